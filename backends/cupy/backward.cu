// NHA backward on CUDA cores (notes MATH.md section 3), deterministic: every sum has one fixed
// order and no float atomics are used.
//
// Shifted time axis as in forward.cu: shifted row t writes token j = t - W into the slots (an
// identity row when j < bos). Per KV head, the gradient with respect to the state after row t,
//     G(t) = dHd(t) + alpha(t+1) * G(t+1),
//     dHd(t) = sum over the group's query heads of  scale * outer(q_slot_t, dLs_t)   (for Hk)
//                                               and  outer(Ps_t, do_t)              (for Hv),
// runs backwards through the sequence the way the forward state runs forwards. From it:
//     dk_slot_j = G_k(t) s_j,   ds_j = G_k(t)^T k_slot_j + G_v(t) v_j,   dv_j += G_v(t)^T s_j,
//     dg_j = sum_{t' >= t} [ sum_heads (dLs*Ls + Ps*dov)(t') - s(t') * ds(t') ]   (t = j + W).
// The gate gradient is MATH.md's reverse-cumsum identity, so no per-row states are stored.
//
// Kernels (launch order; nha_fwd_chunk_state from forward.cu provides the chunk states first):
//   nha_bwd_prep        Dt[r, hq] = do_r . o_r
//   nha_bwd_q           grid (NC, HQ): Ls, dov, Ps, dLs (stored, [rows,HQ,M] fp32), dq_slot part,
//                       window part of dq
//   nha_bwd_gstate      grid (ceil((K*M+M*V)/NT), N*H): G at every chunk end, dhk0/dhv0
//   nha_bwd_slot_kv     grid (NC, H): dk_slot, dv (slot part), ds, per-row gate terms
//   nha_bwd_dg          grid (ceil(H*M/NT), N): reverse cumsum -> dg, ds un-shifted
//   nha_bwd_window_kv   grid (NC, H): window part of dk, dv, plus the slot parts, final stores
#include "nha_common.cuh"

extern "C" __global__ void __launch_bounds__(NT) nha_bwd_prep(
    const IN_T* __restrict__ do_, const IN_T* __restrict__ o, float* __restrict__ Dt, i64 R, int V) {
    const i64 i = (i64)blockIdx.x * NT + threadIdx.x;  // i = row * HQ + hq
    if (i >= R) return;
    float d = 0.f;
    for (int vv = 0; vv < V; ++vv) d += ld(do_, i * V + vv) * ld(o, i * V + vv);
    Dt[i] = d;
}

