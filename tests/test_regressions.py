"""Named regression cases: every bug found so far, with a readable id, on every CPU backend.

The Triton backend joins when TRITON_INTERPRET=1 (CI sets it); ids read
``B-T-HQ-H-K-V-M-W`` plus flags, as in tests/cases.py.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import nha_core
from nha_core import reference

from .cases import Case, inputs

BACKENDS = ["numpy"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])

REGRESSIONS = [
    # api: reshape((-1, ...)) of an empty ring buffer / empty time axis raised (fixed with _rows)
    Case(B=1, T=0, HQ=1, H=1, K=1, V=1, M=1, W=1, seed=0, hard_gates=True, big_logits=True),
    # triton: M = 0 reshape failure; numpy: no slots and a window of two
    Case(B=2, T=9, HQ=2, H=1, K=3, V=2, M=0, W=2, seed=1),
    # triton: inf * 0 = NaN on the explicit-decay path in rows past the sequence end (resets)
    Case(B=1, T=21, HQ=1, H=1, K=4, V=4, M=3, W=5, seed=2, hard_gates=True, seqlens=(13, 0, 8)),
    # single-logit rows (M = 1, W = 0): logit gradients are exactly 0 (rounding noise only)
    Case(B=1, T=4, HQ=1, H=1, K=1, V=1, M=1, W=0, seed=0, hard_gates=True, seqlens=(4,)),
    Case(B=1, T=2, HQ=1, H=1, K=1, V=1, M=1, W=0, seed=2, explicit_s=True, hard_gates=True, big_logits=True),
    # one token, one slot: o underflows to ~1e-162 in fp64 (0 in fp32), lse = log(1 + 3e-7):
    # only an absolute comparison means anything (the property tests' noise floor)
    Case(B=1, T=1, HQ=1, H=1, K=1, V=1, M=1, W=1, seed=37, hard_gates=True, big_logits=True),
    Case(B=1, T=1, HQ=1, H=1, K=1, V=1, M=1, W=1, seed=0, hard_gates=True, big_logits=True),
    # chunk boundaries not aligned with the window, GQA, explicit slot inputs
    Case(B=2, T=70, HQ=4, H=2, K=5, V=7, M=6, W=33, seed=3, explicit_s=True, slot_inputs=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", REGRESSIONS, ids=[c.id for c in REGRESSIONS])
def test_regression(backend, case):
    dtype = "float64" if backend == "numpy" else "float32"
    tol = 1e-12 if dtype == "float64" else 1e-5
    if case.big_logits:
        tol = 1e-9 if dtype == "float64" else 1e-3
    x = {n: a.astype(dtype) for n, a in inputs(case).items()}
    if backend == "triton":
        torch = pytest.importorskip("torch")
        dev = {n: torch.from_numpy(a) for n, a in x.items()}
    else:
        dev = x
    opts = dict(window_size=case.W, s=dev.get("s"), q_slot=dev.get("q_slot"), k_slot=dev.get("k_slot"),
                cu_seqlens=case.cu_seqlens, backend=backend)
    o, lse, _ = nha_core.attention(dev["q"], dev["k"], dev["v"], dev["g"], return_lse=True, **opts)
    do = np.random.default_rng(case.seed).standard_normal(tuple(o.shape)).astype(dtype)
    grads = nha_core.attention_backward(do if backend == "numpy" else torch.from_numpy(do),
                                        dev["q"], dev["k"], dev["v"], dev["g"], o, lse, **opts)
    r = {n: a.astype(np.float64) for n, a in x.items()}
    ref_o, ref_lse, _, _ = reference.forward(r["q"], r["k"], r["v"], r["g"], window_size=case.W, s=r.get("s"),
                                             q_slot=r.get("q_slot"), k_slot=r.get("k_slot"), cu_seqlens=case.cu_seqlens)
    ref_g = reference.backward(do.astype(np.float64), r["q"], r["k"], r["v"], r["g"], window_size=case.W,
                               s=r.get("s"), q_slot=r.get("q_slot"), k_slot=r.get("k_slot"),
                               cu_seqlens=case.cu_seqlens)
    host = lambda a: np.asarray(a, np.float64)  # noqa: E731
    ulp = np.finfo(dtype).eps
    floor = 10 * ulp * np.sqrt(max(ref_o.size, 1))  # absolute noise floor, as in test_properties
    assert np.linalg.norm(host(o) - ref_o) <= tol * np.linalg.norm(ref_o) + floor
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(host(lse)), finite)
    lse_floor = 10 * ulp * np.sqrt(max(int(finite.sum()), 1)) * (900.0 if case.big_logits else 1.0)
    assert np.linalg.norm(host(lse)[finite] - ref_lse[finite]) <= tol * np.linalg.norm(ref_lse[finite]) + lse_floor
    single_logit = case.W == 0 and case.M == 1
    floor = 1e-3 * np.linalg.norm(do) * (900.0 if case.big_logits else 1.0)
    for name in ("dq", "dk", "dv", "dg", "ds", "dq_slot", "dk_slot"):
        got, want = getattr(grads, name), ref_g[name]
        assert (got is None) == (want is None), name
        if got is None:
            continue
        got = host(got)
        assert np.isfinite(got).all(), name
        if single_logit and name in ("dq", "dk", "dq_slot", "dk_slot"):
            # exactly zero in exact arithmetic: bound the rounding noise by the term scale
            assert np.linalg.norm(got) <= 1e-4 * np.linalg.norm(do) * (900.0 if case.big_logits else 1.0), name
            continue
        if case.hard_gates and name == "dg":
            continue  # gates at -80 / -inf: dg is conditioned by cancellation (see test_properties)
        assert np.linalg.norm(got - want) <= tol * (np.linalg.norm(want) + floor), name
