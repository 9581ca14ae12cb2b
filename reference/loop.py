"""The fp64 oracle: NHA as a plain token loop, exactly SPEC section 2.

At query position t (within one sequence) every earlier token sits in exactly one memory::

    token:   0   1   ...   t-W  | t-W+1  ...  t-1   t
             `------ slots -----' `------ window -----'
             absorbed one by one    raw k, v; W tokens including t
             with their own g, s    (empty when W = 0)

    slot logits   scale * q_slot_t . Hk[:, m]      m < M   (0 while nothing was absorbed)
    window logits scale * q_t . k_j                j in (t-W, t]
    one softmax over the M + min(t+1, W) logits; o_t mixes Hv rows and window values.

Token j = t - W is absorbed at step t, before the read, so W = 0 is gated slot attention.
Everything is float64, per sequence and KV head; the HQ // H query heads of a group share
the KV head's state.
"""
from __future__ import annotations

import numpy as np

from ._inputs import default_scale, derived_s, prepare


def absorb(hk, hv, k_slot_j, v_j, g_j, s_j):
    """One slot update with token j's own gate.

    hk [K,M]  hv [M,V]  k_slot_j [K]  v_j [V]  g_j [M]  s_j [M]  ->  new (hk, hv).
    ``exp(-inf) = 0`` multiplies a finite state, so ``g = -inf`` is an exact reset.
    """
    alpha = np.exp(g_j)
    hk = hk * alpha[None, :] + np.outer(k_slot_j, s_j)
    hv = alpha[:, None] * hv + np.outer(s_j, v_j)
    return hk, hv


def softmax_read(logits, values):
    """Max-subtracted softmax over the last axis, then the weighted sum of values.

    logits [G,L]  values [L,V]  ->  o [G,V], lse [G].  With L = 0 (M = 0 and W = 0: nothing
    to attend to) the result is o = 0, lse = -inf.
    """
    G, L = logits.shape
    if L == 0:
        return np.zeros((G, values.shape[1])), np.full(G, -np.inf)
    mx = logits.max(axis=1, keepdims=True)
    p = np.exp(logits - mx)
    den = p.sum(axis=1)
    return (p @ values) / den[:, None], mx[:, 0] + np.log(den)


def forward(q, k, v, g, *, window_size, s=None, q_slot=None, k_slot=None, scale=None,
            hk0=None, hv0=None, cu_seqlens=None):
    """NHA forward, token by token, in float64.

    q [B,T,HQ,K]  k [B,T,H,K]  v [B,T,H,V]  g [B,T,H,M] (log forget gate)
    s [B,T,H,M] or None (default 1 - exp(g))
    q_slot [B,T,HQ,K] / k_slot [B,T,H,K] or None (default q / k)
    scale: default K ** -0.5.  window_size W >= 0.
    hk0 [N,H,K,M] / hv0 [N,H,M,V] or None (zeros).  cu_seqlens [N+1] (B == 1) or None (N = B).

    Returns float64 ``o [B,T,HQ,V]``, ``lse [B,HQ,T]`` (natural log) and ``hk [N,H,K,M]``,
    ``hv [N,H,M,V]``: the slot state after the last token of each sequence (the state the
    last query read; ``hk0`` / ``hv0`` for an empty sequence).
    """
    x = prepare(q, k, v, g, window_size=window_size, s=s, q_slot=q_slot, k_slot=k_slot,
                scale=scale, hk0=hk0, hv0=hv0, cu_seqlens=cu_seqlens)
    W, G = x.W, x.G
    o = np.zeros((x.B, x.T, x.HQ, x.V))
    lse = np.zeros((x.B, x.HQ, x.T))
    hk_out = x.hk0.copy()
    hv_out = x.hv0.copy()
    for n, (b, bos, eos) in enumerate(x.seqs):
        for h in range(x.H):
            heads = slice(h * G, (h + 1) * G)
            hk, hv = x.hk0[n, h], x.hv0[n, h]
            for t in range(bos, eos):
                j = t - W
                if j >= bos:
                    hk, hv = absorb(hk, hv, x.k_slot[b, j, h], x.v[b, j, h], x.g[b, j, h], x.s[b, j, h])
                win = slice(max(bos, t - W + 1), t + 1) if W > 0 else slice(t + 1, t + 1)
                logits = np.concatenate([x.scale * x.q_slot[b, t, heads] @ hk,            # [G, M]
                                         x.scale * x.q[b, t, heads] @ x.k[b, win, h].T],  # [G, nw]
                                        axis=1)
                values = np.concatenate([hv, x.v[b, win, h]], axis=0)                     # [M + nw, V]
                o[b, t, heads], lse[b, heads, t] = softmax_read(logits, values)
            hk_out[n, h], hv_out[n, h] = hk, hv
    return o, lse, hk_out, hv_out


