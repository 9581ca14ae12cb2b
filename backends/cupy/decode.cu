// NHA decode: one new token per sequence, state updated in place (ring buffer of
// nha_core/state.py: token i lives at row i % W; rows of tokens seen-W+1 .. seen-1 are valid).
//
// With s = state.seen tokens already consumed, the new token is number s:
//   W > 0 and s >= W: token s - W (row s % W) leaves the window and enters the slots with its own
//                     gate; the new token then takes row s % W.
//   W == 0:           the new token itself enters the slots before it is read.
//
//   time ->   ... s-W | s-W+1 ... s-1  s(new)
//             slots --'  `---- window (ring rows) + the new token (read from the inputs)
//
// Two kernel sets, chosen by configs.DECODE_VARIANT (both read this header's semantics):
//
// "split" (default; flash-decoding), launch order, then decode.py adds 1 to seen:
//   nha_decode_window  1-D grid of N*H*(S*QB + 1) blocks; block b serves (n, h) = b / (S*QB + 1) and
//                      part = b % (S*QB + 1):
//                        part <  S*QB  window split j = part % S of query chunk qb = part / S (BG query
//                                      heads of the group): the valid ring rows j*RS .. j*RS + RS - 1
//                                      except row s % W, each read once for the BG queries -> partial j
//                        part == S*QB  the slots: evict (Hk = Hk diag(a) + k_slot (x) s, Hv likewise),
//                                      then slot logits and values of all G query heads -> partial S
//   nha_decode_merge   grid (N*HQ): the new token's logit from the inputs plus the S + 1 partials,
//                      merged by their log-sum-exps -> o, lse; the group's first query head then
//                      writes the new token into ring row s % W.
//   Partials: part_acc [N,HQ,S+1,V] (sum of p * v, unnormalised), part_ml [N,HQ,S+1,2] (max, sum of
//   p), in the log2 domain: logits carry scale * log2(e), so exp2 gives the softmax weights.
//   Ordering (kernels on one stream run one after the other, so no inter-block sync is needed):
//   * ring row s % W holds the evicted token (or was never written while s < W): the slot block
//     reads it, no window block reads it, and only the next kernel (the merge) overwrites it;
//   * hk / hv of (n, h) are touched by its slot block only; with more than SG query heads that block
//     recomputes the evicted state from the old one in every pass and stores it in the last pass;
//   * every partial element is written exactly once (an empty split writes max -inf, sum 0, acc 0),
//     o and lse once per query head by the merge kernel. No atomics: results are deterministic.
//
// "per_head" (the first version, kept for timing against), launch order:
//   nha_decode_evict  grid (ceil((K*M+M*V)/NT), N*H): slot update, one thread per state element
//   nha_decode_read   grid (N, HQ): one softmax over M slot + window logits; the first query
//                     head of each group then writes the new token into row s % W. No block reads
//                     that row (it holds the evicted token, already in the slots), so there is no race.
//
// decode.py sets the split kernels' two tiles (the per-head kernels use neither): BG query heads
// per window block, DC 16-byte chunks per lane of a key / value row. The defaults below are the
// spec decode tile (bf16, K = V = 128, G = 4), so the file also compiles on its own.
#ifndef BG
#define BG 4                             // query heads per window block (a power of two >= G, capped)
#endif
#ifndef DC
#define DC 1                             // 16-byte chunks per lane of a key / value row
#endif
#include "nha_common.cuh"

// The new token's slot write weight at offset o of s / g: given, or derived from its gate
// (s = 1 - exp(g); decode.py passes a null s when the state derives it).
__device__ __forceinline__ float new_token_s(const IN_T* __restrict__ s_t, const IN_T* __restrict__ g_t, i64 o) {
    return s_t != nullptr ? ld(s_t, o) : -expm1f(ld(g_t, o));
}

extern "C" __global__ void __launch_bounds__(NT) nha_decode_evict(
    const IN_T* __restrict__ k_t, const IN_T* __restrict__ v_t, const IN_T* __restrict__ g_t,
    const IN_T* __restrict__ s_t, const IN_T* __restrict__ k_slot_t,
    const CACHE_T* __restrict__ k_cache, const CACHE_T* __restrict__ v_cache,
    const CACHE_T* __restrict__ g_cache, const CACHE_T* __restrict__ s_cache,
    const CACHE_T* __restrict__ k_slot_cache, const i64* __restrict__ seen,
    float* __restrict__ hk, float* __restrict__ hv, int H, int K, int V, int M, int W) {
    const int n = blockIdx.y / H, h = blockIdx.y % H;
    const i64 EK = (i64)K * M, E = EK + (i64)M * V;
    const i64 e = (i64)blockIdx.x * NT + threadIdx.x;
    if (e >= E) return;
    const bool is_k = e < EK;
    const int m = is_k ? (int)(e % M) : (int)((e - EK) / V);
    const int col = is_k ? (int)(e / M) : (int)((e - EK) % V);
    const i64 s_n = seen[n];
    float a, w, u;
    if (W == 0) {
        const i64 o = ((i64)n * H + h) * M + m;
        a = expf(ld(g_t, o));
        w = new_token_s(s_t, g_t, o);
        u = is_k ? ld(k_slot_t, ((i64)n * H + h) * K + col) : ld(v_t, ((i64)n * H + h) * V + col);
    } else if (s_n >= W) {
        const i64 row = ((i64)n * W + s_n % W) * H + h;
        const float gj = ld(g_cache, row * M + m);
        a = expf(gj);
        w = s_cache != nullptr ? ld(s_cache, row * M + m) : -expm1f(gj);  // derived s = 1 - exp(g)
        const CACHE_T* p_k = k_slot_cache != nullptr ? k_slot_cache : k_cache;
        u = is_k ? ld(p_k, row * K + col) : ld(v_cache, row * V + col);
    } else {
        return;  // nothing has left the window yet
    }
    float* p = is_k ? hk + ((i64)n * H + h) * EK + e : hv + ((i64)n * H + h) * M * V + (e - EK);
    *p = a * *p + u * w;
}

