// NHA forward: chunk states, then one block per (chunk, query head). Three kernel sets, picked by
// forward.py: CUDA cores (this part; fp32, and any shape), WMMA tensor cores (fp16 / bf16, K, V, M
// multiples of 16: "Tensor-core forward" below) and register tiles on mma.sync (bf16 up to 128:
// "Register-tile forward" at the end, with nha_fwd_redo from this part for the chunks it leaves).
//
// Shift trick (notes MATH.md section 1): the slot state read by the query at position t has
// absorbed the "shifted" tokens t' <= t, where shifted token t' is the real token j = t' - W
// (identity, alpha = 1 and no write, when j < bos). So queries and slot writes share one time
// axis and one chunk grid:
//
//   tokens:  0 ........ t-W | t-W+1 ...... t
//            `-- slots ----' `-- window ---'     one softmax over M slot + <= W window logits
//
// Kernels (launch order):
//   nha_fwd_chunk_state  grid (ceil((K*M + M*V) / NT), N*H): one thread per state element runs
//                        the exact elementwise recurrence over the sequence and stores the state
//                        at every chunk start (and the final state). Products of alphas only, no
//                        exp(-cumsum): g = -inf is an exact reset and nothing can overflow.
//   nha_fwd_main         grid (NC, HQ): slot logits from the chunk-start state by the same
//                        elementwise recurrence inside the chunk, online softmax over the window
//                        band in BS-key tiles (no T*W buffer), then the slot values.
//
// Rows are flattened tokens r = b*T + t (varlen: B == 1, rows of sequence n are
// bos_arr[n] .. bos_arr[n+1]-1). Chunk c covers rows chunk_t0[c] .. +BT of sequence chunk_n[c].
#include "nha_common.cuh"

// Shifted-token view of row t: alpha = exp(g_j), write weight s_j, for j = t - W.
__device__ __forceinline__ void shifted_gate(const IN_T* g, const IN_T* s, i64 t, i64 bos, int W,
                                             int H, int M, int h, int m, float& a, float& w) {
    i64 j = t - W;
    if (j >= bos && m < M) {
        i64 o = (j * H + h) * M + m;
        const float gr = ld(g, o);
        a = expf(gr);  // g = -inf gives exactly 0
        w = s != nullptr ? ld(s, o) : -expm1f(gr);
    } else {
        a = 1.f;
        w = 0.f;
    }
}

// hk_chunks [NC,H,K,M], hv_chunks [NC,H,M,V]: state before chunk c (after shifted rows < t0).
// hk_out/hv_out [N,H,K,M]/[N,H,M,V] (may be null): state after the last row of each sequence.
extern "C" __global__ void __launch_bounds__(NT) nha_fwd_chunk_state(
    const IN_T* __restrict__ k_slot, const IN_T* __restrict__ v, const IN_T* __restrict__ g,
    const IN_T* __restrict__ s, const float* __restrict__ hk0, const float* __restrict__ hv0,
    const i64* __restrict__ bos_arr, const int* __restrict__ seq_chunk0,
    float* __restrict__ hk_chunks, float* __restrict__ hv_chunks,
    float* __restrict__ hk_out, float* __restrict__ hv_out, int H, int K, int V, int M, int W) {
    const int n = blockIdx.y / H, h = blockIdx.y % H;
    const i64 EK = (i64)K * M, E = EK + (i64)M * V;
    const i64 e = (i64)blockIdx.x * NT + threadIdx.x;
    if (e >= E) return;  // no barriers below
    const bool is_k = e < EK;
    // Hk element (k, m) = e; Hv element (m, vv) = e - EK.
    const int m = is_k ? (int)(e % M) : (int)((e - EK) / V);
    const int col = is_k ? (int)(e / M) : (int)((e - EK) % V);  // k or vv
    const i64 bos = bos_arr[n], eos = bos_arr[n + 1];
    const int c0 = seq_chunk0[n], c1 = seq_chunk0[n + 1];

    float x = 0.f;
    if (hk0 != nullptr) x = is_k ? hk0[((i64)n * H + h) * EK + e] : hv0[((i64)n * H + h) * M * V + (e - EK)];

    for (int c = c0; c < c1; ++c) {
        if (is_k) hk_chunks[((i64)c * H + h) * EK + e] = x;
        else hv_chunks[((i64)c * H + h) * M * V + (e - EK)] = x;
        const i64 t0 = bos + (i64)(c - c0) * BT;
        const i64 t1 = min(t0 + BT, eos);
        // Shifted rows before bos + W are identities: skip them.
        for (i64 t = max(t0, bos + W); t < t1; ++t) {
            const i64 j = t - W;
            const i64 o = (j * H + h) * M + m;
            const float a = expf(ld(g, o));
            const float w = ld(s, o);
            const float u = is_k ? ld(k_slot, (j * H + h) * K + col) : ld(v, (j * H + h) * V + col);
            x = a * x + u * w;
        }
    }
    if (hk_out != nullptr) {
        if (is_k) hk_out[((i64)n * H + h) * EK + e] = x;
        else hv_out[((i64)n * H + h) * M * V + (e - EK)] = x;
    }
}

// Dynamic shared memory, floats (sizes computed by forward.py, same order):
//   A_s [BT*M] alpha of shifted rows   W_s [BT*M] write weight s of shifted rows
//   L_s [BT*M] slot logits, then slot probabilities Ps
//   Q_s [BT*K] q_slot, then q    K_s [BS*K] shifted k_slot rows, then key tiles
//   V_s [BS*V] value tiles, then shifted v rows (BS == BT)
//   P_s [BT*BS] scores / probabilities of one key tile    O_s [BT*V] output accumulator
//   r_m, r_l, r_c [BT] running max, running denominator, rescale factor
//
// o [B,T,HQ,V] (IN_T), lse [B,HQ,T] (float, natural log).
#define FWD_MAIN_PARAMS(S_T)                                                                    \
    const IN_T* __restrict__ q, const IN_T* __restrict__ k, const IN_T* __restrict__ v,          \
    const IN_T* __restrict__ g, const IN_T* __restrict__ s, const IN_T* __restrict__ q_slot,     \
    const IN_T* __restrict__ k_slot, const S_T* __restrict__ hk_chunks,                          \
    const S_T* __restrict__ hv_chunks, const i64* __restrict__ bos_arr,                          \
    const int* __restrict__ chunk_n, const i64* __restrict__ chunk_t0, IN_T* __restrict__ o,     \
    float* __restrict__ lse, int T, int HQ, int H, int K, int V, int M, int W, float scale
#define FWD_MAIN_ARGS \
    q, k, v, g, s, q_slot, k_slot, hk_chunks, hv_chunks, bos_arr, chunk_n, chunk_t0, o, lse, T, HQ, H, K, V, M, W, scale

