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
// Kernels (launch order, then decode.py adds 1 to seen):
//   nha_decode_evict  grid (ceil((K*M+M*V)/NT), N*H): slot update, one thread per state element
//   nha_decode_read   grid (N, HQ): one softmax over M slot + window logits; the first query
//                     head of each group then writes the new token into row s % W. No block reads
//                     that row (it holds the evicted token, already in the slots), so there is no race.
#include "nha_common.cuh"

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
        w = ld(s_t, o);
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
            if (s_cache != nullptr) st(s_cache, row * M + m, ld(s_t, o_m + m));
        }
    }
}