// o [N,HQ,V] (IN_T), lse [N,HQ] (float). Needs V <= NT (one value column per thread).
// Static shared memory: slot logits (M <= 256), q and q_slot (K <= 256), one tile of weights.
extern "C" __global__ void __launch_bounds__(NT) nha_decode_read(
    const IN_T* __restrict__ q_t, const IN_T* __restrict__ k_t, const IN_T* __restrict__ v_t,
    const IN_T* __restrict__ g_t, const IN_T* __restrict__ s_t, const IN_T* __restrict__ q_slot_t,
    const IN_T* __restrict__ k_slot_t, CACHE_T* __restrict__ k_cache, CACHE_T* __restrict__ v_cache,
    CACHE_T* __restrict__ g_cache, CACHE_T* __restrict__ s_cache, CACHE_T* __restrict__ k_slot_cache,
    const i64* __restrict__ seen, const float* __restrict__ hk, const float* __restrict__ hv,
    IN_T* __restrict__ o, float* __restrict__ lse, int HQ, int H, int K, int V, int M, int W,
    float scale) {
    __shared__ float L_s[256];
    __shared__ float q_s[256];
    __shared__ float qs_s[256];
    __shared__ float P_s[NT];
    __shared__ float red[NT / 32];
    const int n = blockIdx.x, i_hq = blockIdx.y, G = HQ / H, i_h = i_hq / G;
    const int tid = threadIdx.x;
    const i64 s_n = seen[n];
    const i64 o_q = ((i64)n * HQ + i_hq) * K;

    for (int kk = tid; kk < K; kk += NT) {
        q_s[kk] = ld(q_t, o_q + kk);
        qs_s[kk] = ld(q_slot_t, o_q + kk);
    }
    __syncthreads();

    // Slot logits, one thread per slot (hk is already updated by nha_decode_evict).
    const float* p_hk = hk + ((i64)n * H + i_h) * K * M;
    float mx_loc = -INFINITY;
    for (int m = tid; m < M; m += NT) {
        float d = 0.f;
        for (int kk = 0; kk < K; ++kk) d += qs_s[kk] * p_hk[(i64)kk * M + m];
        L_s[m] = scale * d;
        mx_loc = fmaxf(mx_loc, scale * d);
    }
    float mx = block_max(mx_loc, red);
    float l_loc = 0.f;
    for (int m = tid; m < M; m += NT) l_loc += exp_sub(L_s[m], mx);
    float l = block_sum(l_loc, red);

    // Window: old tokens lo .. s-1 from the ring, then the new token (index nw - 1).
    const i64 lo = W > 0 ? max((i64)0, s_n - W + 1) : s_n;
    const int nw = W > 0 ? (int)(s_n - lo + 1) : 0;
    float acc = 0.f;  // value column tid
    for (int base = 0; base < nw; base += NT) {
        const int idx = base + tid;
        float x = -INFINITY;
        if (idx < nw) {
            float d = 0.f;
            if (idx == nw - 1) {
                for (int kk = 0; kk < K; ++kk) d += q_s[kk] * ld(k_t, ((i64)n * H + i_h) * K + kk);
            } else {
                const i64 row = ((i64)n * W + (lo + idx) % W) * H + i_h;
                for (int kk = 0; kk < K; ++kk) d += q_s[kk] * ld(k_cache, row * K + kk);
            }
            x = scale * d;
        }
        const float mx_new = fmaxf(mx, block_max(x, red));
        const float c = exp_sub(mx, mx_new);
        const float pw = exp_sub(x, mx_new);
        P_s[tid] = pw;
        l = l * c + block_sum(pw, red);  // its barriers also publish P_s
        mx = mx_new;
        if (tid < V) {
            acc *= c;
            const int cnt = min(NT, nw - base);
            for (int jj = 0; jj < cnt; ++jj) {
                const int id = base + jj;
                const float vj = id == nw - 1
                                     ? ld(v_t, ((i64)n * H + i_h) * V + tid)
                                     : ld(v_cache, (((i64)n * W + (lo + id) % W) * H + i_h) * V + tid);
                acc += P_s[jj] * vj;
            }
        }
        __syncthreads();  // P_s is rewritten by the next tile
    }

    const float inv = l > 0.f ? 1.f / l : 0.f;  // l == 0 only when M == 0 and W == 0
    if (tid < V) {
        const float* p_hv = hv + ((i64)n * H + i_h) * M * V;
        for (int m = 0; m < M; ++m) acc += exp_sub(L_s[m], mx) * p_hv[(i64)m * V + tid];
        st(o, ((i64)n * HQ + i_hq) * V + tid, acc * inv);
    }
    if (tid == 0) lse[(i64)n * HQ + i_hq] = l > 0.f ? mx + logf(l) : -INFINITY;

    // The new token takes ring row s % W (written once per KV head).
    if (W > 0 && i_hq % G == 0) {
        const i64 row = ((i64)n * W + s_n % W) * H + i_h;
        const i64 o_k = ((i64)n * H + i_h) * K, o_v = ((i64)n * H + i_h) * V, o_m = ((i64)n * H + i_h) * M;
        for (int kk = tid; kk < K; kk += NT) {
            st(k_cache, row * K + kk, ld(k_t, o_k + kk));
            if (k_slot_cache != nullptr) st(k_slot_cache, row * K + kk, ld(k_slot_t, o_k + kk));
        }
        for (int vv = tid; vv < V; vv += NT) st(v_cache, row * V + vv, ld(v_t, o_v + vv));
        for (int m = tid; m < M; m += NT) {
            st(g_cache, row * M + m, ld(g_t, o_m + m));
            if (s_cache != nullptr) st(s_cache, row * M + m, new_token_s(s_t, g_t, o_m + m));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Split-window decode ("split"): tiles. A window block runs NS = NT / LR independent row streams
// (one per LR lanes); each streams TR ring rows per step, the next step's rows already in flight
// (double-buffered registers), and keeps its own online softmax; the streams merge once at the end.
#define LR 16                            // lanes per row: 16 x 16 B covers a 256-byte bf16 row of 128
#define NS (NT / LR)                     // row streams per block
#ifndef TR
#define TR 2                             // rows per stream per step
#endif
#ifndef STG
#define STG 0                            // steps of the cp.async ring in shared memory (configs.DECODE_STAGES);
#endif                                   // 0: the next step's rows are prefetched in registers
#define BR (NS * TR)                     // ring rows per block step (configs.DECODE_BR)
#define VEC (16 / (int)sizeof(CACHE_T))  // elements per 16-byte load
#define EL (DC * VEC)                    // elements of a row per lane: element (d*LR + lane)*VEC + e
#define SG 4                             // query heads per pass of the slot block ([SG, 256] shared)
#define UNR 8                            // state loads in flight per thread in the slot block
#define LN2 0.6931471805599453f

// exp2(a - b) for a running max b in the log2 domain; b = -inf (nothing seen yet) gives 0, not NaN.
__device__ __forceinline__ float exp2_sub(float a, float b) {
    return (b == -INFINITY) ? 0.f : exp2f(a - b);
}

template <int S> struct raw_bits;
template <> struct raw_bits<2> { typedef unsigned short t; };
template <> struct raw_bits<4> { typedef unsigned int t; };
typedef raw_bits<sizeof(CACHE_T)>::t CACHE_RAW;
union chunk16 {
    uint4 u;
    CACHE_RAW e[VEC];
};

// Elements kb .. kb+VEC-1 of the row at p (those < D; zeros past the end). vec: D % VEC == 0 and the
// row is 16-byte aligned, so a chunk is whole (one 16-byte load) or entirely past the end.
__device__ __forceinline__ uint4 ld_chunk(const CACHE_T* __restrict__ p, int kb, int D, bool vec) {
    chunk16 c;
    c.u = make_uint4(0u, 0u, 0u, 0u);
    if (vec) {
        if (kb < D) c.u = __ldg(reinterpret_cast<const uint4*>(p + kb));
    } else {
        const CACHE_RAW* p_r = reinterpret_cast<const CACHE_RAW*>(p);
#pragma unroll
        for (int e = 0; e < VEC; ++e)
            if (kb + e < D) c.e[e] = p_r[kb + e];
    }
    return c.u;
}

// 16 bytes of cache elements -> VEC floats (the tag picks the element type).
__device__ __forceinline__ void to_float(uint4 u, float* f, const __nv_bfloat16*) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void to_float(uint4 u, float* f, const __half*) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __half2float(__ushort_as_half((unsigned short)(w[i] & 0xffffu)));
        f[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(w[i] >> 16)));
    }
}
__device__ __forceinline__ void to_float(uint4 u, float* f, const float*) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
}