// The work of one block of nha_fwd_main: chunk i_c, query head i_hq (s may be null: s = 1 - exp(g);
// chunk states S_T: float, or IN_T from nha_fwd_state_mma).
template <typename S_T>
__device__ __forceinline__ void fwd_main_block(const int i_c, const int i_hq, FWD_MAIN_PARAMS(S_T)) {
    extern __shared__ float smem_main[];  // (a name of its own: kernels below align theirs)
    float* smem = smem_main;
    float* A_s = smem;
    float* W_s = A_s + BT * M;
    float* L_s = W_s + BT * M;
    float* Q_s = L_s + BT * M;
    float* K_s = Q_s + BT * K;
    float* V_s = K_s + BS * K;
    float* P_s = V_s + BS * V;
    float* O_s = P_s + BT * BS;
    float* r_m = O_s + BT * V;
    float* r_l = r_m + BT;
    float* r_c = r_l + BT;

    const int i_h = i_hq / (HQ / H);
    const int tid = threadIdx.x, i_lane = tid % LANES, i_col = tid / LANES;
    const int n = chunk_n[i_c];
    const i64 bos = bos_arr[n], eos = bos_arr[n + 1];
    const i64 t0 = chunk_t0[i_c];
    const int nt = (int)min((i64)BT, eos - t0);

    // 1. alpha and s of the shifted rows of this chunk.  # [BT, M]
    for (int i = tid; i < BT * M; i += NT) {
        const int tt = i / M, m = i % M;
        float a = 1.f, w = 0.f;
        if (tt < nt) shifted_gate(g, s, t0 + tt, bos, W, H, M, i_h, m, a, w);
        A_s[i] = a;
        W_s[i] = w;
        L_s[i] = 0.f;  // rows past the chunk end stay finite
    }
    // q_slot rows and shifted k_slot rows (zero for identity rows) for the slot pass.  # [BT, K]
    for (int i = tid; i < BT * K; i += NT) {
        const int tt = i / K, kk = i % K;
        const i64 t = t0 + tt, j = t - W;
        Q_s[i] = tt < nt ? ld(q_slot, (t * HQ + i_hq) * K + kk) : 0.f;
        K_s[i] = (tt < nt && j >= bos) ? ld(k_slot, (j * H + i_h) * K + kk) : 0.f;
    }
    __syncthreads();

    // 2. Slot logits Ls[t, m] = scale * q_slot_t . Hk(t)[:, m]: LANES lanes own column m of Hk,
    //    each every LANES-th row k, and step the recurrence row by row through the chunk.
    for (int m0 = 0; m0 < M; m0 += BM) {
        const int m = m0 + i_col;
        const bool m_ok = m < M;
        float b_h[RMAX];  // Hk[i_lane + LANES*r, m]
        const S_T* p_h = hk_chunks + ((i64)i_c * H + i_h) * K * M;
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
            const int kk = i_lane + LANES * r;
            b_h[r] = (m_ok && kk < K) ? ld(p_h, (i64)kk * M + m) : 0.f;
        }
        for (int tt = 0; tt < nt; ++tt) {
            const float a = m_ok ? A_s[tt * M + m] : 1.f;
            const float w = m_ok ? W_s[tt * M + m] : 0.f;
            float acc = 0.f;
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
                const int kk = i_lane + LANES * r;
                if (kk < K) {
                    b_h[r] = a * b_h[r] + K_s[tt * K + kk] * w;
                    acc += Q_s[tt * K + kk] * b_h[r];
                }
            }
            acc = group_sum(acc);
            if (i_lane == 0 && m_ok) L_s[tt * M + m] = scale * acc;
        }
    }
    __syncthreads();  // Q_s is reloaded with q below
    // q tile for the window, rows past the chunk end are zero.  # [BT, K]
    for (int i = tid; i < BT * K; i += NT) {
        const int tt = i / K, kk = i % K;
        Q_s[i] = tt < nt ? ld(q, ((t0 + tt) * HQ + i_hq) * K + kk) : 0.f;
    }
    for (int i = tid; i < BT * V; i += NT) O_s[i] = 0.f;
    __syncthreads();

    // 3. Softmax state starts from the slot logits (zero slots count: they are M logits of 0).
    if (tid < BT) {
        float mx = -INFINITY, l = 0.f;
        for (int m = 0; m < M; ++m) mx = fmaxf(mx, L_s[tid * M + m]);
        for (int m = 0; m < M; ++m) l += exp_sub(L_s[tid * M + m], mx);
        r_m[tid] = mx;
        r_l[tid] = l;
    }
    __syncthreads();

    // 4. Window band: keys (t-W, t] for every query t of the chunk, tiles of BS keys.
    if (W > 0) {
        const i64 k_lo = max(bos, t0 - W + 1), k_hi = t0 + nt;
        for (i64 s0 = k_lo; s0 < k_hi; s0 += BS) {
            for (int i = tid; i < BS * K; i += NT) {
                const int jj = i / K, kk = i % K;
                K_s[i] = s0 + jj < k_hi ? ld(k, ((s0 + jj) * H + i_h) * K + kk) : 0.f;
            }
            for (int i = tid; i < BS * V; i += NT) {
                const int jj = i / V, vv = i % V;
                V_s[i] = s0 + jj < k_hi ? ld(v, ((s0 + jj) * H + i_h) * V + vv) : 0.f;
            }
            __syncthreads();
            for (int i = tid; i < BT * BS; i += NT) {
                const int tt = i / BS, jj = i % BS;
                const i64 t = t0 + tt, j = s0 + jj;
                float x = -INFINITY;
                if (tt < nt && j < k_hi && j <= t && j > t - W) {
                    float d = 0.f;
                    for (int kk = 0; kk < K; ++kk) d += Q_s[tt * K + kk] * K_s[jj * K + kk];
                    x = scale * d;
                }
                P_s[i] = x;
            }
            __syncthreads();
            if (tid < BT) {
                const float m_old = r_m[tid];
                float mx = m_old;
                for (int jj = 0; jj < BS; ++jj) mx = fmaxf(mx, P_s[tid * BS + jj]);
                float l = 0.f;
                for (int jj = 0; jj < BS; ++jj) {
                    const float pw = exp_sub(P_s[tid * BS + jj], mx);
                    P_s[tid * BS + jj] = pw;
                    l += pw;
                }
                const float c = exp_sub(m_old, mx);  // m_old = -inf -> 0 (nothing to rescale)
                r_c[tid] = c;
                r_l[tid] = r_l[tid] * c + l;
                r_m[tid] = mx;
            }
            __syncthreads();
            for (int i = tid; i < BT * V; i += NT) {
                const int tt = i / V, vv = i % V;
                float acc = O_s[i] * r_c[tt];
                for (int jj = 0; jj < BS; ++jj) acc += P_s[tt * BS + jj] * V_s[jj * V + vv];
                O_s[i] = acc;
            }
            __syncthreads();
        }
    }

    // 5. Normalise: lse, Ps = exp(Ls - max) / den, window part of o divided by den.
    if (tid < BT) {
        const float l = r_l[tid], mx = r_m[tid];
        r_c[tid] = l > 0.f ? 1.f / l : 0.f;  // l == 0 only when M == 0 and W == 0: o = 0
        if (tid < nt) {
            const i64 t = t0 + tid, b = t / T, tpos = t % T;
            lse[((i64)b * HQ + i_hq) * T + tpos] = l > 0.f ? mx + logf(l) : -INFINITY;
        }
    }
    __syncthreads();
    for (int i = tid; i < BT * M; i += NT) {
        const int tt = i / M;
        L_s[i] = exp_sub(L_s[i], r_m[tt]) * r_c[tt];
    }
    for (int i = tid; i < BT * V; i += NT) O_s[i] *= r_c[i / V];
    // shifted v rows for the slot values (V_s is free after the window band).  # [BT, V]
    for (int i = tid; i < BT * V; i += NT) {
        const int tt = i / V, vv = i % V;
        const i64 j = t0 + tt - W;
        V_s[i] = (tt < nt && j >= bos) ? ld(v, (j * H + i_h) * V + vv) : 0.f;
    }
    __syncthreads();

    // 6. Slot values: o_t += sum_m Ps[t, m] Hv(t)[m, :]. LANES lanes own column vv of Hv.
    for (int v0 = 0; v0 < V; v0 += BV) {
        const int vv = v0 + i_col;
        const bool v_ok = vv < V;
        float b_h[RMAX];  // Hv[i_lane + LANES*r, vv]
        const S_T* p_h = hv_chunks + ((i64)i_c * H + i_h) * M * V;
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
            const int m = i_lane + LANES * r;
            b_h[r] = (v_ok && m < M) ? ld(p_h, (i64)m * V + vv) : 0.f;
        }
        for (int tt = 0; tt < nt; ++tt) {
            const float u = v_ok ? V_s[tt * V + vv] : 0.f;
            float acc = 0.f;
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
                const int m = i_lane + LANES * r;
                if (m < M) {
                    b_h[r] = A_s[tt * M + m] * b_h[r] + W_s[tt * M + m] * u;
                    acc += L_s[tt * M + m] * b_h[r];
                }
            }
            acc = group_sum(acc);
            if (i_lane == 0 && v_ok) O_s[tt * V + vv] += acc;
        }
    }
    __syncthreads();
    for (int i = tid; i < nt * V; i += NT) {
        const int tt = i / V, vv = i % V;
        st(o, ((t0 + tt) * HQ + i_hq) * V + vv, O_s[i]);
    }
}

extern "C" __global__ void __launch_bounds__(NT) nha_fwd_main(FWD_MAIN_PARAMS(float)) {
    fwd_main_block<float>(blockIdx.x, blockIdx.y, FWD_MAIN_ARGS);
}

// The blocks nha_fwd_main_mma left to the exact recurrence: redo[0] of them, redo[1 + i] = i_c * HQ
// + i_hq; chunk states as nha_fwd_state_mma stores them (IN_T). A fixed grid walks the list (its
// length is only known on the device).
extern "C" __global__ void __launch_bounds__(NT) nha_fwd_redo(FWD_MAIN_PARAMS(IN_T), const int* __restrict__ redo) {
    const int count = redo[0];
    for (int i = blockIdx.x; i < count; i += gridDim.x) {
        const int id = redo[1 + i];
        fwd_main_block<IN_T>(id / HQ, id % HQ, FWD_MAIN_ARGS);
        __syncthreads();  // the next block's staging overwrites shared memory
    }
}

// ================================================================================================
// Tensor-core forward (fp16 / bf16 inputs; K, V, M multiples of 16). forward.py picks these two
// kernels when the shape allows and the ones above otherwise (fp32 keeps exact CUDA-core math); bf16
// takes the register-tile kernels at the end where configs.use_mma allows.
//
//   nha_fwd_state_tc  grid (2 * ceil(M / BMC), N*H): one block per (sequence, head, Hk or Hv,
//                     BMC slot columns); walks the chunks in order and advances its state tile a
//                     whole chunk at a time with one matrix product (MATH.md section 2):
//                       U[m, :] <- exp(Gc[last, m]) U[m, :] + sum_j Wt[j, m] X[j, :]
//                     with U = Hk^T or Hv ([BMC, K|V]), X = shifted k_slot or v rows and
//                     Wt = S * exp(Gc[last] - Gc) (a reverse exclusive sum of gates, <= 1).
//   nha_fwd_main_tc   grid (NC, HQ): one block per (chunk, query head); slot logits and slot values
//                     by the factored intra-chunk form (tf32 products), then the window band with
//                     IN_T products (Q K^T, P V) and an online softmax seeded by the slots.
//
// Products run on WMMA fragments read from / written to shared memory: tf32 (m16n16k8) for the
// slot terms, whose factors exp(+-Gc) reach e^SAFE_LIMIT and need float range; IN_T (m16n16k16)
// for the window band. Rows of every shared tile are padded by PADF elements: a 64-float row
// stride would put all 16 rows of a fragment in one bank.
// ================================================================================================
#ifndef NHA_NO_TC  // defined by the launcher where the toolkit headers lack crt/mma.h
#include <mma.h>

#define PADF 8               // row padding of shared tiles, elements
#define BMC 16               // slot columns per block of nha_fwd_state_tc
#define G_FLOOR (-200.f)     // exp(-200) == 0 in float: clamping changes no result, keeps sums finite
#define SAFE_LIMIT 40.f      // factored decays exp(+-Gc) stay below e^40 (Triton backend: same rule)

template <typename T> struct wmma_elem { typedef T type; enum { KS = 16 }; };
template <> struct wmma_elem<float> { typedef nvcuda::wmma::precision::tf32 type; enum { KS = 8 }; };
template <bool COL> struct wmma_layout { typedef nvcuda::wmma::row_major type; };
template <> struct wmma_layout<true> { typedef nvcuda::wmma::col_major type; };

