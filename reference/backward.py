"""Explicit fp64 backward of the NHA token loop (no autodiff): the gradient of sum(o * do).

Forward pass: the token loop of ``loop.py``, keeping the slot state every query read.
Reverse pass, per sequence and KV head, with dHk [K,M] / dHv [M,V] the gradient w.r.t. the
state read at step t (which collects every later read, since later states are built on it):

    read at t:   dP = do_t . values;  dL = P * (dP - do_t . o_t)        (softmax backward)
                 window: dq_t += scale dLw k_win,  dk_win += scale dLw^T q_t,  dv_win += Pw^T do_t
                 slots:  dq_slot_t += scale Hk dLs,  dHk += scale q_slot_t^T dLs,  dHv += Ps^T do_t
    absorb j = t-W (Hk = Hk_prev diag(a) + k_slot_j (x) s_j,  Hv = diag(a) Hv_prev + s_j (x) v_j):
                 dk_slot_j += dHk s_j,  dv_j += dHv^T s_j,  ds_j += k_slot_j dHk + dHv v_j
                 dg_j = a * (sum_k dHk * Hk_prev + sum_v dHv * Hv_prev)     (a = exp(g_j))
                 dHk <- dHk diag(a),  dHv <- diag(a) dHv
    after t = 0: dhk0 = dHk, dhv0 = dHv.

The window/slot boundary is the forward's: at query t the slots hold tokens <= t-W and the
window holds (t-W, t].
"""
from __future__ import annotations

import numpy as np

from ._inputs import prepare
from .loop import absorb, softmax_read


def _probs(logits):
    """Softmax over the last axis of logits [G,L]; an empty row set (L = 0) stays empty."""
    if logits.shape[1] == 0:
        return logits.copy()
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def backward(do, q, k, v, g, *, window_size, s=None, q_slot=None, k_slot=None, scale=None,
             hk0=None, hv0=None, cu_seqlens=None, o=None):
    """Gradients of ``sum(o * do)`` for ``o = forward(q, k, v, g, ...)`` (lse and final state
    are not part of the loss).

    do [B,T,HQ,V]; the other arguments exactly as ``reference.forward``, except ``o``
    [B,T,HQ,V]: the output the softmax backward's row term ``do_t . o_t`` takes (default: the
    exact output). A backend's backward receives the forward's output in the input dtype and
    builds that term from it, as FlashAttention does; pass that rounded output here to measure
    the backward's arithmetic alone. Returns a dict of
    float64 arrays shaped like the inputs:
      dq [B,T,HQ,K], dk [B,T,H,K], dv [B,T,H,V], dg [B,T,H,M],
      ds [B,T,H,M]  or None when s was derived (then dg includes the path through s = 1 - exp(g)),
      dq_slot / dk_slot or None when q_slot / k_slot were not given (then dq / dk include the
      slot branch), dhk0 [N,H,K,M] / dhv0 [N,H,M,V] or None when neither hk0 nor hv0 was given.
    """
    x = prepare(q, k, v, g, window_size=window_size, s=s, q_slot=q_slot, k_slot=k_slot,
                scale=scale, hk0=hk0, hv0=hv0, cu_seqlens=cu_seqlens)
    do = np.asarray(do, dtype=np.float64)
    given_o = None if o is None else np.asarray(o, dtype=np.float64)
    W, G, M, sc = x.W, x.G, x.M, x.scale
    dq, dk, dv = np.zeros_like(x.q), np.zeros_like(x.k), np.zeros_like(x.v)
    dg, ds = np.zeros_like(x.g), np.zeros_like(x.g)
    dq_slot, dk_slot = np.zeros_like(x.q), np.zeros_like(x.k)
    dhk0, dhv0 = np.zeros_like(x.hk0), np.zeros_like(x.hv0)

    for n, (b, bos, eos) in enumerate(x.seqs):
        L = eos - bos
        for h in range(x.H):
            heads = slice(h * G, (h + 1) * G)
            # forward: hk_at[t - bos + 1] is the state the query at t read; index 0 is hk0
            hk_at = np.zeros((L + 1, x.K, M))
            hv_at = np.zeros((L + 1, M, x.V))
            hk_at[0], hv_at[0] = x.hk0[n, h], x.hv0[n, h]
            for t in range(bos, eos):
                hk, hv = hk_at[t - bos], hv_at[t - bos]
                if t - W >= bos:
                    j = t - W
                    hk, hv = absorb(hk, hv, x.k_slot[b, j, h], x.v[b, j, h], x.g[b, j, h], x.s[b, j, h])
                hk_at[t - bos + 1], hv_at[t - bos + 1] = hk, hv

            dhk = np.zeros((x.K, M))
            dhv = np.zeros((M, x.V))
            for t in reversed(range(bos, eos)):
                hk, hv = hk_at[t - bos + 1], hv_at[t - bos + 1]
                win = slice(max(bos, t - W + 1), t + 1) if W > 0 else slice(t + 1, t + 1)
                k_win, v_win = x.k[b, win, h], x.v[b, win, h]                  # [nw, K], [nw, V]
                qs_t, q_t, do_t = x.q_slot[b, t, heads], x.q[b, t, heads], do[b, t, heads]
                logits = np.concatenate([sc * qs_t @ hk, sc * q_t @ k_win.T], axis=1)   # [G, M + nw]
                values = np.concatenate([hv, v_win], axis=0)                            # [M + nw, V]
                o_t = softmax_read(logits, values)[0] if given_o is None else given_o[b, t, heads]
                p = _probs(logits)
                dl = p * (do_t @ values.T - (do_t * o_t).sum(axis=1, keepdims=True))   # [G, M + nw]
                dls, dlw = dl[:, :M], dl[:, M:]
                ps, pw = p[:, :M], p[:, M:]
                # window branch
                dq[b, t, heads] += sc * dlw @ k_win
                dk[b, win, h] += sc * dlw.T @ q_t
                dv[b, win, h] += pw.T @ do_t
                # slot branch: the read at t
                dq_slot[b, t, heads] += sc * dls @ hk.T
                dhk += sc * qs_t.T @ dls
                dhv += ps.T @ do_t
                # the absorb done at step t (token j = t - W), undone in reverse
                if t - W >= bos:
                    j = t - W
                    hk_prev, hv_prev = hk_at[t - bos], hv_at[t - bos]
                    a = np.exp(x.g[b, j, h])
                    s_j, ks_j, v_j = x.s[b, j, h], x.k_slot[b, j, h], x.v[b, j, h]
                    dk_slot[b, j, h] += dhk @ s_j
                    dv[b, j, h] += dhv.T @ s_j
                    ds[b, j, h] += ks_j @ dhk + dhv @ v_j
                    dg[b, j, h] += a * ((dhk * hk_prev).sum(axis=0) + (dhv * hv_prev).sum(axis=1))
                    dhk = dhk * a[None, :]
                    dhv = a[:, None] * dhv
            dhk0[n, h], dhv0[n, h] = dhk, dhv

    if x.s_derived:
        dg += ds * -np.exp(x.g)      # s = 1 - exp(g); exp(-inf) = 0 keeps a reset NaN-free
        ds = None
    if not x.has_q_slot:
        dq += dq_slot
        dq_slot = None
    if not x.has_k_slot:
        dk += dk_slot
        dk_slot = None
    if not x.has_h0:
        dhk0 = dhv0 = None
    return {"dq": dq, "dk": dk, "dv": dv, "dg": dg, "ds": ds,
            "dq_slot": dq_slot, "dk_slot": dk_slot, "dhk0": dhk0, "dhv0": dhv0}
