"""NumPy forward: chunk-parallel NHA with batched BLAS products (MATH: shift trick + chunked GSA).

For each chunk of ``BT`` queries ``[t0, t1)`` and every (batch, KV head) at once::

    keys       t0-W+1 ............ t0 ........ t1-1
    window     |<------- band: t-W < j <= t ------>|   one [BT*G, BT+W-1] logit block, masked
    slots      state before the chunk + shifted tokens t0-W ... t1-1-W (chunk-local GSA)

The slot branch is gated slot attention on tokens shifted right by ``W`` (position ``p`` writes
token ``p - W``; ``p < W`` is an identity token), so slots and window of a chunk line up row by
row and one softmax covers ``M + window`` logits. GQA: the ``G = HQ // H`` query heads of a KV head
are stacked as rows ``(t, g)`` of one matrix, so K/V are never repeated.

Once the window is full (t0 >= W) and q_slot/k_slot are q/k, ``_chunk_fused`` takes one key block
t0-W ... t1-1: its first C keys are the chunk's shifted slot tokens, so the slot products
q . k_slot come out of the window product. The forward reads those chunks straight from the
caller's arrays and builds the slot algebra of several chunks per vectorised pass
(``Chunk.many``). ``chunk_forward`` (general layout) serves the first chunks and the backward.
"""
from __future__ import annotations

import numpy as np

from . import configs


def _dtype(p):
    return np.dtype(p.dtype)


def _head_major(x, dt, pad_front=0, pad_back=0, extra_col=False, scale=None):
    """[B,T,H,D] -> contiguous [B,H,pad_front+T+pad_back,D(+1)] copy in ``dt`` (zero padding).

    ``extra_col`` appends a column of ones (used to get softmax row sums out of the P @ V
    product, saving a separate reduction pass over the probability block).
    """
    B, T, H, D = x.shape
    out = np.zeros((B, H, pad_front + T + pad_back, D + int(extra_col)), dtype=dt)
    body = out[:, :, pad_front:pad_front + T, :D]
    if scale is None:
        body[...] = x.transpose(0, 2, 1, 3)
    else:
        np.multiply(x.transpose(0, 2, 1, 3), scale, out=body)
    if extra_col:
        out[:, :, :, D] = 1
    return out


