"""NumPy decode: one new token for each of N sequences, updating the NHAState in place.

Ring buffer (nha_core/state.py): token i of a sequence lives at row i % W. With ``seen``
tokens consumed, the new token (number ``seen``) first evicts row ``seen % W`` (token
``seen - W``, when ``seen >= W``) into the slots with that token's own cached g, s, k_slot,
then takes the row; the query reads M slots + min(seen + 1, W) rows with one softmax::

    rows   0 1 ... W-1        row r is valid iff r < min(seen + 1, W)
    W = 0: no ring buffer; the new token is absorbed into the slots before the read.
"""
from __future__ import annotations

import numpy as np


def _absorb(hk, hv, idx, k_slot, v, g, s):
    """Slot update of sequences ``idx``: hk [n,H,K,M], hv [n,H,M,V] with one token each:
    k_slot [n,H,K], v [n,H,V], g [n,H,M], s [n,H,M]. exp(-inf) = 0 makes g = -inf a reset."""
    alpha = np.exp(g)
    hk[idx] = hk[idx] * alpha[:, :, None, :] + k_slot[:, :, :, None] * s[:, :, None, :]
    hv[idx] = alpha[:, :, :, None] * hv[idx] + s[:, :, :, None] * v[:, :, None, :]


def decode(p, q, k, v, g, s, q_slot, k_slot, state):
    """q [N,HQ,K], k [N,H,K], v [N,H,V], g [N,H,M], s [N,H,M], q_slot / k_slot or None.

    Returns o [N,HQ,V] (input dtype) and lse [N,HQ] (p.state_dtype); ``state`` is updated
    in place (slots, ring buffer, ``seen + 1``).
    """
    dt, sdt = np.dtype(p.dtype), np.dtype(p.state_dtype)
    N, HQ, K = q.shape
    H, G, V, M = p.H, p.G, p.V, p.M
    W = int(state.window_size)
    seen = np.asarray(state.seen).astype(np.int64)
    ks_new = k if k_slot is None else k_slot
    if W == 0:
        _absorb(state.hk, state.hv, slice(None), ks_new, v, g, s)
    else:
        rows = seen % W
        full = np.nonzero(seen >= W)[0]
        if full.size:
            r = rows[full]
            g_old = state.g_cache[full, r]  # [n,H,M]
            s_old = state.s_cache[full, r] if state.s_cache is not None else -np.expm1(g_old)
            kc = state.k_slot_cache if state.k_slot_cache is not None else state.k_cache
            _absorb(state.hk, state.hv, full, kc[full, r], state.v_cache[full, r], g_old, s_old)
        n_all = np.arange(N)
        state.k_cache[n_all, rows] = k
        state.v_cache[n_all, rows] = v
        state.g_cache[n_all, rows] = g
        if state.s_cache is not None:
            state.s_cache[n_all, rows] = s
        if state.k_slot_cache is not None:
            state.k_slot_cache[n_all, rows] = ks_new

    qh = np.asarray(q, dtype=sdt).reshape(N, H, G, K) * p.scale  # [N,H,G,K]
    qsh = qh if q_slot is None else np.asarray(q_slot, dtype=sdt).reshape(N, H, G, K) * p.scale
    parts = []
    if M > 0:
        parts.append(qsh @ np.asarray(state.hk, dtype=sdt))  # [N,H,G,M]
    if W > 0:
        kc = np.asarray(state.k_cache, dtype=sdt).transpose(0, 2, 3, 1)  # [N,H,K,W]
        lw = qh @ kc  # [N,H,G,W]
        valid = np.arange(W)[None, :] < np.minimum(seen + 1, W)[:, None]  # [N,W]
        lw = np.where(valid[:, None, None, :], lw, -np.inf)
        parts.append(lw)
    state.seen[...] = seen + 1
    if not parts:
        return np.zeros((N, HQ, V), dt), np.full((N, HQ), -np.inf, sdt)
    logits = np.concatenate(parts, axis=-1)  # [N,H,G,M+W]
    m = logits.max(-1, keepdims=True)
    pr = np.exp(logits - m)
    den = pr.sum(-1)
    o = np.zeros((N, H, G, V), sdt)
    if M > 0:
        o += pr[..., :M] @ np.asarray(state.hv, dtype=sdt)
    if W > 0:
        o += pr[..., M:] @ np.asarray(state.v_cache, dtype=sdt).transpose(0, 2, 1, 3)  # [N,H,W,V]
    o /= den[..., None]
    lse = m[..., 0] + np.log(den)
    return o.reshape(N, HQ, V).astype(dt), lse.reshape(N, HQ).astype(sdt)
