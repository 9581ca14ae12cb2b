"""Reproduce the bf16 slot-dot failure of the Triton forward (asv_bench/triton_tuning_notes.md).

Runs the varlen GQA case of tests/test_triton_gpu.py (B1-T260-HQ4-H1-K64-V64-M16-W33, explicit s,
q_slot, k_slot, initial state) forward + backward ITERS times and counts runs whose output is not
within SPEC's bf16 bound or whose gradients are not finite. Config overrides as NAME=VALUE:

    python3 asv_bench/repro_bf16_slots.py 12 BF16_SLOT_DOTS=True     # failed 12/12 on an H200 (2026-12-02)
    python3 asv_bench/repro_bf16_slots.py 12                         # the default (TF32 slot dots): 0/12
    python3 asv_bench/repro_bf16_slots.py 12 BF16_SLOT_DOTS=True BF16_MIN_SLOT_TILE=64
    compute-sanitizer --tool memcheck python3 asv_bench/repro_bf16_slots.py 2 BF16_SLOT_DOTS=True

An illegal memory access ends the process (the CUDA context is lost): run one setting per process.
"""
import ast
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import nha_core.reference as ref  # noqa: E402
import nha_core  # noqa: E402,F401  (first: the package wires up its backends)
import tests.test_triton_gpu as t  # noqa: E402
from nha_core.backends.triton import configs  # noqa: E402
from nha_core.backends.triton.backward import backward  # noqa: E402
from nha_core.backends.triton.forward import forward  # noqa: E402

CASE = dict(B=1, T=260, HQ=4, H=1, K=64, V=64, M=16, W=33, seqlens=(100, 0, 1, 159), explicit=True, initial=True)


def main():
    iters = int(sys.argv[1])
    for item in sys.argv[2:]:
        name, value = item.split("=")
        old, value = getattr(configs, name), ast.literal_eval(value)
        setattr(configs, name, (lambda *a, _v=value: _v) if callable(old) else value)
    p, x = t.make(11, **CASE, dtype="bfloat16")
    want = ref.forward(x["q"], x["k"], x["v"], x["g"], window_size=p.W, s=x["s"], q_slot=x["q_slot"],
                       k_slot=x["k_slot"], hk0=x["hk0"], hv0=x["hv0"], cu_seqlens=x["cu"])[0]
    bad = 0
    for i in range(iters):
        n = t.native(p, x)
        args = (n["q"], n["k"], n["v"], n["g"], n["s"], n["q_slot"], n["k_slot"], n["hk0"], n["hv0"], n["cu"])
        o, lse, _, _ = forward(p, *args)
        grads = backward(p, torch.randn_like(o), *args[:7], o, lse, n["hk0"], n["hv0"], n["cu"])
        torch.cuda.synchronize()
        err = t.rel(o, want) if torch.isfinite(o).all() else float("inf")
        finite = all(bool(torch.isfinite(a).all()) for a in grads if a is not None)
        bad += not (err <= t.TOL["bfloat16"] and finite)
        print(f"run {i}: o rel. error {err:.3e}, gradients finite {finite}", flush=True)
    print(f"{sys.argv[2:] or 'defaults'}: {bad}/{iters} bad", flush=True)


if __name__ == "__main__":
    main()
