"""Hypothesis properties of every backend against the fp64 reference, through the public API.

Which backends and device: ``NHA_TEST_DEVICE`` (``cpu`` default, or ``cuda``) and
``NHA_TEST_BACKENDS`` (comma list; default ``numpy`` on the CPU, every usable CUDA backend on
``cuda``). On a GPU machine: ``NHA_TEST_DEVICE=cuda pytest -m gpu tests/test_properties.py``.

``NHA_TEST_CASE_LOG=PREFIX`` appends every drawn case to ``PREFIX.<xdist worker>`` before it runs
(flushed). A CUDA fault poisons the context and fails every later example; on CUDA each line
first checks the context, so the case just before the first "CONTEXT ALREADY BROKEN" line is the
one that faulted (with ``CUDA_LAUNCH_BLOCKING=1`` the fault surfaces inside it).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import nha_core
from nha_core import reference

from .cases import Case, cases, gradient_check, inputs, property_tolerance, rel_err, tile_cases

DEVICE = os.environ.get("NHA_TEST_DEVICE", "cpu")


def _backends():
    names = os.environ.get("NHA_TEST_BACKENDS")
    if names:
        return names.split(",")
    if DEVICE == "cpu":
        return ["numpy"]
    return [n for n, r in nha_core.backends().items() if r["usable"] and "cuda" in r["devices"]]


BACKENDS = _backends()
DTYPES = os.environ.get("NHA_TEST_DTYPES", "float64,float32" if DEVICE == "cpu" else "float32,bfloat16").split(",")
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []
# NHA_TEST_EXAMPLES sets the examples per property: few on a GPU (every new shape compiles
# kernels), many for a long search (e.g. 500); unset, each property keeps its CI count.
_EXAMPLES = int(os.environ.get("NHA_TEST_EXAMPLES", "0"))


def examples(n: int) -> int:
    return _EXAMPLES or n


def to_device(x, dtype):
    """fp64 NumPy -> the array type under test (NumPy on the CPU, torch on CUDA)."""
    if x is None:
        return None
    if DEVICE == "cpu":
        return np.ascontiguousarray(x.astype(dtype))
    import torch

    return torch.as_tensor(x, device=DEVICE).to(getattr(torch, dtype))


def to_host(x):
    if x is None or isinstance(x, np.ndarray):
        return x
    return x.detach().float().cpu().numpy() if x.dtype.is_floating_point else x.cpu().numpy()


def cast_back(x, dtype):
    """What the kernel actually saw: fp64 data rounded to ``dtype`` (the reference runs on this)."""
    if x is None:
        return None
    return to_host(to_device(x, dtype)).astype(np.float64)


def tolerance(case: Case, dtype: str) -> float:
    return property_tolerance(case, dtype, DEVICE)


def log_case(case, dtype, backend):
    prefix = os.environ.get("NHA_TEST_CASE_LOG")
    if not prefix:
        return
    state = ""
    if DEVICE == "cuda":   # a fault leaves the context broken: the case logged before this line caused it
        import torch

        try:
            torch.cuda.synchronize()
        except Exception as error:
            state = f"CONTEXT ALREADY BROKEN ({type(error).__name__}) "
    with open(f"{prefix}.{os.environ.get('PYTEST_XDIST_WORKER', 'main')}", "a") as f:
        f.write(f"{state}{os.environ.get('PYTEST_CURRENT_TEST', '?')} {backend} {dtype} {case!r}\n")
        f.flush()
        os.fsync(f.fileno())


def run_attention(case, x, dtype, backend, **extra):
    log_case(case, dtype, backend)
    dev = {n: to_device(a, dtype) for n, a in x.items()}
    cu = case.cu_seqlens
    return nha_core.attention(
        dev["q"], dev["k"], dev["v"], dev["g"], window_size=case.W, s=dev.get("s"), q_slot=dev.get("q_slot"),
        k_slot=dev.get("k_slot"), cu_seqlens=cu, return_lse=True, output_final_state=True, backend=backend, **extra)


def reference_args(x, dtype):
    return {n: cast_back(a, dtype) for n, a in x.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(40))
@given(case=cases())
def test_forward_matches_reference(backend, dtype, case):
    check_forward(backend, dtype, case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(8), deadline=None)
@given(case=tile_cases())
# found by this property (Triton, float32): a tenth of the gates -inf and a tenth -80 put a chunk's
# cumsums near -2600 (log2), where float32 numbers lie 2.4e-4 apart; decays taken as differences of
# two such sums were off by that much (o 1.9e-5 relative); each segment is now summed from its gates
@example(case=Case(B=1, T=99, HQ=4, H=2, K=16, V=16, M=16, W=0, seed=0, hard_gates=True))
@example(case=Case(B=1, T=99, HQ=4, H=2, K=16, V=16, M=16, W=5, seed=0, hard_gates=True))
def test_forward_tile_dims_match_reference(backend, dtype, case):
    """The same check on sizes the tensor-core paths take (K, V, M multiples of 16, several
    64-row chunks): cases() draws small odd dims, which the CuPy register-tile kernels refuse."""
    check_forward(backend, dtype, case)


def check_forward(backend, dtype, case):
    x = inputs(case)
    o, lse, state = run_attention(case, x, dtype, backend)
    r = reference_args(x, dtype)
    ref_o, ref_lse, ref_hk, ref_hv = reference.forward(
        r["q"], r["k"], r["v"], r["g"], window_size=case.W, s=r.get("s"), q_slot=r.get("q_slot"),
        k_slot=r.get("k_slot"), cu_seqlens=case.cu_seqlens)
    tol = tolerance(case, dtype)
    # Relative error, plus a noise floor of 10 ulp per element on the unit scale of the inputs:
    # an output that is ~0 by underflow (o ~ 1e-162) or by cancellation (lse = log(1 + 1e-7))
    # can only be compared absolutely. big_logits cases scale every logit by 30 * 30.
    ulp = np.finfo(np.float32 if dtype != "float64" else np.float64).eps
    for name, got, want in (("o", o, ref_o), ("lse", lse, ref_lse), ("hk", state.hk, ref_hk),
                            ("hv", state.hv, ref_hv)):
        got = to_host(got)
        floor = 10 * ulp * np.sqrt(want.size) * (900.0 if case.big_logits and name == "lse" else 1.0)
        assert np.isfinite(got).all(), (name, case.id)
        err = np.linalg.norm(np.asarray(got, np.float64) - want)
        assert err <= tol * np.linalg.norm(want) + floor, (name, case.id, err)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(30))
@given(case=cases())
def test_backward_matches_reference(backend, dtype, case):
    x = inputs(case)
    o, lse, _ = run_attention(case, x, dtype, backend)
    do = np.random.default_rng(case.seed + 1).standard_normal(o.shape)
    dev = {n: to_device(a, dtype) for n, a in x.items()}
    grads = nha_core.attention_backward(
        to_device(do, dtype), dev["q"], dev["k"], dev["v"], dev["g"], o, lse, window_size=case.W, s=dev.get("s"),
        q_slot=dev.get("q_slot"), k_slot=dev.get("k_slot"), cu_seqlens=case.cu_seqlens, backend=backend)
    r = reference_args(x, dtype)
    # The reference takes the output the backend's backward was given (o in the input dtype): the
    # softmax backward's row term do . o is built from it, as in FlashAttention, and a 16-bit o
    # shifts a gradient that cancels (e.g. dq of one token over two near-equal slots) by more
    # than the kernel's own arithmetic. The error a user sees end to end, rounded o included, is
    # test_low_precision_within_twice_naive's (tests/test_triton_gpu.py, tests/test_naive_lowp.py).
    ref = reference.backward(
        cast_back(do, dtype), r["q"], r["k"], r["v"], r["g"], window_size=case.W, s=r.get("s"),
        q_slot=r.get("q_slot"), k_slot=r.get("k_slot"), cu_seqlens=case.cu_seqlens, o=to_host(o))
    # Gradients w.r.t. g are conditioned by the state magnitudes: for gates at -80 / -inf the
    # reference itself differs from the chain rule by cancellation; check them on easy gates.
    names = ["dq", "dk", "dv", "ds", "dq_slot", "dk_slot"] + ([] if case.hard_gates else ["dg"])
    for name in names:
        got = getattr(grads, name)
        if ref[name] is None:
            assert got is None, (name, case.id)
            continue
        assert np.isfinite(to_host(got)).all(), (name, case.id)
        err, bound = gradient_check(to_host(got), ref[name], do, case, dtype, DEVICE)
        assert err <= bound, (name, case.id, err, bound)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(100))
@given(case=cases(varlen=False), split=st.integers(0, 40))
def test_chunked_prefill_equals_one_shot(backend, case, split):
    """attention(x[:a]) then attention(x[a:], initial_state=...) == attention(x)."""
    dtype = DTYPES[0]
    x = inputs(case)
    a = min(split, case.T)
    full_o, full_lse, full_state = run_attention(case, x, dtype, backend)
    first = Case(**{**case.__dict__, "T": a})
    head = {n: arr[:, :a] for n, arr in x.items()}
    tail = {n: to_device(arr[:, a:], dtype) for n, arr in x.items()}
    _, _, state = run_attention(first, head, dtype, backend)
    o2, lse2, state2 = nha_core.attention(
        tail["q"], tail["k"], tail["v"], tail["g"], window_size=case.W, s=tail.get("s"), q_slot=tail.get("q_slot"),
        k_slot=tail.get("k_slot"), initial_state=state, return_lse=True, output_final_state=True, backend=backend)
    tol = tolerance(case, dtype) * 10
    assert rel_err(to_host(o2), to_host(full_o)[:, a:]) <= tol, case.id
    assert rel_err(to_host(lse2), to_host(full_lse)[:, :, a:]) <= tol, case.id
    for field in ("hk", "hv"):
        assert rel_err(to_host(getattr(state2, field)), to_host(getattr(full_state, field))) <= tol, (field, case.id)
    for field in ("k_cache", "v_cache", "g_cache", "s_cache", "k_slot_cache", "seen"):  # copies of inputs: exact
        a, b = getattr(state2, field), getattr(full_state, field)
        assert (a is None) == (b is None), field
        if a is not None:
            np.testing.assert_array_equal(to_host(a), to_host(b), err_msg=field)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(100))
@given(case=cases(varlen=False), split=st.integers(0, 40))
def test_prefill_then_decode_equals_one_shot(backend, case, split):
    dtype = DTYPES[0]
    x = inputs(case)
    a = min(split, case.T)
    full_o, _, full_state = run_attention(case, x, dtype, backend)
    _, _, state = run_attention(Case(**{**case.__dict__, "T": a}), {n: arr[:, :a] for n, arr in x.items()},
                                dtype, backend)
    outs = []
    for t in range(a, case.T):
        step = {n: to_device(arr[:, t], dtype) for n, arr in x.items()}
        o_t, state = nha_core.decode_step(
            step["q"], step["k"], step["v"], step["g"], state, s_t=step.get("s"), q_slot_t=step.get("q_slot"),
            k_slot_t=step.get("k_slot"), backend=backend)
        outs.append(to_host(o_t))
    if outs:
        tol = tolerance(case, dtype) * 10
        assert rel_err(np.stack(outs, 1), to_host(full_o)[:, a:]) <= tol, case.id
        assert rel_err(to_host(state.hk), to_host(full_state.hk)) <= tol, case.id


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(100))
@given(case=cases())
def test_varlen_equals_each_sequence_alone(backend, case):
    if case.seqlens is None:
        case = Case(**{**case.__dict__, "B": 1, "seqlens": (case.T // 2, case.T - case.T // 2)})
    dtype = DTYPES[0]
    x = inputs(case)
    o, lse, state = run_attention(case, x, dtype, backend)
    cu = case.cu_seqlens
    for n in range(len(case.seqlens)):
        lo, hi = int(cu[n]), int(cu[n + 1])
        one = Case(**{**case.__dict__, "T": hi - lo, "seqlens": None})
        o1, lse1, st1 = run_attention(one, {k: a[:, lo:hi] for k, a in x.items()}, dtype, backend)
        tol = tolerance(case, dtype) * 10
        assert rel_err(to_host(o)[:, lo:hi], to_host(o1)) <= tol
        assert rel_err(to_host(lse)[:, :, lo:hi], to_host(lse1)) <= tol
        assert rel_err(to_host(state.hk)[n:n + 1], to_host(st1.hk)) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(100))
@given(case=cases(varlen=False, flags=False))
def test_window_zero_is_gated_slot_attention(backend, case):
    dtype = DTYPES[0]
    case = Case(**{**case.__dict__, "W": 0, "M": max(case.M, 1), "HQ": case.H})
    x = inputs(case)
    log_case(case, dtype, backend)
    o = to_host(nha_core.attention(*(to_device(x[n], dtype) for n in "qkvg"), window_size=0, backend=backend))
    ref, _ = reference.gsa_recurrence(*(cast_back(x[n], dtype) for n in "qkvg"))
    assert rel_err(o, ref) <= tolerance(case, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(100))
@given(case=cases(varlen=False, flags=False))
def test_no_slots_full_window_is_causal_attention(backend, case):
    dtype = DTYPES[0]
    case = Case(**{**case.__dict__, "M": 0, "W": case.T + 1})
    x = inputs(case)
    log_case(case, dtype, backend)
    o = to_host(nha_core.attention(*(to_device(x[n], dtype) for n in "qkvg"), window_size=case.W, backend=backend))
    ref, _ = reference.causal_softmax_attention(*(cast_back(x[n], dtype) for n in "qkv"))
    assert rel_err(o, ref) <= tolerance(case, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(100))
@given(case=cases(varlen=False))
def test_strided_inputs_and_no_mutation(backend, case):
    """Non-contiguous views give the contiguous result; the caller's arrays stay as they were."""
    if DEVICE != "cpu":
        pytest.skip("strided views are built with NumPy here; the GPU suite checks torch views separately")
    dtype = DTYPES[0]
    x = {n: a.astype(dtype) for n, a in inputs(case).items()}
    contiguous = nha_core.attention(x["q"], x["k"], x["v"], x["g"], window_size=case.W, s=x.get("s"), backend=backend)
    # Same values behind other strides: a transposed copy viewed back, and every other row.
    views = {}
    for n, a in x.items():
        wide = np.repeat(a, 2, axis=-1)[..., ::2]                     # last-dim stride 2
        views[n] = np.asfortranarray(wide) if n == "q" else wide    # q fully Fortran-ordered
    before = {n: v.copy() for n, v in views.items()}
    strided = nha_core.attention(views["q"], views["k"], views["v"], views["g"], window_size=case.W,
                                 s=views.get("s"), backend=backend)
    np.testing.assert_allclose(strided, contiguous, rtol=1e-6 if dtype == "float32" else 1e-12, atol=1e-6)
    for n in views:
        np.testing.assert_array_equal(views[n], before[n])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_time_axis(backend):
    dtype = DTYPES[0]
    case = Case(B=2, T=0, HQ=4, H=2, K=5, V=3, M=4, W=3, seed=0)
    x = inputs(case)
    o, lse, state = run_attention(case, x, dtype, backend)
    assert tuple(o.shape) == (2, 0, 4, 3) and tuple(lse.shape) == (2, 4, 0)
    assert not np.any(to_host(state.hk)) and list(to_host(state.seen)) == [0, 0]