// C[R, N] (float, row-major, ldc) (+)= A[R, Kd] @ B[Kd, N] on the block's warps, one 16x16 output
// tile per warp at a time. A_COL: A is stored transposed (element (r, k) at A[k*lda + r]);
// B_COL: B is stored transposed (element (k, n) at B[n*ldb + k]). R, N multiples of 16, Kd of KS.
// Callers put a __syncthreads between a product and any read of C by other warps.
template <typename T, bool A_COL, bool B_COL>
__device__ __forceinline__ void mm(float* C, int ldc, const T* A, int lda, const T* B, int ldb,
                                   int R, int N, int Kd, bool acc) {
    using namespace nvcuda;
    typedef typename wmma_elem<T>::type E;
    const int KS = wmma_elem<T>::KS;
    const int tn = N / 16, tiles = (R / 16) * tn;
    for (int i = threadIdx.x / 32; i < tiles; i += NT / 32) {
        const int r0 = (i / tn) * 16, c0 = (i % tn) * 16;
        wmma::fragment<wmma::accumulator, 16, 16, wmma_elem<T>::KS, float> f_c;
        if (acc) wmma::load_matrix_sync(f_c, C + r0 * ldc + c0, ldc, wmma::mem_row_major);
        else wmma::fill_fragment(f_c, 0.f);
        for (int k0 = 0; k0 < Kd; k0 += KS) {
            wmma::fragment<wmma::matrix_a, 16, 16, wmma_elem<T>::KS, E, typename wmma_layout<A_COL>::type> f_a;
            wmma::fragment<wmma::matrix_b, 16, 16, wmma_elem<T>::KS, E, typename wmma_layout<B_COL>::type> f_b;
            wmma::load_matrix_sync(f_a, A_COL ? A + k0 * lda + r0 : A + r0 * lda + k0, lda);
            wmma::load_matrix_sync(f_b, B_COL ? B + c0 * ldb + k0 : B + k0 * ldb + c0, ldb);
            if (KS == 8) {  // tf32: round the float operands once
#pragma unroll
                for (int e = 0; e < f_a.num_elements; ++e) f_a.x[e] = wmma::__float_to_tf32(f_a.x[e]);
#pragma unroll
                for (int e = 0; e < f_b.num_elements; ++e) f_b.x[e] = wmma::__float_to_tf32(f_b.x[e]);
            }
            wmma::mma_sync(f_c, f_a, f_b, f_c);
        }
        wmma::store_matrix_sync(C + r0 * ldc + c0, f_c, ldc, wmma::mem_row_major);
    }
}

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Gate of token j (clamped at G_FLOOR) and its write weight; s == nullptr: s = 1 - exp(g).
__device__ __forceinline__ void gate_sw(const IN_T* g, const IN_T* s, i64 o, float& gc, float& w) {
    const float gr = ld(g, o);
    gc = fmaxf(gr, G_FLOOR);
    w = s != nullptr ? ld(s, o) : -expm1f(gr);
}

// Shared memory (floats): U [BMC, D+PADF] state tile, X [BT, D+PADF] shifted rows,
// Wt [BT, BMC+PADF] write weights, e_last [BMC], G_s [BT, BMC] gates. D = K (Hk part) or V (Hv part).
extern "C" __global__ void __launch_bounds__(NT) nha_fwd_state_tc(
    const IN_T* __restrict__ k_slot, const IN_T* __restrict__ v, const IN_T* __restrict__ g,
    const IN_T* __restrict__ s, const float* __restrict__ hk0, const float* __restrict__ hv0,
    const i64* __restrict__ bos_arr, const int* __restrict__ seq_chunk0,
    float* __restrict__ hk_chunks, float* __restrict__ hv_chunks,
    float* __restrict__ hk_out, float* __restrict__ hv_out, int H, int K, int V, int M, int W) {
    extern __shared__ __align__(128) float smem[];
    const int n_mt = (M + BMC - 1) / BMC;
    const bool is_k = blockIdx.x < n_mt;
    const int m0 = (is_k ? blockIdx.x : blockIdx.x - n_mt) * BMC;
    const int n = blockIdx.y / H, h = blockIdx.y % H, tid = threadIdx.x;
    const int D = is_k ? K : V, LD = D + PADF, LW = BMC + PADF;
    float* U = smem;
    float* X = U + BMC * LD;
    float* Wt = X + BT * LD;
    float* e_last = Wt + BT * LW;
    float* G_s = e_last + BMC;
    const IN_T* src = is_k ? k_slot : v;
    // global state [.., K, M] (Hk) or [.., M, V] (Hv); U[mm][d] is Hk[d, m0+mm] or Hv[m0+mm, d]
    const i64 SZ = (i64)K * M;  // == M * V only when K == V: use per-part sizes
    const i64 S_k = SZ, S_v = (i64)M * V;
    auto gidx = [&](int mm, int d) -> i64 { return is_k ? (i64)d * M + m0 + mm : (i64)(m0 + mm) * V + d; };
    const i64 bos = bos_arr[n], eos = bos_arr[n + 1];
    const int c0 = seq_chunk0[n], c1 = seq_chunk0[n + 1];

    for (int i = tid; i < BMC * D; i += NT) {
        const int mm = is_k ? i % BMC : i / D, d = is_k ? i / BMC : i % D;
        float x = 0.f;
        if (m0 + mm < M) {
            if (is_k && hk0 != nullptr) x = hk0[((i64)n * H + h) * S_k + gidx(mm, d)];
            if (!is_k && hv0 != nullptr) x = hv0[((i64)n * H + h) * S_v + gidx(mm, d)];
        }
        U[mm * LD + d] = x;
    }
    __syncthreads();
    for (int c = c0; c < c1; ++c) {
        float* dst = is_k ? hk_chunks + ((i64)c * H + h) * S_k : hv_chunks + ((i64)c * H + h) * S_v;
        for (int i = tid; i < BMC * D; i += NT) {
            const int mm = is_k ? i % BMC : i / D, d = is_k ? i / BMC : i % D;
            if (m0 + mm < M) dst[gidx(mm, d)] = U[mm * LD + d];
        }
        const i64 t0 = bos + (i64)(c - c0) * BT;
        const int nt = (int)min((i64)BT, eos - t0);
        for (int i = tid; i < BT * D; i += NT) {
            const int tt = i / D, d = i % D;
            const i64 j = t0 + tt - W;
            X[tt * LD + d] = (tt < nt && j >= bos) ? ld(src, (j * H + h) * D + d) : 0.f;
        }
        // gates (clamped) and write weights of the shifted rows, all threads (independent loads)
        for (int i = tid; i < BT * BMC; i += NT) {
            const int tt = i / BMC, mm = i % BMC, m = m0 + mm;
            const i64 j = t0 + tt - W;
            float gc = 0.f, w = 0.f;
            if (tt < nt && j >= bos && m < M) gate_sw(g, s, (j * H + h) * M + m, gc, w);
            Wt[tt * LW + mm] = w;
            G_s[tt * BMC + mm] = gc;
        }
        __syncthreads();
        // Wt[j, m] *= exp(sum of gates after j in the chunk): reverse walk, one thread per
        // column, so -inf gates (clamped) never meet a difference.
        if (tid < BMC) {
            float acc = 0.f;
            for (int tt = BT - 1; tt >= 0; --tt) {
                Wt[tt * LW + tid] *= expf(acc);
                acc += G_s[tt * BMC + tid];
            }
            e_last[tid] = expf(acc);
        }
        __syncthreads();
        for (int i = tid; i < BMC * D; i += NT) U[(i / D) * LD + i % D] *= e_last[i / D];
        __syncthreads();
        mm<float, true, false>(U, LD, Wt, LW, X, LD, BMC, D, BT, true);
        __syncthreads();
    }
    if (hk_out != nullptr) {
        float* dst = is_k ? hk_out + ((i64)n * H + h) * S_k : hv_out + ((i64)n * H + h) * S_v;
        for (int i = tid; i < BMC * D; i += NT) {
            const int mm = is_k ? i % BMC : i / D, d = is_k ? i / BMC : i % D;
            if (m0 + mm < M) dst[gidx(mm, d)] = U[mm * LD + d];
        }
    }
}

