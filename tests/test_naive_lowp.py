"""The naive low-precision yardstick of SPEC section 5 (``cases.naive_attention``).

SPEC section 5 bounds float16/bfloat16 kernels by twice the error of "the same computation done
naively in that dtype with PyTorch". That computation must first be the right one: here, run in
float64 on the CPU (in CI), it matches the fp64 oracle to 1e-12 in its outputs and, through
autograd, in every gradient. tests/test_triton_gpu.py (``test_low_precision_within_twice_naive``)
and ``test_cupy_within_twice_naive`` below (gpu-marked, skipped without cupy) then run it in
float16/bfloat16 on the GPU and compare errors.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from .cases import (GRAD_OF, assert_within_twice_naive, kernel_inputs, naive_results, oracle_backward, oracle_forward,
                    rel_err)

torch = pytest.importorskip("torch")

SELF_CHECK = [
    dict(B=2, T=23, HQ=4, H=2, K=5, V=3, M=4, W=6),                                   # GQA, W < T
    dict(B=1, T=20, HQ=2, H=1, K=4, V=5, M=16, W=0, explicit=True, initial=True),      # pure slots, M = 16
    dict(B=1, T=17, HQ=2, H=2, K=3, V=4, M=0, W=5),                                   # pure window
    dict(B=1, T=15, HQ=3, H=1, K=4, V=4, M=3, W=40, explicit=True),                   # W >= T
    dict(B=1, T=30, HQ=2, H=1, K=4, V=3, M=5, W=3, seqlens=(7, 0, 13, 10), explicit=True, initial=True),
    dict(B=1, T=45, HQ=2, H=1, K=4, V=4, M=4, W=2, hard="spikes"),                    # resets, x200 decay
]


@pytest.mark.parametrize("case", SELF_CHECK, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_naive_in_float64_matches_oracle(case):
    p, x = kernel_inputs(1, **case, dtype="float64", gates="logsigmoid")
    t = {n: None if a is None or n == "cu" else torch.from_numpy(a) for n, a in x.items()}
    do = np.random.default_rng(2).standard_normal((p.B, p.T, p.HQ, p.V))
    got = naive_results(p, t, x["cu"], torch.from_numpy(do))
    want = dict(zip(("o", "lse", "hk", "hv"), oracle_forward(p, x)))
    want.update(oracle_backward(p, x, do))
    for name in ("o", "lse", "hk", "hv", *GRAD_OF):
        if want[name] is None:
            assert name not in got, name
            continue
        assert got[name].dtype == torch.float64, name
        assert rel_err(got[name].numpy(), want[name]) <= 1e-12, (name, rel_err(got[name].numpy(), want[name]))


# -- CuPy backend: the same rule as tests/test_triton_gpu.py::test_low_precision_within_twice_naive --

LOWP_CASES = [
    dict(B=2, T=300, HQ=4, H=2, K=64, V=64, M=64, W=100),                   # GQA, W < T, several chunks
    dict(B=1, T=260, HQ=4, H=1, K=64, V=64, M=16, W=33, seqlens=(100, 0, 1, 159), explicit=True, initial=True),
    dict(B=1, T=200, HQ=2, H=1, K=64, V=64, M=32, W=0),                     # pure gated slot attention
    dict(B=1, T=150, HQ=2, H=2, K=128, V=128, M=16, W=500),                 # W >= T: slots never written
]


def _cupy_backend():
    cupy = pytest.importorskip("cupy", reason="cupy: not installed")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    from nha_core.backends.cupy import BACKEND

    return cupy, BACKEND


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", LOWP_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_cupy_within_twice_naive(case, dtype):
    """SPEC section 5 for the CuPy kernels: float16/bfloat16 outputs, final state and gradients
    within 2e-2 of the fp64 oracle and never more than 2x the error of ``naive_attention`` in that
    dtype (plus LOWP_FLOOR), all on the same inputs rounded to ``dtype``."""
    cupy, backend = _cupy_backend()
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    p, x = kernel_inputs(13, **case, dtype=dtype, gates="logsigmoid", device="cuda:0", array_kind="cupy")
    low = {n: None if a is None or n == "cu" else torch.from_numpy(a).cuda().to(dt) for n, a in x.items()}
    x = {n: a if a is None or n == "cu" else low[n].double().cpu().numpy() for n, a in x.items()}

    def to_cupy(a):   # CuPy has no bfloat16: the backend takes its bits as uint16
        if a is None:
            return None
        a = a.detach().contiguous()
        if a.dtype == torch.bfloat16:
            return cupy.asarray(a.view(torch.int16).cpu().numpy().view(np.uint16))
        return cupy.asarray(a.cpu().numpy())

    def to_f64(a):
        if a is None:
            return None
        a = cupy.asnumpy(a)
        if a.dtype == np.uint16:
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float64)

    f32 = lambda a: None if a is None else a.float()  # noqa: E731  (the state is fp32)
    ins = [to_cupy(low[n]) for n in ("q", "k", "v", "g", "s", "q_slot", "k_slot")]
    hk0, hv0 = to_cupy(f32(low["hk0"])), to_cupy(f32(low["hv0"]))
    cu = None if x["cu"] is None else cupy.asarray(x["cu"])
    o, lse, hk, hv = backend.forward(p, *ins, hk0, hv0, cu)
    do = torch.from_numpy(np.random.default_rng(3).standard_normal((p.B, p.T, p.HQ, p.V))).cuda().to(dt)
    bp = dataclasses.replace(p, mode="backward", output_final_state=False)
    grads = backend.backward(bp, to_cupy(do), *ins, o, lse, hk0, hv0, cu)
    got = dict(zip(("o", "lse", "hk", "hv"), map(to_f64, (o, lse, hk, hv))))
    got.update(zip(("dq", "dk", "dv", "dg", "ds", "dq_slot", "dk_slot", "dhk0", "dhv0"), map(to_f64, grads)))
    if x["s"] is None:   # the API adds the path through the derived s = 1 - exp(g)
        got["dg"] = got["dg"] + got["ds"] * -np.exp(x["g"])
        got["ds"] = None

    naive = naive_results(p, low, x["cu"], do)
    want = dict(zip(("o", "lse", "hk", "hv"), oracle_forward(p, x)))
    want.update(oracle_backward(p, x, do.double().cpu().numpy()))
    host = lambda a: a if isinstance(a, np.ndarray) else a.double().cpu().numpy()  # noqa: E731
    assert_within_twice_naive(got, naive, want, dtype, lambda a, ref: rel_err(host(a), ref))
