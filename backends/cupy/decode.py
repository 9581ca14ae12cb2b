"""CuPy decode launcher: one new token per sequence, ``state`` updated in place (see decode.cu).

    q [N,HQ,K] k [N,H,K] v [N,H,V] g, s [N,H,M] q_slot / k_slot or None, state: NHAState of CuPy
    arrays (hk [N,H,K,M], hv [N,H,M,V] float32, ring caches [N,W,H,*], seen [N] int64)
    -> o [N,HQ,V] (input dtype), lse [N,HQ] float32; state.hk/hv/caches/seen updated in place
"""
from __future__ import annotations

import numpy as np

from . import configs, kernels, launch
from .forward import NULL, c

_CACHE_TYPE = {"float32": "float", "float16": "__half", "uint16": "__nv_bfloat16",
               "bfloat16": "__nv_bfloat16"}  # CuPy 14 views torch bf16 as a bfloat16 dtype


def decode(p, q, k, v, g, s, q_slot, k_slot, state):
    import cupy

    caches = {name: a for name, a in state.arrays().items() if name.endswith("_cache")}
    dtypes = {str(a.dtype) for a in caches.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _CACHE_TYPE:
        raise NotImplementedError(
            "cupy: decode needs every window cache in one of float32/float16/bfloat16, got "
            + ", ".join(f"{n} {a.dtype}" for n, a in caches.items()))
    for name in ("hk", "hv", "seen", *caches):
        a = getattr(state, name)
        if not a.flags.c_contiguous:  # updated in place: a copy would lose the update
            raise NotImplementedError(f"cupy: decode updates state.{name} in place and needs it contiguous")
    if state.hk.dtype != cupy.float32 or state.hv.dtype != cupy.float32 or state.seen.dtype != cupy.int64:
        raise NotImplementedError("cupy: decode needs float32 hk / hv and int64 seen")

    if s is None:  # derives_s
        from .forward import derived_s

        s = derived_s(g)
    ctype = configs.CUDA_TYPE[p.dtype]
    mod = kernels("decode.cu", ctype, _CACHE_TYPE[next(iter(dtypes))], 16, 1)  # BT, RMAX unused
    q, k, v, g, s = c(q), c(k), c(v), c(g), c(s)
    q_slot = q if q_slot is None else c(q_slot)
    k_slot = k if k_slot is None else c(k_slot)
    N, HQ, H, K, V, M = q.shape[0], p.HQ, p.H, p.K, p.V, p.M
    W = int(state.window_size)
    i32 = np.int32
    s_cache = state.s_cache if state.s_cache is not None else NULL
    k_slot_cache = state.k_slot_cache if state.k_slot_cache is not None else NULL

    E = K * M + M * V
    launch(mod, "nha_decode_evict", (-(-E // configs.NT), N * H), (
        k, v, g, s, k_slot, state.k_cache, state.v_cache, state.g_cache, s_cache, k_slot_cache,
        state.seen, state.hk, state.hv, i32(H), i32(K), i32(V), i32(M), i32(W)))
    o = cupy.empty((N, HQ, V), dtype=configs.ARRAY_DTYPE[p.dtype])
    lse = cupy.empty((N, HQ), dtype=cupy.float32)
    launch(mod, "nha_decode_read", (N, HQ), (
        q, k, v, g, s, q_slot, k_slot, state.k_cache, state.v_cache, state.g_cache, s_cache,
        k_slot_cache, state.seen, state.hk, state.hv, o, lse,
        i32(HQ), i32(H), i32(K), i32(V), i32(M), i32(W), np.float32(p.scale)))
    state.seen += 1
    return o, lse
