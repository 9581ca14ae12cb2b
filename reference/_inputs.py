"""Turn the oracle's arguments into float64 arrays with every default filled in.

Shared by the token loop, the dense form and the backward so that all three read the same
defaults (SPEC section 2): ``s = 1 - exp(g)``, ``q_slot = q``, ``k_slot = k``,
``scale = K ** -0.5``, zero initial state, one sequence per batch row unless ``cu_seqlens``.
"""
from __future__ import annotations

import types

import numpy as np


def derived_s(g):
    """``s = 1 - exp(g)`` written as ``-expm1(g)``: exact for tiny ``|g|``, and ``g = -inf`` gives 1."""
    return -np.expm1(g)


def default_scale(scale, K):
    if scale is None:
        return K ** -0.5 if K > 0 else 1.0
    return float(scale)


def _f64(x):
    return np.array(x, dtype=np.float64, copy=True)


def prepare(q, k, v, g, *, window_size, s, q_slot, k_slot, scale, hk0, hv0, cu_seqlens):
    """Return a namespace of float64 copies plus dims and the list of sequences.

    q [B,T,HQ,K]  k [B,T,H,K]  v [B,T,H,V]  g [B,T,H,M]  s [B,T,H,M] or None
    q_slot [B,T,HQ,K] or None  k_slot [B,T,H,K] or None  hk0 [N,H,K,M] / hv0 [N,H,M,V] or None
    cu_seqlens [N+1] or None (then N = B).  ``seqs[n] = (b, bos, eos)``: sequence n is
    tokens ``bos:eos`` of batch row ``b``.
    """
    q, k, v, g = _f64(q), _f64(k), _f64(v), _f64(g)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or g.ndim != 4:
        raise ValueError("q, k, v, g: expected rank-4 arrays [B,T,heads,dim]")
    B, T, HQ, K = q.shape
    H = k.shape[2]
    V = v.shape[3]
    M = g.shape[3]
    if k.shape != (B, T, H, K) or v.shape[:3] != (B, T, H) or g.shape[:3] != (B, T, H):
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}, g {g.shape}")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"HQ % H != 0: HQ = {HQ}, H = {H}")
    W = int(window_size)
    if W < 0:
        raise ValueError(f"window_size: expected >= 0, got {W}")

    if cu_seqlens is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        cu = np.asarray(cu_seqlens).astype(np.int64)
        if B != 1 or cu[0] != 0 or cu[-1] != T or (np.diff(cu) < 0).any():
            raise ValueError(f"cu_seqlens: bad value {cu.tolist()} for B = {B}, T = {T}")
        seqs = [(0, int(cu[n]), int(cu[n + 1])) for n in range(len(cu) - 1)]
    N = len(seqs)

    has_h0 = hk0 is not None or hv0 is not None
    hk0 = np.zeros((N, H, K, M)) if hk0 is None else _f64(hk0)
    hv0 = np.zeros((N, H, M, V)) if hv0 is None else _f64(hv0)
    if hk0.shape != (N, H, K, M) or hv0.shape != (N, H, M, V):
        raise ValueError(f"hk0/hv0: expected [N,H,K,M] = {(N, H, K, M)} and [N,H,M,V] = {(N, H, M, V)}, "
                         f"got {hk0.shape} and {hv0.shape}")

    return types.SimpleNamespace(
        q=q, k=k, v=v, g=g,
        s=derived_s(g) if s is None else _f64(s),
        q_slot=q if q_slot is None else _f64(q_slot),
        k_slot=k if k_slot is None else _f64(k_slot),
        scale=default_scale(scale, K), hk0=hk0, hv0=hv0, has_h0=has_h0,
        s_derived=s is None, has_q_slot=q_slot is not None, has_k_slot=k_slot is not None,
        B=B, T=T, HQ=HQ, H=H, K=K, V=V, M=M, W=W, N=N, G=HQ // H, seqs=seqs,
    )
