"""Run one case from a property-test case log (``NHA_TEST_CASE_LOG``) on its own, forward and backward.

    python3 -m tests.replay_case LOGFILE            # the case before the first "CONTEXT ALREADY BROKEN"
    python3 -m tests.replay_case LOGFILE --line 12  # line 12 (1-based)

Meant to run under ``compute-sanitizer`` on a GPU, where a fault found by the property suite
poisons the context and hides which case caused it. It prints the case, "clean" if both calls
and a synchronize finished, then the relative error of every output and gradient against the
fp64 reference on the rounded inputs, and the backward property's verdict per gradient (error,
bound, ok/FAIL). ``NHA_TEST_TRITON_CONFIG`` applies as in the test suite.
"""
from __future__ import annotations

import argparse
import os
import re

import numpy as np

import nha_core

from nha_core import reference

from .cases import Case, gradient_check, inputs, rel_err


def faulting_line(lines: list[str]) -> int:
    """Index of the line logged just before the context was first seen broken (else the last)."""
    for i, line in enumerate(lines):
        if line.startswith("CONTEXT ALREADY BROKEN") and i > 0:
            return i - 1
    return len(lines) - 1


def parse(line: str):
    match = re.search(r" (\w+) (float16|bfloat16|float32|float64) (Case\(.*\))\s*$", line)
    if not match:
        raise SystemExit(f"not a case-log line: {line!r}")
    backend, dtype, text = match.groups()
    case = eval(text, {"Case": Case})   # the log is written by tests/test_properties.py
    return backend, dtype, case


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--line", type=int, help="1-based line number (default: the faulting case)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if os.environ.get("NHA_TEST_TRITON_CONFIG", "").strip():
        from nha_core.backends.triton import configs

        configs.override(os.environ["NHA_TEST_TRITON_CONFIG"])
    lines = open(args.log).read().splitlines()
    index = args.line - 1 if args.line else faulting_line(lines)
    backend, dtype, case = parse(lines[index])
    print(f"line {index + 1}: {backend} {dtype} {case.id}", flush=True)

    import torch

    x = inputs(case)
    dev = {n: torch.as_tensor(a, device=args.device).to(getattr(torch, dtype)) for n, a in x.items()}
    extra = dict(window_size=case.W, s=dev.get("s"), q_slot=dev.get("q_slot"), k_slot=dev.get("k_slot"),
                 cu_seqlens=case.cu_seqlens)
    o, lse, _ = nha_core.attention(dev["q"], dev["k"], dev["v"], dev["g"], return_lse=True, output_final_state=True,
                                   backend=backend, **extra)
    torch.cuda.synchronize() if args.device == "cuda" else None
    print("forward done", flush=True)
    do = torch.as_tensor(np.random.default_rng(case.seed + 1).standard_normal(o.shape), device=args.device).to(o.dtype)
    grads = nha_core.attention_backward(do, dev["q"], dev["k"], dev["v"], dev["g"], o, lse, backend=backend, **extra)
    torch.cuda.synchronize() if args.device == "cuda" else None
    print("backward done:", {n: tuple(getattr(grads, n).shape) for n in ("dq", "dk", "dv", "dg")}, flush=True)
    print("clean")
    host = lambda a: a.detach().double().cpu().numpy()  # noqa: E731
    r = {n: host(a) for n, a in dev.items()}
    ref_extra = dict(window_size=case.W, s=r.get("s"), q_slot=r.get("q_slot"), k_slot=r.get("k_slot"),
                     cu_seqlens=case.cu_seqlens)
    ref_o, ref_lse, _, _ = reference.forward(r["q"], r["k"], r["v"], r["g"], **ref_extra)
    ref = reference.backward(host(do), r["q"], r["k"], r["v"], r["g"], **ref_extra)
    errors = {"o": rel_err(host(o), ref_o), "lse": rel_err(host(lse), ref_lse)}
    errors.update({n: rel_err(host(getattr(grads, n)), ref[n]) for n in ("dq", "dk", "dv", "dg", "ds", "dq_slot",
                                                                        "dk_slot") if ref.get(n) is not None})
    print("relative errors:", {n: f"{e:.2e}" for n, e in errors.items()})
    # The backward property's verdict (tests/test_properties.py): the reference takes the o the
    # backward was given; the floor's scale is the unrounded do; dg only on easy gates.
    given = reference.backward(host(do), r["q"], r["k"], r["v"], r["g"], o=host(o), **ref_extra)
    do64 = np.random.default_rng(case.seed + 1).standard_normal(o.shape)
    where = "cpu" if args.device == "cpu" and dtype in ("float32", "float64") else "cuda"   # TOL's key
    names = ["dq", "dk", "dv", "ds", "dq_slot", "dk_slot"] + ([] if case.hard_gates else ["dg"])
    for name in (n for n in names if given.get(n) is not None):
        err, bound = gradient_check(host(getattr(grads, name)), given[name], do64, case, dtype, where)
        print(f"property {name}: error {err:.3e} bound {bound:.3e} {'ok' if err <= bound else 'FAIL'}")


if __name__ == "__main__":
    main()