// Shared memory of one window block: the per-warp partials of one query head at a time.
struct WindowSmem {
    float acc[(NT / 32) * LR * EL];  // [NT/32, LR*EL]
    float ml[2 * (NT / 32)];         // [NT/32, 2]: max, sum
};

// Shared memory of one slot block.
struct SlotSmem {
    float a[256], w[256], uk[256], uv[256];  // evicted token: exp(g), s [M]; k_slot [K]; v [V]
    float qs[SG * 256];                      // [SG, K] slot queries (scaled)
    float L[SG * 256];                       // [SG, M] slot logits, then their softmax weights
    float red[SG * NT];                      // [SG, NT] per-thread partial sums
    float ml[2 * SG];                        // [SG, 2]
};

// One step of a row stream: TR rows (key chunks b_k, value chunks b_v of this lane) from ring row
// base + t * NS + i_s; rows at or past r1 and row r_new are masked. Logits of the BG queries, online
// softmax (b_m, b_l), value accumulation (b_acc).
__device__ __forceinline__ void window_step(
    const uint4 (&b_k)[TR][DC], const uint4 (&b_v)[TR][DC], int base, int i_s, int r1, int r_new,
    const float (&b_q)[BG][EL], float (&b_acc)[BG][EL], float (&b_m)[BG], float (&b_l)[BG]) {
    const CACHE_T* tag = nullptr;
    float b_x[TR][BG];  // logits (log2 domain), then softmax weights
#pragma unroll
    for (int t = 0; t < TR; ++t) {
        float f[EL];
#pragma unroll
        for (int d = 0; d < DC; ++d) to_float(b_k[t][d], f + d * VEC, tag);
#pragma unroll
        for (int g = 0; g < BG; ++g) {
            float x = 0.f;
#pragma unroll
            for (int e = 0; e < EL; ++e) x = fmaf(b_q[g][e], f[e], x);
#pragma unroll
            for (int o = LR / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
            b_x[t][g] = x;
        }
        const int row = base + t * NS + i_s;
        if (row >= r1 || row == r_new) {
#pragma unroll
            for (int g = 0; g < BG; ++g) b_x[t][g] = -INFINITY;
        }
    }
#pragma unroll
    for (int g = 0; g < BG; ++g) {
        float mt = b_x[0][g];
#pragma unroll
        for (int t = 1; t < TR; ++t) mt = fmaxf(mt, b_x[t][g]);
        const float mn = fmaxf(b_m[g], mt);
        const float corr = exp2_sub(b_m[g], mn);
        float ps = 0.f;
#pragma unroll
        for (int t = 0; t < TR; ++t) {
            b_x[t][g] = exp2_sub(b_x[t][g], mn);
            ps += b_x[t][g];
        }
        b_l[g] = b_l[g] * corr + ps;
        b_m[g] = mn;
#pragma unroll
        for (int e = 0; e < EL; ++e) b_acc[g][e] *= corr;
    }
#pragma unroll
    for (int t = 0; t < TR; ++t) {
        float f[EL];
#pragma unroll
        for (int d = 0; d < DC; ++d) to_float(b_v[t][d], f + d * VEC, tag);
#pragma unroll
        for (int g = 0; g < BG; ++g)
#pragma unroll
            for (int e = 0; e < EL; ++e) b_acc[g][e] = fmaf(b_x[t][g], f[e], b_acc[g][e]);
    }
}

#if STG > 0
// cp.async (sm_80+): 16 bytes global -> shared, bypassing L1; src_size 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Ring of STG steps in shared memory [STG][TR][DC][2 (key, value)][NT] 16-byte chunks: each thread
// copies, and later reads back, only its own chunks, so no barrier is needed between the two.
typedef uint4 WindowRing[STG][TR][DC][2][NT];
typedef WindowRing* WindowRingPtr;

// Start the copies of one step (rows base + t * NS + i_s) into ring slot st, as one commit group.
__device__ __forceinline__ void window_issue(WindowRing& ring, int st, const CACHE_T* __restrict__ p_k,
                                             const CACHE_T* __restrict__ p_v, i64 o_rk, i64 o_rv, int base,
                                             int i_s, int c, int r1, int r_new, int K, int V) {
#pragma unroll
    for (int t = 0; t < TR; ++t) {
        const int row = base + t * NS + i_s;
        const bool ok = row < r1 && row != r_new;
#pragma unroll
        for (int d = 0; d < DC; ++d) {
            const int kb = (d * LR + c) * VEC;
            cp_async16(&ring[st][t][d][0][threadIdx.x], ok && kb < K ? p_k + row * o_rk + kb : p_k, ok && kb < K);
            cp_async16(&ring[st][t][d][1][threadIdx.x], ok && kb < V ? p_v + row * o_rv + kb : p_v, ok && kb < V);
        }
    }
    cp_async_commit();
}
#else
typedef void* WindowRingPtr;  // no ring: the register-prefetch loop only
#endif

// Window split j of query chunk qb for (n, h): partial j of the BG query heads hq0 .. hq0+gq-1.
__device__ __forceinline__ void window_part(
    const IN_T* __restrict__ q_t, const CACHE_T* __restrict__ k_cache, const CACHE_T* __restrict__ v_cache,
    i64 s_n, float* __restrict__ part_acc, float* __restrict__ part_ml, WindowSmem& sm, WindowRingPtr ring, int n,
    int h, int qb, int j, int P, int HQ, int H, int K, int V, int W, int RS, bool vec_k, bool vec_v, float qscale) {
    const int tid = threadIdx.x, c = tid % LR, i_s = tid / LR, lane = tid % 32, i_w = tid / 32;
    const int G = HQ / H, gq = min(BG, G - qb * BG), hq0 = h * G + qb * BG;
    const int n_valid = (int)min(s_n + 1, (i64)W);  // rows 0 .. n_valid-1 hold tokens, except r_new
    const int r_new = (int)(s_n % W);               // the evicted token's row (or unwritten if s < W)
    const int r0 = j * RS, r1 = min(r0 + RS, n_valid);

    float b_q[BG][EL];  // [BG, EL] queries of this lane's key elements, times scale * log2(e)
#pragma unroll
    for (int g = 0; g < BG; ++g)
#pragma unroll
        for (int d = 0; d < DC; ++d)
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const int kk = (d * LR + c) * VEC + e;
                b_q[g][d * VEC + e] = (g < gq && kk < K) ? ld(q_t, ((i64)n * HQ + hq0 + g) * K + kk) * qscale : 0.f;
            }
    float b_acc[BG][EL], b_m[BG], b_l[BG];  // [BG, EL] value elements; running max / sum per query
#pragma unroll
    for (int g = 0; g < BG; ++g) {
        b_m[g] = -INFINITY;
        b_l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < EL; ++e) b_acc[g][e] = 0.f;
    }

    const i64 o_rk = (i64)H * K, o_rv = (i64)H * V;  // ring row strides
    const CACHE_T* p_k = k_cache + ((i64)n * W * H + h) * K;
    const CACHE_T* p_v = v_cache + ((i64)n * W * H + h) * V;
