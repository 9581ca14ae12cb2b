"""NumPy backward: recompute each chunk from (o, lse), walk the chunks in reverse (MATH §3).

A forward sweep stores the slot state before every chunk (O(T/BT * M*(K+V)) per head). The
reverse sweep recomputes the chunk's probabilities as exp(L - lse), takes the window gradients
with dense block products, and carries the slot-state gradients dHk [K,M], dHv [M,V] from the
chunk after. The gate gradient needs no per-token states: with H(p) the state read at shifted
position p and dH_acc(p) the total gradient reaching it,

    dL/dGt_p = sum_{p' >= p} ( <dH_read(p'), H(p')> - <dH_acc(p'), write_p'> )   per slot m

and the two inner products are dLs*Ls + Ps*dov and S*dS (a reverse cumsum over the sequence).
"""
from __future__ import annotations

import numpy as np

from . import configs
from .forward import Chunk, Inputs, _dtype, _queries, chunk_forward, window_bias


def backward(p, do, q, k, v, g, s, q_slot, k_slot, o, lse, hk0, hv0, cu_seqlens):
    """Returns (dq, dk, dv, dg, ds, dq_slot, dk_slot, dhk0, dhv0); see nha_core.registry."""
    dt, sdt = _dtype(p), np.dtype(p.state_dtype)
    B, T = q.shape[:2]
    grads = {
        "dq": np.zeros((B, T, p.HQ, p.K), dt), "dk": np.zeros((B, T, p.H, p.K), dt),
        "dv": np.zeros((B, T, p.H, p.V), dt), "dg": np.zeros((B, T, p.H, p.M), dt),
        "ds": np.zeros((B, T, p.H, p.M), dt),
        "dq_slot": None if q_slot is None else np.zeros((B, T, p.HQ, p.K), dt),
        "dk_slot": None if k_slot is None else np.zeros((B, T, p.H, p.K), dt),
    }
    with_state = hk0 is not None
    dhk0 = np.zeros((p.N, p.H, p.K, p.M), sdt) if with_state else None
    dhv0 = np.zeros((p.N, p.H, p.M, p.V), sdt) if with_state else None

    def run(sl, n0, n1):
        out = {name: (None if a is None else a[sl]) for name, a in grads.items()}
        dH = _backward_seq(
            p, do[sl], q[sl], k[sl], v[sl], g[sl], s[sl],
            None if q_slot is None else q_slot[sl], None if k_slot is None else k_slot[sl],
            o[sl], lse[:, :, sl[1]],
            None if hk0 is None else hk0[n0:n1], None if hv0 is None else hv0[n0:n1], out,
        )
        if with_state:
            dhk0[n0:n1], dhv0[n0:n1] = dH

    if p.varlen:
        bounds = [int(x) for x in np.asarray(cu_seqlens)]
        for n in range(p.N):
            run((slice(None), slice(bounds[n], bounds[n + 1])), n, n + 1)
    else:
        run((slice(None), slice(None)), 0, B)
    return (grads["dq"], grads["dk"], grads["dv"], grads["dg"], grads["ds"],
            grads["dq_slot"], grads["dk_slot"], dhk0, dhv0)


def _store(dst, src_head_major):
    """Write a head-major [B,H,T,D] (or [B,H,T,G,D]) gradient into a time-major output view."""
    if src_head_major.ndim == 5:
        B, H, T, G, D = src_head_major.shape
        dst.reshape(B, T, H, G, D)[...] = src_head_major.transpose(0, 2, 1, 3, 4)
    else:
        dst[...] = src_head_major.transpose(0, 2, 1, 3)


