"""One-process GPU measurement shared by compare.py and the asv ``bench_gpu.Summary`` suite.

For every shape: each implementation's forward, forward+backward (and, for decode shapes, decode
step) median device time (triton.testing.do_bench) and peak extra device memory, plus each NHA
backend's relative error against the composition. Failures are recorded, never raised, so one
broken peer or backend cannot stop the run. A deadline bounds the whole thing: what does not fit
is recorded as "skipped: time budget".
"""
from __future__ import annotations

import gc
import json
import math
import os
import time
import traceback

from . import calls, common, targets

MIB = 1 << 20


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _free():
    gc.collect()
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass


def measure_one(shape, impl, mode, *, dtype=None, quick=False) -> dict:
    """Device time (ms, median) and peak extra memory (MiB) of one call, or why not."""
    rec = {"shape": shape.name, "impl": impl, "mode": mode, "dtype": dtype or shape.dtype}
    t0 = time.perf_counter()
    try:
        call = calls.make_call(shape, impl, mode, dtype=dtype)
        rec["first_call_s"] = round(time.perf_counter() - t0, 3)  # compile / autotune included
        rep = 30 if quick else 100
        rec["ms"] = common.gpu_time_ms(call.run, warmup_ms=10 if quick else 25, rep_ms=rep)
        rec["peak_mib"] = common.gpu_peak_bytes(call.run) / MIB
        rec["timing"] = call.info.get("timing", "eager")
        if "eager_run" in call.info:  # graph-replayed decode: the eager call's time too
            rec["eager_ms"] = common.gpu_time_ms(call.info["eager_run"], warmup_ms=10 if quick else 25, rep_ms=rep)
        if mode == "forward_backward" and impl.startswith("nha_"):
            # SPEC: peak memory within 1.3x of inputs + outputs + gradients (targets.fwd_bwd_io_bytes)
            d = dict(shape.__dict__, dtype=rec["dtype"])
            rec["io_mib"] = targets.fwd_bwd_io_bytes(d)[1] / MIB
            rec["peak_over_io"] = targets.peak_over_io(d, rec["peak_mib"])
        if "bytes" in call.info:
            rec["bytes"] = call.info["bytes"]
            rec["gbs"] = call.info["bytes"] / (rec["ms"] * 1e-3) / 1e9
        rec["status"] = "ok"
    except NotImplementedError as error:
        rec.update(status="missing", reason=_short(error))
    except Exception as error:  # a failing peer/backend is reported, and the run goes on
        rec.update(status="failed", reason=_short(error), trace=traceback.format_exc()[-2000:])
    finally:
        call = None
        _free()
    return rec


def relative_error(shape, backend, *, dtype=None, seed=0) -> dict:
    """||o_nha - o_ref|| / ||o_ref|| with o_ref = the composition (same bf16 inputs), plus the
    composition's own error against a float32 run of itself, for scale."""
    rec = {"shape": shape.name, "impl": f"nha_{backend}", "mode": "accuracy"}
    try:
        import torch

        from . import peers

        nha_core = common.require_backend(backend)
        common.cuda_or_skip()
        why = peers.fla_available()
        if why:
            raise NotImplementedError(why)
        x = common.make_inputs(shape, lib="torch", dtype=dtype, seed=seed)
        with torch.no_grad():
            o = nha_core.attention(x["q"], x["k"], x["v"], x["g"], window_size=shape.W, backend=backend)
            ref = peers.composition(x["q"], x["k"], x["v"], x["g"], x["s"], shape.W)
        rec["rel_err_vs_composition"] = float((o.float() - ref.float()).norm() / ref.float().norm())
        rec["status"] = "ok"
    except NotImplementedError as error:
        rec.update(status="missing", reason=_short(error))
    except Exception as error:
        rec.update(status="failed", reason=_short(error), trace=traceback.format_exc()[-2000:])
    finally:
        _free()
    return rec