#if STG > 0
    if (vec_k && vec_v) {  // STG - 1 steps in flight through shared memory (whole 16-byte chunks only)
        const int steps = r1 > r0 ? (r1 - r0 + BR - 1) / BR : 0;
#pragma unroll
        for (int i = 0; i < STG - 1; ++i) {
            if (i < steps) window_issue(*ring, i, p_k, p_v, o_rk, o_rv, r0 + i * BR, i_s, c, r1, r_new, K, V);
            else cp_async_commit();  // empty groups keep the count: step i is group i
        }
        for (int i = 0; i < steps; ++i) {
            const int ahead = i + STG - 1;  // its slot was read back (into registers) at step i - 1
            if (ahead < steps) window_issue(*ring, ahead % STG, p_k, p_v, o_rk, o_rv, r0 + ahead * BR, i_s, c, r1, r_new, K, V);
            else cp_async_commit();
            cp_async_wait<STG - 1>();  // groups 0 .. i are complete
            uint4 b_k[TR][DC], b_v[TR][DC];
            const int st = i % STG;
#pragma unroll
            for (int t = 0; t < TR; ++t)
#pragma unroll
                for (int d = 0; d < DC; ++d) {
                    b_k[t][d] = (*ring)[st][t][d][0][threadIdx.x];
                    b_v[t][d] = (*ring)[st][t][d][1][threadIdx.x];
                }
            window_step(b_k, b_v, r0 + i * BR, i_s, r1, r_new, b_q, b_acc, b_m, b_l);
        }
        cp_async_wait<0>();
    } else