// Shared memory (floats; LDk = K+PADF, LDv = V+PADF, LDm = M+PADF, LDt = BT+PADF):
//   F_Q [BT*LDk] q_slot rows (float), then the q tile (IN_T)
//   F_K [BT*LDk] shifted k_slot rows, then key tiles (IN_T)
//   F_V [BT*LDv] shifted v rows, then value tiles (IN_T)
//   F_X [BT*LDm] S (then S*exp(-Gc) when safe)   F_G [BT*LDm] Gc    (F_X..F_G: P tile (IN_T) later)
//   F_H [max(K*LDm, M*LDv)] Hk_c, then Hv_c      F_A [BT*LDt] Qs Ks^T, then the slot-value
//   weights, then window scores                   F_L [BT*LDm] slot logits, then slot weights
//   F_O [BT*LDv] output accumulator               r_m, r_l [BT] running max and denominator
extern "C" __global__ void __launch_bounds__(NT) nha_fwd_main_tc(
    const IN_T* __restrict__ q, const IN_T* __restrict__ k, const IN_T* __restrict__ v,
    const IN_T* __restrict__ g, const IN_T* __restrict__ s, const IN_T* __restrict__ q_slot,
    const IN_T* __restrict__ k_slot, const float* __restrict__ hk_chunks,
    const float* __restrict__ hv_chunks, const i64* __restrict__ bos_arr,
    const int* __restrict__ chunk_n, const i64* __restrict__ chunk_t0, IN_T* __restrict__ o,
    float* __restrict__ lse, int T, int HQ, int H, int K, int V, int M, int W, float scale) {
    extern __shared__ __align__(128) float smem[];
    const int LDk = K + PADF, LDv = V + PADF, LDm = M + PADF, LDt = BT + PADF, LDs = BS + PADF;
    float* F_Q = smem;
    float* F_K = F_Q + BT * LDk;
    float* F_V = F_K + BT * LDk;
    float* F_X = F_V + BT * LDv;
    float* F_G = F_X + BT * LDm;
    float* F_H = F_G + BT * LDm;
    float* F_A = F_H + max(K * LDm, M * LDv);
    float* F_L = F_A + BT * LDt;
    float* F_O = F_L + BT * LDm;
    float* r_m = F_O + BT * LDv;
    float* r_l = r_m + BT;
    IN_T* Q16 = reinterpret_cast<IN_T*>(F_Q);
    IN_T* K16 = reinterpret_cast<IN_T*>(F_K);
    IN_T* V16 = reinterpret_cast<IN_T*>(F_V);
    IN_T* P16 = reinterpret_cast<IN_T*>(F_X);
    __shared__ int safe_s;

    const int i_c = blockIdx.x, i_hq = blockIdx.y, i_h = i_hq / (HQ / H);
    const int tid = threadIdx.x, i_warp = tid / 32, i_lane = tid % 32;
    const int n = chunk_n[i_c];
    const i64 bos = bos_arr[n], eos = bos_arr[n + 1];
    const i64 t0 = chunk_t0[i_c];
    const int nt = (int)min((i64)BT, eos - t0);

    // 1. Operands of the slot terms (float): q_slot, shifted k_slot / v / s rows, chunk states.
    if (tid == 0) safe_s = 1;
    for (int i = tid; i < BT * K; i += NT) {
        const int tt = i / K, kk = i % K;
        const i64 t = t0 + tt, j = t - W;
        F_Q[tt * LDk + kk] = tt < nt ? ld(q_slot, (t * HQ + i_hq) * K + kk) : 0.f;
        F_K[tt * LDk + kk] = (tt < nt && j >= bos) ? ld(k_slot, (j * H + i_h) * K + kk) : 0.f;
    }
    for (int i = tid; i < BT * V; i += NT) {
        const int tt = i / V, vv = i % V;
        const i64 j = t0 + tt - W;
        F_V[tt * LDv + vv] = (tt < nt && j >= bos) ? ld(v, (j * H + i_h) * V + vv) : 0.f;
    }
    const float* p_hk = hk_chunks + ((i64)i_c * H + i_h) * K * M;
    for (int i = tid; i < K * M; i += NT) F_H[(i / M) * LDm + i % M] = p_hk[i];
    __syncthreads();
    // clamped gates and write weights of the shifted rows (identity rows: gate 0, weight 0)
    for (int i = tid; i < BT * M; i += NT) {
        const int tt = i / M, m = i % M;
        const i64 j = t0 + tt - W;
        float gc = 0.f, w = 0.f;
        if (tt < nt && j >= bos) gate_sw(g, s, (j * H + i_h) * M + m, gc, w);
        F_G[tt * LDm + m] = gc;
        F_X[tt * LDm + m] = w;
    }
    mm<float, false, true>(F_A, LDt, F_Q, LDk, F_K, LDk, BT, BT, K, false);   // Qs Ks^T
    mm<float, false, false>(F_L, LDm, F_Q, LDk, F_H, LDm, BT, M, K, false);   // Qs @ Hk_c
    __syncthreads();
    // Gc: inclusive cumsum over the chunk (rows past the sequence end add 0, so they repeat the
    // last value and no decay from a real row to them exceeds 1).
    for (int m = tid; m < M; m += NT) {
        float acc = 0.f, amax = 0.f;
        for (int tt = 0; tt < BT; ++tt) {
            acc += F_G[tt * LDm + m];
            amax = fmaxf(amax, fabsf(acc));
            F_G[tt * LDm + m] = acc;
        }
        if (amax > SAFE_LIMIT) safe_s = 0;
    }
    __syncthreads();
    const bool safe = safe_s != 0;
    for (int i = tid; i < BT * BT; i += NT) {
        const int tt = i / BT, jj = i % BT;
        if (jj > tt) F_A[tt * LDt + jj] = 0.f;  // causal, diagonal included
    }
    if (safe)
        for (int i = tid; i < BT * M; i += NT) {
            const int o_ = (i / M) * LDm + i % M;
            F_X[o_] *= expf(-F_G[o_]);
        }
    __syncthreads();
    // 2. Slot logits Ls = scale exp(Gc) (Qs Hk_c + (Qs Ks^T)_causal @ (S exp(-Gc))).
    if (safe) {
        mm<float, false, false>(F_L, LDm, F_A, LDt, F_X, LDm, BT, M, BT, true);
        __syncthreads();
        for (int i = tid; i < BT * M; i += NT) {
            const int o_ = (i / M) * LDm + i % M;
            F_L[o_] *= scale * expf(F_G[o_]);
        }
    } else {  // explicit per-pair decays exp(Gc[t] - Gc[j]) (both finite: clamped gates)
        for (int i = tid; i < BT * M; i += NT) {
            const int tt = i / M, m = i % M;
            const float gt = F_G[tt * LDm + m];
            float acc = 0.f;
            for (int jj = 0; jj <= tt; ++jj)
                acc += F_A[tt * LDt + jj] * F_X[jj * LDm + m] * expf(gt - F_G[jj * LDm + m]);
            F_L[tt * LDm + m] = scale * (expf(gt) * F_L[tt * LDm + m] + acc);
        }
    }
    __syncthreads();
    // 3. Softmax seed from the slot logits (zero slots count: M logits of 0); P = exp(Ls - max).
    for (int tt = i_warp; tt < BT; tt += NT / 32) {
        float mx = -INFINITY;
        for (int m = i_lane; m < M; m += 32) mx = fmaxf(mx, F_L[tt * LDm + m]);
        mx = warp_max(mx);
        float l = 0.f;
        for (int m = i_lane; m < M; m += 32) {
            const float p = expf(F_L[tt * LDm + m] - mx);
            F_L[tt * LDm + m] = p;
            l += p;
        }
        l = warp_sum(l);
        if (i_lane == 0) {
            r_m[tt] = mx;
            r_l[tt] = l;
        }
    }
    const float* p_hv = hv_chunks + ((i64)i_c * H + i_h) * M * V;
    for (int i = tid; i < M * V; i += NT) F_H[(i / V) * LDv + i % V] = p_hv[i];  // Hk_c is done
    __syncthreads();
    // 4. Slot values: O = (P exp(Gc)) @ Hv_c + (weights (.) causal) @ Vs,
    //    weights[t, j] = sum_m P[t, m] S[j, m] exp(Gc[t, m] - Gc[j, m]).
    if (!safe) {
        for (int i = tid; i < BT * BT; i += NT) {
            const int tt = i / BT, jj = i % BT;
            float acc = 0.f;
            if (jj <= tt)
                for (int m = 0; m < M; ++m)
                    acc += F_L[tt * LDm + m] * F_X[jj * LDm + m] * expf(F_G[tt * LDm + m] - F_G[jj * LDm + m]);
            F_A[tt * LDt + jj] = acc;
        }
        __syncthreads();
    }
    for (int i = tid; i < BT * M; i += NT) {
        const int o_ = (i / M) * LDm + i % M;
        F_L[o_] *= expf(F_G[o_]);
    }
    __syncthreads();
    if (safe) {
        mm<float, false, true>(F_A, LDt, F_L, LDm, F_X, LDm, BT, BT, M, false);
        __syncthreads();
        for (int i = tid; i < BT * BT; i += NT) {
            const int tt = i / BT, jj = i % BT;
            if (jj > tt) F_A[tt * LDt + jj] = 0.f;
        }
    }
    mm<float, false, false>(F_O, LDv, F_L, LDm, F_H, LDv, BT, V, M, false);
    __syncthreads();
    mm<float, false, false>(F_O, LDv, F_A, LDt, F_V, LDv, BT, V, BT, true);
    __syncthreads();

    // 5. Window band: keys (t-W, t] for every query t of the chunk, tiles of BS keys (IN_T).
    if (W > 0) {
        for (int i = tid; i < BT * K; i += NT) {
            const int tt = i / K, kk = i % K;
            Q16[tt * LDk + kk] = tt < nt ? q[((t0 + tt) * HQ + i_hq) * K + kk] : IN_T(0.f);
        }
        const i64 k_lo = max(bos, t0 - W + 1), k_hi = t0 + nt;
        for (i64 s0 = k_lo; s0 < k_hi; s0 += BS) {
            for (int i = tid; i < BS * K; i += NT) {
                const int jj = i / K, kk = i % K;
                K16[jj * LDk + kk] = s0 + jj < k_hi ? k[((s0 + jj) * H + i_h) * K + kk] : IN_T(0.f);
            }
            for (int i = tid; i < BS * V; i += NT) {
                const int jj = i / V, vv = i % V;
                V16[jj * LDv + vv] = s0 + jj < k_hi ? v[((s0 + jj) * H + i_h) * V + vv] : IN_T(0.f);
            }
            __syncthreads();
            mm<IN_T, false, true>(F_A, LDt, Q16, LDk, K16, LDk, BT, BS, K, false);
            __syncthreads();
            for (int tt = i_warp; tt < BT; tt += NT / 32) {
                const i64 t = t0 + tt;
                float mx = r_m[tt];
                for (int jj = i_lane; jj < BS; jj += 32) {
                    const i64 j = s0 + jj;
                    const bool ok = tt < nt && j < k_hi && j <= t && j > t - W;
                    const float x = ok ? scale * F_A[tt * LDt + jj] : -INFINITY;
                    F_A[tt * LDt + jj] = x;
                    mx = fmaxf(mx, x);
                }
                mx = warp_max(mx);  // >= the slot max: finite
                float l = 0.f;
                for (int jj = i_lane; jj < BS; jj += 32) {
                    const float p = expf(F_A[tt * LDt + jj] - mx);
                    P16[tt * LDs + jj] = IN_T(p);
                    l += p;
                }
                l = warp_sum(l);
                const float c = expf(r_m[tt] - mx);
                for (int vv = i_lane; vv < V; vv += 32) F_O[tt * LDv + vv] *= c;
                __syncwarp();
                if (i_lane == 0) {
                    r_l[tt] = r_l[tt] * c + l;
                    r_m[tt] = mx;
                }
            }
            __syncthreads();
            mm<IN_T, false, false>(F_O, LDv, P16, LDs, V16, LDv, BT, V, BS, true);
            __syncthreads();
        }
    }

    // 6. Normalise and store o, lse.
    for (int i = tid; i < nt * V; i += NT) {
        const int tt = i / V, vv = i % V;
        st(o, ((t0 + tt) * HQ + i_hq) * V + vv, F_O[tt * LDv + vv] / r_l[tt]);
    }
    if (tid < nt) {
        const i64 t = t0 + tid, b = t / T, tpos = t % T;
        lse[((i64)b * HQ + i_hq) * T + tpos] = r_m[tid] + logf(r_l[tid]);
    }
}