// Dynamic shared memory, floats (sizes in backward.py, same order):
//   A_s, W_s, L_s, dL_s [BT*M]   Q_s [BT*K]   K_s [BS*K]   V_s [BS*V]   dO_s [BT*V]
//   dQ_s [BT*K]   P_s [BT*BS]   r_lse, r_D [BT]
extern "C" __global__ void __launch_bounds__(NT) nha_bwd_q(
    const IN_T* __restrict__ do_, const IN_T* __restrict__ q, const IN_T* __restrict__ k,
    const IN_T* __restrict__ v, const IN_T* __restrict__ g, const IN_T* __restrict__ s,
    const IN_T* __restrict__ q_slot, const IN_T* __restrict__ k_slot,
    const float* __restrict__ lse, const float* __restrict__ Dt,
    const float* __restrict__ hk_chunks, const float* __restrict__ hv_chunks,
    const i64* __restrict__ bos_arr, const int* __restrict__ chunk_n, const i64* __restrict__ chunk_t0,
    float* __restrict__ P_buf, float* __restrict__ dL_buf, float* __restrict__ T1_buf,
    IN_T* __restrict__ dq, IN_T* __restrict__ dq_slot,
    int T, int HQ, int H, int K, int V, int M, int W, float scale) {
    extern __shared__ float smem[];
    float* A_s = smem;
    float* W_s = A_s + BT * M;
    float* L_s = W_s + BT * M;
    float* dL_s = L_s + BT * M;
    float* Q_s = dL_s + BT * M;
    float* K_s = Q_s + BT * K;
    float* V_s = K_s + BS * K;
    float* dO_s = V_s + BS * V;
    float* dQ_s = dO_s + BT * V;
    float* P_s = dQ_s + BT * K;
    float* r_lse = P_s + BT * BS;
    float* r_D = r_lse + BT;

    const int i_c = blockIdx.x, i_hq = blockIdx.y, i_h = i_hq / (HQ / H);
    const int tid = threadIdx.x, i_lane = tid % LANES, i_col = tid / LANES;
    const int n = chunk_n[i_c];
    const i64 bos = bos_arr[n], eos = bos_arr[n + 1];
    const i64 t0 = chunk_t0[i_c];
    const int nt = (int)min((i64)BT, eos - t0);

    // 1. Per-chunk inputs: gates of shifted rows, q_slot, shifted k_slot and v, do, lse, Dt.
    for (int i = tid; i < BT * M; i += NT) {
        const int tt = i / M, m = i % M;
        const i64 j = t0 + tt - W;
        const bool ok = tt < nt && j >= bos;
        A_s[i] = ok ? expf(ld(g, (j * H + i_h) * M + m)) : 1.f;
        W_s[i] = ok ? ld(s, (j * H + i_h) * M + m) : 0.f;
    }
    for (int i = tid; i < BT * K; i += NT) {
        const int tt = i / K, kk = i % K;
        const i64 t = t0 + tt, j = t - W;
        Q_s[i] = tt < nt ? ld(q_slot, (t * HQ + i_hq) * K + kk) : 0.f;
        K_s[i] = (tt < nt && j >= bos) ? ld(k_slot, (j * H + i_h) * K + kk) : 0.f;
        dQ_s[i] = 0.f;
    }
    for (int i = tid; i < BT * V; i += NT) {
        const int tt = i / V, vv = i % V;
        const i64 t = t0 + tt, j = t - W;
        V_s[i] = (tt < nt && j >= bos) ? ld(v, (j * H + i_h) * V + vv) : 0.f;
        dO_s[i] = tt < nt ? ld(do_, (t * HQ + i_hq) * V + vv) : 0.f;
    }
    if (tid < BT) {
        const i64 t = t0 + tid;
        r_lse[tid] = tid < nt ? lse[((t / T) * HQ + i_hq) * T + t % T] : 0.f;
        r_D[tid] = tid < nt ? Dt[t * HQ + i_hq] : 0.f;
    }
    __syncthreads();

    // 2. Slot logits (as in the forward): lanes own column m of Hk, reduce over k.
    for (int m0 = 0; m0 < M; m0 += BM) {
        const int m = m0 + i_col;
        const bool m_ok = m < M;
        const float* p_h = hk_chunks + ((i64)i_c * H + i_h) * K * M;
        float b_h[RMAX];
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
    // 3. dov[t, m] = do_t . Hv(t)[m, :]: lanes own row m of Hv, reduce over v.
    for (int m0 = 0; m0 < M; m0 += BM) {
        const int m = m0 + i_col;
        const bool m_ok = m < M;
        const float* p_h = hv_chunks + ((i64)i_c * H + i_h) * M * V;
        float b_h[RMAX];
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
            const int vv = i_lane + LANES * r;
            b_h[r] = (m_ok && vv < V) ? p_h[(i64)m * V + vv] : 0.f;
        }
        for (int tt = 0; tt < nt; ++tt) {
            const float a = m_ok ? A_s[tt * M + m] : 1.f;
            const float w = m_ok ? W_s[tt * M + m] : 0.f;
            float acc = 0.f;
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
                const int vv = i_lane + LANES * r;
                if (vv < V) {
                    b_h[r] = a * b_h[r] + w * V_s[tt * V + vv];
                    acc += dO_s[tt * V + vv] * b_h[r];
                }
            }
            acc = group_sum(acc);
            if (i_lane == 0 && m_ok) dL_s[tt * M + m] = acc;
        }
    }
    __syncthreads();

    // 4. Ps = exp(Ls - lse), dLs = Ps (dov - Dt); the gate term dLs*Ls + Ps*dov = <dHd, H>.
    for (int i = tid; i < nt * M; i += NT) {
        const int tt = i / M, m = i % M;
        const float l = L_s[i], dov = dL_s[i];
        const float p = exp_sub(l, r_lse[tt]);
        const float dl = p * (dov - r_D[tt]);
        const i64 o_b = ((t0 + tt) * HQ + i_hq) * M + m;
        P_buf[o_b] = p;
        dL_buf[o_b] = dl;
        T1_buf[o_b] = dl * l + p * dov;
        dL_s[i] = dl;
    }
    __syncthreads();

    // 5. dq_slot[t, k] = scale * sum_m Hk(t)[k, m] dLs[t, m]: lanes own row k of Hk, reduce over m.
    for (int k0 = 0; k0 < K; k0 += BK) {
        const int kk = k0 + i_col;
        const bool k_ok = kk < K;
        const float* p_h = hk_chunks + ((i64)i_c * H + i_h) * K * M;
        float b_h[RMAX];
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
            const int m = i_lane + LANES * r;
            b_h[r] = (k_ok && m < M) ? p_h[(i64)kk * M + m] : 0.f;
        }
        for (int tt = 0; tt < nt; ++tt) {
            const float u = k_ok ? K_s[tt * K + kk] : 0.f;
            float acc = 0.f;
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
                const int m = i_lane + LANES * r;
                if (m < M) {
                    b_h[r] = A_s[tt * M + m] * b_h[r] + u * W_s[tt * M + m];
                    acc += dL_s[tt * M + m] * b_h[r];
                }
            }
            acc = group_sum(acc);
            if (i_lane == 0 && k_ok) {
                if (dq_slot != nullptr) st(dq_slot, ((t0 + tt) * HQ + i_hq) * K + kk, scale * acc);
                else dQ_s[tt * K + kk] = scale * acc;
            }
        }
    }
    __syncthreads();
    if (dq_slot != nullptr) {  // q_slot read separate data: reload q for the window
        for (int i = tid; i < BT * K; i += NT) {
            const int tt = i / K, kk = i % K;
            Q_s[i] = tt < nt ? ld(q, ((t0 + tt) * HQ + i_hq) * K + kk) : 0.f;
        }
    }
    __syncthreads();

    // 6. Window band: dLw = Pw (do . v_j - Dt), dq += scale * dLw @ k.
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
                float x = 0.f;
                if (tt < nt && j < k_hi && j <= t && j > t - W) {
                    float d = 0.f, dp = 0.f;
                    for (int kk = 0; kk < K; ++kk) d += Q_s[tt * K + kk] * K_s[jj * K + kk];
                    for (int vv = 0; vv < V; ++vv) dp += dO_s[tt * V + vv] * V_s[jj * V + vv];
                    const float pw = exp_sub(scale * d, r_lse[tt]);
                    x = pw * (dp - r_D[tt]);
                }
                P_s[i] = x;
            }
            __syncthreads();
            for (int i = tid; i < BT * K; i += NT) {
                const int tt = i / K, kk = i % K;
                float acc = 0.f;
                for (int jj = 0; jj < BS; ++jj) acc += P_s[tt * BS + jj] * K_s[jj * K + kk];
                dQ_s[i] += scale * acc;
            }
            __syncthreads();
        }
    }
    for (int i = tid; i < nt * K; i += NT) {
        const int tt = i / K, kk = i % K;
        st(dq, ((t0 + tt) * HQ + i_hq) * K + kk, dQ_s[i]);
    }
}

