"""CuPy forward launcher: chunk states, then the main kernel (see forward.cu).

    q [B,T,HQ,K] k [B,T,H,K] v [B,T,H,V] g, s [B,T,H,M] q_slot / k_slot or None, hk0 [N,H,K,M] /
    hv0 [N,H,M,V] float32 or None  ->  o [B,T,HQ,V] (input dtype), lse [B,HQ,T] float32,
    hk, hv (final state, float32) or None
"""
from __future__ import annotations

import functools

import numpy as np

from nha_core.interop import bf16_bits_to_float32, float32_to_bf16_bits

from . import configs, kernels, launch, sm_count

NULL = np.uint64(0)  # a null pointer argument


def c(x):
    """Kernels index dense row-major arrays; strided views are copied once here."""
    import cupy

    return cupy.ascontiguousarray(x)


def chunk_table(p, cu_seqlens, BT: int):
    """Sequences and chunks on the flattened row axis r = b*T + t.

    bos [N+1] int64: rows of sequence n are bos[n] .. bos[n+1]-1. seq_chunk0 [N+1] int32: chunks of
    sequence n are seq_chunk0[n] .. seq_chunk0[n+1]-1. chunk_n [NC] int32, chunk_t0 [NC] int64:
    sequence and first row of each chunk. Built on the host (cu_seqlens is N+1 numbers); the table
    of B equal sequences is built once per (B, T, BT, device) and kept (dense_table).
    """
    import cupy

    if cu_seqlens is None:
        return dense_table(p.B, p.T, BT, cupy.cuda.runtime.getDevice())
    return _table(cupy.asnumpy(cu_seqlens).astype(np.int64), BT)


@functools.lru_cache(maxsize=64)
def dense_table(B: int, T: int, BT: int, device: int):
    """chunk_table's arrays for B sequences of T rows, from CuPy's own pool (not the caller's
    allocator: the arrays outlive the call)."""
    import cupy

    with cupy.cuda.Device(device), cupy.cuda.using_allocator(cupy.get_default_memory_pool().malloc):
        table = _table(np.arange(B + 1, dtype=np.int64) * T, BT)
        cupy.cuda.get_current_stream().synchronize()  # copied before any other stream reads it
    return table


