"""CuPy backward launcher (see backward.cu for the math and the kernel order).

    do [B,T,HQ,V], inputs as in forward.py, o [B,T,HQ,V], lse [B,HQ,T] float32
    -> dq [B,T,HQ,K] dk [B,T,H,K] dv [B,T,H,V] dg, ds [B,T,H,M] (input dtype),
       dq_slot / dk_slot (input dtype) or None, dhk0 [N,H,K,M] / dhv0 [N,H,M,V] float32 or None

Scratch (float32, O(T*(K+V+M)) per head, never T*W): per-(row, query head) Ps, dLs and gate terms
[rows,HQ,M]; chunk states and chunk-end state gradients [NC,H,K,M] / [NC,H,M,V]; slot-branch
gradients at shifted rows [rows,H,K|V|M].
"""
from __future__ import annotations

import numpy as np

from . import configs, kernels, launch
from .forward import NULL, c, chunk_states, chunk_table


def backward(p, do, q, k, v, g, s, q_slot, k_slot, o, lse, hk0, hv0, cu_seqlens):
    import cupy

    if s is None:  # derives_s: the backward kernels read a materialised s
        from .forward import derived_s

        s = derived_s(g)
    BT, RMAX = configs.pick_bt(p), configs.rmax(p)
    ctype = configs.CUDA_TYPE[p.dtype]
    fwd = kernels("forward.cu", ctype, ctype, BT=BT, RMAX=RMAX)
    mod = kernels("backward.cu", ctype, ctype, BT=BT, RMAX=RMAX)
    do, q, k, v, g, s, o, lse = c(do), c(q), c(k), c(v), c(g), c(s), c(o), c(lse)
    has_q_slot, has_k_slot = q_slot is not None, k_slot is not None
    q_slot = c(q_slot) if has_q_slot else q
    k_slot = c(k_slot) if has_k_slot else k
    table = chunk_table(p, cu_seqlens, BT)
    bos, seq_chunk0, chunk_n, chunk_t0, NC, N, _ = table
    B, T, HQ, H, K, V, M, W = p.B, p.T, p.HQ, p.H, p.K, p.V, p.M, p.W
    R = B * T
    dt = configs.ARRAY_DTYPE[p.dtype]
    f32 = cupy.float32
    i32 = np.int32
    NT = configs.NT

    dq = cupy.empty((B, T, HQ, K), dtype=dt)
    dk = cupy.empty((B, T, H, K), dtype=dt)
    dv = cupy.empty((B, T, H, V), dtype=dt)
    dg = cupy.empty((B, T, H, M), dtype=dt)
    ds = cupy.empty((B, T, H, M), dtype=dt)
    dq_slot = cupy.empty((B, T, HQ, K), dtype=dt) if has_q_slot else None
    dk_slot = cupy.empty((B, T, H, K), dtype=dt) if has_k_slot else None
    dhk0 = cupy.empty((N, H, K, M), dtype=f32) if hk0 is not None else None
    dhv0 = cupy.empty((N, H, M, V), dtype=f32) if hk0 is not None else None
    if hk0 is not None and K * M + M * V == 0:
        dhk0[...] = 0  # nothing to launch for empty states
        dhv0[...] = 0

    Dt = cupy.empty((R, HQ), dtype=f32)
    launch(mod, "nha_bwd_prep", (-(-R * HQ // NT),), (do, o, Dt, np.int64(R * HQ), i32(V)))

    hk_chunks, hv_chunks, _, _ = chunk_states(p, fwd, table, BT, k_slot, v, g, s, hk0, hv0, False)

    P_buf = cupy.empty((R, HQ, M), dtype=f32)
    dL_buf = cupy.empty((R, HQ, M), dtype=f32)
    T1_buf = cupy.empty((R, HQ, M), dtype=f32)
    launch(mod, "nha_bwd_q", (NC, HQ), (
        do, q, k, v, g, s, q_slot, k_slot, lse, Dt, hk_chunks, hv_chunks, bos, chunk_n, chunk_t0,
        P_buf, dL_buf, T1_buf, dq, dq_slot if has_q_slot else NULL,
        i32(T), i32(HQ), i32(H), i32(K), i32(V), i32(M), i32(W), np.float32(p.scale)),
        4 * configs.smem_floats("bwd_q", BT, K, V, M))

    gk_chunks = cupy.empty((NC, H, K, M), dtype=f32)
    gv_chunks = cupy.empty((NC, H, M, V), dtype=f32)
    E = K * M + M * V
    launch(mod, "nha_bwd_gstate", (-(-E // NT), N * H), (
        do, g, q_slot, P_buf, dL_buf, bos, seq_chunk0, gk_chunks, gv_chunks,
        dhk0 if dhk0 is not None else NULL, dhv0 if dhv0 is not None else NULL,
        i32(HQ), i32(H), i32(K), i32(V), i32(M), i32(W), np.float32(p.scale)))

    dks_buf = cupy.empty((R, H, K), dtype=f32)
    dvs_buf = cupy.empty((R, H, V), dtype=f32)
    dS_buf = cupy.empty((R, H, M), dtype=f32)
    dGt_buf = cupy.empty((R, H, M), dtype=f32)
    launch(mod, "nha_bwd_slot_kv", (NC, H), (
        do, v, g, s, q_slot, k_slot, P_buf, dL_buf, T1_buf, gk_chunks, gv_chunks,
        bos, chunk_n, chunk_t0, dks_buf, dvs_buf, dS_buf, dGt_buf,
        i32(HQ), i32(H), i32(K), i32(V), i32(M), i32(W), np.float32(p.scale)),
        4 * configs.smem_floats("bwd_slot_kv", BT, K, V, M))

    launch(mod, "nha_bwd_dg", (-(-(H * M) // NT), N), (dS_buf, dGt_buf, bos, dg, ds, i32(H), i32(M), i32(W)))

    launch(mod, "nha_bwd_window_kv", (NC, H), (
        do, q, k, v, lse, Dt, dks_buf, dvs_buf, bos, chunk_n, chunk_t0,
        dk, dv, dk_slot if has_k_slot else NULL,
        i32(T), i32(HQ), i32(H), i32(K), i32(V), i32(W), np.float32(p.scale)),
        4 * configs.smem_floats("bwd_window_kv", BT, K, V, M))
    return dq, dk, dv, dg, ds, dq_slot, dk_slot, dhk0, dhv0
