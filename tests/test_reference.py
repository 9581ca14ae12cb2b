"""Self-checks of the fp64 oracle in reference/ (layer 1 of the test suite, STYLE.md rule 8).

The token loop, the dense masked form, the explicit backward, decode, and the two classic
limits (GSA at W = 0, causal softmax attention at M = 0, W >= T) must agree with each other
before the oracle judges any backend. Shapes are tiny so the whole file runs in seconds.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nha_core import reference as R

# deadline off: the first example pays NumPy warm-up. Derandomized so CI runs are repeatable.
FAST = dict(deadline=None, derandomize=True)


# ----------------------------------------------------------------------------- helpers

def rel_err(a, b):
    """||a - b|| / ||b|| over the finite entries; infinities must match exactly."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert not np.isnan(a).any() and not np.isnan(b).any()
    inf = np.isinf(b)
    assert (np.isinf(a) == inf).all() and (a[inf] == b[inf]).all()
    num = np.linalg.norm(a[~inf] - b[~inf])
    den = np.linalg.norm(b[~inf])
    return num / den if den > 0 else num


@st.composite
def configs(draw, max_T=9, max_dim=4, max_heads=2, max_group=3):
    """One NHA call: dims, window, options, and a seed for the NumPy arrays."""
    H = draw(st.integers(1, max_heads))
    G = draw(st.integers(1, max_group))
    varlen = draw(st.booleans())
    if varlen:
        lengths = draw(st.lists(st.integers(0, max_T - 2), min_size=1, max_size=3))
        B, T = 1, sum(lengths)
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    else:
        B, T, cu = draw(st.integers(1, 2)), draw(st.integers(0, max_T)), None
    return dict(
        B=B, T=T, H=H, HQ=H * G, K=draw(st.integers(1, max_dim)), V=draw(st.integers(1, max_dim)),
        M=draw(st.integers(0, max_dim)), W=draw(st.integers(0, max_T + 2)), cu_seqlens=cu,
        explicit_s=draw(st.booleans()), slot_inputs=draw(st.booleans()),
        initial_state=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(c):
    """Arrays for config c: (q, k, v, g) and the keyword arguments of forward."""
    rng = np.random.default_rng(c["seed"])
    B, T, HQ, H, K, V, M = (c[x] for x in ("B", "T", "HQ", "H", "K", "V", "M"))
    N = B if c["cu_seqlens"] is None else len(c["cu_seqlens"]) - 1
    q = rng.normal(size=(B, T, HQ, K))
    k = rng.normal(size=(B, T, H, K))
    v = rng.normal(size=(B, T, H, V))
    g = np.log(rng.uniform(0.4, 0.99, size=(B, T, H, M)))      # alpha in (0.4, 0.99)
    kw = dict(window_size=c["W"], cu_seqlens=c["cu_seqlens"])
    if c["explicit_s"]:
        kw["s"] = rng.uniform(0.05, 1.0, size=(B, T, H, M))
    if c["slot_inputs"]:
        kw["q_slot"] = rng.normal(size=(B, T, HQ, K))
        kw["k_slot"] = rng.normal(size=(B, T, H, K))
    if c["initial_state"]:
        kw["hk0"] = 0.5 * rng.normal(size=(N, H, K, M))
        kw["hv0"] = 0.5 * rng.normal(size=(N, H, M, V))
    return (q, k, v, g), kw


# ----------------------------------------------------------------------------- loop vs dense

@settings(max_examples=40, **FAST)
@given(configs())
def test_loop_matches_dense(c):
    args, kw = make_inputs(c)
    o, lse, hk, hv = R.forward(*args, **kw)
    o_d, lse_d = R.dense_forward(*args, **kw)
    assert rel_err(o, o_d) <= 1e-12
    assert rel_err(lse, lse_d) <= 1e-12
    B, T, HQ, H, K, V, M = (c[x] for x in ("B", "T", "HQ", "H", "K", "V", "M"))
    N = hk.shape[0]
    assert o.shape == (B, T, HQ, V) and lse.shape == (B, HQ, T)
    assert hk.shape == (N, H, K, M) and hv.shape == (N, H, M, V)
    assert o.dtype == lse.dtype == hk.dtype == hv.dtype == np.float64


@pytest.mark.parametrize("W", [0, 1, 3, 12])
def test_loop_matches_dense_named_cases(W):
    """Fixed cases that must always be covered: T=1, T<W, W=0, W>=T, odd dims, GQA, varlen
    with an empty sequence in the middle, initial state."""
    cases = [
        dict(B=1, T=1, H=1, HQ=1, K=3, V=5, M=3),
        dict(B=2, T=7, H=2, HQ=6, K=5, V=3, M=7),
        dict(B=1, T=11, H=1, HQ=2, K=3, V=3, M=0),
    ]
    for i, base in enumerate(cases):
        for varlen in (False, True):
            c = dict(base, W=W, explicit_s=i == 1, slot_inputs=i == 2, initial_state=True, seed=7 + i,
                     cu_seqlens=None)
            if varlen:
                c.update(B=1, cu_seqlens=np.array([0, 2, 2, base["T"] + 2]))
                c["T"] = base["T"] + 2
            args, kw = make_inputs(c)
            o, lse, _, _ = R.forward(*args, **kw)
            o_d, lse_d = R.dense_forward(*args, **kw)
            assert rel_err(o, o_d) <= 1e-12 and rel_err(lse, lse_d) <= 1e-12


def test_large_logits_do_not_overflow():
    c = dict(B=1, T=8, H=1, HQ=2, K=4, V=3, M=3, W=3, cu_seqlens=None, explicit_s=False,
             slot_inputs=False, initial_state=True, seed=3)
    (q, k, v, g), kw = make_inputs(c)
    q = q * 1e4                                   # logits ~ 1e4: exp would overflow unshifted
    kw["hk0"] = kw["hk0"] * 1e3
    o, lse, _, _ = R.forward(q, k, v, g, **kw)
    o_d, lse_d = R.dense_forward(q, k, v, g, **kw)
    assert np.isfinite(o).all() and np.isfinite(lse).all()
    assert rel_err(o, o_d) <= 1e-12 and rel_err(lse, lse_d) <= 1e-12
    assert lse.max() > 1e3
    grads = R.backward(np.ones_like(o), q, k, v, g, **kw)
    assert all(np.isfinite(x).all() for x in grads.values() if x is not None)


# ----------------------------------------------------------------------------- edge cases

def test_empty_sequence_T0():
    B, HQ, H, K, V, M, N = 2, 4, 2, 3, 2, 3, 2
    q, k, v = np.zeros((B, 0, HQ, K)), np.zeros((B, 0, H, K)), np.zeros((B, 0, H, V))
    g = np.zeros((B, 0, H, M))
    hk0 = np.arange(N * H * K * M, dtype=float).reshape(N, H, K, M)
    hv0 = np.arange(N * H * M * V, dtype=float).reshape(N, H, M, V)
    for W in (0, 2):
        o, lse, hk, hv = R.forward(q, k, v, g, window_size=W)
        assert o.shape == (B, 0, HQ, V) and lse.shape == (B, HQ, 0)
        assert (hk == 0).all() and hk.shape == (N, H, K, M) and hv.shape == (N, H, M, V)
        o, lse, hk, hv = R.forward(q, k, v, g, window_size=W, hk0=hk0, hv0=hv0)
        assert (hk == hk0).all() and (hv == hv0).all()
        o_d, lse_d = R.dense_forward(q, k, v, g, window_size=W, hk0=hk0, hv0=hv0)
        assert o_d.shape == (B, 0, HQ, V) and lse_d.shape == (B, HQ, 0)
        grads = R.backward(np.zeros((B, 0, HQ, V)), q, k, v, g, window_size=W, hk0=hk0, hv0=hv0)
        assert grads["dq"].shape == q.shape and (grads["dhk0"] == 0).all()
        # varlen with only empty sequences
        o, lse, hk, hv = R.forward(q[:1], k[:1], v[:1], g[:1], window_size=W, hk0=hk0, hv0=hv0,
                                   cu_seqlens=np.array([0, 0, 0]))
        assert (hk == hk0).all() and o.shape == (1, 0, HQ, V)


def test_no_logits_at_all_M0_W0():
    """M = 0 and W = 0 leaves nothing to attend to: o = 0 and lse = -inf, never NaN."""
    c = dict(B=1, T=3, H=1, HQ=1, K=2, V=2, M=0, W=0, cu_seqlens=None, explicit_s=False,
             slot_inputs=False, initial_state=False, seed=0)
    args, kw = make_inputs(c)
    o, lse, _, _ = R.forward(*args, **kw)
    assert (o == 0).all() and (lse == -np.inf).all()
    grads = R.backward(np.ones_like(o), *args, **kw)
    assert all((x == 0).all() for x in grads.values() if x is not None)


def test_minus_inf_gate_is_exact_reset():
    """g = -inf at token r (all slots) wipes everything absorbed before r (and hk0): queries
    t >= r + W, whose window starts after r, must see exactly what a run whose slots start
    empty at r sees. Nothing may be NaN."""
    B, T, HQ, H, K, V, M, W, r = 1, 10, 2, 1, 3, 2, 3, 2, 4
    rng = np.random.default_rng(11)
    q, k = rng.normal(size=(B, T, HQ, K)), rng.normal(size=(B, T, H, K))
    v = rng.normal(size=(B, T, H, V))
    g = np.log(rng.uniform(0.4, 0.99, size=(B, T, H, M)))
    g[:, r] = -np.inf
    hk0, hv0 = rng.normal(size=(1, H, K, M)), rng.normal(size=(1, H, M, V))
    o, lse, hk, hv = R.forward(q, k, v, g, window_size=W, hk0=hk0, hv0=hv0)
    for x in (o, lse, hk, hv):
        assert np.isfinite(x).all()
    o_d, lse_d = R.dense_forward(q, k, v, g, window_size=W, hk0=hk0, hv0=hv0)
    assert rel_err(o, o_d) <= 1e-12 and rel_err(lse, lse_d) <= 1e-12

    # manual reset: explicit s with s = 1 at r (the derived value), no writes before r,
    # gate 0 (alpha = 1) at r, and no initial state
    s = -np.expm1(g)
    s[:, :r] = 0.0
    g_manual = g.copy()
    g_manual[:, r] = 0.0
    o_m, lse_m, hk_m, hv_m = R.forward(q, k, v, g_manual, window_size=W, s=s)
    assert np.allclose(s[:, r], 1.0)
    assert rel_err(o[:, r + W:], o_m[:, r + W:]) <= 1e-12
    assert rel_err(lse[:, :, r + W:], lse_m[:, :, r + W:]) <= 1e-12
    assert rel_err(hk, hk_m) <= 1e-12 and rel_err(hv, hv_m) <= 1e-12

    do = rng.normal(size=o.shape)
    grads = R.backward(do, q, k, v, g, window_size=W, hk0=hk0, hv0=hv0)
    assert all(np.isfinite(x).all() for x in grads.values() if x is not None)
    # outputs after the reset do not depend on anything absorbed before it, nor on hk0 / hv0
    do[:, :r + W] = 0.0
    grads = R.backward(do, q, k, v, g, window_size=W, hk0=hk0, hv0=hv0)
    assert (grads["dhk0"] == 0).all() and (grads["dhv0"] == 0).all()
    assert (grads["dg"][:, :r + 1] == 0).all() and (grads["dq"][:, :r + W] == 0).all()
    # decode through the reset agrees too
    state = R.state_from_prefill(k[:, :r + 1], v[:, :r + 1], g[:, :r + 1],
                                 *R.forward(q[:, :r + 1], k[:, :r + 1], v[:, :r + 1], g[:, :r + 1],
                                            window_size=W, hk0=hk0, hv0=hv0)[2:], window_size=W)
    for t in range(r + 1, T):
        o_t, lse_t, state = R.decode_step(q[:, t], k[:, t], v[:, t], g[:, t], state)
        assert rel_err(o_t, o[:, t]) <= 1e-12 and rel_err(lse_t, lse[:, :, t]) <= 1e-12


# ----------------------------------------------------------------------------- classic limits

@settings(max_examples=30, **FAST)
@given(configs(), st.booleans())
def test_window_zero_is_gated_slot_attention(c, explicit_s):
    c = dict(c, cu_seqlens=None, M=max(c["M"], 1), W=0, explicit_s=explicit_s,
             slot_inputs=False, initial_state=False)
    if c["T"] == 0:
        c["T"] = 3
    args, kw = make_inputs(c)
    o, lse, _, _ = R.forward(*args, **kw)
    o_g, lse_g = R.gsa_recurrence(*args, s=kw.get("s"))
    assert rel_err(o, o_g) <= 1e-12 and rel_err(lse, lse_g) <= 1e-12


@settings(max_examples=30, **FAST)
@given(configs(), st.integers(0, 3))
def test_no_slots_full_window_is_causal_attention(c, extra):
    c = dict(c, cu_seqlens=None, M=0, W=c["T"] + extra, explicit_s=False, initial_state=False)
    if c["T"] == 0:
        c["T"] = 1
        c["W"] = 1 + extra
    if c["W"] == 0:
        c["W"] = 1
    args, kw = make_inputs(c)
    o, lse, _, _ = R.forward(*args, **kw)
    o_c, lse_c = R.causal_softmax_attention(*args[:3])
    assert rel_err(o, o_c) <= 1e-12 and rel_err(lse, lse_c) <= 1e-12


# ----------------------------------------------------------------------------- backward

def _finite_difference(loss, x, h=1e-5):
    """Central differences of scalar loss() w.r.t. every entry of x (perturbed in place)."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        old = x[idx]
        x[idx] = old + h
        up = loss()
        x[idx] = old - h
        down = loss()
        x[idx] = old
        grad[idx] = (up - down) / (2 * h)
    return grad


@settings(max_examples=20, **FAST)
@given(configs(max_T=5, max_dim=3, max_heads=2, max_group=2))
def test_backward_matches_finite_differences(c):
    (q, k, v, g), kw = make_inputs(c)
    do = np.random.default_rng(c["seed"] + 1).normal(size=(c["B"], c["T"], c["HQ"], c["V"]))
    inputs = dict(q=q, k=k, v=v, g=g)
    inputs.update({name: kw.pop(name) for name in ("s", "q_slot", "k_slot", "hk0", "hv0") if name in kw})

    def loss():
        o = R.forward(inputs["q"], inputs["k"], inputs["v"], inputs["g"], **kw,
                      **{n: x for n, x in inputs.items() if n not in "qkvg"})[0]
        return float((o * do).sum())

    grads = R.backward(do, q, k, v, g, **kw, **{n: x for n, x in inputs.items() if n not in "qkvg"})
    assert (grads["ds"] is None) == ("s" not in inputs)
    assert (grads["dq_slot"] is None) == ("q_slot" not in inputs)
    assert (grads["dk_slot"] is None) == ("k_slot" not in inputs)
    assert (grads["dhk0"] is None) == ("hk0" not in inputs)
    for name, x in inputs.items():
        numeric = _finite_difference(loss, x)
        analytic = grads["d" + name]
        assert analytic.shape == x.shape
        # relative 1e-6, plus an absolute floor for the FD rounding noise on near-zero gradients
        err = np.linalg.norm(analytic - numeric)
        assert err <= 1e-6 * np.linalg.norm(analytic) + 1e-8, (name, err, np.linalg.norm(analytic))


def test_backward_one_sided_initial_state():
    """hk0 given with hv0 None (and the reverse) treats the missing one as zeros and returns both."""
    c = dict(B=1, T=6, H=1, HQ=2, K=2, V=3, M=2, W=2, cu_seqlens=None, explicit_s=False,
             slot_inputs=False, initial_state=True, seed=5)
    args, kw = make_inputs(c)
    do = np.ones((1, 6, 2, 3))
    for drop in ("hk0", "hv0"):
        kw1 = dict(kw)
        kw1.pop(drop)
        grads = R.backward(do, *args, **kw1)
        assert grads["dhk0"] is not None and grads["dhv0"] is not None
        kw0 = dict(kw, **{drop: np.zeros_like(kw[drop])})
        grads0 = R.backward(do, *args, **kw0)
        for name in grads:
            assert (grads[name] is None) == (grads0[name] is None)
            assert grads[name] is None or np.array_equal(grads[name], grads0[name])


# ----------------------------------------------------------------------------- decode

@settings(max_examples=30, **FAST)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=3), st.integers(1, 6), configs())
def test_prefill_then_decode_equals_one_shot(prefill_lengths, steps, c):
    """state_from_prefill + decode_step token by token == forward over the whole sequences."""
    N = len(prefill_lengths)
    full = [L + steps for L in prefill_lengths]
    cu_full = np.concatenate([[0], np.cumsum(full)]).astype(np.int64)
    cu_pre = np.concatenate([[0], np.cumsum(prefill_lengths)]).astype(np.int64)
    c = dict(c, B=1, T=int(cu_full[-1]), cu_seqlens=cu_full)
    (q, k, v, g), kw = make_inputs(c)
    o, lse, hk, hv = R.forward(q, k, v, g, **kw)

    pre = np.concatenate([np.arange(cu_full[n], cu_full[n] + prefill_lengths[n]) for n in range(N)]).astype(int)
    tok = {name: x for name, x in dict(q=q, k=k, v=v, g=g, s=kw.get("s"), q_slot=kw.get("q_slot"),
                                         k_slot=kw.get("k_slot")).items() if x is not None}
    pre_kw = dict(kw, cu_seqlens=cu_pre, **{n: tok[n][:, pre] for n in ("s", "q_slot", "k_slot") if n in tok})
    _, _, hk_p, hv_p = R.forward(q[:, pre], k[:, pre], v[:, pre], g[:, pre], **pre_kw)
    state = R.state_from_prefill(k[:, pre], v[:, pre], g[:, pre], hk_p, hv_p, window_size=c["W"],
                                 s=pre_kw.get("s"), k_slot=pre_kw.get("k_slot"), cu_seqlens=cu_pre)
    assert (state["seen"] == np.array(prefill_lengths)).all()
    for d in range(steps):
        rows = np.array([cu_full[n] + prefill_lengths[n] + d for n in range(N)])
        step = {n: tok[n][0, rows] for n in tok}
        before = {n: (x.copy() if isinstance(x, np.ndarray) else x) for n, x in state.items()}
        o_t, lse_t, new_state = R.decode_step(step["q"], step["k"], step["v"], step["g"], state,
                                              s=step.get("s"), q_slot=step.get("q_slot"),
                                              k_slot=step.get("k_slot"))
        for n, x in state.items():     # the input state is left alone
            assert x is None and before[n] is None or np.array_equal(x, before[n])
        assert rel_err(o_t, o[0, rows]) <= 1e-12
        assert rel_err(lse_t, lse[0][:, rows].T) <= 1e-12
        state = new_state
    assert rel_err(state["hk"], hk) <= 1e-12 and rel_err(state["hv"], hv) <= 1e-12
    assert (state["seen"] == np.array(full)).all()