// ================================================================================================
// Register-tile forward for bfloat16 inputs (NHA_MMA builds: IN_T = __nv_bfloat16, BT = 64, K, V, M
// multiples of 16 up to 128, compile-time KD, VD, MD). One block of MT = 128 threads per (chunk,
// query head), as nha_fwd_main_tc, but every product runs on mma.sync m16n8k16 with its
// accumulators in registers: each warp owns QW = 16 query rows, and the online softmax, the slot
// seed and the output never leave registers. Operand tiles go global -> shared by cp.async (16-byte
// rows, zero-filled past the ends) and shared -> registers by ldmatrix; the window's key / value
// tiles are double-buffered so the next tile's loads overlap this tile's products.
//
// Slot terms take bfloat16 operands with fp32 accumulation, the Triton backend's bf16 rule
// (forward.py "Precision"), in the factored form (MATH.md section 2), gates in log2 units:
//   Gc = cumsum(max(g, G_FLOOR)) log2(e) over the chunk's shifted rows, Sw = S 2^-Gc,
//   Ls = qk2 2^Gc (Qs Hk_c + causal(Qs Ks^T) Sw),  P = 2^(Ls - max),  Pe = P 2^Gc,
//   acc = Pe Hv_c + causal(Pe Sw^T) Vs,
// then the window band continues the same (max, sum, acc). A chunk whose |Gc| passes SAFE2 cannot
// factor: the block appends itself to `redo` and returns, and nha_fwd_redo (nha_fwd_main's exact
// fp32 recurrence, no decay factors) computes it.
//
// Fragment layout of m16n8k16 (lane = 4 gq + q4): accumulator element e of n-tile j sits at row
// gq + 8 (e >> 1), column 8 j + 2 q4 + (e & 1). The A operand of a product is built from two
// accumulator n-tiles (the FlashAttention-2 register reuse), so P and the causal weights never
// touch shared memory.
// ================================================================================================
#if defined(NHA_MMA) && BT == 64
#ifndef KD
#define KD 64
#endif
#ifndef VD
#define VD 64
#endif
#ifndef MD
#define MD 64
#endif
#ifndef FAST_EXP
#define FAST_EXP 1
#endif
#ifndef FAST_GATES
#define FAST_GATES 1
#endif
#define MT 128               // threads of nha_fwd_main_mma
#define QW 16                // query rows per warp
#define LDK (KD + 8)         // shared row strides, elements: 16 bytes of padding keep ldmatrix
#define LDV (VD + 8)         // rows on distinct banks
#define LDM (MD + 8)
#define LDG (MD + 4)         // Gc rows (float)
#define LOG2E_F 1.4426950408889634f
#define SAFE2 (SAFE_LIMIT * LOG2E_F)
static_assert(BT == (MT / 32) * QW, "nha_fwd_main_mma: one warp per 16 query rows");
static_assert(KD % 16 == 0 && VD % 16 == 0 && MD % 16 == 0 && KD <= 128 && VD <= 128 && MD <= 128,
              "nha_fwd_main_mma: K, V, M multiples of 16 up to 128");