#endif
    {
        uint4 b_kn[TR][DC], b_vn[TR][DC];  // the next step's rows, loaded one step ahead (registers)
#pragma unroll
        for (int t = 0; t < TR; ++t) {
            const int row = r0 + t * NS + i_s;
            const bool ok = row < r1 && row != r_new;
#pragma unroll
            for (int d = 0; d < DC; ++d) {
                b_kn[t][d] = ok ? ld_chunk(p_k + row * o_rk, (d * LR + c) * VEC, K, vec_k) : make_uint4(0u, 0u, 0u, 0u);
                b_vn[t][d] = ok ? ld_chunk(p_v + row * o_rv, (d * LR + c) * VEC, V, vec_v) : make_uint4(0u, 0u, 0u, 0u);
            }
        }
        for (int base = r0; base < r1; base += BR) {  // the same trip count for every thread of the block
            uint4 b_k[TR][DC], b_v[TR][DC];  // [TR, 16 B x DC] this step's key and value chunks
#pragma unroll
            for (int t = 0; t < TR; ++t)
#pragma unroll
                for (int d = 0; d < DC; ++d) {
                    b_k[t][d] = b_kn[t][d];
                    b_v[t][d] = b_vn[t][d];
                }
            if (base + BR < r1) {
#pragma unroll
                for (int t = 0; t < TR; ++t) {
                    const int row = base + BR + t * NS + i_s;
                    const bool ok = row < r1 && row != r_new;
#pragma unroll
                    for (int d = 0; d < DC; ++d) {
                        b_kn[t][d] = ok ? ld_chunk(p_k + row * o_rk, (d * LR + c) * VEC, K, vec_k) : make_uint4(0u, 0u, 0u, 0u);
                        b_vn[t][d] = ok ? ld_chunk(p_v + row * o_rv, (d * LR + c) * VEC, V, vec_v) : make_uint4(0u, 0u, 0u, 0u);
                    }
                }
            }
            window_step(b_k, b_v, base, i_s, r1, r_new, b_q, b_acc, b_m, b_l);
        }
    }

    // Merge the two streams of each warp (lanes l and l + 16), then the warps through shared memory.
#pragma unroll
    for (int g = 0; g < BG; ++g) {
        const float mo = __shfl_xor_sync(0xffffffffu, b_m[g], 16);
        const float lo = __shfl_xor_sync(0xffffffffu, b_l[g], 16);
        const float mn = fmaxf(b_m[g], mo);
        const float c1 = exp2_sub(b_m[g], mn), c2 = exp2_sub(mo, mn);
        b_l[g] = b_l[g] * c1 + lo * c2;
        b_m[g] = mn;
#pragma unroll
        for (int e = 0; e < EL; ++e) {
            const float ao = __shfl_xor_sync(0xffffffffu, b_acc[g][e], 16);
            b_acc[g][e] = b_acc[g][e] * c1 + ao * c2;
        }
    }