// gk_chunks [NC,H,K,M], gv_chunks [NC,H,M,V]: gradient reaching the state after the last row of
// chunk c from rows after the chunk (alpha of the next row already applied).
// dhk0/dhv0 [N,H,K,M]/[N,H,M,V] (may be null): gradient with respect to the initial state.
extern "C" __global__ void __launch_bounds__(NT) nha_bwd_gstate(
    const IN_T* __restrict__ do_, const IN_T* __restrict__ g, const IN_T* __restrict__ q_slot,
    const float* __restrict__ P_buf, const float* __restrict__ dL_buf,
    const i64* __restrict__ bos_arr, const int* __restrict__ seq_chunk0,
    float* __restrict__ gk_chunks, float* __restrict__ gv_chunks,
    float* __restrict__ dhk0, float* __restrict__ dhv0,
    int HQ, int H, int K, int V, int M, int W, float scale) {
    const int n = blockIdx.y / H, h = blockIdx.y % H, G = HQ / H;
    const i64 EK = (i64)K * M, E = EK + (i64)M * V;
    const i64 e = (i64)blockIdx.x * NT + threadIdx.x;
    if (e >= E) return;  // no barriers below
    const bool is_k = e < EK;
    const int m = is_k ? (int)(e % M) : (int)((e - EK) / V);
    const int col = is_k ? (int)(e / M) : (int)((e - EK) % V);  // k or vv
    const i64 bos = bos_arr[n], eos = bos_arr[n + 1];
    const int c0 = seq_chunk0[n], c1 = seq_chunk0[n + 1];

    float x = 0.f;
    for (int c = c1 - 1; c >= c0; --c) {
        if (is_k) gk_chunks[((i64)c * H + h) * EK + e] = x;
        else gv_chunks[((i64)c * H + h) * M * V + (e - EK)] = x;
        const i64 t0 = bos + (i64)(c - c0) * BT;
        const i64 t1 = min(t0 + BT, eos);
        for (i64 t = t1 - 1; t >= t0; --t) {
            float d = 0.f;
            for (int i = 0; i < G; ++i) {
                const i64 r = t * HQ + h * G + i;
                d += is_k ? scale * ld(q_slot, r * K + col) * dL_buf[r * M + m]
                          : P_buf[r * M + m] * ld(do_, r * V + col);
            }
            x += d;
            const i64 j = t - W;
            if (j >= bos) x *= expf(ld(g, (j * H + h) * M + m));
        }
    }
    if (dhk0 != nullptr) {
        if (is_k) dhk0[((i64)n * H + h) * EK + e] = x;
        else dhv0[((i64)n * H + h) * M * V + (e - EK)] = x;
    }
}