typedef unsigned u32;

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it.
// The address is a shared-window byte address: constant offsets added to it fold into the instruction.
__device__ __forceinline__ void ldsm4(u32 (&r)[4], u32 a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldsm4_t(u32 (&r)[4], u32 a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldsm4(u32 (&r)[4], const void* p) { ldsm4(r, smem_u32(p)); }
__device__ __forceinline__ void ldsm4_t(u32 (&r)[4], const void* p) { ldsm4_t(r, smem_u32(p)); }
// c (16x8, f32) += a (16x16, row) b (16x8, col), bfloat16 operands.
__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 2^x by the MUFU approximation (ex2.approx.ftz, ~2 ulp; the Triton backend's tl.exp2).
__device__ __forceinline__ float ex2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
template <bool APPROX> __device__ __forceinline__ float exp2_by(float x) { return APPROX ? ex2_approx(x) : exp2f(x); }
// 2^x for the softmax weights (FAST_EXP) and for decay factors that are rounded to bfloat16 before
// use (FAST_GATES: Sw, Wc, Pe, the slot logits' 2^Gc). The state decay a = 2^Gc_last multiplies the
// fp32 state once per chunk and keeps exp2f.
__device__ __forceinline__ float exp2_w(float x) { return exp2_by<FAST_EXP>(x); }
__device__ __forceinline__ float exp2_g(float x) { return exp2_by<FAST_GATES>(x); }
// s = 1 - exp(g) where the kernels derive it (s == nullptr): -expm1f, or with FAST_GATES the Triton
// backend's derive_s: a short series where |g| < 0.1 keeps the digits that 1 - 2^(g log2 e) cancels
// away (relative error < 2e-9 there), else 1 - ex2_approx (float32 error < 4e-7 relative over
// g in [-100, -1e-8], checked on the host against expm1). g = -inf gives 1, g = 0 gives 0.
__device__ __forceinline__ float derive_s(float g) {
#if FAST_GATES
    if (fabsf(g) < 0.1f)
        return -g * (1.f + g * (0.5f + g * (0.16666667f + g * (0.041666668f + g * 0.008333334f))));
    return 1.f - ex2_approx(g * LOG2E_F);
#else
    return -expm1f(g);
#endif
}
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    __nv_bfloat162 x = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&x);
}
// 16 bytes global -> shared (byte address dst), asynchronously; ok = false writes zeros (src is not read).
__device__ __forceinline__ void cp16(u32 dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// The lane's ldmatrix row, in elements from the fragment's origin in a tile of row stride ld.
// A operand (16 x 16, row-major):
__device__ __forceinline__ int lane_a(int ld, int lane) { return (lane & 15) * ld + (lane >> 4) * 8; }
// B operands of two n-tiles (16 n x 16 k) from a tile stored [n][k] (ldsm4) ...
__device__ __forceinline__ int lane_nk(int ld, int lane) { return ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8; }
// ... or stored [k][n] (ldsm4_t).
__device__ __forceinline__ int lane_kn(int ld, int lane) { return ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8; }
// B operands of n-tiles n0 and n0 + 8 (k0 .. k0+15) of a tile stored [k][n].
__device__ __forceinline__ const IN_T* at_b_kn(const IN_T* t, int ld, int k0, int n0, int lane) {
    return t + k0 * ld + n0 + lane_kn(ld, lane);
}

// acc[NA/8][4] (+)= A (16 x KA, registers) @ B, B the shared tile at byte address b (row stride LD
// elements), stored [n][k] when NK, else [k][n]. Only k-tiles kt <= kt_max and n-tile pairs
// np <= np_max take part (16 rows / columns each): the causal products stop at the warp's diagonal.
template <int KA, int NA, bool NK, int LD>
__device__ __forceinline__ void mm_rs(float (&acc)[NA / 8][4], const u32 (&a)[KA / 16][4], u32 b, int lane,
                                      int kt_max = KA / 16, int np_max = NA / 16) {
    b += 2 * (NK ? lane_nk(LD, lane) : lane_kn(LD, lane));
#pragma unroll
    for (int kt = 0; kt < KA / 16; ++kt) {
        if (kt > kt_max) break;
#pragma unroll
        for (int np = 0; np < NA / 16; ++np) {
            if (np > np_max) break;
            u32 f[4];
            if (NK) ldsm4(f, b + 2 * (np * 16 * LD + kt * 16));
            else ldsm4_t(f, b + 2 * (kt * 16 * LD + np * 16));
            mma16816(acc[2 * np], a[kt], f[0], f[1]);
            mma16816(acc[2 * np + 1], a[kt], f[2], f[3]);
        }
    }
}
// The A operand (16 x NA) of a next product from accumulator tiles (16 x NA, float).
template <int NA>
__device__ __forceinline__ void to_a(u32 (&a)[NA / 16][4], const float (&c)[NA / 8][4]) {
#pragma unroll
    for (int kt = 0; kt < NA / 16; ++kt) {
        a[kt][0] = pack_bf16(c[2 * kt][0], c[2 * kt][1]);
        a[kt][1] = pack_bf16(c[2 * kt][2], c[2 * kt][3]);
        a[kt][2] = pack_bf16(c[2 * kt + 1][0], c[2 * kt + 1][1]);
        a[kt][3] = pack_bf16(c[2 * kt + 1][2], c[2 * kt + 1][3]);
    }
}
template <int NA>
__device__ __forceinline__ void zero(float (&c)[NA / 8][4]) {
#pragma unroll
    for (int j = 0; j < NA / 8; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
}
// Keep key columns j <= row t (diagonal included) of a [16, BT] accumulator whose rows start at r0.
__device__ __forceinline__ void causal(float (&c)[BT / 8][4], int r0, int lane) {
#pragma unroll
    for (int j = 0; j < BT / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (8 * j + 2 * (lane & 3) + (e & 1) > r0 + (lane >> 2) + 8 * (e >> 1)) c[j][e] = 0.f;
}
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
// R rows of D elements into the shared tile at byte address dst (row stride D + 8), by cp.async in
// 16-byte pieces: row r from src + off + r * stride (elements) where lo <= r < hi, zeros elsewhere.
// A thread's pieces share their column when MT is a multiple of the pieces per row (D = 16, 32, 64,
// 128), so their addresses are one multiply-add apart.
template <int R, int D>
__device__ __forceinline__ void stage_rows(u32 dst, const IN_T* src, i64 off, int stride, int lo, int hi, int tid) {
    constexpr int P = D / 8;
#pragma unroll
    for (int u = 0; u < (R * P + MT - 1) / MT; ++u) {
        const int r = MT % P == 0 ? tid / P + u * (MT / P) : (tid + u * MT) / P;
        const int c = MT % P == 0 ? tid % P : (tid + u * MT) % P;
        if (R * P % MT != 0 && r >= R) break;
        const bool ok = r >= lo && r < hi;
        cp16(dst + 2 * (r * (D + 8) + c * 8), ok ? src + (off + r * stride + c * 8) : src, ok);
    }
}

// Shared memory (configs.mma_smem_bytes, same order): sQ [BT, LDK] q_slot rows, then q rows;
// then either the slot operands  sKs [BT, LDK] sVs [BT, LDV] sHk [KD, LDM] sHv [MD, LDV] sSw [BT, LDM]
// (bfloat16) and sGc [BT, LDG] (float; its last BT * LDM * 2 bytes first hold the raw gates, and
// sSw the raw s, until the gate pass has read them),  or, once the slot terms are done, the window
// tiles sK [2][BT, LDK] and sV [2][BT, LDV]. Static: s_tot, the gate runs' totals.
// redo: [1 + NC * HQ] int, redo[0] = 0 before the launch (see nha_fwd_redo_tc).
template <bool B> struct Flag { static constexpr bool value = B; };  // a compile-time choice as an argument

extern "C" __global__ void __launch_bounds__(MT) nha_fwd_main_mma(
    const IN_T* __restrict__ q, const IN_T* __restrict__ k, const IN_T* __restrict__ v,
    const IN_T* __restrict__ g, const IN_T* __restrict__ s, const IN_T* __restrict__ q_slot,
    const IN_T* __restrict__ k_slot, const IN_T* __restrict__ hk_chunks,
    const IN_T* __restrict__ hv_chunks, const i64* __restrict__ bos_arr,
    const int* __restrict__ chunk_n, const i64* __restrict__ chunk_t0, IN_T* __restrict__ o,
    float* __restrict__ lse, int* __restrict__ redo, int T, int HQ, int H, int W, float scale) {
    extern __shared__ uint4 smem_mma[];
    IN_T* sQ = reinterpret_cast<IN_T*>(smem_mma);
    IN_T* sKs = sQ + BT * LDK;
    IN_T* sVs = sKs + BT * LDK;
    IN_T* sHk = sVs + BT * LDV;
    IN_T* sHv = sHk + KD * LDM;
    IN_T* sSw = sHv + MD * LDV;
    float* sGc = reinterpret_cast<float*>(sSw + BT * LDM);
    const u32 uQ = smem_u32(sQ), uKs = smem_u32(sKs), uVs = smem_u32(sVs), uHk = smem_u32(sHk),
              uHv = smem_u32(sHv), uSw = smem_u32(sSw);
    const u32 uK = uKs, uV = uK + 2 * (2 * BT * LDK);  // window tiles: uK + b * 2 BT LDK, uV + b * 2 BT LDV

    const int i_c = blockIdx.x, i_hq = blockIdx.y, i_h = i_hq / (HQ / H);
    const int tid = threadIdx.x, lane = tid & 31, gq = lane >> 2, q4 = lane & 3, r0 = (tid >> 5) * QW;
    const int diag = tid >> 5;  // the warp's diagonal k-tile of 16 keys in the causal products
    const int n = chunk_n[i_c];
    const i64 bos = bos_arr[n], eos = bos_arr[n + 1], t0 = chunk_t0[i_c];
    const int nt = (int)min((i64)BT, eos - t0);
    // rows r >= s_lo of the chunk have a shifted row t0 + r - W inside the sequence
    const int s_lo = (int)min((i64)BT, max((i64)0, bos + W - t0));
    const float qk2 = scale * LOG2E_F;
    const u32 uQa = uQ + 2 * (r0 * LDK + lane_a(LDK, lane));  // the warp's A fragments of sQ

    // 1. Slot operands: the shifted rows' gates (and s) first, in their own group: g into the end of
    // sGc's memory, s into sSw's (both overwritten once read); then q_slot rows, shifted k_slot / v
    // rows (zero for identity rows) and the chunk's states.
    IN_T* sG = reinterpret_cast<IN_T*>(reinterpret_cast<char*>(sGc) + 4 * BT * LDG - 2 * BT * LDM);
    stage_rows<BT, MD>(smem_u32(sG), g, ((t0 - W) * H + i_h) * MD, H * MD, s_lo, nt, tid);
    if (s != nullptr) stage_rows<BT, MD>(uSw, s, ((t0 - W) * H + i_h) * MD, H * MD, s_lo, nt, tid);
    cp_commit();
    stage_rows<BT, KD>(uQ, q_slot, (t0 * HQ + i_hq) * KD, HQ * KD, 0, nt, tid);
    stage_rows<BT, KD>(uKs, k_slot, ((t0 - W) * H + i_h) * KD, H * KD, s_lo, nt, tid);
    stage_rows<BT, VD>(uVs, v, ((t0 - W) * H + i_h) * VD, H * VD, s_lo, nt, tid);
    stage_rows<KD, MD>(uHk, hk_chunks, ((i64)i_c * H + i_h) * KD * MD, MD, 0, KD, tid);
    stage_rows<MD, VD>(uHv, hv_chunks, ((i64)i_c * H + i_h) * MD * VD, VD, 0, MD, tid);
    cp_commit();
    // Gc by columns: TPC threads per slot column, each a run of RPT rows (read at once into
    // registers), then the runs' offsets through s_tot.
    constexpr int TPC = MT / MD, RPT = BT / TPC;
    __shared__ float s_tot[TPC * MD];
    const int gm = tid % MD, part = tid / MD;
    const bool g_thread = part < TPC;
    float gc_run[RPT], w_run[RPT];
    cp_wait<1>();
    __syncthreads();  // the gates are in
    if (g_thread) {
#pragma unroll
        for (int rr = 0; rr < RPT; ++rr) {
            const int r = part * RPT + rr;
            gc_run[rr] = ld(sG, r * LDM + gm);
            w_run[rr] = s != nullptr ? ld(sSw, r * LDM + gm) : derive_s(gc_run[rr]);  // 0 for zero rows
        }
        float acc = 0.f;
#pragma unroll
        for (int rr = 0; rr < RPT; ++rr) {
            acc += fmaxf(gc_run[rr], G_FLOOR) * LOG2E_F;
            gc_run[rr] = acc;
        }
        s_tot[part * MD + gm] = acc;  // the run's total
    }
    __syncthreads();  // every total is in, and every raw gate and s has been read
    float off = 0.f;
    if (g_thread)
        for (int p = 0; p < part; ++p) off += s_tot[p * MD + gm];
    bool unsafe = false;
    if (g_thread)
#pragma unroll
        for (int rr = 0; rr < RPT; ++rr) {
            const int r = part * RPT + rr;
            const float gc = gc_run[rr] + off;
            sGc[r * LDG + gm] = gc;
            unsafe |= fabsf(gc) > SAFE2;
            sSw[r * LDM + gm] = __float2bfloat16_rn(w_run[rr] * exp2_g(-gc));
        }
    cp_wait<0>();
    if (__syncthreads_or(unsafe)) {  // decays do not factor: the fp32 kernel redoes this block
        if (tid == 0) redo[1 + atomicAdd(redo, 1)] = i_c * HQ + i_hq;
        return;
    }

    // 2. Slot logits of the warp's rows: Ls = qk2 2^Gc (Qs Hk_c + causal(Qs Ks^T) Sw).
    float m_i[2], l_i[2], acc[VD / 8][4];
    {
        u32 qa[KD / 16][4];
#pragma unroll
        for (int kt = 0; kt < KD / 16; ++kt) ldsm4(qa[kt], uQa + 2 * kt * 16);
        float ls[MD / 8][4];
        zero<MD>(ls);
        mm_rs<KD, MD, false, LDM>(ls, qa, uHk, lane);
        {
            float a_t[BT / 8][4];
            zero<BT>(a_t);
            mm_rs<KD, BT, true, LDK>(a_t, qa, uKs, lane, KD / 16, diag);  // Qs Ks^T up to the diagonal
            causal(a_t, r0, lane);
            u32 aa[BT / 16][4];
            to_a<BT>(aa, a_t);
            mm_rs<BT, MD, false, LDM>(ls, aa, uSw, lane, diag);
        }
        // 3. Softmax seed: max and sum over the M slots; Pe = 2^(Ls - max) 2^Gc.
        m_i[0] = m_i[1] = -INFINITY;
#pragma unroll
        for (int j = 0; j < MD / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                ls[j][e] *= qk2 * exp2_g(sGc[(r0 + gq + 8 * (e >> 1)) * LDG + 8 * j + 2 * q4 + (e & 1)]);
                m_i[e >> 1] = fmaxf(m_i[e >> 1], ls[j][e]);
            }
        m_i[0] = quad_max(m_i[0]);
        m_i[1] = quad_max(m_i[1]);
        l_i[0] = l_i[1] = 0.f;  // this thread's part of the row sums (quad_sum at the end)
#pragma unroll
        for (int j = 0; j < MD / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2_w(ls[j][e] - m_i[e >> 1]);
                l_i[e >> 1] += p;
                ls[j][e] = p * exp2_g(sGc[(r0 + gq + 8 * (e >> 1)) * LDG + 8 * j + 2 * q4 + (e & 1)]);
            }
        u32 pe[MD / 16][4];
        to_a<MD>(pe, ls);
        // 4. Slot values: acc = Pe Hv_c + causal(Pe Sw^T) Vs.
        zero<VD>(acc);
        mm_rs<MD, VD, false, LDV>(acc, pe, uHv, lane);
        float pw[BT / 8][4];
        zero<BT>(pw);
        mm_rs<MD, BT, true, LDM>(pw, pe, uSw, lane, MD / 16, diag);  // Pe Sw^T up to the diagonal
        causal(pw, r0, lane);
        u32 pa[BT / 16][4];
        to_a<BT>(pa, pw);
        mm_rs<BT, VD, false, LDV>(acc, pa, uVs, lane, diag);
    }
    __syncthreads();  // slot operands done: the window tiles take their memory, sQ takes q

    // 5. Window band: keys (t-W, t] of the chunk's queries in tiles of BT keys from max(bos, t0-W+1),
    // key positions relative to t0. Two buffers: tile it + 1's loads start when every warp is done
    // with tile it - 1 (the one barrier per tile) and run under tile it's products. Tiles whose
    // every key is in every real row's band (the band's inside, all but its two ends at W >= 2 BT)
    // take the unmasked copy of the body.
    const int k_lo = (int)(max(bos, t0 - W + 1) - t0);
    const int n_tiles = W > 0 ? (nt - k_lo + BT - 1) / BT : 0;
    auto stage_tile = [&](int it) {
        const i64 row0 = (t0 + k_lo + it * BT) * H + i_h;
        const int keys = nt - k_lo - it * BT;  // rows of the tile before the chunk's end
        stage_rows<BT, KD>(uK + (it & 1) * (2 * BT * LDK), k, row0 * KD, H * KD, 0, keys, tid);
        stage_rows<BT, VD>(uV + (it & 1) * (2 * BT * LDV), v, row0 * VD, H * VD, 0, keys, tid);
        cp_commit();
    };
    if (n_tiles > 0) {
        stage_rows<BT, KD>(uQ, q, (t0 * HQ + i_hq) * KD, HQ * KD, 0, nt, tid);
        stage_tile(0);
    }
    u32 qf[KD / 16][4];
    auto tile = [&](int it, auto masked) {
        cp_wait<0>();
        __syncthreads();  // tile it is in for every thread, and every warp is done with tile it - 1
        if (it + 1 < n_tiles) stage_tile(it + 1);
        if (it == 0)
#pragma unroll
            for (int kt = 0; kt < KD / 16; ++kt) ldsm4(qf[kt], uQa + 2 * kt * 16);
        float sc[BT / 8][4];
        zero<BT>(sc);
        mm_rs<KD, BT, true, LDK>(sc, qf, uK + (it & 1) * (2 * BT * LDK), lane);
        // raw scores; the masked copy keeps key j = t0 + s0 + col for query t = t0 + row where
        // t - W < j <= t (the tile's keys are inside the sequence and before the chunk's end)
        const int s0 = k_lo + it * BT;
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < BT / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (decltype(masked)::value) {
                    const int d = s0 + 8 * j + 2 * q4 + (e & 1) - (r0 + gq + 8 * (e >> 1));
                    if (d > 0 || d <= -W) sc[j][e] = -INFINITY;
                }
                mx[e >> 1] = fmaxf(mx[e >> 1], sc[j][e]);
            }
        float alpha[2];
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
            const float m_n = fmaxf(m_i[h2], quad_max(mx[h2]) * qk2);  // >= the slot max: finite
            alpha[h2] = exp2_w(m_i[h2] - m_n);
            m_i[h2] = m_n;
            l_i[h2] *= alpha[h2];
        }
#pragma unroll
        for (int j = 0; j < BT / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2_w(fmaf(sc[j][e], qk2, -m_i[e >> 1]));
                l_i[e >> 1] += p;
                sc[j][e] = p;
            }
#pragma unroll
        for (int j = 0; j < VD / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[j][e] *= alpha[e >> 1];
        u32 pa[BT / 16][4];
        to_a<BT>(pa, sc);
        mm_rs<BT, VD, false, LDV>(acc, pa, uV + (it & 1) * (2 * BT * LDV), lane);
    };
    for (int it = 0; it < n_tiles; ++it) {
        const int s0 = k_lo + it * BT;
        if (s0 + BT - 1 <= 0 && s0 > nt - 1 - W) tile(it, Flag<false>());
        else tile(it, Flag<true>());
    }

    // 6. Normalise and store o, lse (natural log).
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
        const float l = quad_sum(l_i[h2]), inv = 1.f / l;
        const int tt = r0 + gq + 8 * h2;
        if (tt >= nt) continue;
        const i64 t = t0 + tt;
        u32* po = reinterpret_cast<u32*>(o + (t * HQ + i_hq) * VD + 2 * q4);
#pragma unroll
        for (int j = 0; j < VD / 8; ++j) po[4 * j] = pack_bf16(acc[j][2 * h2] * inv, acc[j][2 * h2 + 1] * inv);
        if (q4 == 0) lse[((t / T) * HQ + i_hq) * T + t % T] = (m_i[h2] + log2f(l)) * 0.6931471805599453f;
    }
}

// Chunk states for nha_fwd_main_mma (replaces nha_fwd_state_tc in NHA_MMA builds), grid
// (MD / SC, N * H), MT threads. A block walks one (sequence, head)'s chunks in order for SC slot
// columns: Hk[:, m0 .. m0+SC] and Hv[m0 .. m0+SC, :], whose updates share the chunk's gate weights.
// Its state tiles stay in the warps' mma accumulators (fp32; stored at each chunk start as IN_T,
// which is what nha_fwd_main_mma's bf16 products read, and as fp32 at the end), and each chunk is
// one product per part (MATH.md section 2):
//   Hk <- a Hk + Ks^T Wc,   Hv <- a Hv + Wc^T Vs,   Wc = S 2^(Gc_last - Gc) (<= 1, bfloat16),  a = 2^Gc_last,
// the Triton walk's form (forward.py fwd_chunk_update). A chunk's shifted rows and its gates (and s)
// reach shared memory by cp.async through a ring of SST stages, SST - 1 chunks ahead of the walk,
// so the chain per chunk is two barriers, the gate sums and the products. Gate sums: each warp takes
// SC / 4 slot columns, one lane per column and run of 8 rows; suffix sums inside a run, then across
// the runs of a column by shuffles.
#define SC 16                                   // slot columns per block
#ifndef SST
#define SST 2                                   // ring stages (configs.state_mma_smem_bytes)
#endif
static_assert(MT == SC * (BT / 8), "nha_fwd_state_mma: one lane per slot column and run of 8 rows");
static_assert(SC * 2 == 32, "nha_fwd_state_mma: a row of SC gates is two 16-byte pieces");

// One block's share of a chunk's state update (nha_fwd_state_mma, nha_fwd_state_local_mma): SC slot
// columns m0 .. m0+SC of Hk and of Hv, head h. The warp's accumulator tiles: Hk part (Flag<true>),
// row tiles kd = 16 (warp + 4 i) and both 8-column halves of the SC slots; Hv part (Flag<false>),
// the SC slot rows and value columns 16 (warp + 4 i) + 8 jn. Element e of (i, jn) is the state's
// (row, col) in offset(), and e, e + 1 are adjacent in memory.
// A chunk's stage in shared memory: XK [BT, KD+8] and XV [BT, VD+8] (shifted k_slot and v rows),
// G [BT, SC] and S [BT, SC] (gates and write weights of the block's slot columns, as stored: IN_T).
constexpr int NIK = (KD / 16 + 3) / 4, NIV = (VD / 16 + 3) / 4;
constexpr int XKS = BT * (KD + 8), XS = XKS + BT * (VD + 8), GS = BT * SC, STAGE = XS + 2 * GS;
struct StateAcc {
    float k[NIK][2][4], v[NIV][2][4];
};
struct StatePart {
    int m0, h, H, W, tid, lane, warp, gq, q4, gm, run;  // gm, run: gate column, run of rows 8 run ..

    __device__ __forceinline__ StatePart(int part, int h_, int H_, int W_)
        : m0(part * SC), h(h_), H(H_), W(W_), tid(threadIdx.x), lane(threadIdx.x & 31), warp(threadIdx.x >> 5),
          gq((threadIdx.x & 31) >> 2), q4(threadIdx.x & 3), gm(4 * (threadIdx.x >> 5) + (threadIdx.x & 3)),
          run((threadIdx.x & 31) >> 2) {}
    template <bool K> __device__ static constexpr i64 state_size(Flag<K>) { return K ? (i64)KD * MD : (i64)MD * VD; }
    template <bool K> __device__ __forceinline__ i64 offset(Flag<K>, int i, int jn, int e) const {  // in one state
        if (K) return (i64)(16 * (warp + 4 * i) + gq + 8 * (e >> 1)) * MD + m0 + 8 * jn + 2 * q4 + (e & 1);
        return (i64)(m0 + gq + 8 * (e >> 1)) * VD + 16 * (warp + 4 * i) + 8 * jn + 2 * q4 + (e & 1);
    }
    // the pair (e, e + 1) of tile (i, jn) of the part
    template <bool K> __device__ __forceinline__ float* at(StateAcc& a, Flag<K>, int i, int jn, int e) const {
        if constexpr (K) return &a.k[i][jn][e];
        else return &a.v[i][jn][e];
    }
    // the slot of element e of tile (i, jn): its decay a = 2^Gc_last scales it
    template <bool K> __device__ __forceinline__ int slot(Flag<K>, int jn, int e) const {
        return K ? 8 * jn + 2 * q4 + (e & 1) : gq + 8 * (e >> 1);
    }
    // f(part, i, jn, e) for one part's tiles (NI of them, D / 16 rows or columns in all), e = 0, 2 ...
    template <bool K, int NI, int D, typename F> __device__ __forceinline__ void part_pairs(F& f) const {
#pragma unroll
        for (int i = 0; i < NI; ++i)
            if (warp + 4 * i < D / 16)
#pragma unroll
                for (int jn = 0; jn < 2; ++jn) {
                    f(Flag<K>(), i, jn, 0);
                    f(Flag<K>(), i, jn, 2);
                }
    }
    // ... and for both parts'
    template <typename F> __device__ __forceinline__ void for_pairs(F&& f) const {
        part_pairs<true, NIK, KD>(f);
        part_pairs<false, NIV, VD>(f);
    }
    // The chunk of rows t0 .. t0+BT of sequence [bos, eos) into stage st (cp.async, not committed);
    // zero-filled rows (identity tokens, past the end) have gate 0 and weight 0.
    __device__ __forceinline__ void stage_chunk(IN_T* st, i64 t0, i64 bos, i64 eos, const IN_T* k_slot,
                                                const IN_T* v, const IN_T* g, const IN_T* s) const {
        // rows lo <= r < hi have a shifted row t0 + r - W inside the sequence
        const int lo = (int)min((i64)BT, max((i64)0, bos + W - t0)), hi = (int)min((i64)BT, eos - t0);
        const u32 ust = smem_u32(st);
        stage_rows<BT, KD>(ust, k_slot, ((t0 - W) * H + h) * KD, H * KD, lo, hi, tid);
        stage_rows<BT, VD>(ust + 2 * XKS, v, ((t0 - W) * H + h) * VD, H * VD, lo, hi, tid);
        const int r = tid >> 1, half = (tid & 1) * 8;  // BT rows x 2 pieces = MT threads
        const bool ok = r >= lo && r < hi;
        const i64 o = ((t0 + r - W) * H + h) * MD + m0 + half;
        cp16(ust + 2 * (XS + r * SC + half), ok ? g + o : g, ok);
        if (s != nullptr) cp16(ust + 2 * (XS + GS + r * SC + half), ok ? s + o : s, ok);
    }
    // Wc = S 2^(Gc_last - Gc) into sW [BT, SC+8], 2^Gc_last into s_a [SC]: gates after each row inside
    // the run, then the runs after this one (lanes 4 apart).
    __device__ __forceinline__ void weights(const IN_T* st, const IN_T* s, IN_T* sW, float* s_a) const {
        float ex[8], tot = 0.f;
#pragma unroll
        for (int r = 7; r >= 0; --r) {
            ex[r] = tot;
            tot += fmaxf(ld(st + XS, (8 * run + r) * SC + gm), G_FLOOR) * LOG2E_F;
        }
        float incl = tot;  // inclusive suffix sum over runs >= run
#pragma unroll
        for (int d = 1; d < BT / 8; d *= 2) {
            const float y = __shfl_down_sync(0xffffffffu, incl, 4 * d);
            if (run + d < BT / 8) incl += y;
        }
        const float later = incl - tot;
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            const int o = (8 * run + r) * SC + gm;
            const float w = s != nullptr ? ld(st + XS + GS, o) : derive_s(ld(st + XS, o));
            sW[(8 * run + r) * (SC + 8) + gm] = __float2bfloat16_rn(w * exp2_g(ex[r] + later));
        }
        if (run == 0) s_a[gm] = exp2f(incl);
    }
    // acc.k += Ks^T Wc and acc.v += Wc^T Vs, the rows of stage st.
    __device__ __forceinline__ void product(StateAcc& acc, const IN_T* st, const IN_T* sW) const {
        const IN_T* xk = st;
        const IN_T* xv = st + XKS;
#pragma unroll
        for (int kt = 0; kt < BT / 16; ++kt) {
            u32 a[4], b[4];
            ldsm4_t(b, at_b_kn(sW, SC + 8, kt * 16, 0, lane));  // B = Wc
#pragma unroll
            for (int i = 0; i < NIK; ++i)
                if (warp + 4 * i < KD / 16) {  // A = Ks^T: rows kd, stored [j][kd]
                    ldsm4_t(a, xk + (kt * 16 + (lane & 7) + (lane >> 4) * 8) * (KD + 8) + 16 * (warp + 4 * i) + ((lane >> 3) & 1) * 8);
                    mma16816(acc.k[i][0], a, b[0], b[1]);
                    mma16816(acc.k[i][1], a, b[2], b[3]);
                }
            // A = Wc^T: rows m, stored [j][m]
            ldsm4_t(a, sW + (kt * 16 + (lane & 7) + (lane >> 4) * 8) * (SC + 8) + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int i = 0; i < NIV; ++i)
                if (warp + 4 * i < VD / 16) {
                    ldsm4_t(b, at_b_kn(xv, VD + 8, kt * 16, 16 * (warp + 4 * i), lane));
                    mma16816(acc.v[i][0], a, b[0], b[1]);
                    mma16816(acc.v[i][1], a, b[2], b[3]);
                }
        }
    }
};

// Dynamic shared memory: SST stages (StatePart).
extern "C" __global__ void __launch_bounds__(MT) nha_fwd_state_mma(
    const IN_T* __restrict__ k_slot, const IN_T* __restrict__ v, const IN_T* __restrict__ g,
    const IN_T* __restrict__ s, const float* __restrict__ hk0, const float* __restrict__ hv0,
    const i64* __restrict__ bos_arr, const int* __restrict__ seq_chunk0,
    IN_T* __restrict__ hk_chunks, IN_T* __restrict__ hv_chunks,
    float* __restrict__ hk_out, float* __restrict__ hv_out, int H, int W) {
    extern __shared__ uint4 smem_state[];
    IN_T* ring = reinterpret_cast<IN_T*>(smem_state);
    __shared__ __align__(16) IN_T sW[BT * (SC + 8)];  // Wc [BT, SC]
    __shared__ float s_a[SC];                         // 2^Gc_last
    const StatePart P(blockIdx.x, blockIdx.y % H, H, W);
    const int n = blockIdx.y / H;
    const i64 bos = bos_arr[n], eos = bos_arr[n + 1];
    const int c0 = seq_chunk0[n], c1 = seq_chunk0[n + 1];
    const i64 nh = (i64)n * H + P.h;

    StateAcc acc;
    P.for_pairs([&](auto part, int i, int jn, int e) {
        const float* h0 = decltype(part)::value ? hk0 : hv0;
        float2 x = make_float2(0.f, 0.f);
        if (h0 != nullptr) x = *reinterpret_cast<const float2*>(h0 + nh * P.state_size(part) + P.offset(part, i, jn, e));
        float* a = P.at(acc, part, i, jn, e);
        a[0] = x.x;
        a[1] = x.y;
    });
    // chunk c into ring stage (c - c0) % SST; always one commit group
    auto stage_chunk = [&](int c) {
        if (c < c1) P.stage_chunk(ring + ((c - c0) % SST) * STAGE, bos + (i64)(c - c0) * BT, bos, eos, k_slot, v, g, s);
        cp_commit();
    };
#pragma unroll
    for (int k = 0; k < SST - 1; ++k) stage_chunk(c0 + k);
    for (int c = c0; c < c1; ++c) {
        const i64 ch = (i64)c * H + P.h;
        P.for_pairs([&](auto part, int i, int jn, int e) {
            IN_T* dst = decltype(part)::value ? hk_chunks : hv_chunks;
            const float* a = P.at(acc, part, i, jn, e);
            *reinterpret_cast<u32*>(dst + ch * P.state_size(part) + P.offset(part, i, jn, e)) = pack_bf16(a[0], a[1]);
        });
        cp_wait<SST - 2>();  // chunk c's group is complete
        __syncthreads();     // ... for every thread; and the previous step is done with sW and its stage
        stage_chunk(c + SST - 1);
        const IN_T* st = ring + ((c - c0) % SST) * STAGE;
        P.weights(st, s, sW, s_a);
        __syncthreads();
        P.for_pairs([&](auto part, int i, int jn, int e) {
            float* a = P.at(acc, part, i, jn, e);
            a[0] *= s_a[P.slot(part, jn, e)];
            a[1] *= s_a[P.slot(part, jn, e + 1)];
        });
        P.product(acc, st, sW);
    }
    cp_wait<0>();  // the empty groups of the last steps
    P.for_pairs([&](auto part, int i, int jn, int e) {
        float* out = decltype(part)::value ? hk_out : hv_out;
        const float* a = P.at(acc, part, i, jn, e);
        if (out != nullptr)
            *reinterpret_cast<float2*>(out + nh * P.state_size(part) + P.offset(part, i, jn, e)) = make_float2(a[0], a[1]);
    });
}

// Chunk states in two passes (configs.state_pass "scan", picked for few long sequences, as the Triton
// backend's "scan"): nha_fwd_state_local_mma computes every chunk's own update at once, nha_fwd_state_scan
// chains them per state element. The walk above has one block per (sequence, head, slot tile) on a
// chain of all the sequence's chunks: few blocks and long chains when B is small and T large.
//
// Step 1, grid (NC * H, MD / SC), MT threads, dynamic shared memory one stage (StatePart):
// chunk c's own updates L_c (Ks^T Wc and Wc^T Vs, rounded to IN_T as the Triton scan stores them for
// bf16) into row c of hk_chunks and hv_chunks, and a_c [NC, H, M] = 2^Gc_last.
extern "C" __global__ void __launch_bounds__(MT) nha_fwd_state_local_mma(
    const IN_T* __restrict__ k_slot, const IN_T* __restrict__ v, const IN_T* __restrict__ g,
    const IN_T* __restrict__ s, const i64* __restrict__ bos_arr, const int* __restrict__ chunk_n,
    const i64* __restrict__ chunk_t0, IN_T* __restrict__ hk_chunks, IN_T* __restrict__ hv_chunks,
    float* __restrict__ a_c, int H, int W) {
    extern __shared__ uint4 smem_state[];
    IN_T* st = reinterpret_cast<IN_T*>(smem_state);
    __shared__ __align__(16) IN_T sW[BT * (SC + 8)];
    __shared__ float s_a[SC];
    const int c = blockIdx.x / H;
    const StatePart P(blockIdx.y, blockIdx.x % H, H, W);
    const int n = chunk_n[c];
    const i64 ch = (i64)c * H + P.h;
    P.stage_chunk(st, chunk_t0[c], bos_arr[n], bos_arr[n + 1], k_slot, v, g, s);
    cp_commit();
    cp_wait<0>();
    __syncthreads();
    P.weights(st, s, sW, s_a);
    __syncthreads();
    StateAcc acc;
    P.for_pairs([&](auto part, int i, int jn, int e) {
        float* a = P.at(acc, part, i, jn, e);
        a[0] = a[1] = 0.f;
    });
    P.product(acc, st, sW);
    P.for_pairs([&](auto part, int i, int jn, int e) {
        IN_T* dst = decltype(part)::value ? hk_chunks : hv_chunks;
        const float* a = P.at(acc, part, i, jn, e);
        *reinterpret_cast<u32*>(dst + ch * P.state_size(part) + P.offset(part, i, jn, e)) = pack_bf16(a[0], a[1]);
    });
    if (P.run == 0) a_c[ch * MD + P.m0 + P.gm] = s_a[P.gm];
}

// Step 2, grid (ceil((K M + M V) / NT), N * H), NT threads, one state element per thread, in place:
// from h = h0 (or 0), for each chunk c of the sequence, row c := h (the state before chunk c) and
// h := a_c h + L_c (what row c held); the last h (fp32) to hk_out / hv_out. UNROLL chunks' rows and
// decays are loaded before their steps: the loads do not wait on the chain.
#define SCAN_UNROLL 8
extern "C" __global__ void __launch_bounds__(NT) nha_fwd_state_scan(
    const float* __restrict__ hk0, const float* __restrict__ hv0, const int* __restrict__ seq_chunk0,
    IN_T* __restrict__ hk_chunks, IN_T* __restrict__ hv_chunks, const float* __restrict__ a_c,
    float* __restrict__ hk_out, float* __restrict__ hv_out, int H) {
    const int n = blockIdx.y / H, h = blockIdx.y % H;
    const i64 EK = (i64)KD * MD, E = EK + (i64)MD * VD;
    const i64 e = (i64)blockIdx.x * NT + threadIdx.x;
    if (e >= E) return;  // no barriers below
    const bool is_k = e < EK;
    const int m = is_k ? (int)(e % MD) : (int)((e - EK) / VD);  // the slot whose decay the element takes
    const i64 idx = is_k ? e : e - EK, size = is_k ? EK : E - EK;
    IN_T* buf = is_k ? hk_chunks : hv_chunks;
    const float* h0 = is_k ? hk0 : hv0;
    float x = h0 != nullptr ? h0[((i64)n * H + h) * size + idx] : 0.f;
    const int c0 = seq_chunk0[n], c1 = seq_chunk0[n + 1];
    int c = c0;
    for (; c + SCAN_UNROLL <= c1; c += SCAN_UNROLL) {
        float l[SCAN_UNROLL], a[SCAN_UNROLL];
#pragma unroll
        for (int u = 0; u < SCAN_UNROLL; ++u) {
            const i64 row = (i64)(c + u) * H + h;
            l[u] = ld(buf, row * size + idx);
            a[u] = a_c[row * MD + m];
        }
#pragma unroll
        for (int u = 0; u < SCAN_UNROLL; ++u) {
            st(buf, ((i64)(c + u) * H + h) * size + idx, x);
            x = a[u] * x + l[u];
        }
    }
    for (; c < c1; ++c) {
        const i64 row = (i64)c * H + h;
        const float l = ld(buf, row * size + idx);
        st(buf, row * size + idx, x);
        x = a_c[row * MD + m] * x + l;
    }
    float* out = is_k ? hk_out : hv_out;
    if (out != nullptr) out[((i64)n * H + h) * size + idx] = x;
}
#endif  // NHA_MMA
#endif  // NHA_NO_TC