#pragma unroll
    for (int g = 0; g < BG; ++g) {
        if (g < gq) {  // uniform across the block
            __syncthreads();  // the previous head's partials have been read
            if (lane < LR) {
#pragma unroll
                for (int d = 0; d < DC; ++d)
#pragma unroll
                    for (int e = 0; e < VEC; ++e) sm.acc[i_w * (LR * EL) + (d * LR + lane) * VEC + e] = b_acc[g][d * VEC + e];
            }
            if (lane == 0) {
                sm.ml[2 * i_w] = b_m[g];
                sm.ml[2 * i_w + 1] = b_l[g];
            }
            __syncthreads();
            float mx = -INFINITY;
            for (int w = 0; w < NT / 32; ++w) mx = fmaxf(mx, sm.ml[2 * w]);
            const i64 o_p = ((i64)n * HQ + hq0 + g) * P + j;
            for (int vv = tid; vv < V; vv += NT) {
                float a = 0.f;
                for (int w = 0; w < NT / 32; ++w) a += exp2_sub(sm.ml[2 * w], mx) * sm.acc[w * (LR * EL) + vv];
                part_acc[o_p * V + vv] = a;
            }
            if (tid == 0) {
                float l = 0.f;
                for (int w = 0; w < NT / 32; ++w) l += exp2_sub(sm.ml[2 * w], mx) * sm.ml[2 * w + 1];
                part_ml[2 * o_p] = mx;
                part_ml[2 * o_p + 1] = l;
            }
        }
    }
}