// Per (chunk, KV head): run G backwards through the chunk four times, once per reduction
// direction (columns of Hk -> ds_k, rows of Hk -> dk_slot, columns of Hv -> dv, rows of Hv -> ds_v).
// Outputs at SHIFTED rows t (token j = t - W): dks_buf, dvs_buf [rows,H,K|V], dS_buf, dGt_buf [rows,H,M].
// Dynamic shared memory, floats: A_s, W_s, dSk_s, dSv_s [BT*M]   K_s [BT*K]   V_s [BT*V]
extern "C" __global__ void __launch_bounds__(NT) nha_bwd_slot_kv(
    const IN_T* __restrict__ do_, const IN_T* __restrict__ v, const IN_T* __restrict__ g,
    const IN_T* __restrict__ s, const IN_T* __restrict__ q_slot, const IN_T* __restrict__ k_slot,
    const float* __restrict__ P_buf, const float* __restrict__ dL_buf, const float* __restrict__ T1_buf,
    const float* __restrict__ gk_chunks, const float* __restrict__ gv_chunks,
    const i64* __restrict__ bos_arr, const int* __restrict__ chunk_n, const i64* __restrict__ chunk_t0,
    float* __restrict__ dks_buf, float* __restrict__ dvs_buf, float* __restrict__ dS_buf,
    float* __restrict__ dGt_buf, int HQ, int H, int K, int V, int M, int W, float scale) {
    extern __shared__ float smem[];
    float* A_s = smem;
    float* W_s = A_s + BT * M;
    float* dSk_s = W_s + BT * M;
    float* dSv_s = dSk_s + BT * M;
    float* K_s = dSv_s + BT * M;
    float* V_s = K_s + BT * K;

    const int i_c = blockIdx.x, i_h = blockIdx.y, G = HQ / H;
    const int tid = threadIdx.x, i_lane = tid % LANES, i_col = tid / LANES;
    const int n = chunk_n[i_c];
    const i64 bos = bos_arr[n], eos = bos_arr[n + 1];
    const i64 t0 = chunk_t0[i_c];
    const int nt = (int)min((i64)BT, eos - t0);

    for (int i = tid; i < BT * M; i += NT) {
        const int tt = i / M, m = i % M;
        const i64 j = t0 + tt - W;
        const bool ok = tt < nt && j >= bos;
        A_s[i] = ok ? expf(ld(g, (j * H + i_h) * M + m)) : 1.f;
        W_s[i] = ok ? ld(s, (j * H + i_h) * M + m) : 0.f;
        dSk_s[i] = 0.f;
        dSv_s[i] = 0.f;
    }
    for (int i = tid; i < BT * K; i += NT) {
        const int tt = i / K, kk = i % K;
        const i64 j = t0 + tt - W;
        K_s[i] = (tt < nt && j >= bos) ? ld(k_slot, (j * H + i_h) * K + kk) : 0.f;
    }
    for (int i = tid; i < BT * V; i += NT) {
        const int tt = i / V, vv = i % V;
        const i64 j = t0 + tt - W;
        V_s[i] = (tt < nt && j >= bos) ? ld(v, (j * H + i_h) * V + vv) : 0.f;
    }
    __syncthreads();
    const float* p_gk = gk_chunks + ((i64)i_c * H + i_h) * K * M;
    const float* p_gv = gv_chunks + ((i64)i_c * H + i_h) * M * V;

    // a. columns of G_k (lanes own column m, rows k = lane + LANES*r): ds_k[t, m] = G_k[:, m] . k_slot_j
    for (int m0 = 0; m0 < M; m0 += BM) {
        const int m = m0 + i_col;
        const bool m_ok = m < M;
        float b_x[RMAX];
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
            const int kk = i_lane + LANES * r;
            b_x[r] = (m_ok && kk < K) ? p_gk[(i64)kk * M + m] : 0.f;
        }
        for (int tt = nt - 1; tt >= 0; --tt) {
            const i64 t = t0 + tt;
            const float a = m_ok ? A_s[tt * M + m] : 1.f;
            float acc = 0.f;
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
                const int kk = i_lane + LANES * r;
                if (kk < K) {
                    float d = 0.f;
                    if (m_ok)
#pragma unroll 1
                        for (int i = 0; i < G; ++i) {
                            const i64 row = t * HQ + i_h * G + i;
                            d += ld(q_slot, row * K + kk) * dL_buf[row * M + m];
                        }
                    b_x[r] += scale * d;
                    acc += b_x[r] * K_s[tt * K + kk];
                    b_x[r] *= a;
                }
            }
            acc = group_sum(acc);
            if (i_lane == 0 && m_ok) dSk_s[tt * M + m] = acc;
        }
    }
    // b. rows of G_k (lanes own row k, columns m = lane + LANES*r): dk_slot_j[k] = G_k[k, :] . s_j
    for (int k0 = 0; k0 < K; k0 += BK) {
        const int kk = k0 + i_col;
        const bool k_ok = kk < K;
        float b_x[RMAX];
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
            const int m = i_lane + LANES * r;
            b_x[r] = (k_ok && m < M) ? p_gk[(i64)kk * M + m] : 0.f;
        }
        for (int tt = nt - 1; tt >= 0; --tt) {
            const i64 t = t0 + tt;
            float acc = 0.f;
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
                const int m = i_lane + LANES * r;
                if (m < M) {
                    float d = 0.f;
                    if (k_ok)
#pragma unroll 1
                        for (int i = 0; i < G; ++i) {
                            const i64 row = t * HQ + i_h * G + i;
                            d += ld(q_slot, row * K + kk) * dL_buf[row * M + m];
                        }
                    b_x[r] += scale * d;
                    acc += b_x[r] * W_s[tt * M + m];
                    b_x[r] *= A_s[tt * M + m];
                }
            }
            acc = group_sum(acc);
            if (i_lane == 0 && k_ok) dks_buf[(t * H + i_h) * K + kk] = acc;
        }
    }
    // c. columns of G_v (lanes own column vv, rows m = lane + LANES*r): dv_j[vv] = s_j . G_v[:, vv]
    for (int v0 = 0; v0 < V; v0 += BV) {
        const int vv = v0 + i_col;
        const bool v_ok = vv < V;
        float b_x[RMAX];
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
            const int m = i_lane + LANES * r;
            b_x[r] = (v_ok && m < M) ? p_gv[(i64)m * V + vv] : 0.f;
        }
        for (int tt = nt - 1; tt >= 0; --tt) {
            const i64 t = t0 + tt;
            float acc = 0.f;
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
                const int m = i_lane + LANES * r;
                if (m < M) {
                    float d = 0.f;
                    if (v_ok)
#pragma unroll 1
                        for (int i = 0; i < G; ++i) {
                            const i64 row = t * HQ + i_h * G + i;
                            d += P_buf[row * M + m] * ld(do_, row * V + vv);
                        }
                    b_x[r] += d;
                    acc += W_s[tt * M + m] * b_x[r];
                    b_x[r] *= A_s[tt * M + m];
                }
            }
            acc = group_sum(acc);
            if (i_lane == 0 && v_ok) dvs_buf[(t * H + i_h) * V + vv] = acc;
        }
    }
    // d. rows of G_v (lanes own row m, columns vv = lane + LANES*r): ds_v[t, m] = G_v[m, :] . v_j
    for (int m0 = 0; m0 < M; m0 += BM) {
        const int m = m0 + i_col;
        const bool m_ok = m < M;
        float b_x[RMAX];
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
            const int vv = i_lane + LANES * r;
            b_x[r] = (m_ok && vv < V) ? p_gv[(i64)m * V + vv] : 0.f;
        }
        for (int tt = nt - 1; tt >= 0; --tt) {
            const i64 t = t0 + tt;
            const float a = m_ok ? A_s[tt * M + m] : 1.f;
            float acc = 0.f;
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
                const int vv = i_lane + LANES * r;
                if (vv < V) {
                    float d = 0.f;
                    if (m_ok)
#pragma unroll 1
                        for (int i = 0; i < G; ++i) {
                            const i64 row = t * HQ + i_h * G + i;
                            d += P_buf[row * M + m] * ld(do_, row * V + vv);
                        }
                    b_x[r] += d;
                    acc += b_x[r] * V_s[tt * V + vv];
                    b_x[r] *= a;
                }
            }
            acc = group_sum(acc);
            if (i_lane == 0 && m_ok) dSv_s[tt * M + m] = acc;
        }
    }
    __syncthreads();
    // Per shifted row: ds = ds_k + ds_v, and the gate term sum_heads <dHd, H> - s * ds.
    for (int i = tid; i < nt * M; i += NT) {
        const int tt = i / M, m = i % M;
        const i64 t = t0 + tt;
        const float ds = dSk_s[i] + dSv_s[i];
        float t1 = 0.f;
        for (int ih = 0; ih < G; ++ih) t1 += T1_buf[(t * HQ + i_h * G + ih) * M + m];
        dS_buf[(t * H + i_h) * M + m] = ds;
        dGt_buf[(t * H + i_h) * M + m] = t1 - W_s[i] * ds;
    }
}

