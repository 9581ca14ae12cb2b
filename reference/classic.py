"""The two attentions NHA contains as limits, written from their own definitions.

* ``gsa_recurrence``: Gated Slot Attention (Zhang et al. 2024, "Gated Slot Attention for
  Efficient Linear-Time Sequence Modeling"), two-pass form of its slot memory with M slots:
      Kt_t = diag(alpha_t) Kt_{t-1} + s_t k_t^T      Kt [M,K]
      Vt_t = diag(alpha_t) Vt_{t-1} + s_t v_t^T      Vt [M,V]
      o_t  = Vt_t^T softmax(scale * Kt_t q_t)        alpha_t = exp(g_t), s_t = 1 - alpha_t
  NHA with W = 0 must equal it (token t enters the slots before it is read).
* ``causal_softmax_attention``: plain causal softmax attention; NHA with M = 0 and W >= T
  must equal it.
Both support GQA (query head i reads KV head i // (HQ // H)) and return float64.
"""
from __future__ import annotations

import numpy as np


def gsa_recurrence(q, k, v, g, s=None, scale=None):
    """q [B,T,HQ,K]  k [B,T,H,K]  v [B,T,H,V]  g [B,T,H,M]  s [B,T,H,M] or None (1 - exp(g))
    scale: default K ** -0.5.  Returns ``o [B,T,HQ,V]``, ``lse [B,HQ,T]`` (log-sum-exp of
    the M slot logits), no initial state."""
    q, k, v, g = (np.asarray(a, dtype=np.float64) for a in (q, k, v, g))
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[3], g.shape[3]
    scale = K ** -0.5 if scale is None else float(scale)
    alpha = np.exp(g)
    s = 1.0 - alpha if s is None else np.asarray(s, dtype=np.float64)
    o = np.zeros((B, T, HQ, V))
    lse = np.zeros((B, HQ, T))
    for b in range(B):
        for i in range(HQ):
            h = i // (HQ // H)
            kt = np.zeros((M, K))
            vt = np.zeros((M, V))
            for t in range(T):
                kt = alpha[b, t, h][:, None] * kt + s[b, t, h][:, None] * k[b, t, h][None, :]
                vt = alpha[b, t, h][:, None] * vt + s[b, t, h][:, None] * v[b, t, h][None, :]
                z = scale * kt @ q[b, t, i]                       # [M]
                zmax = z.max()
                e = np.exp(z - zmax)
                o[b, t, i] = vt.T @ (e / e.sum())
                lse[b, i, t] = zmax + np.log(e.sum())
    return o, lse


def causal_softmax_attention(q, k, v, scale=None):
    """q [B,T,HQ,K]  k [B,T,H,K]  v [B,T,H,V]; scale default K ** -0.5.
    Returns ``o [B,T,HQ,V]``, ``lse [B,HQ,T]``; query t sees keys 0..t."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    B, T, HQ, K = q.shape
    H = k.shape[2]
    scale = K ** -0.5 if scale is None else float(scale)
    kv_head = np.arange(HQ) // (HQ // H)
    kq = k[:, :, kv_head]                                         # [B,T,HQ,K]
    vq = v[:, :, kv_head]                                         # [B,T,HQ,V]
    scores = scale * np.einsum("bthk,bshk->bhts", q, kq)          # [B,HQ,T,T]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores)
    if T == 0:
        return np.zeros((B, 0, HQ, v.shape[3])), np.zeros((B, HQ, 0))
    mx = scores.max(axis=-1, keepdims=True)
    p = np.exp(scores - mx)
    den = p.sum(axis=-1)
    o = np.einsum("bhts,bshv->bthv", p, vq) / den.transpose(0, 2, 1)[..., None]
    return o, mx[..., 0] + np.log(den)
