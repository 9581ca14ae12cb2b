"""Kernel variants of one GPU backend, checked and timed in one process (for tuning on a GPU).

A variant is a set of overrides of the backend's ``configs`` module (``NAME=VALUE``; a function
such as ``num_warps`` becomes a constant). For every variant, in this order:

1. correctness on small problems (first variant only, unless ``--check-all``) against the fp64 oracle (``nha_core.reference``): forward and
   backward in bfloat16 and float32 at an odd T, GQA, W not a multiple of the blocks, M = 64
   and M = 16 (SPEC section 5 bounds: 2e-2 and 1e-3);
2. agreement with the first variant's output at the benchmark shape (same inputs);
3. median device time (triton.testing.do_bench) of the whole API call per mode, its peak device
   memory above what was allocated before it, and the per-kernel split (torch.profiler, mean of
   5 calls); for the backward, agreement of the gradients with the first variant's.

    python3 asv_bench/tune_gpu.py --shape gpu-a --modes forward,backward \\
        --variant base: --variant w8:num_warps=8,num_stages=2 --out DIR
    python3 asv_bench/tune_gpu.py --shape gpu-a --dtype float16 \\
        --variant x3:FP16_SLOT_DOTS=tf32x3 --variant tf32:FP16_SLOT_DOTS=tf32   # another dtype

Writes DIR/tune.json (one record per variant and mode) and prints a table. A variant that fails
its check is timed anyway and marked, so a fast wrong variant cannot pass unnoticed.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import nha_core  # noqa: E402
import nha_core.reference as ref  # noqa: E402
from benchmarks import common  # noqa: E402

DEVICE = os.environ.get("NHA_TUNE_DEVICE", "cuda")  # "cpu" with TRITON_INTERPRET=1 checks this script here
TOL = {"bfloat16": 2e-2, "float16": 2e-2, "float32": 1e-3}


def _top_level_items(body: str):
    """``a=1,b=("x","y")`` -> ["a=1", 'b=("x","y")']: commas inside brackets or quotes stay."""
    items, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(body):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(body[start:i])
            start = i + 1
    return items + [body[start:]]


def parse_variant(text: str):
    """``name:attr=value,attr=value`` -> (name, {attr: value}); a value may be a tuple."""
    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, _top_level_items(body)):
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()
    return name, overrides


class Overrides:
    """Apply config overrides for the duration of a ``with`` block."""

    def __init__(self, configs, overrides: dict):
        self.configs, self.overrides, self.saved = configs, overrides, {}

    def __enter__(self):
        for key, value in self.overrides.items():
            if not hasattr(self.configs, key):
                raise AttributeError(f"{self.configs.__name__} has no {key}")
            old = getattr(self.configs, key)
            self.saved[key] = old
            setattr(self.configs, key, (lambda *a, _v=value: _v) if callable(old) else value)

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            setattr(self.configs, key, value)


def rel(out, want) -> float:
    out = np.asarray(out.detach().to("cpu", torch.float64))
    want = np.asarray(want, dtype=np.float64)
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.linalg.norm(out - want) / max(np.linalg.norm(want), 1e-300))


def small_checks(backend: str, seed: int = 0, dtypes=("bfloat16", "float32")) -> dict:
    """Worst relative errors vs the fp64 oracle on small problems (forward o and every gradient)."""
    worst = {}
    for case, (B, T, HQ, H, K, M, W) in {"gqa-M64": (2, 203, 4, 2, 64, 64, 70),
                                         "M16-W>T": (1, 150, 2, 1, 64, 16, 300),
                                         "K128-gqa": (1, 203, 4, 2, 128, 64, 70)}.items():
        r = np.random.default_rng(seed)
        x = {"q": r.standard_normal((B, T, HQ, K)), "k": r.standard_normal((B, T, H, K)),
             "v": r.standard_normal((B, T, H, K)),
             "g": -np.logaddexp(0, -r.standard_normal((B, T, H, M))) / 8}
        do = r.standard_normal((B, T, HQ, K))
        for dt in dtypes:
            td = getattr(torch, dt)
            t = {n: torch.tensor(a, device=DEVICE).to(td) for n, a in x.items()}
            # the oracle sees the same rounded inputs
            t64 = {n: a.double().cpu().numpy() for n, a in t.items()}
            want_o = ref.forward(t64["q"], t64["k"], t64["v"], t64["g"], window_size=W)[0]
            want_g = ref.backward(do, t64["q"], t64["k"], t64["v"], t64["g"], window_size=W)
            o, lse, _ = nha_core.attention(t["q"], t["k"], t["v"], t["g"], window_size=W, return_lse=True,
                                           backend=backend)
            errs = {"o": rel(o, want_o)}
            grads = nha_core.attention_backward(torch.tensor(do, device=DEVICE).to(td), t["q"], t["k"], t["v"],
                                                t["g"], o, lse, window_size=W, backend=backend)
            for name, got in zip(("dq", "dk", "dv", "dg"), grads[:4]):
                errs[name] = rel(got, want_g[name])
            key = f"{case}/{dt}"
            worst[key] = max(errs.values())
            worst[key + "/ok"] = all(e <= TOL[dt] for e in errs.values())
            worst[key + "/errs"] = {n: round(e, 6) for n, e in errs.items()}
    return worst


def kernel_split(fn) -> dict:
    """Mean device time (ms) per kernel name over 5 calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            out[e.key[:60]] = round(t / 5 / 1000, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:10])