// dg_j = sum over shifted rows t' >= j + W of dGt(t'), ds_j = dS(j + W); both 0 for tokens that
// never reach the slots (j + W >= eos). One thread per (sequence, head, slot), rows in reverse.
extern "C" __global__ void __launch_bounds__(NT) nha_bwd_dg(
    const float* __restrict__ dS_buf, const float* __restrict__ dGt_buf,
    const i64* __restrict__ bos_arr, IN_T* __restrict__ dg, IN_T* __restrict__ ds, int H, int M, int W) {
    const int n = blockIdx.y;
    const int e = blockIdx.x * NT + threadIdx.x;  // e = h * M + m
    if (e >= H * M) return;
    const i64 bos = bos_arr[n], eos = bos_arr[n + 1];
    float run = 0.f;
    for (i64 t = eos - 1; t >= bos; --t) {
        run += dGt_buf[t * H * M + e];
        const i64 j = t - W;
        if (j >= bos) {
            st(dg, j * H * M + e, run);
            st(ds, j * H * M + e, dS_buf[t * H * M + e]);
        }
    }
    for (i64 j = max(bos, eos - W); j < eos; ++j) {
        st(dg, j * H * M + e, 0.f);
        st(ds, j * H * M + e, 0.f);
    }
}

// Per (key block = chunk c, KV head): window part of dk, dv over the queries t in [j, j + W) of
// every query head of the group, then the slot parts of shifted row j + W, then the stores.
// Dynamic shared memory, floats:
//   K_s, dK_s [BT*K]   V_s, dV_s [BT*V]   Q_s [BT*K]   dO_s [BT*V]   P_s, dP_s [BT*BT]   r_lse, r_D [BT]
extern "C" __global__ void __launch_bounds__(NT) nha_bwd_window_kv(
    const IN_T* __restrict__ do_, const IN_T* __restrict__ q, const IN_T* __restrict__ k,
    const IN_T* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ Dt,
    const float* __restrict__ dks_buf, const float* __restrict__ dvs_buf,
    const i64* __restrict__ bos_arr, const int* __restrict__ chunk_n, const i64* __restrict__ chunk_t0,
    IN_T* __restrict__ dk, IN_T* __restrict__ dv, IN_T* __restrict__ dk_slot,
    int T, int HQ, int H, int K, int V, int W, float scale) {
    extern __shared__ float smem[];
    float* K_s = smem;
    float* dK_s = K_s + BT * K;
    float* V_s = dK_s + BT * K;
    float* dV_s = V_s + BT * V;
    float* Q_s = dV_s + BT * V;
    float* dO_s = Q_s + BT * K;
    float* P_s = dO_s + BT * V;
    float* dP_s = P_s + BT * BT;
    float* r_lse = dP_s + BT * BT;
    float* r_D = r_lse + BT;

    const int i_c = blockIdx.x, i_h = blockIdx.y, G = HQ / H;
    const int tid = threadIdx.x;
    const i64 eos = bos_arr[chunk_n[i_c] + 1];
    const i64 j0 = chunk_t0[i_c];
    const int nk = (int)min((i64)BT, eos - j0);

    for (int i = tid; i < BT * K; i += NT) {
        const int jj = i / K, kk = i % K;
        K_s[i] = jj < nk ? ld(k, ((j0 + jj) * H + i_h) * K + kk) : 0.f;
        dK_s[i] = 0.f;
    }
    for (int i = tid; i < BT * V; i += NT) {
        const int jj = i / V, vv = i % V;
        V_s[i] = jj < nk ? ld(v, ((j0 + jj) * H + i_h) * V + vv) : 0.f;
        dV_s[i] = 0.f;
    }
    __syncthreads();

    // Queries that see key j: t in [j, j + W).
    const i64 q_hi = W > 0 ? min(eos, j0 + nk - 1 + W) : j0;
    for (int ih = 0; ih < G; ++ih) {
        const int i_hq = i_h * G + ih;
        for (i64 s0 = j0; s0 < q_hi; s0 += BT) {
            for (int i = tid; i < BT * K; i += NT) {
                const int tt = i / K, kk = i % K;
                Q_s[i] = s0 + tt < q_hi ? ld(q, ((s0 + tt) * HQ + i_hq) * K + kk) : 0.f;
            }
            for (int i = tid; i < BT * V; i += NT) {
                const int tt = i / V, vv = i % V;
                dO_s[i] = s0 + tt < q_hi ? ld(do_, ((s0 + tt) * HQ + i_hq) * V + vv) : 0.f;
            }
            if (tid < BT) {
                const i64 t = s0 + tid;
                r_lse[tid] = t < q_hi ? lse[((t / T) * HQ + i_hq) * T + t % T] : 0.f;
                r_D[tid] = t < q_hi ? Dt[t * HQ + i_hq] : 0.f;
            }
            __syncthreads();
            for (int i = tid; i < BT * BT; i += NT) {
                const int tt = i / BT, jj = i % BT;
                const i64 t = s0 + tt, j = j0 + jj;
                float pw = 0.f, dl = 0.f;
                if (t < q_hi && jj < nk && j <= t && t < j + W) {
                    float d = 0.f, dp = 0.f;
                    for (int kk = 0; kk < K; ++kk) d += Q_s[tt * K + kk] * K_s[jj * K + kk];
                    for (int vv = 0; vv < V; ++vv) dp += dO_s[tt * V + vv] * V_s[jj * V + vv];
                    pw = exp_sub(scale * d, r_lse[tt]);
                    dl = pw * (dp - r_D[tt]);
                }
                P_s[i] = pw;
                dP_s[i] = dl;
            }
            __syncthreads();
            for (int i = tid; i < BT * K; i += NT) {
                const int jj = i / K, kk = i % K;
                float acc = 0.f;
                for (int tt = 0; tt < BT; ++tt) acc += dP_s[tt * BT + jj] * Q_s[tt * K + kk];
                dK_s[i] += scale * acc;
            }
            for (int i = tid; i < BT * V; i += NT) {
                const int jj = i / V, vv = i % V;
                float acc = 0.f;
                for (int tt = 0; tt < BT; ++tt) acc += P_s[tt * BT + jj] * dO_s[tt * V + vv];
                dV_s[i] += acc;
            }
            __syncthreads();
        }
    }

    // Slot parts live at shifted row t = j + W (zero when the token never leaves the window).
    for (int i = tid; i < nk * K; i += NT) {
        const int jj = i / K, kk = i % K;
        const i64 j = j0 + jj, t = j + W;
        const float x = t < eos ? dks_buf[(t * H + i_h) * K + kk] : 0.f;
        if (dk_slot != nullptr) {
            st(dk_slot, (j * H + i_h) * K + kk, x);
            st(dk, (j * H + i_h) * K + kk, dK_s[i]);
        } else {
            st(dk, (j * H + i_h) * K + kk, dK_s[i] + x);
        }
    }
    for (int i = tid; i < nk * V; i += NT) {
        const int jj = i / V, vv = i % V;
        const i64 j = j0 + jj, t = j + W;
        const float x = t < eos ? dvs_buf[(t * H + i_h) * V + vv] : 0.f;
        st(dv, (j * H + i_h) * V + vv, dV_s[i] + x);
    }
}