def _table(bos, BT: int):
    import cupy

    lengths = np.diff(bos)
    counts = -(-lengths // BT)
    seq_chunk0 = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    chunk_n = np.repeat(np.arange(len(lengths), dtype=np.int32), counts)
    chunk_t0 = (bos[chunk_n] + (np.arange(len(chunk_n)) - seq_chunk0[chunk_n]) * BT).astype(np.int64)
    NC = int(seq_chunk0[-1])
    return (cupy.asarray(bos), cupy.asarray(seq_chunk0), cupy.asarray(chunk_n),
            cupy.asarray(chunk_t0), NC, len(lengths), int(counts.max(initial=0)))


def chunk_states(p, mod, table, BT, k_slot, v, g, s, hk0, hv0, want_final):
    """hk_chunks [NC,H,K,M], hv_chunks [NC,H,M,V]: slot state before each chunk (shifted rows);
    plus the final state [N,H,K,M] / [N,H,M,V] when ``want_final``."""
    import cupy

    bos, seq_chunk0, _, _, NC, N, _ = table
    H, K, V, M = p.H, p.K, p.V, p.M
    hk_chunks = cupy.empty((NC, H, K, M), dtype=cupy.float32)
    hv_chunks = cupy.empty((NC, H, M, V), dtype=cupy.float32)
    hk = hv = None
    if want_final:
        hk = cupy.empty((N, H, K, M), dtype=cupy.float32)
        hv = cupy.empty((N, H, M, V), dtype=cupy.float32)
    E = K * M + M * V
    launch(mod, "nha_fwd_chunk_state", (-(-E // configs.NT), N * H), (
        k_slot, v, g, s,
        c(hk0) if hk0 is not None else NULL, c(hv0) if hv0 is not None else NULL,
        bos, seq_chunk0, hk_chunks, hv_chunks,
        hk if hk is not None else NULL, hv if hv is not None else NULL,
        np.int32(H), np.int32(K), np.int32(V), np.int32(M), np.int32(p.W)))
    return hk_chunks, hv_chunks, hk, hv


def derived_s(g):
    """s = 1 - exp(g) for the kernels that need it materialised (derives_s: the API passes None)."""
    import cupy

    if g.dtype == cupy.uint16:  # bfloat16 bits (nha_core.interop.BF16_BITS)
        return float32_to_bf16_bits(-cupy.expm1(bf16_bits_to_float32(g)))
    return (-cupy.expm1(g.astype(cupy.float32))).astype(g.dtype)


def forward(p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu_seqlens):
    import cupy

    if configs.use_tc(p):
        return forward_tc(p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu_seqlens)
    if s is None:
        s = derived_s(g)
    BT, RMAX = configs.pick_bt(p), configs.rmax(p)
    mod = kernels("forward.cu", configs.CUDA_TYPE[p.dtype], configs.CUDA_TYPE[p.dtype], BT=BT, RMAX=RMAX)
    q, k, v, g, s = c(q), c(k), c(v), c(g), c(s)
    q_slot = q if q_slot is None else c(q_slot)
    k_slot = k if k_slot is None else c(k_slot)
    table = chunk_table(p, cu_seqlens, BT)
    bos, _, chunk_n, chunk_t0, NC, N, _ = table

    o = cupy.empty((p.B, p.T, p.HQ, p.V), dtype=configs.ARRAY_DTYPE[p.dtype])
    lse = cupy.empty((p.B, p.HQ, p.T), dtype=cupy.float32)
    hk_chunks, hv_chunks, hk, hv = chunk_states(
        p, mod, table, BT, k_slot, v, g, s, hk0, hv0, p.output_final_state)
    smem = 4 * configs.smem_floats("fwd_main", BT, p.K, p.V, p.M)
    launch(mod, "nha_fwd_main", (NC, p.HQ), (
        q, k, v, g, s, q_slot, k_slot, hk_chunks, hv_chunks, bos, chunk_n, chunk_t0, o, lse,
        np.int32(p.T), np.int32(p.HQ), np.int32(p.H), np.int32(p.K), np.int32(p.V),
        np.int32(p.M), np.int32(p.W), np.float32(p.scale)), smem)
    return o, lse, hk, hv


def forward_tc(p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu_seqlens):
    """Tensor-core path (forward.cu): nha_fwd_state_mma + nha_fwd_main_mma (+ nha_fwd_redo) where
    configs.use_mma says so, else nha_fwd_state_tc + nha_fwd_main_tc; s may be None."""
    import cupy

    q, k, v, g = c(q), c(k), c(v), c(g)
    s = NULL if s is None else c(s)
    q_slot = q if q_slot is None else c(q_slot)
    k_slot = k if k_slot is None else c(k_slot)
    # the register-tile kernels move rows in 16-byte pieces: their arrays must start 16-byte aligned
    mma = configs.use_mma(p) and all(x.data.ptr % 16 == 0 for x in (q, k, v, g, q_slot, k_slot)) \
        and (s is NULL or s.data.ptr % 16 == 0)
    BT = configs.MMA_BT if mma else configs.pick_bt_tc(p)
    tiles = dict(BT=BT, RMAX=1)
    if mma:  # nha_fwd_redo (the exact CUDA-core kernel) takes the chunks whose decays do not factor
        tiles.update(NHA_MMA=1, KD=p.K, VD=p.V, MD=p.M, RMAX=configs.rmax(p), SST=configs.MMA_STATE_STAGES,
                     FAST_EXP=int(configs.MMA_FAST_EXP), FAST_GATES=int(configs.MMA_FAST_GATES))
    mod = kernels("forward.cu", configs.CUDA_TYPE[p.dtype], configs.CUDA_TYPE[p.dtype], **tiles)
    table = chunk_table(p, cu_seqlens, BT)
    bos, seq_chunk0, chunk_n, chunk_t0, NC, N, longest = table
    H, K, V, M = p.H, p.K, p.V, p.M
    i32 = np.int32

    # chunk states: IN_T for the register-tile kernels (their bf16 products read them so), else fp32
    sdt = configs.ARRAY_DTYPE[p.dtype] if mma else cupy.float32
    hk_chunks = cupy.empty((NC, H, K, M), dtype=sdt)
    hv_chunks = cupy.empty((NC, H, M, V), dtype=sdt)
    hk = hv = None
    if p.output_final_state:
        hk = cupy.empty((N, H, K, M), dtype=cupy.float32)
        hv = cupy.empty((N, H, M, V), dtype=cupy.float32)
    h0 = (c(hk0) if hk0 is not None else NULL, c(hv0) if hv0 is not None else NULL)
    h_t = (hk, hv) if hk is not None else (NULL, NULL)
    state_args = (k_slot, v, g, s, *h0, bos, seq_chunk0, hk_chunks, hv_chunks, *h_t)
    if mma and configs.state_pass(N, H, K, V, M, longest, NC, sm_count(q.device.id)) == "scan":
        a_c = cupy.empty((NC, H, M), dtype=cupy.float32)
        launch(mod, "nha_fwd_state_local_mma", (NC * H, M // configs.MMA_STATE_COLUMNS), (
            k_slot, v, g, s, bos, chunk_n, chunk_t0, hk_chunks, hv_chunks, a_c, i32(H), i32(p.W)),
            configs.state_mma_smem_bytes(K, V, stages=1), threads=configs.MMA_THREADS)
        launch(mod, "nha_fwd_state_scan", (-(-(K * M + M * V) // configs.NT), N * H), (
            *h0, seq_chunk0, hk_chunks, hv_chunks, a_c, *h_t, i32(H)))
    elif mma:
        launch(mod, "nha_fwd_state_mma", (M // configs.MMA_STATE_COLUMNS, N * H), state_args + (i32(H), i32(p.W)),
               configs.state_mma_smem_bytes(K, V), threads=configs.MMA_THREADS)
    else:
        launch(mod, "nha_fwd_state_tc", (2 * (-(-M // configs.BMC)), N * H), state_args + (
            i32(H), i32(K), i32(V), i32(M), i32(p.W)), 4 * configs.smem_floats("fwd_state_tc", BT, K, V, M))

    o = cupy.empty((p.B, p.T, p.HQ, p.V), dtype=configs.ARRAY_DTYPE[p.dtype])
    lse = cupy.empty((p.B, p.HQ, p.T), dtype=cupy.float32)
    main_args = (q, k, v, g, s, q_slot, k_slot, hk_chunks, hv_chunks, bos, chunk_n, chunk_t0, o, lse)
    if not mma:
        launch(mod, "nha_fwd_main_tc", (NC, p.HQ), main_args + (
            i32(p.T), i32(p.HQ), i32(H), i32(K), i32(V), i32(M), i32(p.W), np.float32(p.scale)),
            4 * configs.smem_floats("fwd_main_tc", BT, K, V, M))
        return o, lse, hk, hv
    redo = cupy.zeros(1 + NC * p.HQ, dtype=cupy.int32)
    launch(mod, "nha_fwd_main_mma", (NC, p.HQ), main_args + (
        redo, i32(p.T), i32(p.HQ), i32(H), i32(p.W), np.float32(p.scale)),
        configs.mma_smem_bytes(K, V, M), threads=configs.MMA_THREADS)
    launch(mod, "nha_fwd_redo", (min(NC * p.HQ, sm_count(q.device.id)),), main_args + (
        i32(p.T), i32(p.HQ), i32(H), i32(K), i32(V), i32(M), i32(p.W), np.float32(p.scale), redo),
        4 * configs.smem_floats("fwd_main", BT, K, V, M))
    return o, lse, hk, hv
