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
