"""NumPy backend kernels against the fp64 oracle (SPEC §5 tolerances), called at the kernel
contract level (nha_core/registry.py) with hand-built Problems; the public API is tested elsewhere.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import nha_core.reference as ref
from nha_core.backends.numpy.backward import backward as np_backward
from nha_core.backends.numpy.decode import decode as np_decode
from nha_core.backends.numpy.forward import forward as np_forward
from nha_core.problem import Problem
from nha_core.state import NHAState

from .cases import kernel_inputs, oracle_backward, oracle_forward

TOL = {"float64": 1e-12, "float32": 1e-5}


def rel(out, want):
    out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(out).all() == np.isfinite(want).all()
    fin = np.isfinite(want)
    assert (out[~fin] == want[~fin]).all()
    norm = np.linalg.norm(want[fin])
    return np.linalg.norm(out[fin] - want[fin]) / (norm if norm > 0 else 1.0)


def native(p, x):
    """Inputs as the API hands them to the kernel: input dtype, s materialised, strided views."""
    dt = np.dtype(p.dtype)

    def cast(a):
        if a is None:
            return None
        # a non-contiguous view: kernels must read strides correctly and never write
        wide = np.repeat(a.astype(dt), 2, axis=-1)[..., ::2]
        wide.flags.writeable = False
        return wide

    out = {name: cast(a) for name, a in x.items() if name != "cu"}
    out["s"] = cast(-np.expm1(x["g"]) if x["s"] is None else x["s"])
    out["cu"] = x["cu"]
    return out


def check_forward_backward(p, x, seed=0, tol=None):
    n = native(p, x)
    args = (n["q"], n["k"], n["v"], n["g"], n["s"], n["q_slot"], n["k_slot"], n["hk0"], n["hv0"], n["cu"])
    o, lse, hk, hv = np_forward(p, *args)
    assert o.dtype == np.dtype(p.dtype) and lse.dtype == np.dtype(p.state_dtype)
    assert o.shape == (p.B, p.T, p.HQ, p.V) and lse.shape == (p.B, p.HQ, p.T)
    ro, rlse, rhk, rhv = oracle_forward(p, x)
    tol = TOL[p.dtype] if tol is None else tol
    for name, a, b in (("o", o, ro), ("lse", lse, rlse), ("hk", hk, rhk), ("hv", hv, rhv)):
        assert rel(a, b) <= tol, (name, rel(a, b))

    do = np.random.default_rng(seed + 1).standard_normal(o.shape)
    grads = np_backward(p, do.astype(p.dtype), n["q"], n["k"], n["v"], n["g"], n["s"], n["q_slot"],
                        n["k_slot"], o, lse, n["hk0"], n["hv0"], n["cu"])
    dq, dk, dv, dg, ds, dq_slot, dk_slot, dhk0, dhv0 = grads
    want = oracle_backward(p, x, do)
    if x["s"] is None:
        # the API adds the path through the derived s = 1 - exp(g): ds * (-exp(g))
        dg = dg.astype(np.float64) + ds.astype(np.float64) * -np.exp(x["g"])
    elif np.linalg.norm(want["ds"]) > np.finfo(p.dtype).tiny:
        assert rel(ds, want["ds"]) <= tol, ("ds", rel(ds, want["ds"]))
    got = {"dq": dq, "dk": dk, "dv": dv, "dg": dg, "dq_slot": dq_slot, "dk_slot": dk_slot,
           "dhk0": dhk0, "dhv0": dhv0}
    for name, a in got.items():
        assert (a is None) == (want[name] is None), name
        if a is not None:
            assert a.shape == want[name].shape, name
            assert np.isfinite(a).all(), name
            if np.linalg.norm(want[name]) > np.finfo(p.dtype).tiny:  # else not representable
                assert rel(a, want[name]) <= tol, (name, rel(a, want[name]))


dims = st.fixed_dictionaries({
    "B": st.integers(1, 2), "T": st.integers(1, 80), "H": st.integers(1, 2), "G": st.integers(1, 3),
    "K": st.integers(1, 9), "V": st.integers(1, 9), "M": st.integers(0, 6), "W": st.integers(0, 90),
})


@settings(deadline=None, max_examples=25)
@given(d=dims, dtype=st.sampled_from(["float64", "float32"]), explicit=st.booleans(),
       initial=st.booleans(), reset=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_forward_backward_random(d, dtype, explicit, initial, reset, seed):
    p, x = kernel_inputs(seed, d["B"], d["T"], d["H"] * d["G"], d["H"], d["K"], d["V"], d["M"], d["W"], dtype,
                         explicit=explicit, initial=initial, hard="random-resets" if reset else None)
    check_forward_backward(p, x, seed)


@settings(deadline=None, max_examples=10)
@given(lens=st.lists(st.integers(0, 40), min_size=1, max_size=4), W=st.integers(0, 20),
       M=st.integers(0, 4), dtype=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2 ** 16))
def test_varlen_random(lens, W, M, dtype, seed):
    T = sum(lens)
    p, x = kernel_inputs(seed, 1, T, 4, 2, 5, 3, M, W, dtype, explicit=seed % 2 == 0, initial=True,
                         seqlens=lens)
    check_forward_backward(p, x, seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "case",
    [
        dict(B=1, T=200, HQ=2, H=1, K=8, V=8, M=4, W=70),  # chunk edges not aligned with W
        dict(B=1, T=130, HQ=4, H=2, K=6, V=5, M=3, W=0),   # pure gated slot attention, 3 chunks
        dict(B=1, T=150, HQ=2, H=2, K=4, V=4, M=0, W=33),  # pure sliding window
        dict(B=1, T=70, HQ=3, H=1, K=4, V=4, M=3, W=500),  # W >= T: no slot writes
        dict(B=2, T=129, HQ=2, H=1, K=4, V=4, M=2, W=1),
    ],
    ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()),
)
def test_named_shapes(case, dtype):
    p, x = kernel_inputs(3, **case, dtype=dtype, explicit=True, initial=True)
    check_forward_backward(p, x)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_strong_decay_and_resets_stay_finite(dtype):
    """Chunks whose gate cumsum overflows the factored form take the explicit path (no NaN/Inf)."""
    p, x = kernel_inputs(4, 1, 160, 2, 1, 8, 8, 4, 40, dtype, hard="random-resets", gscale=40.0, qscale=30.0)
    check_forward_backward(p, x)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_large_logits(dtype):
    """Logits of a few hundred: no overflow. In float32 the logits' own rounding (|L| * 2^-24
    ~ 1e-5) bounds the attainable gradient accuracy, so the bound there is the naive one."""
    p, x = kernel_inputs(5, 1, 100, 2, 2, 16, 8, 4, 20, dtype, qscale=200.0, explicit=True)
    check_forward_backward(p, x, tol=1e-12 if dtype == "float64" else 1e-3)


def test_no_memory_at_all():
    """M = 0 and W = 0: nothing to attend to, o = 0 and lse = -inf as in the reference."""
    p, x = kernel_inputs(6, 1, 5, 2, 1, 3, 3, 0, 0, "float64")
    n = native(p, x)
    o, lse, _, _ = np_forward(p, n["q"], n["k"], n["v"], n["g"], n["s"], None, None, None, None, None)
    assert (o == 0).all() and np.isneginf(lse).all()


@settings(deadline=None, max_examples=20)
@given(T=st.integers(0, 30), W=st.integers(0, 12), M=st.integers(0, 4), G=st.integers(1, 2),
       explicit=st.booleans(), steps=st.integers(1, 15), dtype=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 2 ** 16))
def test_decode_continues_prefill(T, W, M, G, explicit, steps, dtype, seed):
    N, H, K, V = 2, 2, 5, 4
    p, x = kernel_inputs(seed, N, T + steps, G * H, H, K, V, M, W, dtype, explicit=explicit,
                         hard="random-resets" if seed % 3 == 0 else None)
    pre = {n: (None if a is None or n == "cu" else a[:, :T]) for n, a in x.items()}
    _, _, hk, hv = ref.forward(pre["q"], pre["k"], pre["v"], pre["g"], window_size=W, s=pre["s"],
                               q_slot=pre["q_slot"], k_slot=pre["k_slot"])
    sd = ref.state_from_prefill(pre["k"], pre["v"], pre["g"], hk, hv, window_size=W, s=pre["s"],
                                k_slot=pre["k_slot"])
    want_state = dict(sd)
    sdt = np.dtype(p.state_dtype)
    state = NHAState(**{name: (a if name in ("window_size",) or a is None else
                               np.array(a, dtype=np.int64 if name == "seen" else sdt))
                        for name, a in sd.items()})
    dp = Problem(**{**p.__dict__, "mode": "decode", "B": N, "T": 1})
    tol = TOL[dtype]
    for i in range(T, T + steps):
        step = {n: (None if a is None or n == "cu" else a[:, i]) for n, a in x.items()}
        s_t = -np.expm1(step["g"]) if step["s"] is None else step["s"]
        o, lse = np_decode(dp, *(None if a is None else a.astype(dtype) for a in
                                 (step["q"], step["k"], step["v"], step["g"], s_t, step["q_slot"],
                                  step["k_slot"])), state)
        ro, rlse, want_state = ref.decode_step(step["q"], step["k"], step["v"], step["g"], want_state,
                                               s=step["s"], q_slot=step["q_slot"], k_slot=step["k_slot"])
        assert o.dtype == np.dtype(dtype) and lse.dtype == sdt
        assert rel(o, ro) <= tol and rel(lse, rlse) <= tol
    for name in ("hk", "hv", "k_cache", "v_cache", "g_cache", "s_cache", "k_slot_cache"):
        a, b = getattr(state, name), want_state[name]
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel(a, b) <= tol, name
    assert (state.seen == want_state["seen"]).all()


@pytest.mark.parametrize("varlen", [False, True])
def test_head_parallel_split_is_exact(monkeypatch, varlen):
    """The worker-thread split over KV heads gives bit-identical results to one thread."""
    import nha_core
    from nha_core.backends.numpy import configs as numpy_configs

    rng = np.random.default_rng(3)
    B, T, HQ, H, K, V, M = (1, 37, 6, 3, 5, 4, 3)
    q, k, v = rng.standard_normal((B, T, HQ, K)), rng.standard_normal((B, T, H, K)), rng.standard_normal((B, T, H, V))
    g = -rng.random((B, T, H, M))
    cu = np.array([0, 10, 10, 37]) if varlen else None
    _, _, state0 = nha_core.attention(q[:, :3], k[:, :3], v[:, :3], g[:, :3], window_size=4, output_final_state=True)
    kw = dict(window_size=4, cu_seqlens=cu, return_lse=True, output_final_state=True, backend="numpy",
              initial_state=None if varlen else state0)

    def both():
        o, lse, st = nha_core.attention(q, k, v, g, **kw)
        grads = nha_core.attention_backward(np.ones_like(o), q, k, v, g, o, lse,
                                            **{n: kw[n] for n in ("window_size", "cu_seqlens", "initial_state")})
        return [o, lse, st.hk, st.hv, *[x for x in grads[:4]]]

    monkeypatch.setenv("NHA_CORE_NUM_THREADS", "1")
    one = both()
    monkeypatch.setenv("NHA_CORE_NUM_THREADS", "3")
    monkeypatch.setattr(numpy_configs, "MIN_PARALLEL_WORK", 0)
    three = both()
    for a, b in zip(one, three):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("block", [4, 8, 16])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_small_chunks_cover_the_full_window_path(monkeypatch, block, dtype, tol):
    """Chunks past the first W tokens take the shared-key-block path; force many of them."""
    import nha_core
    from nha_core.backends.numpy import configs as numpy_configs

    monkeypatch.setattr(numpy_configs, "BLOCK_T", block)
    monkeypatch.setattr(numpy_configs, "SLOT_GROUP", 3)
    rng = np.random.default_rng(block)
    B, T, HQ, H, K, V, M, W = 2, 61, 4, 2, 6, 5, 7, 9
    x = [rng.standard_normal((B, T, HQ, K)), rng.standard_normal((B, T, H, K)), rng.standard_normal((B, T, H, V)),
         -np.logaddexp(0.0, -rng.standard_normal((B, T, H, M))) / 4]
    x[3][:, 30, :, 2] = -np.inf
    x = [a.astype(dtype) for a in x]
    o, lse, st = nha_core.attention(*x, window_size=W, return_lse=True, output_final_state=True, backend="numpy")
    r = [a.astype(np.float64) for a in x]
    ro, rl, rhk, rhv = ref.forward(*r, window_size=W)
    for got, want in ((o, ro), (lse, rl), (st.hk, rhk), (st.hv, rhv)):
        assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want)
    do = rng.standard_normal(o.shape).astype(dtype)
    grads = nha_core.attention_backward(do, *x, o, lse, window_size=W, backend="numpy")
    rg = ref.backward(do.astype(np.float64), *r, window_size=W)
    for name in ("dq", "dk", "dv", "dg"):
        got, want = getattr(grads, name), rg[name]
        assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want), name
