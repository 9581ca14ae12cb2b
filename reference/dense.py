"""Second, independent oracle: NHA as one dense masked softmax per query (no recurrence).

Unrolling the slot recurrence, the slots read at query t (last absorbed token r = t - W) are

    Hk(t)[:, m] = sum_{j <= r} w[t,j,m] k_slot_j  +  exp(sum_{i <= r} g_i[m]) hk0[:, m]
    Hv(t)[m, :] = sum_{j <= r} w[t,j,m] v_j       +  exp(sum_{i <= r} g_i[m]) hv0[m, :]
    w[t,j,m]    = s_j[m] * exp(sum_{j < i <= r} g_i[m])

so slot logit m = scale * sum_j w[t,j,m] (q_slot_t . k_slot_j) (+ the hk0 term), and the window
logits are scale * q_t . k_j for t-W < j <= t. All logits of one query go through one softmax::

    key j:     0 ... t-W | t-W+1 ... t | t+1 ...
               slot mass |   window    |  masked (-inf)

Decay sums are taken directly over their ranges (never as differences of cumulative sums), so
a gate of -inf gives a weight of exactly 0 instead of NaN.
"""
from __future__ import annotations

import numpy as np

from ._inputs import prepare


def _log_decays(g, W):
    """g [L,H,M] -> ld [L,L,H,M], ld0 [L,H,M].

    ld[t, j] = sum_{j < i <= t-W} g_i for j <= t-W, else -inf (token j not in the slots at t);
    ld0[t]   = sum_{i <= t-W} g_i (0 when nothing was absorbed yet): decay of the initial state.
    """
    L, H, M = g.shape
    ld = np.full((L, L, H, M), -np.inf)
    ld0 = np.zeros((L, H, M))
    for t in range(L):
        r = t - W
        ld0[t] = g[:max(r + 1, 0)].sum(axis=0)
        for j in range(r + 1):
            ld[t, j] = g[j + 1:r + 1].sum(axis=0)
    return ld, ld0


def dense_forward(q, k, v, g, *, window_size, s=None, q_slot=None, k_slot=None, scale=None,
                  hk0=None, hv0=None, cu_seqlens=None):
    """Same contract as ``reference.forward`` but returns only ``(o [B,T,HQ,V], lse [B,HQ,T])``.

    q [B,T,HQ,K]  k [B,T,H,K]  v [B,T,H,V]  g [B,T,H,M]  s [B,T,H,M] or None (1 - exp(g))
    q_slot [B,T,HQ,K] / k_slot [B,T,H,K] or None (q / k)  scale: default K ** -0.5
    hk0 [N,H,K,M] / hv0 [N,H,M,V] or None (zeros)  cu_seqlens [N+1] (B == 1) or None.
    Builds the full [T, M + T] logit matrix per query head; O(T^2 M (K + V)) work and memory,
    for tiny test shapes only.
    """
    x = prepare(q, k, v, g, window_size=window_size, s=s, q_slot=q_slot, k_slot=k_slot,
                scale=scale, hk0=hk0, hv0=hv0, cu_seqlens=cu_seqlens)
    W, M = x.W, x.M
    o = np.zeros((x.B, x.T, x.HQ, x.V))
    lse = np.zeros((x.B, x.HQ, x.T))
    for n, (b, bos, eos) in enumerate(x.seqs):
        L = eos - bos
        if L == 0:
            continue
        ld, ld0 = _log_decays(x.g[b, bos:eos], W)
        w = x.s[b, bos:eos][None] * np.exp(ld)                 # [L(t), L(j), H, M]; 0 where masked
        d0 = np.exp(ld0)                                       # [L, H, M]
        t_idx = np.arange(L)[:, None]
        j_idx = np.arange(L)[None, :]
        in_window = (j_idx <= t_idx) & (j_idx > t_idx - W)     # [L, L]
        for i in range(x.HQ):
            h = i // x.G
            qs, ks = x.q_slot[b, bos:eos, i], x.k_slot[b, bos:eos, h]       # [L, K]
            vv = x.v[b, bos:eos, h]                                          # [L, V]
            slot_logits = x.scale * (np.einsum("tjm,tj->tm", w[:, :, h], qs @ ks.T)
                                     + d0[:, h] * (qs @ x.hk0[n, h]))        # [L, M]
            slot_values = (np.einsum("tjm,jv->tmv", w[:, :, h], vv)
                           + d0[:, h, :, None] * x.hv0[n, h][None])         # [L, M, V]
            win_logits = np.where(in_window, x.scale * x.q[b, bos:eos, i] @ x.k[b, bos:eos, h].T,
                                  -np.inf)                                   # [L, L]
            logits = np.concatenate([slot_logits, win_logits], axis=1)      # [L, M + L]
            mx = logits.max(axis=1, keepdims=True)
            if not np.isfinite(mx).all():   # only M = 0 and W = 0: no logits at all
                o[b, bos:eos, i] = 0.0
                lse[b, i, bos:eos] = -np.inf
                continue
            p = np.exp(logits - mx)
            den = p.sum(axis=1)
            out = np.einsum("tm,tmv->tv", p[:, :M], slot_values) + p[:, M:] @ vv
            o[b, bos:eos, i] = out / den[:, None]
            lse[b, i, bos:eos] = mx[:, 0] + np.log(den)
    return o, lse