def make_mode(shape, backend, mode, x):
    q, k, v, g = x["q"], x["k"], x["v"], x["g"]
    W = shape.W
    if mode == "forward":
        return lambda: nha_core.attention(q, k, v, g, window_size=W, backend=backend)
    if mode == "backward":
        o, lse, _ = nha_core.attention(q, k, v, g, window_size=W, return_lse=True, backend=backend)
        # the same do for every variant (compared by grads_vs_first)
        do = torch.randn(o.shape, generator=torch.Generator(o.device).manual_seed(1), device=o.device).to(o.dtype)
        return lambda: nha_core.attention_backward(do, q, k, v, g, o, lse, window_size=W, backend=backend)
    if mode == "decode":
        N = shape.B
        state = nha_core.init_state(N, shape.H, shape.K, shape.V, shape.M, window_size=W, dtype=shape.dtype,
                                    like=q)
        for name, a in state.arrays().items():  # random state and ring: never time on zeros
            if name != "seen":
                a.copy_(torch.randn_like(a, dtype=torch.float32).to(a.dtype))
        state.g_cache.copy_(-torch.rand_like(state.g_cache, dtype=torch.float32).to(state.g_cache.dtype))
        state.seen.fill_(shape.T)
        return lambda: nha_core.decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state, backend=backend,
                                            in_place=True)
    raise ValueError(mode)


def parse_shape(text: str):
    """``gpu-a`` or ``gpu-a@W=0,M=0``: a benchmark shape, with integer fields overridden (ablations:
    W=0 leaves the slots alone, M=0 the window alone)."""
    name, _, fields = text.partition("@")
    shape = common.SHAPES[name]
    for item in filter(None, fields.split(",")):
        field, _, value = item.partition("=")
        shape = dataclasses.replace(shape, **{field: int(value)})
    return dataclasses.replace(shape, name=text) if fields else shape


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--shape", default="gpu-a", help="a shape of benchmarks/common.py, optionally NAME@FIELD=INT,...")
    ap.add_argument("--modes", default="forward")
    ap.add_argument("--variant", action="append", default=[], help="name:attr=value,... (repeatable)")
    ap.add_argument("--no-check", action="store_true", help="skip the small fp64 checks")
    ap.add_argument("--check-all", action="store_true", help="fp64 checks for every variant, not the first only")
    ap.add_argument("--dtype", default=None, help="time this dtype instead of the shape's (float16, float32)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    configs = importlib.import_module(f"nha_core.backends.{args.backend}.configs")
    shape = parse_shape(args.shape)
    if args.dtype:
        shape = dataclasses.replace(shape, dtype=args.dtype)
    variants = [parse_variant(v) for v in (args.variant or ["base:"])]
    print(f"# {torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d %H:%M')} backend {args.backend} "
          f"shape {shape.name} ({shape.describe()}) torch {torch.__version__}", flush=True)
    if shape.decode:
        x = common.make_inputs(shape, lib="torch", tokens=1)
    else:
        x = common.make_inputs(shape, lib="torch")
    records, baseline, baseline_grads = [], None, None
    for name, overrides in variants:
        rec = {"variant": name, "overrides": overrides, "shape": shape.name, "backend": args.backend}
        try:
            with Overrides(configs, overrides):
                t0 = time.perf_counter()
                if not args.no_check and not shape.decode and (baseline is None or args.check_all):
                    rec["check"] = small_checks(args.backend, dtypes=tuple(dict.fromkeys(
                        ("bfloat16", "float32", shape.dtype))))
                    rec["check_ok"] = all(v for k, v in rec["check"].items() if k.endswith("/ok"))
                if not shape.decode:
                    o = nha_core.attention(x["q"], x["k"], x["v"], x["g"], window_size=shape.W, backend=args.backend)
                    if baseline is None:
                        baseline = o.float()
                    rec["vs_first"] = float((o.float() - baseline).norm() / baseline.norm())
                rec["compile_s"] = round(time.perf_counter() - t0, 1)
                for i, mode in enumerate(args.modes.split(",")):
                    fn = make_mode(shape, args.backend, mode, x)
                    fn()
                    torch.cuda.synchronize()
                    rec[f"{mode}_ms"] = common.gpu_time_ms(fn)
                    rec[f"{mode}_ms_again"] = common.gpu_time_ms(fn)  # the spread between two timings
                    rec[f"{mode}_peak_mib"] = round(common.gpu_peak_bytes(fn) / 2**20, 1)
                    if mode == "backward":
                        grads = [a.float() for a in fn()[:4]]
                        baseline_grads = baseline_grads or grads
                        rec["grads_vs_first"] = max(float((a - b).norm() / b.norm())
                                                    for a, b in zip(grads, baseline_grads))
                        del grads
                    rec[f"{mode}_kernels"] = kernel_split(fn)
        except Exception as error:  # record and go on with the next variant
            rec["error"] = f"{type(error).__name__}: {error}"[:400]
            rec["trace"] = traceback.format_exc()[-1500:]
        records.append(rec)
        print(json.dumps(rec), flush=True)
        torch.cuda.empty_cache()
    print(f"\n{'variant':<18} {'check':<6} {'vs_first':>9} "
          + " ".join(f"{m + ' ms, peak MiB':>26}" for m in args.modes.split(",")))
    for rec in records:
        times = " ".join(f"{rec.get(m + '_ms', float('nan')):>7.3f}/{rec.get(m + '_ms_again', float('nan')):<8.3f}"
                         f"{rec.get(m + '_peak_mib', float('nan')):>9.1f}" for m in args.modes.split(","))
        ok = "ERR" if "error" in rec else ("ok" if rec.get("check_ok", True) else "FAIL")
        print(f"{rec['variant']:<18} {ok:<6} {rec.get('vs_first', float('nan')):>9.2e} {times}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tune.json"), "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