def _queries(x, G, dt, scale):
    """q [B,T,HQ,K] -> scaled contiguous [B,H,T,G,K] (rows (t, g) of one KV head are adjacent)."""
    B, T, HQ, K = x.shape
    out = np.empty((B, HQ // G, T, G, K), dtype=dt)
    np.multiply(x.reshape(B, T, HQ // G, G, K).transpose(0, 2, 1, 3, 4), scale, out=out)
    return out


_TRIL = {}


def _tril(C, dt):
    """Cached inclusive causal mask [C, C] (j <= t) as 0/1 in ``dt``."""
    key = (C, dt.name)
    if key not in _TRIL:
        _TRIL[key] = np.tril(np.ones((C, C), dtype=dt))
    return _TRIL[key]


def _decays(gc, dt):
    """exp(gc), exp(-gc) in ``dt`` (C-contiguous, shape of ``gc``) from float64 cumsums ``gc``.

    float64 takes exp in float64 (0.5 ulp). float32 avoids the float64 exp (scalar on AVX2 CPUs,
    ~4x the cost of the float32 SIMD exp): with hi = fp32(gc) and lo = gc - hi (|lo| <= |gc| 2^-25),
    exp(gc) = exp(hi) (1 + lo) to second order in lo, so only exp's own few-ulp error remains
    (<= 3.5 ulp for eg and 1/eg measured, against 0.5 ulp through float64).
    """
    if dt == np.float64:
        eg = np.exp(gc, out=np.empty(gc.shape, dt))
        return eg, 1.0 / eg
    hi = np.empty(gc.shape, dt)
    np.copyto(hi, gc, casting="same_kind")
    lo = np.empty(gc.shape, dt)
    np.subtract(gc, hi, out=lo, casting="same_kind")
    eg = np.exp(hi)
    lo *= eg
    eg += lo
    return eg, np.divide(1.0, eg, dtype=dt)


class Chunk:
    """Decay algebra of the slot branch inside one chunk, for all (batch, KV head) at once.

    ``gt [B,H,C,M]`` shifted log gates and ``st [B,H,C,M]`` shifted write weights of the chunk.
    Writing D[t,j,m] = exp(sum_{j<i<=t} gt_i) for j <= t (0 above the diagonal), the three
    contractions every kernel needs are

        read(X)     [B,H,R,C] -> [B,H,R,M]   sum_j X[t,j] st[j,m] D[t,j,m]
        coef(P)     [B,H,R,M] -> [B,H,R,C]   sum_m P[t,m] st[j,m] D[t,j,m]
        grad_s(X,P) -> [B,H,C,M]             sum_t X[t,j] P[t,m] D[t,j,m]

    with rows R = (t, g). NUMERICS: the fast path factors D = exp(Gc[t]) * exp(-Gc[j]) with the
    chunk-local cumsum Gc, turning each contraction into one BLAS product. exp(-Gc) overflows
    when the chunk decays strongly (g = -inf resets, |Gc| > ~88 in fp32), so a (batch, head)
    whose |Gc| exceeds ``configs.SAFE_LOG`` in this chunk is recomputed with D built explicitly
    (segment sums taken by a cumsum per key, never as a difference of cumsums, so -inf gates
    give exact zeros instead of NaN). Normal gates never leave the fast path; the explicit path
    costs O(C*C*M) per offending head and chunk.
    """

    def __init__(self, gt, st, dt):
        B, H, C, M = gt.shape
        self.dt = dt
        self.C = C
        gc = np.cumsum(gt, axis=2, dtype=np.float64)  # [B,H,C,M]
        safe = configs.SAFE_LOG[dt.name]
        if np.abs(gc).max() <= safe:  # one reduction in the common case
            self.unsafe = []
            gc_fast = gc
        else:
            with np.errstate(invalid="ignore"):
                ok = (np.abs(gc) <= safe).all(axis=(2, 3))  # [B,H]
            self.unsafe = [tuple(i) for i in np.argwhere(~ok)]
            gc_fast = np.where(ok[:, :, None, None], gc, 0.0)
        self.causal = _tril(C, dt)
        self.eg, egi = _decays(gc_fast, dt)  # [B,H,C,M] exp(Gc[t]), exp(-Gc[j]) (finite here)
        self.sn = st * egi  # [B,H,C,M] st[j] * exp(-Gc[j])
        self.egi = egi
        # decay of the whole chunk, and each key's decay to the chunk end (state update weight)
        self.last = self.eg[:, :, -1, :]  # [B,H,M]
        self.r = egi * self.last[:, :, None, :]  # [B,H,C,M] exp(Gc[last] - Gc[j])
        self.w = self.sn * self.last[:, :, None, :]  # [B,H,C,M] st[j] * exp(Gc[last] - Gc[j])
        self.ds = {}
        if self.unsafe:
            tri = np.tri(C, C, -1, dtype=bool).T  # [j, t] True where j < t
            for b, h in self.unsafe:
                g64 = gt[b, h].astype(np.float64)  # [C,M]
                # seg[t, j] = sum_{j<i<=t} g_i: cumsum over t of g_t masked to t > j
                x = np.where(tri.T[:, :, None], g64[:, None, :], 0.0)  # [t,j,M]
                seg = np.cumsum(x, axis=0)
                d = np.where(tri.T[:, :, None] | np.eye(C, dtype=bool)[:, :, None], np.exp(seg), 0.0)
                d = d.astype(dt)  # [t,j,M]
                self.ds[(b, h)] = (d, d * st[b, h][None, :, :])
                eg = np.exp(np.cumsum(g64, axis=0))  # [C,M] decay from the chunk start
                self.eg[b, h] = eg
                self.last[b, h] = eg[-1]
                self.r[b, h] = d[-1]
                self.w[b, h] = d[-1] * st[b, h]

    @classmethod
    def many(cls, gt, st, dt, C):
        """The chunks of ``gt, st [B,H,n*C,M]`` (n whole chunks of length C), built in one set of
        vectorised passes instead of n: at C = 64 the ~15 NumPy calls per chunk cost as much as the
        arithmetic. Same values as ``__init__`` bit for bit; a chunk with any (batch, head) off the
        fast path (|Gc| > SAFE_LOG) is built by ``__init__`` on its own."""
        B, H, TC, M = gt.shape
        n = TC // C
        g5 = gt.reshape(B, H, n, C, M)
        s5 = st.reshape(B, H, n, C, M)
        # chunk-local cumsum, time axis first: C vector adds over contiguous [B,H,n,M] rows run ~3x
        # faster than np.cumsum along an inner axis (same sequential sums, so same bits)
        gcT = np.empty((C, B, H, n, M), np.float64)
        gcT[...] = np.moveaxis(g5, 3, 0)
        for i in range(1, C):
            np.add(gcT[i], gcT[i - 1], out=gcT[i])
        safe = configs.SAFE_LOG[dt.name]
        with np.errstate(invalid="ignore"):  # row-wise max/min first: fast contiguous passes
            top, bot = gcT.max(axis=0).max(axis=(0, 1, 3)), gcT.min(axis=0).min(axis=(0, 1, 3))
            off = ~((top <= safe) & (bot >= -safe))  # [n]; NaN counts as off
        if off.any():
            gcT[:, :, :, off] = 0.0  # those chunks are rebuilt below; keeps exp() quiet
        eg, egi = _decays(np.moveaxis(gcT, 0, 3), dt)  # [B,H,n,C,M]
        sn = s5 * egi
        last = eg[:, :, :, -1, :]  # [B,H,n,M]
        r = egi * last[:, :, :, None, :]
        w = sn * last[:, :, :, None, :]
        causal = _tril(C, dt)
        out = []
        for i in range(n):
            if off[i]:
                out.append(cls(g5[:, :, i], s5[:, :, i], dt))
                continue
            ch = cls.__new__(cls)
            ch.dt, ch.C, ch.unsafe, ch.causal, ch.ds = dt, C, [], causal, {}
            ch.eg, ch.egi, ch.sn, ch.r, ch.w = eg[:, :, i], egi[:, :, i], sn[:, :, i], r[:, :, i], w[:, :, i]
            ch.last = last[:, :, i]
            out.append(ch)
        return out

    def _rows(self, x, G):
        B, H = x.shape[:2]
        return x.reshape(B, H, self.C, G, -1)

    def read(self, X, G):
        out = X @ self.sn  # [B,H,R,M]
        self._rows(out, G)[...] *= self.eg[:, :, :, None, :]
        for b, h in self.unsafe:
            _, dsm = self.ds[(b, h)]
            x = X[b, h].reshape(self.C, G, self.C)
            out[b, h] = np.einsum("tgj,tjm->tgm", x, dsm).reshape(self.C * G, -1)
        return out

    def coef(self, P, Pe, G):
        """``Pe`` = P * exp(Gc[t]) (the inter-chunk term needs it too); unsafe heads use ``P``."""
        out = Pe @ self.sn.swapaxes(-1, -2)  # [B,H,R,C]
        self._rows(out, G)[...] *= self.causal[:, None, :]
        for b, h in self.unsafe:
            _, dsm = self.ds[(b, h)]
            pr = P[b, h].reshape(self.C, G, -1)
            out[b, h] = np.einsum("tgm,tjm->tgj", pr, dsm).reshape(self.C * G, self.C)
        return out

    def grad_s(self, X, P, Pe, G):
        out = X.swapaxes(-1, -2) @ Pe  # [B,H,C,M]
        out *= self.egi
        for b, h in self.unsafe:
            d, _ = self.ds[(b, h)]
            x = X[b, h].reshape(self.C, G, self.C)
            pr = P[b, h].reshape(self.C, G, -1)
            out[b, h] = np.einsum("tjm,tjm->jm", np.einsum("tgj,tgm->tjm", x, pr), d)
        return out


def window_bias(C, W, dt):
    """[C, C+W-1] additive mask of one query chunk against keys t0-W+1 ... t0+C-1: 0 where the key
    is in the query's window (t-W < j <= t), -inf elsewhere."""
    i = np.arange(C)[:, None]
    jj = np.arange(C + W - 1)[None, :]
    return np.where((jj >= i) & (jj <= i + W - 1), 0.0, -np.inf).astype(dt)


class Inputs:
    """Head-major, zero-padded copies of one batch of equal-length sequences (B, T).

    Token ``i`` lives at row ``Wp + i`` of the padded arrays (``Wp = min(W, T)`` zero rows in
    front), so the window keys of queries [t0, t1) are rows [t0+1, t1+Wp) and the shifted slot
    tokens of positions [t0, t1) (token p - W, identity when p < W) are rows [t0, t1) whenever a
    chunk has writes at all (t1 > W implies Wp = W). q and q_slot carry the scale.
    """

    def __init__(self, p, q, k, v, g, s, q_slot, k_slot, hk0, hv0):
        dt = _dtype(p)
        self.dt = dt
        self.B, self.T = q.shape[:2]
        self.W = p.W
        self.Wp = Wp = min(p.W, self.T)
        G = p.G
        self.q = _queries(q, G, dt, p.scale)  # [B,H,T,G,K]
        self.qs = self.q if q_slot is None else _queries(q_slot, G, dt, p.scale)
        self.k = _head_major(k, dt, Wp)  # [B,H,Wp+T,K]
        self.v = _head_major(v, dt, Wp, extra_col=True)  # [B,H,Wp+T,V+1], last column ones
        self.ks = self.k if k_slot is None else _head_major(k_slot, dt, Wp)
        self.g = _head_major(g, dt, Wp)  # [B,H,Wp+T,M]
        self.s = _head_major(s, dt, Wp)
        B, H, K, M, V = self.B, p.H, p.K, p.M, p.V
        self.hk0 = np.zeros((B, H, K, M), dt) if hk0 is None else np.array(hk0, dtype=dt)
        self.hv0 = np.zeros((B, H, M, V), dt) if hv0 is None else np.array(hv0, dtype=dt)


def forward(p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu_seqlens):
    """o [B,T,HQ,V] (input dtype), lse [B,HQ,T] (p.state_dtype), hk [N,H,K,M], hv [N,H,M,V] or None."""
    dt, sdt = _dtype(p), np.dtype(p.state_dtype)
    B, T = q.shape[:2]
    o = np.empty((B, T, p.HQ, p.V), dt)
    lse = np.empty((B, p.HQ, T), sdt)
    hk = np.empty((p.N, p.H, p.K, p.M), sdt) if p.output_final_state else None
    hv = np.empty((p.N, p.H, p.M, p.V), sdt) if p.output_final_state else None
    if p.varlen:
        bounds = [int(x) for x in np.asarray(cu_seqlens)]
        for n in range(p.N):
            i0, i1 = bounds[n], bounds[n + 1]
            sl = (slice(None), slice(i0, i1))
            state = _forward_seq(
                p, q[sl], k[sl], v[sl], g[sl], s[sl],
                None if q_slot is None else q_slot[sl], None if k_slot is None else k_slot[sl],
                None if hk0 is None else hk0[n:n + 1], None if hv0 is None else hv0[n:n + 1],
                o[sl], lse[:, :, i0:i1],
            )
            if hk is not None:
                hk[n:n + 1], hv[n:n + 1] = state
    else:
        state = _forward_seq(p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, o, lse)
        if hk is not None:
            hk[...], hv[...] = state
    return o, lse, hk, hv


def _forward_seq(p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, o_out, lse_out):
    """One batch of equal-length sequences; writes o_out [B,T,HQ,V], lse_out [B,HQ,T]; returns (Hk, Hv).

    Chunks [t0, t1) with t0 >= T0 (T0: the first chunk start >= W) run ``_chunk_fused`` straight
    on the caller's token-major arrays (strided views; only each chunk's queries are copied, to
    apply the scale). Copying whole [B,H,T,D] head-major arrays cost ~10% of the call, most of it
    first-touch page faults on fresh memory. The chunks before T0 use the padded ``Inputs`` of
    those tokens only.
    """
    B, T = q.shape[:2]
    H, G, K, V, M, W = p.H, p.G, p.K, p.V, p.M, p.W
    BT = configs.block_t(p, T)
    # the fused layout needs slot keys/queries that are the window keys/queries, and W >= 1
    fused = W > 0 and M > 0 and q_slot is None and k_slot is None
    T0 = min(T, -(-W // BT) * BT) if fused else T
    pre = (slice(None), slice(0, T0))
    x = Inputs(p, q[pre], k[pre], v[pre], g[pre], s[pre], None if q_slot is None else q_slot[pre],
               None if k_slot is None else k_slot[pre], hk0, hv0)
    dt, Wp = x.dt, x.Wp
    Hk, Hv = x.hk0, x.hv0
    o_view = o_out.reshape(B, T, H, G, V)
    lse_view = lse_out.reshape(B, H, G, T)
    bias = window_bias(BT, Wp, dt) if W > 0 else None
    slot0 = (W // BT) * BT  # first chunk start with t1 > W (the first with slot writes)
    chunks = _slot_chunks(x.g[:, :, slot0:T0], x.s[:, :, slot0:T0], T0 - slot0, BT, dt)
    for t0 in range(0, T0, BT):
        t1 = min(t0 + BT, T0)
        C = t1 - t0
        ch = next(chunks) if M > 0 and t1 > W else None
        r = chunk_forward(x, p, t0, t1, Hk, Hv, bias, ch=ch)
        o_view[:, t0:t1] = r.o.reshape(B, H, C, G, V).transpose(0, 2, 1, 3, 4)
        lse_view[:, :, :, t0:t1] = r.lse.reshape(B, H, C, G).transpose(0, 1, 3, 2)
        if ch is not None:
            Ks = x.ks[:, :, t0:t1]
            Vs = x.v[:, :, t0:t1, :V]
            Hk = Hk * ch.last[:, :, None, :] + Ks.swapaxes(-1, -2) @ ch.w
            Hv = ch.last[:, :, :, None] * Hv + ch.w.swapaxes(-1, -2) @ Vs
    if T0 == T:
        return Hk, Hv

    # token-major views [B,H,T,D]: token j at row j (no padding; t0 >= W keeps rows >= 0)
    kt, vt, gt, st = (np.asarray(a, dtype=dt).transpose(0, 2, 1, 3) for a in (k, v, g, s))
    band = fused_bias(BT, W, dt)
    ones = np.ones(BT + W + M, dt)  # row sums as matrix-vector products (3x a .sum(-1))
    q_buf = np.empty((B, H, BT, G, K), dt)
    chunks = _slot_chunks(gt[:, :, T0 - W:T - W], st[:, :, T0 - W:T - W], T - T0, BT, dt)
    q5 = q.reshape(B, T, H, G, K)
    for t0 in range(T0, T, BT):
        t1 = min(t0 + BT, T)
        C = t1 - t0
        ch = next(chunks)
        Q = q_buf[:, :, :C]
        np.multiply(q5[:, t0:t1].transpose(0, 2, 1, 3, 4), p.scale, out=Q, casting="same_kind")
        o_c = o_view[:, t0:t1].transpose(0, 2, 1, 3, 4)  # [B,H,C,G,V] view of the output
        lse_c = lse_view[:, :, :, t0:t1].transpose(0, 1, 3, 2)  # [B,H,C,G]
        _chunk_fused(p, Q.reshape(B, H, C * G, K), kt, vt, t0, t1, Hk, Hv, ch, band, ones, o_c, lse_c)
        Ks = kt[:, :, t0 - W:t1 - W]  # [B,H,C,K] the chunk's shifted slot tokens
        Vs = vt[:, :, t0 - W:t1 - W]
        Hk *= ch.last[:, :, None, :]  # in place: Hk, Hv are this call's own arrays here
        Hk += Ks.swapaxes(-1, -2) @ ch.w
        Hv *= ch.last[:, :, :, None]
        Hv += ch.w.swapaxes(-1, -2) @ Vs
    return Hk, Hv


def _slot_chunks(gs, ss, n_pos, BT, dt):
    """Yield the :class:`Chunk` of consecutive chunks of length BT covering ``gs, ss [B,H,n_pos,M]``
    (shifted gates and writes, chunk-aligned), ``configs.SLOT_GROUP`` chunks per ``Chunk.many``;
    a short last chunk alone."""
    t0 = 0
    while t0 < n_pos:
        n = min(configs.SLOT_GROUP, (n_pos - t0) // BT)
        if n == 0:
            yield Chunk(gs[:, :, t0:n_pos], ss[:, :, t0:n_pos], dt)
            return
        yield from Chunk.many(gs[:, :, t0:t0 + n * BT], ss[:, :, t0:t0 + n * BT], dt, BT)
        t0 += n * BT


def fused_bias(C, W, dt):
    """[C, C+W] additive mask of one query chunk against keys t0-W ... t0+C-1 (one older key in
    front of ``window_bias``'s, the chunk's first slot token): 0 where t-W < j <= t, else -inf.

    Only the first C and the last C columns hold -inf (``_chunk_fused`` adds just those strips)::

        col   0 ........ C-1   C ...... W-1   W ....... W+C-1
              -inf on j <= t-W  all in window   -inf on j > t
              (lower triangle)                  (strict upper triangle)
    """
    i = np.arange(C)[:, None]
    c = np.arange(C + W)[None, :]
    return np.where((c > i) & (c <= i + W), 0.0, -np.inf).astype(dt)


def _chunk_fused(p, Q, kt, vt, t0, t1, Hk, Hv, ch, band, ones, o_c, lse_c):
    """Forward of queries [t0, t1), t0 >= W, with q_slot = q and k_slot = k. ``Q [B,H,R,K]`` the
    scaled queries, ``kt, vt [B,H,T,K|V]`` token-major keys/values; writes o_c [B,H,C,G,V] and
    lse_c [B,H,C,G] (views of the outputs).

    Keys t0-W ... t0-W+C-1 are the chunk's shifted slot tokens and keys t0-W+1 ... t1-1 its
    window, so one product Q @ k[t0-W : t1]^T gives both: the lower triangle (j <= t-W) of its
    first C columns is the slot branch's A = q . k_slot (masked out of the window), the rest are
    the window logits. That saves the separate A product and masks only two C-wide strips.
    """
    B, H, R = Q.shape[:3]
    G, V, M, W = p.G, p.V, p.M, p.W
    C = t1 - t0
    nk = C + W
    L = Q @ kt[:, :, t0 - W:t1].swapaxes(-1, -2)  # [B,H,R,C+W]
    L5 = L.reshape(B, H, C, G, nk)
    A = (L5[..., :C] * ch.causal[:, None, :]).reshape(B, H, R, C)  # before the strip is masked
    if C <= W:
        L5[..., :C] += band[:C, None, :C]
        L5[..., W:] += band[:C, None, W:nk]
    else:
        L5 += band[:C, None, :nk]
    Ls = Q @ Hk  # [B,H,R,M]
    Ls5 = Ls.reshape(B, H, C, G, M)
    eg5 = ch.eg[:, :, :, None, :]  # [B,H,C,1,M]
    if ch.unsafe:
        Ls5 *= eg5
        Ls += ch.read(A, G)
    else:  # read(A) = (A @ sn) * eg: one scaling for both terms
        Ls += A @ ch.sn
        Ls5 *= eg5
    m = L.max(-1)  # [B,H,R]
    np.maximum(m, Ls.max(-1), out=m)
    # Row maxima within +-SHIFT_FREE need no shift: exp(L) stays far inside the float range and
    # the normalisation removes the scale. The decision is per (batch, head), so results do not
    # depend on which heads share a call (the head-parallel split stays bit-identical).
    shift = ~(np.abs(m) <= configs.SHIFT_FREE).all(-1)  # [B,H]
    if shift.any():
        for b, h in np.argwhere(shift):
            L[b, h] -= m[b, h, :, None]
            Ls[b, h] -= m[b, h, :, None]
        m *= shift[:, :, None]
    else:
        m[...] = 0
    np.exp(L, out=L)
    np.exp(Ls, out=Ls)
    den = L @ ones[:nk]  # [B,H,R]
    den += Ls @ ones[:M]
    num = L @ vt[:, :, t0 - W:t1]  # [B,H,R,V]
    Pe = (Ls5 * eg5).reshape(B, H, R, M)
    num += Pe @ Hv
    num += ch.coef(Ls, Pe, G) @ vt[:, :, t0 - W:t1 - W]
    den5 = den.reshape(B, H, C, G)
    np.divide(num.reshape(B, H, C, G, V), den5[..., None], out=o_c)
    np.log(den5, out=lse_c)
    lse_c += m.reshape(B, H, C, G)


class ChunkResult:
    """What one chunk's forward leaves for the caller (the backward recomputes it with ``lse``)."""

    __slots__ = ("o", "lse", "Pw", "Ps", "Ls", "A", "ch", "ks")


def chunk_forward(x, p, t0, t1, Hk, Hv, bias, lse=None, ch=None):
    """Queries [t0, t1) of every (batch, KV head), rows R = (t, g).

    Returns a :class:`ChunkResult`: o [B,H,R,V] and lse [B,H,R] (None when ``lse`` is given:
    then the probabilities are exp(L - lse), as the backward recomputes them), Pw [B,H,R,nk]
    window probabilities over keys ks ... t1-1 (ks = max(0, t0-W+1)), Ps [B,H,R,M] slot
    probabilities, Ls [B,H,R,M] slot logits (backward only), A [B,H,R,C] causal-masked scaled
    q_slot . k_slot products of the chunk, ch: the :class:`Chunk` of shifted tokens (``ch`` if
    given, else built here), or None when no token has reached the slots by the end of this
    chunk (t1 <= W).
    """
    B, H, G, V, M, W, Wp = x.B, p.H, p.G, p.V, p.M, p.W, x.Wp
    C = t1 - t0
    R = C * G
    r = ChunkResult()
    r.o = r.lse = r.Pw = r.Ps = r.Ls = r.A = r.ch = None
    Q = x.q[:, :, t0:t1].reshape(B, H, R, -1)  # [B,H,R,K]
    Qs = x.qs[:, :, t0:t1].reshape(B, H, R, -1)
    Lw = Ls = None
    r.ks = ks = max(0, t0 - Wp + 1)
    if W > 0:
        col0 = ks - (t0 - Wp + 1)
        Kw = x.k[:, :, Wp + ks:Wp + t1]  # [B,H,nk,K]
        Lw = Q @ Kw.swapaxes(-1, -2)  # [B,H,R,nk]
        Lw.reshape(B, H, C, G, -1)[...] += bias[:C, None, col0:col0 + t1 - ks]
    if M > 0:
        Ls = Qs @ Hk  # [B,H,R,M]
        if t1 > W:
            if ch is None:
                ch = Chunk(x.g[:, :, t0:t1], x.s[:, :, t0:t1], x.dt)
            A = Qs @ x.ks[:, :, t0:t1].swapaxes(-1, -2)  # [B,H,R,C]
            A.reshape(B, H, C, G, C)[...] *= ch.causal[:, None, :]
            Ls.reshape(B, H, C, G, M)[...] *= ch.eg[:, :, :, None, :]
            Ls += ch.read(A, G)
            r.A = A
    r.ch = ch
    if lse is None:
        if Lw is None and Ls is None:
            # M = 0 and W = 0: nothing to attend to; o = 0 and lse = -inf (as the reference)
            r.o = np.zeros((B, H, R, V), x.dt)
            r.lse = np.full((B, H, R), -np.inf, x.dt)
            return r
        m = Lw.max(-1) if Lw is not None else Ls.max(-1)
        if Lw is not None and Ls is not None:
            np.maximum(m, Ls.max(-1), out=m)
    else:
        m = lse
        if Ls is not None:
            r.Ls = Ls.copy()
    if Lw is not None:
        Lw -= m[..., None]
        np.exp(Lw, out=Lw)
        r.Pw = Lw
    if Ls is not None:
        Ls -= m[..., None]
        np.exp(Ls, out=Ls)
        r.Ps = Ls
    if lse is not None:
        return r
    if Lw is not None:
        num = Lw @ x.v[:, :, Wp + ks:Wp + t1]  # [B,H,R,V+1]; last column: window row sums
    else:
        num = np.zeros((B, H, R, V + 1), x.dt)
    if Ls is not None:
        num[..., V] += Ls.sum(-1)
        if ch is None:
            num[..., :V] += Ls @ Hv
        else:
            Pe = (Ls.reshape(B, H, C, G, M) * ch.eg[:, :, :, None, :]).reshape(B, H, R, M)
            num[..., :V] += Pe @ Hv + ch.coef(Ls, Pe, G) @ x.v[:, :, t0:t1, :V]
    den = num[..., V]
    r.o = num[..., :V] / den[..., None]
    r.lse = m + np.log(den)
    return r