def _backward_seq(p, do, q, k, v, g, s, q_slot, k_slot, o, lse, hk0, hv0, out):
    """One batch of equal-length sequences; fills the views in ``out``; returns (dHk0, dHv0)."""
    x = Inputs(p, q, k, v, g, s, q_slot, k_slot, hk0, hv0)
    B, T, H, G, K, V, M, W, Wp, dt = x.B, x.T, p.H, p.G, p.K, p.V, p.M, p.W, x.Wp, x.dt
    if T == 0:
        return np.zeros((B, H, K, M), dt), np.zeros((B, H, M, V), dt)
    sc = p.scale
    BT = configs.block_t(p, T)
    bias = window_bias(BT, Wp, dt) if W > 0 else None
    doh = _queries(do, G, dt, 1.0)  # [B,H,T,G,V]
    # D_t = do_t . o_t: the softmax-backward row term, shared by slots and window
    Dt = np.einsum("bhtgv,bhtgv->bhtg", doh, _queries(o, G, dt, 1.0))  # [B,H,T,G]
    lse_h = np.ascontiguousarray(lse.reshape(B, H, G, T).transpose(0, 1, 3, 2), dtype=dt)  # [B,H,T,G]

    # forward sweep: slot state before every chunk
    starts = list(range(0, T, BT))
    states = []
    Hk, Hv = x.hk0, x.hv0
    for t0 in starts:
        t1 = min(t0 + BT, T)
        states.append((Hk, Hv))
        if M > 0 and t1 > W:
            ch_gt, ch_st = x.g[:, :, t0:t1], x.s[:, :, t0:t1]
            ch = Chunk(ch_gt, ch_st, dt)
            Hk = Hk * ch.last[:, :, None, :] + x.ks[:, :, t0:t1].swapaxes(-1, -2) @ ch.w
            Hv = ch.last[:, :, :, None] * Hv + ch.w.swapaxes(-1, -2) @ x.v[:, :, t0:t1, :V]

    # gradient accumulators, head-major; q-side ones carry the scale at the end
    dq = np.zeros((B, H, T, G, K), dt)
    dqs = dq if q_slot is None else np.zeros((B, H, T, G, K), dt)
    dkp = np.zeros((B, H, Wp + T, K), dt)  # token j at row Wp + j (the Inputs layout)
    dksp = dkp if k_slot is None else np.zeros((B, H, Wp + T, K), dt)
    dvp = np.zeros((B, H, Wp + T, V), dt)
    dS = np.zeros((B, H, T, M), dt)  # by shifted position p (token p - W)
    dGt = np.zeros((B, H, T, M), np.float64)  # per-position terms, reverse-cumsummed below
    dHk = np.zeros((B, H, K, M), dt)
    dHv = np.zeros((B, H, M, V), dt)

    for i in reversed(range(len(starts))):
        t0 = starts[i]
        t1 = min(t0 + BT, T)
        C, R = t1 - t0, (t1 - t0) * G
        Hk, Hv = states[i]
        r = chunk_forward(x, p, t0, t1, Hk, Hv, bias, lse=lse_h[:, :, t0:t1].reshape(B, H, R))
        Do = doh[:, :, t0:t1].reshape(B, H, R, V)
        Dc = Dt[:, :, t0:t1].reshape(B, H, R)
        Q = x.q[:, :, t0:t1].reshape(B, H, R, K)  # scaled
        Qs = x.qs[:, :, t0:t1].reshape(B, H, R, K)
        dq_c = dq[:, :, t0:t1].reshape(B, H, R, K)
        dqs_c = dqs[:, :, t0:t1].reshape(B, H, R, K)
        if W > 0:
            ks = r.ks
            Kw = x.k[:, :, Wp + ks:Wp + t1]  # [B,H,nk,K]
            Vw = x.v[:, :, Wp + ks:Wp + t1, :V]
            Pw = r.Pw
            dPw = Do @ Vw.swapaxes(-1, -2)  # [B,H,R,nk]
            dPw -= Dc[..., None]
            dPw *= Pw  # dLw
            dq_c += dPw @ Kw
            dkp[:, :, Wp + ks:Wp + t1] += dPw.swapaxes(-1, -2) @ Q
            dvp[:, :, Wp + ks:Wp + t1] += Pw.swapaxes(-1, -2) @ Do
        if M == 0:
            continue
        Ps, Ls, ch = r.Ps, r.Ls, r.ch
        if ch is None:
            dov = Do @ Hv.swapaxes(-1, -2)  # [B,H,R,M]
            dLs = Ps * (dov - Dc[..., None])
            dqs_c += dLs @ Hk.swapaxes(-1, -2)
            dHk += Qs.swapaxes(-1, -2) @ dLs
            dHv += Ps.swapaxes(-1, -2) @ Do
            # positions < W are identity tokens: their gate terms reach no real token
            continue
        eg_rows = ch.eg[:, :, :, None, :]  # [B,H,C,1,M]
        Ks = x.ks[:, :, t0:t1]  # [B,H,C,K]
        Vs = x.v[:, :, t0:t1, :V]  # [B,H,C,V]
        St = x.s[:, :, t0:t1]
        dVm = Do @ Vs.swapaxes(-1, -2)  # [B,H,R,C] do_t . v_j, causal-masked
        dVm.reshape(B, H, C, G, C)[...] *= ch.causal[:, None, :]
        dov = Do @ Hv.swapaxes(-1, -2)
        dov.reshape(B, H, C, G, M)[...] *= eg_rows
        dov += ch.read(dVm, G)  # dov[t,m] = do_t . Hv(t)[m, :]
        dLs = Ps * (dov - Dc[..., None])
        dLe = (dLs.reshape(B, H, C, G, M) * eg_rows).reshape(B, H, R, M)
        Pe = (Ps.reshape(B, H, C, G, M) * eg_rows).reshape(B, H, R, M)
        cq = ch.coef(dLs, dLe, G)  # [B,H,R,C]
        cp = ch.coef(Ps, Pe, G)
        dqs_c += dLe @ Hk.swapaxes(-1, -2) + cq @ Ks
        dKs = cq.swapaxes(-1, -2) @ Qs + ch.w @ dHk.swapaxes(-1, -2)
        dVs = cp.swapaxes(-1, -2) @ Do + ch.w @ dHv
        dSc = ch.grad_s(r.A, dLs, dLe, G) + ch.r * (Ks @ dHk)
        dSc += ch.grad_s(dVm, Ps, Pe, G) + ch.r * (Vs @ dHv.swapaxes(-1, -2))
        read = (dLs * Ls + Ps * dov).reshape(B, H, C, G, M).sum(axis=3)  # <dH_read, H> per slot
        dGt[:, :, t0:t1] += read
        dGt[:, :, t0:t1] -= St * dSc
        dksp[:, :, t0:t1] += dKs
        dvp[:, :, t0:t1] += dVs
        dS[:, :, t0:t1] = dSc
        dHk = dHk * ch.last[:, :, None, :] + Qs.swapaxes(-1, -2) @ dLe
        dHv = ch.last[:, :, :, None] * dHv + Pe.swapaxes(-1, -2) @ Do

    dq *= sc
    if dqs is not dq:
        dqs *= sc
    _store(out["dq"], dq)
    if out["dq_slot"] is not None:
        _store(out["dq_slot"], dqs)
    _store(out["dk"], dkp[:, :, Wp:])
    if out["dk_slot"] is not None:
        _store(out["dk_slot"], dksp[:, :, Wp:])
    _store(out["dv"], dvp[:, :, Wp:])
    if M > 0 and T > W:
        # token j sits at shifted position j + W; tokens with j + W >= T never reach the slots
        dGt = np.cumsum(dGt[:, :, ::-1], axis=2)[:, :, ::-1]
        _store(out["dg"][:, :T - W], dGt[:, :, W:].astype(dt))
        _store(out["ds"][:, :T - W], dS[:, :, W:])
    return dHk, dHv