// The slots of (n, h): evict, then partial S (slot logits and values) of all G query heads.
__device__ __forceinline__ void slot_part(
    const IN_T* __restrict__ v_t, const IN_T* __restrict__ g_t, const IN_T* __restrict__ s_t,
    const IN_T* __restrict__ q_slot_t, const IN_T* __restrict__ k_slot_t, const CACHE_T* __restrict__ k_cache,
    const CACHE_T* __restrict__ v_cache, const CACHE_T* __restrict__ g_cache, const CACHE_T* __restrict__ s_cache,
    const CACHE_T* __restrict__ k_slot_cache, i64 s_n, float* __restrict__ hk, float* __restrict__ hv,
    float* __restrict__ part_acc, float* __restrict__ part_ml, SlotSmem& sm, int n, int h, int S, int P,
    int HQ, int H, int K, int V, int M, int W, float qscale) {
    const int tid = threadIdx.x, lane = tid % 32, i_w = tid / 32;
    const int G = HQ / H;
    const i64 nh = (i64)n * H + h;
    if (M == 0) {  // no slots: an empty partial for every query head of the group
        for (int idx = tid; idx < G * V; idx += NT)
            part_acc[(((i64)n * HQ + h * G + idx / V) * P + S) * V + idx % V] = 0.f;
        for (int g = tid; g < G; g += NT) {
            const i64 o_p = ((i64)n * HQ + h * G + g) * P + S;
            part_ml[2 * o_p] = -INFINITY;
            part_ml[2 * o_p + 1] = 0.f;
        }
        return;
    }
    const bool ev = W == 0 || s_n >= W;  // a token enters the slots at this step
    if (ev) {
        if (W == 0) {  // the new token itself (s derived in the kernel when not given)
            for (int m = tid; m < M; m += NT) {
                sm.a[m] = expf(ld(g_t, nh * M + m));
                sm.w[m] = new_token_s(s_t, g_t, nh * M + m);
            }
            for (int kk = tid; kk < K; kk += NT) sm.uk[kk] = ld(k_slot_t, nh * K + kk);
            for (int vv = tid; vv < V; vv += NT) sm.uv[vv] = ld(v_t, nh * V + vv);
        } else {  // token s - W from ring row s % W, with its own gate
            const i64 row = ((i64)n * W + s_n % W) * H + h;
            const CACHE_T* p_ks = k_slot_cache != nullptr ? k_slot_cache : k_cache;
            for (int m = tid; m < M; m += NT) {
                const float gj = ld(g_cache, row * M + m);
                sm.a[m] = expf(gj);
                sm.w[m] = s_cache != nullptr ? ld(s_cache, row * M + m) : -expm1f(gj);  // derived s = 1 - exp(g)
            }
            for (int kk = tid; kk < K; kk += NT) sm.uk[kk] = ld(p_ks, row * K + kk);
            for (int vv = tid; vv < V; vv += NT) sm.uv[vv] = ld(v_cache, row * V + vv);
        }
    }
    float* p_hk = hk + nh * K * M;  // [K, M]
    float* p_hv = hv + nh * M * V;  // [M, V]
    const int KS = NT / M, m_me = tid % M, i_ks = tid / M;  // pass 1: thread (i_ks, m_me) walks rows i_ks + KS*i of Hk
    const int VS = NT / V, v_me = tid % V, i_vs = tid / V;  // pass 2: thread (i_vs, v_me) walks rows i_vs + VS*i of Hv
    const int n_pass = (G + SG - 1) / SG;
    for (int i_p = 0; i_p < n_pass; ++i_p) {
        const bool store = ev && i_p == n_pass - 1;  // write the evicted state back in the last pass only
        const int gq = min(SG, G - i_p * SG), hq0 = h * G + i_p * SG;
        __syncthreads();  // the eviction operands are published; the previous pass is done with qs / L / red
        for (int idx = tid; idx < SG * K; idx += NT) {
            const int g = idx / K, kk = idx % K;
            sm.qs[idx] = g < gq ? ld(q_slot_t, ((i64)n * HQ + hq0 + g) * K + kk) * qscale : 0.f;
        }
        __syncthreads();
        float b_d[SG];
#pragma unroll
        for (int g = 0; g < SG; ++g) b_d[g] = 0.f;
        if (i_ks < KS) {
            for (int k0 = i_ks; k0 < K; k0 += KS * UNR) {
                float b_h[UNR];  // [UNR] state elements in flight
#pragma unroll
                for (int u = 0; u < UNR; ++u) {
                    const int kk = k0 + u * KS;
                    b_h[u] = kk < K ? p_hk[(i64)kk * M + m_me] : 0.f;
                }
#pragma unroll
                for (int u = 0; u < UNR; ++u) {
                    const int kk = k0 + u * KS;
                    if (kk < K) {
                        float x = b_h[u];
                        if (ev) {
                            x = sm.a[m_me] * x + sm.uk[kk] * sm.w[m_me];
                            if (store) p_hk[(i64)kk * M + m_me] = x;
                        }
#pragma unroll
                        for (int g = 0; g < SG; ++g) b_d[g] = fmaf(sm.qs[g * K + kk], x, b_d[g]);
                    }
                }
            }
        }
#pragma unroll
        for (int g = 0; g < SG; ++g) sm.red[g * NT + tid] = b_d[g];
        __syncthreads();
        for (int idx = tid; idx < gq * M; idx += NT) {
            const int g = idx / M, m = idx % M;
            float x = 0.f;
            for (int i = 0; i < KS; ++i) x += sm.red[g * NT + i * M + m];  // fixed order: deterministic
            sm.L[g * M + m] = x;
        }
        __syncthreads();
        if (i_w < gq) {  // warp i_w: softmax of query head i_w over its M slot logits
            float mx = -INFINITY;
            for (int m = lane; m < M; m += 32) mx = fmaxf(mx, sm.L[i_w * M + m]);
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float l = 0.f;
            for (int m = lane; m < M; m += 32) {
                const float p = exp2_sub(sm.L[i_w * M + m], mx);
                sm.L[i_w * M + m] = p;
                l += p;
            }
            for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
            if (lane == 0) {
                sm.ml[2 * i_w] = mx;
                sm.ml[2 * i_w + 1] = l;
            }
        }
        __syncthreads();
        float b_a[SG];
#pragma unroll
        for (int g = 0; g < SG; ++g) b_a[g] = 0.f;
        if (i_vs < VS) {
            for (int m0 = i_vs; m0 < M; m0 += VS * UNR) {
                float b_h[UNR];
#pragma unroll
                for (int u = 0; u < UNR; ++u) {
                    const int m = m0 + u * VS;
                    b_h[u] = m < M ? p_hv[(i64)m * V + v_me] : 0.f;
                }
#pragma unroll
                for (int u = 0; u < UNR; ++u) {
                    const int m = m0 + u * VS;
                    if (m < M) {
                        float x = b_h[u];
                        if (ev) {
                            x = sm.a[m] * x + sm.w[m] * sm.uv[v_me];
                            if (store) p_hv[(i64)m * V + v_me] = x;
                        }
#pragma unroll
                        for (int g = 0; g < SG; ++g) b_a[g] = fmaf(g < gq ? sm.L[g * M + m] : 0.f, x, b_a[g]);
                    }
                }
            }
        }
#pragma unroll
        for (int g = 0; g < SG; ++g) sm.red[g * NT + tid] = b_a[g];
        __syncthreads();
        for (int idx = tid; idx < gq * V; idx += NT) {
            const int g = idx / V, vv = idx % V;
            float x = 0.f;
            for (int i = 0; i < VS; ++i) x += sm.red[g * NT + i * V + vv];
            part_acc[(((i64)n * HQ + hq0 + g) * P + S) * V + vv] = x;
        }
        if (tid < gq) {
            const i64 o_p = ((i64)n * HQ + hq0 + tid) * P + S;
            part_ml[2 * o_p] = sm.ml[2 * tid];
            part_ml[2 * o_p + 1] = sm.ml[2 * tid + 1];
        }
    }
}