def state_from_prefill(k, v, g, hk, hv, *, window_size, s=None, k_slot=None, cu_seqlens=None):
    """Build the decode state dict (the NHAState layout of nha_core/state.py) after a prefill.

    k [B,T,H,K]  v [B,T,H,V]  g [B,T,H,M]  s [B,T,H,M] or None  k_slot [B,T,H,K] or None
    hk [N,H,K,M]  hv [N,H,M,V]: the final state ``forward`` returned for the same tokens.
    Token i of sequence n (i < T_n) lives at ring row ``i % W`` when ``i >= T_n - W``;
    ``seen[n] = T_n``. ``s_cache`` / ``k_slot_cache`` are present only when s / k_slot are.
    Returns a dict with keys hk, hv, k_cache [N,W,H,K], v_cache [N,W,H,V], g_cache [N,W,H,M],
    s_cache [N,W,H,M] or None, k_slot_cache [N,W,H,K] or None, seen [N] int64, window_size.
    """
    k, v, g = (np.asarray(a, dtype=np.float64) for a in (k, v, g))
    B, T, H, K = k.shape
    V, M = v.shape[3], g.shape[3]
    W = int(window_size)
    if cu_seqlens is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        cu = np.asarray(cu_seqlens).astype(np.int64)
        seqs = [(0, int(cu[n]), int(cu[n + 1])) for n in range(len(cu) - 1)]
    N = len(seqs)
    state = {
        "hk": np.array(hk, dtype=np.float64), "hv": np.array(hv, dtype=np.float64),
        "k_cache": np.zeros((N, W, H, K)), "v_cache": np.zeros((N, W, H, V)),
        "g_cache": np.zeros((N, W, H, M)),
        "s_cache": None if s is None else np.zeros((N, W, H, M)),
        "k_slot_cache": None if k_slot is None else np.zeros((N, W, H, K)),
        "seen": np.zeros(N, dtype=np.int64), "window_size": W,
    }
    for n, (b, bos, eos) in enumerate(seqs):
        state["seen"][n] = eos - bos
        for i in range(max(0, eos - bos - W), eos - bos):
            row = i % W
            state["k_cache"][n, row] = k[b, bos + i]
            state["v_cache"][n, row] = v[b, bos + i]
            state["g_cache"][n, row] = g[b, bos + i]
            if s is not None:
                state["s_cache"][n, row] = np.asarray(s, dtype=np.float64)[b, bos + i]
            if k_slot is not None:
                state["k_slot_cache"][n, row] = np.asarray(k_slot, dtype=np.float64)[b, bos + i]
    return state


def decode_step(q, k, v, g, state, *, s=None, q_slot=None, k_slot=None, scale=None):
    """One new token per sequence, continuing ``state``; the inputs are not mutated.

    q [N,HQ,K]  k [N,H,K]  v [N,H,V]  g [N,H,M]  s [N,H,M] / q_slot [N,HQ,K] / k_slot [N,H,K]
    or None.  state: dict as built by ``state_from_prefill`` (W = state["window_size"]).

    With W > 0, once ``seen >= W`` the token at ring row ``seen % W`` (token ``seen - W``)
    leaves the window and is absorbed into the slots with its own cached g, s and k_slot; the
    new token then takes that row. With W = 0 the new token is absorbed before the read.
    Returns ``o [N,HQ,V]``, ``lse [N,HQ]`` and a new state dict with ``seen + 1``.
    """
    q, k, v, g = (np.asarray(a, dtype=np.float64) for a in (q, k, v, g))
    N, HQ, K = q.shape
    H = k.shape[1]
    G = HQ // H
    W = int(state["window_size"])
    scale = default_scale(scale, K)
    s_new = derived_s(g) if s is None else np.asarray(s, dtype=np.float64)
    q_slot = q if q_slot is None else np.asarray(q_slot, dtype=np.float64)
    k_slot_new = k if k_slot is None else np.asarray(k_slot, dtype=np.float64)

    new = {name: None if state.get(name) is None else np.array(state[name], copy=True)
           for name in ("hk", "hv", "k_cache", "v_cache", "g_cache", "s_cache", "k_slot_cache", "seen")}
    new["hk"] = new["hk"].astype(np.float64)
    new["hv"] = new["hv"].astype(np.float64)
    new["window_size"] = W
    # A cache that was not kept means the default was used for the cached tokens; keep one
    # from now on if this step gives the value explicitly (or if the state already had one).
    if new["s_cache"] is None and s is not None:
        new["s_cache"] = derived_s(new["g_cache"])
    if new["k_slot_cache"] is None and k_slot is not None:
        new["k_slot_cache"] = new["k_cache"].copy()

    o = np.zeros((N, HQ, v.shape[2]))
    lse = np.zeros((N, HQ))
    for n in range(N):
        seen = int(new["seen"][n])
        for h in range(H):
            hk, hv = new["hk"][n, h], new["hv"][n, h]
            if W == 0:
                hk, hv = absorb(hk, hv, k_slot_new[n, h], v[n, h], g[n, h], s_new[n, h])
            elif seen >= W:
                row = seen % W
                g_old = new["g_cache"][n, row, h]
                s_old = derived_s(g_old) if new["s_cache"] is None else new["s_cache"][n, row, h]
                ks_old = (new["k_cache"] if new["k_slot_cache"] is None else new["k_slot_cache"])[n, row, h]
                hk, hv = absorb(hk, hv, ks_old, new["v_cache"][n, row, h], g_old, s_old)
            new["hk"][n, h], new["hv"][n, h] = hk, hv
        if W > 0:
            row = seen % W
            new["k_cache"][n, row] = k[n]
            new["v_cache"][n, row] = v[n]
            new["g_cache"][n, row] = g[n]
            if new["s_cache"] is not None:
                new["s_cache"][n, row] = s_new[n]
            if new["k_slot_cache"] is not None:
                new["k_slot_cache"][n, row] = k_slot_new[n]
        rows = [i % W for i in range(max(0, seen + 1 - W), seen + 1)] if W > 0 else []  # token order
        for h in range(H):
            heads = slice(h * G, (h + 1) * G)
            k_win = new["k_cache"][n, rows, h]                                        # [nw, K]
            logits = np.concatenate([scale * q_slot[n, heads] @ new["hk"][n, h],      # [G, M]
                                     scale * q[n, heads] @ k_win.T], axis=1)          # [G, nw]
            values = np.concatenate([new["hv"][n, h], new["v_cache"][n, rows, h]], axis=0)
            o[n, heads], lse[n, heads] = softmax_read(logits, values)
        new["seen"][n] = seen + 1
    return o, lse, new
