"""CuPy decode launcher: one new token per sequence, ``state`` updated in place (see decode.cu).

    q [N,HQ,K] k [N,H,K] v [N,H,V] g, s [N,H,M] q_slot / k_slot or None, state: NHAState of CuPy
    arrays (hk [N,H,K,M], hv [N,H,M,V] float32, ring caches [N,W,H,*], seen [N] int64)
    -> o [N,HQ,V] (input dtype), lse [N,HQ] float32; state.hk/hv/caches/seen updated in place

configs.DECODE_VARIANT picks the kernels ("split": flash-decoding, the default; "per_head": the first
version), read at every call; configs.DECODE_SPLITS forces the window split count.
"""
from __future__ import annotations

import numpy as np

from . import configs, kernels, launch, sm_count
from .forward import NULL, c

_LOG2E = 1.4426950408889634
_CACHE_TYPE = {"float32": "float", "float16": "__half", "uint16": "__nv_bfloat16",
               "bfloat16": "__nv_bfloat16"}  # CuPy 14's own bfloat16 arrays, from direct callers
                                             # (the API passes bfloat16 as uint16 bits: interop.BF16_BITS)


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

    cache_dtype = next(iter(dtypes))
    q, k, v, g = c(q), c(k), c(v), c(g)
    s = NULL if s is None else c(s)  # derives_s: the kernels take s = 1 - exp(g)
    q_slot = q if q_slot is None else c(q_slot)
    k_slot = k if k_slot is None else c(k_slot)
    if configs.DECODE_VARIANT == "split":
        o, lse = _decode_split(p, q, k, v, g, s, q_slot, k_slot, state, cache_dtype)
    elif configs.DECODE_VARIANT == "per_head":
        o, lse = _decode_per_head(p, q, k, v, g, s, q_slot, k_slot, state, cache_dtype)
    else:
        raise ValueError(f"cupy: configs.DECODE_VARIANT must be 'split' or 'per_head', got {configs.DECODE_VARIANT!r}")
    state.seen += 1
    return o, lse


def _decode_split(p, q, k, v, g, s, q_slot, k_slot, state, cache_dtype):
    """Flash-decoding (decode.cu nha_decode_window, then nha_decode_merge): partials [N,HQ,S+1,*]."""
    import cupy

    N, HQ, H, K, V, M = q.shape[0], p.HQ, p.H, p.K, p.V, p.M
    W, G = int(state.window_size), HQ // H
    itemsize = state.k_cache.dtype.itemsize
    BG, DC = configs.decode_tiles(G, K, V, itemsize)
    QB = -(-G // BG)
    S, RS = configs.decode_splits(N, H, QB, W, sm_count(q.device.id))
    P = S + 1
    mod = kernels("decode.cu", configs.CUDA_TYPE[p.dtype], _CACHE_TYPE[cache_dtype], BG=BG, DC=DC, TR=configs.DECODE_TR,
                  STG=configs.decode_stages(DC))
    vec = 16 // itemsize  # 16-byte loads need whole, aligned chunks in every row
    vec_k = int(K % vec == 0 and state.k_cache.data.ptr % 16 == 0)
    vec_v = int(V % vec == 0 and state.v_cache.data.ptr % 16 == 0)
    i32 = np.int32
    s_cache = state.s_cache if state.s_cache is not None else NULL
    k_slot_cache = state.k_slot_cache if state.k_slot_cache is not None else NULL
    qscale = np.float32(p.scale * _LOG2E)  # the kernels' logits are in the log2 domain

    part_acc = cupy.empty((N, HQ, P, V), dtype=cupy.float32)
    part_ml = cupy.empty((N, HQ, P, 2), dtype=cupy.float32)
    launch(mod, "nha_decode_window", (N * H * (S * QB + 1),), (
        q, v, g, s, q_slot, k_slot, state.k_cache, state.v_cache, state.g_cache, s_cache, k_slot_cache,
        state.seen, state.hk, state.hv, part_acc, part_ml,
        i32(HQ), i32(H), i32(K), i32(V), i32(M), i32(W), i32(S), i32(RS), i32(vec_k), i32(vec_v), qscale))
    o = cupy.empty((N, HQ, V), dtype=configs.ARRAY_DTYPE[p.dtype])
    lse = cupy.empty((N, HQ), dtype=cupy.float32)
    launch(mod, "nha_decode_merge", (N * HQ,), (
        q, k, v, g, s, k_slot, state.k_cache, state.v_cache, state.g_cache, s_cache, k_slot_cache,
        state.seen, part_acc, part_ml, o, lse,
        i32(HQ), i32(H), i32(K), i32(V), i32(M), i32(W), i32(P), qscale))
    return o, lse


def _decode_per_head(p, q, k, v, g, s, q_slot, k_slot, state, cache_dtype):
    """The first version (decode.cu nha_decode_evict, then nha_decode_read per query head)."""
    import cupy

    mod = kernels("decode.cu", configs.CUDA_TYPE[p.dtype], _CACHE_TYPE[cache_dtype])
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
    return o, lse