// part_acc [N,HQ,S+1,V], part_ml [N,HQ,S+1,2] (float); hk / hv updated in place. Needs K, V, M <= 256.
// vec_k / vec_v: K (V) % VEC == 0 and the cache 16-byte aligned (decode.py checks), else scalar loads.
extern "C" __global__ void __launch_bounds__(NT, 2) nha_decode_window(
    const IN_T* __restrict__ q_t, const IN_T* __restrict__ v_t, const IN_T* __restrict__ g_t,
    const IN_T* __restrict__ s_t, const IN_T* __restrict__ q_slot_t, const IN_T* __restrict__ k_slot_t,
    const CACHE_T* __restrict__ k_cache, const CACHE_T* __restrict__ v_cache, const CACHE_T* __restrict__ g_cache,
    const CACHE_T* __restrict__ s_cache, const CACHE_T* __restrict__ k_slot_cache, const i64* __restrict__ seen,
    float* __restrict__ hk, float* __restrict__ hv, float* __restrict__ part_acc, float* __restrict__ part_ml,
    int HQ, int H, int K, int V, int M, int W, int S, int RS, int vec_k, int vec_v, float qscale) {
    __shared__ union {  // a block is a slot block or a window block; the ring is used before sm_w
        WindowSmem w;
        SlotSmem s;
#if STG > 0
        WindowRing ring;
#endif
    } sm;
    const int G = HQ / H, QB = (G + BG - 1) / BG, NP = S * QB + 1, P = S + 1;
    const i64 i_pair = (i64)blockIdx.x / NP;
    const int part = (int)((i64)blockIdx.x % NP);
    const int n = (int)(i_pair / H), h = (int)(i_pair % H);
    const i64 s_n = seen[n];
    if (part == S * QB) {
        slot_part(v_t, g_t, s_t, q_slot_t, k_slot_t, k_cache, v_cache, g_cache, s_cache, k_slot_cache, s_n, hk, hv,
                  part_acc, part_ml, sm.s, n, h, S, P, HQ, H, K, V, M, W, qscale);
    } else {  // S >= 1 implies W >= 2
#if STG > 0
        WindowRingPtr ring = &sm.ring;
#else
        WindowRingPtr ring = nullptr;
#endif
        window_part(q_t, k_cache, v_cache, s_n, part_acc, part_ml, sm.w, ring, n, h, part / S, part % S, P, HQ, H,
                    K, V, W, RS, vec_k != 0, vec_v != 0, qscale);
    }
}

// o [N,HQ,V] (IN_T), lse [N,HQ] (float): the new token plus the P = S + 1 partials of each query head.
extern "C" __global__ void __launch_bounds__(NT) nha_decode_merge(
    const IN_T* __restrict__ q_t, const IN_T* __restrict__ k_t, const IN_T* __restrict__ v_t,
    const IN_T* __restrict__ g_t, const IN_T* __restrict__ s_t, const IN_T* __restrict__ k_slot_t,
    CACHE_T* __restrict__ k_cache, CACHE_T* __restrict__ v_cache, CACHE_T* __restrict__ g_cache,
    CACHE_T* __restrict__ s_cache, CACHE_T* __restrict__ k_slot_cache, const i64* __restrict__ seen,
    const float* __restrict__ part_acc, const float* __restrict__ part_ml, IN_T* __restrict__ o,
    float* __restrict__ lse, int HQ, int H, int K, int V, int M, int W, int P, float qscale) {
    __shared__ float red[NT / 32];
    const int tid = threadIdx.x;
    const i64 i_nq = blockIdx.x, n = i_nq / HQ;
    const int hq = (int)(i_nq % HQ), G = HQ / H, h = hq / G;
    const i64 nh = n * H + h;
    float x_new = -INFINITY;  // the new token's logit (log2 domain); no window when W == 0
    if (W > 0) {
        float d = 0.f;
        for (int kk = tid; kk < K; kk += NT) d += ld(q_t, i_nq * K + kk) * ld(k_t, nh * K + kk);
        x_new = block_sum(d, red) * qscale;
    }
    const float* p_ml = part_ml + i_nq * P * 2;
    float mx = x_new;
    for (int i = 0; i < P; ++i) mx = fmaxf(mx, p_ml[2 * i]);
    const float c_new = exp2_sub(x_new, mx);
    float l = c_new;
    for (int i = 0; i < P; ++i) l += exp2_sub(p_ml[2 * i], mx) * p_ml[2 * i + 1];  // fixed order
    const float inv = l > 0.f ? 1.f / l : 0.f;  // l == 0 only when M == 0 and W == 0
    for (int vv = tid; vv < V; vv += NT) {
        float a = W > 0 ? c_new * ld(v_t, nh * V + vv) : 0.f;
        for (int i = 0; i < P; ++i) a += exp2_sub(p_ml[2 * i], mx) * part_acc[(i_nq * P + i) * V + vv];
        st(o, i_nq * V + vv, a * inv);
    }
    if (tid == 0) lse[i_nq] = l > 0.f ? (mx + log2f(l)) * LN2 : -INFINITY;

    // The new token takes ring row s % W (once per KV head). Nothing reads ring rows in this kernel,
    // and the window kernel that read the other rows (and the slot block that read this one) is done.
    if (W > 0 && hq % G == 0) {
        const i64 s_n = seen[n];
        const i64 row = (n * W + s_n % W) * H + h;
        for (int kk = tid; kk < K; kk += NT) {
            st(k_cache, row * K + kk, ld(k_t, nh * K + kk));
            if (k_slot_cache != nullptr) st(k_slot_cache, row * K + kk, ld(k_slot_t, nh * K + kk));
        }
        for (int vv = tid; vv < V; vv += NT) st(v_cache, row * V + vv, ld(v_t, nh * V + vv));
        for (int m = tid; m < M; m += NT) {
            st(g_cache, row * M + m, ld(g_t, nh * M + m));
            if (s_cache != nullptr) st(s_cache, row * M + m, new_token_s(s_t, g_t, nh * M + m));
        }
    }
}
