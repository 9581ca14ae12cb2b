// NHA forward on CUDA cores: chunk states, then one block per (chunk, query head).
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
        a = expf(ld(g, o));  // g = -inf gives exactly 0
        w = ld(s, o);
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
extern "C" __global__ void __launch_bounds__(NT) nha_fwd_main(
    const IN_T* __restrict__ q, const IN_T* __restrict__ k, const IN_T* __restrict__ v,
    const IN_T* __restrict__ g, const IN_T* __restrict__ s, const IN_T* __restrict__ q_slot,
    const IN_T* __restrict__ k_slot, const float* __restrict__ hk_chunks,
    const float* __restrict__ hv_chunks, const i64* __restrict__ bos_arr,
    const int* __restrict__ chunk_n, const i64* __restrict__ chunk_t0, IN_T* __restrict__ o,
    float* __restrict__ lse, int T, int HQ, int H, int K, int V, int M, int W, float scale) {
    extern __shared__ float smem[];
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

    const int i_c = blockIdx.x, i_hq = blockIdx.y, i_h = i_hq / (HQ / H);
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
        const float* p_h = hk_chunks + ((i64)i_c * H + i_h) * K * M;
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
            const int kk = i_lane + LANES * r;
            b_h[r] = (m_ok && kk < K) ? p_h[(i64)kk * M + m] : 0.f;
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
        const float* p_h = hv_chunks + ((i64)i_c * H + i_h) * M * V;
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
            const int m = i_lane + LANES * r;
            b_h[r] = (v_ok && m < M) ? p_h[(i64)m * V + vv] : 0.f;
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

// ================================================================================================
// Tensor-core forward (fp16 / bf16 inputs; K, V, M multiples of 16). forward.py picks these two
// kernels when the shape allows and the ones above otherwise (fp32 keeps exact CUDA-core math).
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
#endif  // NHA_NO_TC