def check_composition(seed=0, gradients=True) -> dict:
    """The composition (fla + FlexAttention, bf16) against a float32 token loop at a small shape.

    Tells whether the peer itself computes NHA, before its times are trusted. ``gradients=False``
    checks the output only (fla's backward autotunes for minutes on its first call).
    """
    rec = {"shape": "gpu-s", "impl": "composition", "mode": "accuracy"}
    try:
        import torch

        from . import peers

        common.cuda_or_skip()
        why = peers.fla_available()
        if why:
            raise NotImplementedError(why)
        shape = common.SHAPES["gpu-s"]
        x = common.make_inputs(shape, lib="torch", seed=seed, tokens=384)
        with torch.no_grad():
            o = peers.composition(x["q"], x["k"], x["v"], x["g"], x["s"], shape.W)
            f = {n: a.float() for n, a in x.items()}
            ref = peers.composition(f["q"], f["k"], f["v"], f["g"], f["s"], shape.W,
                                    slot_fn=peers.naive_gsa_with_lse, window_fn=peers.dense_window_with_lse)
        rec["rel_err_vs_fp32_loop"] = float((o.float() - ref).norm() / ref.norm())
        if not gradients:
            rec.update(status="ok", note="output only: the composition's backward was not run (--skip)")
            return rec
        # gradient check of the LSE path: d(sum(o * do)) / dq, composition vs the fp32 loop
        leaves = [x[n].detach().float().requires_grad_(True) for n in ("q", "k", "v", "g")]
        do = torch.randn_like(ref)
        got = torch.autograd.grad(peers.composition(*[a.to(x["q"].dtype) for a in leaves[:3]],
                                                    leaves[3].to(x["q"].dtype),
                                                    common.derived_s(leaves[3]).to(x["q"].dtype), shape.W).float(),
                                  leaves, do)
        want = torch.autograd.grad(peers.composition(*leaves, common.derived_s(leaves[3]), shape.W,
                                                     slot_fn=peers.naive_gsa_with_lse,
                                                     window_fn=peers.dense_window_with_lse), leaves, do)
        rec["grad_rel_err_vs_fp32_loop"] = {
            n: float((a - b).norm() / b.norm()) for n, a, b in zip("qkvg", got, want)}
        rec["status"] = "ok"
    except NotImplementedError as error:
        rec.update(status="missing", reason=_short(error))
    except Exception as error:
        rec.update(status="failed", reason=_short(error), trace=traceback.format_exc()[-2000:])
    finally:
        _free()
    return rec


ACCURACY_GRACE_S = 30.0


def run_all(shape_names, *, deadline: float, quick=False, log=print, nha_backends=common.GPU_BACKENDS,
            peers_=calls.GPU_PEERS, modes=("forward", "forward_backward"), skip=()) -> list[dict]:
    """Every (shape, impl, mode) that fits before ``deadline`` (a time.perf_counter() value), but
    the (impl, mode) pairs in ``skip`` (recorded as skipped, e.g. a peer whose first call autotunes
    for minutes).

    Order puts what the SPEC's ratios need first: NHA forward, then its peers, then backward.
    With NHA_GPU_RECORDS set, every record is also appended to that file as it is taken (JSON
    lines), so a run that a caller's timeout cuts short (asv writes its results only at the end)
    still leaves what it measured.
    """
    records = []
    sink = os.environ.get("NHA_GPU_RECORDS")

    def add(rec):
        records.append(rec)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items() if k != "trace"}
        log(f"  {shown}")
        if sink:
            with open(sink, "a") as f:
                f.write(json.dumps(shown, default=str) + "\n")

    def over():
        return time.perf_counter() > deadline

    for name in shape_names:
        shape = common.SHAPES[name]
        log(f"[{name}] {shape.describe()}")
        if shape.decode:
            jobs = [(f"nha_{b}", "decode") for b in nha_backends] + [(p, "decode") for p in calls.DECODE_PEERS]
        else:
            jobs = [(f"nha_{b}", m) for m in modes for b in nha_backends]
            jobs += [(p, m) for m in modes for p in peers_]
            jobs.sort(key=lambda job: job[1] != "forward")  # forward first
        for impl, mode in jobs:
            if (impl, mode) in skip:
                add({"shape": name, "impl": impl, "mode": mode, "status": "skipped", "reason": "not run (--skip)"})
                continue
            if over():
                add({"shape": name, "impl": impl, "mode": mode, "status": "skipped", "reason": "time budget"})
                continue
            add(measure_one(shape, impl, mode, quick=quick))
        if not shape.decode:
            # the agreement check is a SPEC target and costs seconds once the peers are compiled:
            # it may run up to ACCURACY_GRACE_S past the deadline (2026-12-02: a run whose fla
            # autotuning used up the budget timed every gpu-a call but checked nothing)
            for b in nha_backends:
                if time.perf_counter() > deadline + ACCURACY_GRACE_S:
                    add({"shape": name, "impl": f"nha_{b}", "mode": "accuracy", "status": "skipped",
                         "reason": "time budget"})
                    continue
                add(relative_error(shape, b))
    return records


def ratio_table(records) -> list[dict]:
    """NHA time / peer time per (shape, mode, backend, peer), from records of one process."""
    ms = {(r["shape"], r["impl"], r["mode"]): r["ms"] for r in records if r.get("status") == "ok" and "ms" in r}
    out = []
    for (shape, impl, mode), t in sorted(ms.items()):
        if not impl.startswith("nha_"):
            continue
        for (s2, peer, m2), tp in sorted(ms.items()):
            if s2 == shape and m2 == mode and not peer.startswith("nha_"):
                out.append({"shape": shape, "mode": mode, "impl": impl, "peer": peer,
                            "ratio": t / tp if tp > 0 else math.nan})
        if impl == "nha_cupy" and (shape, "nha_triton", mode) in ms:
            out.append({"shape": shape, "mode": mode, "impl": impl, "peer": "nha_triton",
                        "ratio": t / ms[(shape, "nha_triton", mode)]})
    return out
