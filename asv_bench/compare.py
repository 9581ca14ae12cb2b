"""One-process comparison of nha_core against its peers (SPEC section 6). Needs no asv.

GPU (default): for each shape, every usable NHA backend (triton, cupy) and every peer
(FlexAttention sliding window, SDPA full causal, fla chunk_gsa, the fla+Flex composition): median
device time of forward and forward+backward (triton.testing.do_bench), peak extra device memory,
NHA's relative error against the composition, and decode at the decode shape. A missing peer
(e.g. fla not importable) or a failing backend is reported and the run goes on. A global time
guard keeps the whole run inside ``--budget`` seconds (default 480).

CPU (``--cpu``): the numpy backend at cpu-a / cpu-b against torch SDPA full causal (float32) and
the per-token NumPy loop, wall-clock medians.

    python asv_bench/compare.py --out DIR [--shapes gpu-a,gpu-b,...] [--quick]
    python asv_bench/compare.py --out DIR --cpu [--shapes cpu-a,cpu-b]
    python asv_bench/compare.py --out DIR --triton-config "BWD_BF16_DOTS=('state','slot')"  # a candidate
    python asv_bench/compare.py --out DIR --from-records RECORDS.jsonl [--meta OTHER/results.json]

Writes DIR/results.json (every number, plus card, date, versions, commit) and DIR/results.md.
With NHA_GPU_RECORDS=FILE the run's metadata and then every record are streamed to FILE as they
are taken; ``--from-records FILE`` writes results.json/md from such a file when a timeout cut the
run before its end (``--meta`` takes the metadata from another results.json of the same host when
the file has none).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchmarks import calls, common, measure, targets  # noqa: E402


def _commit() -> str | None:
    """HEAD here, or $NHA_COMMIT where the tree was copied without .git (the GPU hosts)."""
    if os.environ.get("NHA_COMMIT"):
        return os.environ["NHA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return None


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("numpy", "torch", "triton", "cupy", "fla", "nha_core"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception as error:
            out[name] = f"not importable ({type(error).__name__})"
    try:
        import nha_core

        out["nha_backends"] = {n: (i.get("usable"), i.get("reason")) for n, i in nha_core.backends().items()}
    except Exception as error:
        out["nha_backends"] = f"unavailable: {error}"
    return out


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"


# ----------------------------------------------------------------------------------------------
# CPU mode


def run_cpu(shape_names, *, deadline, quick, log) -> list[dict]:
    records = []
    for name in shape_names:
        shape = common.SHAPES[name]
        log(f"[{name}] {shape.describe()}")
        for impl in ("nha_numpy", *calls.CPU_PEERS):
            rec = {"shape": name, "impl": impl, "mode": "forward", "dtype": shape.dtype}
            if time.perf_counter() > deadline:
                rec.update(status="skipped", reason="time budget")
            else:
                try:
                    t0 = time.perf_counter()
                    call = calls.make_call(shape, impl, "forward")
                    rec["first_call_s"] = round(time.perf_counter() - t0, 3)
                    repeat = 1 if quick or name == "cpu-b" else 3
                    rec["ms"] = 1e3 * common.cpu_time_s(call.run, repeat=repeat, warmup=0)
                    rec["status"] = "ok"
                except NotImplementedError as error:
                    rec.update(status="missing", reason=str(error).splitlines()[0])
                except Exception as error:
                    rec.update(status="failed", reason=f"{type(error).__name__}: {error}"[:300])
            records.append(rec)
            log(f"  {rec}")
    return records


# ----------------------------------------------------------------------------------------------
# report


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def targets_markdown(rows) -> list[str]:
    """SPEC section 6 targets (benchmarks/targets.py): value, limit, met / not met / not measured."""
    lines = ["## SPEC targets", "", "| target | shape | impl | value | limit | met |", "|---|---|---|---|---|---|"]
    for t in rows:
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
        note = t.get("detail") or t.get("reason") or ""
        lines.append(f"| {t['target']} | {t['shape']} | {t['impl']} | {_fmt(t['value'])} | {t['op']} {t['limit']:g} "
                     f"| {met}{' (' + note + ')' if note else ''} |")
    return lines


def to_markdown(result) -> str:
    lines = [f"# nha_core vs peers — {result['device']}", "",
             f"date {result['date']} · commit {result['commit'] or '?'} · mode {result['mode']}"
             f"{' (quick)' if result['quick'] else ''}"
             + (f" · {result['elapsed_s']:.0f} s" if "elapsed_s" in result else ""), ""]
    if result.get("triton_config"):
        lines += [f"Triton settings changed for this run (backends/triton/configs.py): {result['triton_config']}", ""]
    if result.get("from_records"):
        lines += [f"Written from the streamed records {result['from_records']} of a run its timeout cut"
                  + (f"; metadata from {result['meta_from']}" if result.get("meta_from") else ""), ""]
    v = result["versions"]
    lines.append("versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "triton", "cupy", "fla", "numpy")
                                          if k in v))
    if result.get("copy_bandwidth_gbs"):
        lines.append(f"measured device copy bandwidth: {result['copy_bandwidth_gbs']:.0f} GB/s")
    lines.append("")
    records = result["records"]
    for name in result["shapes"]:
        shape = common.SHAPES[name]
        lines += [f"## {name}: {shape.describe()}", "",
                  "| impl | mode | time (ms) | peak extra MiB | first call (s) | status |",
                  "|---|---|---|---|---|---|"]
        for r in records:
            if r["shape"] != name or r["mode"] == "accuracy":
                continue
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
            extra = f" ({r['gbs']:.0f} GB/s)" if "gbs" in r else ""
            lines.append(f"| {r['impl']} | {r['mode']} | {_fmt(r.get('ms'))}{extra} | {_fmt(r.get('peak_mib'), 4)} "
                         f"| {_fmt(r.get('first_call_s'))} | {status} |")
        ratios = [x for x in result["ratios"] if x["shape"] == name]
        if ratios:
            lines += ["", "| NHA impl | mode | vs peer | time ratio (NHA / peer) |", "|---|---|---|---|"]
            lines += [f"| {x['impl']} | {x['mode']} | {x['peer']} | {_fmt(x['ratio'])} |" for x in ratios]
        acc = [r for r in records if r["shape"] == name and r["mode"] == "accuracy"]
        if acc:
            lines += ["", "| NHA impl | rel. error vs composition (bf16) | status |", "|---|---|---|"]
            for r in acc:
                status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
                lines.append(f"| {r['impl']} | {_fmt(r.get('rel_err_vs_composition'))} | {status} |")
        lines.append("")
    if result.get("targets"):
        lines += targets_markdown(result["targets"]) + [""]
    checks = [r for r in records if r["impl"] == "composition" and r["mode"] == "accuracy"]
    for r in checks:
        lines += ["## composition self-check (gpu-s, T=384, bf16 vs float32 token loop)", "",
                  f"status {r['status']} {r.get('reason', '')}; output rel. error "
                  f"{_fmt(r.get('rel_err_vs_fp32_loop'))}; gradient rel. errors {r.get('grad_rel_err_vs_fp32_loop', 'not run')}", ""]
    missing = sorted({f"{r['impl']}{' ' + r['mode'] if r.get('mode') == 'accuracy' else ''}: {r.get('reason')}"
                      for r in records if r["status"] in ("missing", "failed")})
    if missing:
        lines += ["## not measured", ""] + [f"* {m}" for m in missing] + [""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for results.json and results.md")
    ap.add_argument("--shapes", help="comma-separated shape names (default: all GPU shapes + decode, or cpu-a,cpu-b)")
    ap.add_argument("--quick", action="store_true", help="shorter timing windows (numbers are noisier)")
    ap.add_argument("--cpu", action="store_true", help="CPU mode: numpy backend vs torch SDPA / per-token loop")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    ap.add_argument("--triton-config", default="", metavar="NAME=VALUE;...",
                    help="settings of backends/triton/configs.py for this run (recorded in results.json)")
    ap.add_argument("--skip", default="", metavar="IMPL:MODE,...",
                    help="implementations and modes not to run, e.g. fla_chunk_gsa:forward_backward (recorded as skipped)")
    ap.add_argument("--from-records", metavar="FILE", help="write the results of a cut run from its streamed records")
    ap.add_argument("--meta", metavar="RESULTS_JSON", help="with --from-records: metadata from this results.json")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.from_records:
        return write_results(from_records(args.from_records, args.meta), args.out)

    start = time.perf_counter()
    deadline = start + args.budget

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    if args.cpu:
        shapes = args.shapes.split(",") if args.shapes else ["cpu-a", "cpu-b"]
    else:
        shapes = args.shapes.split(",") if args.shapes else list(common.GPU_SHAPES) + list(common.GPU_DECODE_SHAPES)
    unknown = [s for s in shapes if s not in common.SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; known: {sorted(common.SHAPES)}")

    result = {"device": _device(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": _commit(), "mode": "cpu" if args.cpu else "gpu", "quick": args.quick, "shapes": shapes,
              "shape_defs": {s: common.SHAPES[s].__dict__ for s in shapes}, "versions": _versions()}
    if args.triton_config:
        from nha_core.backends.triton import configs

        result["triton_config"] = configs.override(args.triton_config)
    log(f"device: {result['device']}\nversions: {result['versions']}\ntriton config: {result.get('triton_config', 'defaults')}")

    if args.cpu:
        records = run_cpu(shapes, deadline=deadline, quick=args.quick, log=log)
        result["ratios"] = measure.ratio_table(records)
    else:
        try:
            common.cuda_or_skip()
        except NotImplementedError as error:
            ap.error(f"GPU mode needs CUDA ({error}); use --cpu on a machine without a GPU")
        from benchmarks import peers

        why = peers.fla_available()
        if why:
            log(f"NOTE: {why} -> fla_chunk_gsa and composition are missing from this run")
        try:
            result["copy_bandwidth_gbs"] = common.gpu_copy_bandwidth_gbs()
            log(f"copy bandwidth: {result['copy_bandwidth_gbs']:.0f} GB/s")
        except Exception as error:
            log(f"copy bandwidth not measured: {error}")
        if os.environ.get("NHA_GPU_RECORDS"):   # the metadata first: --from-records rebuilds a cut run
            with open(os.environ["NHA_GPU_RECORDS"], "a") as f:
                f.write(json.dumps({"meta": result}, default=str) + "\n")
        skip = {tuple(item.split(":", 1)) for item in args.skip.split(",") if item}
        bad = [":".join(item) for item in skip if len(item) != 2]
        if bad:
            ap.error(f"--skip: expected IMPL:MODE items, got {bad}")
        records = measure.run_all(shapes, deadline=deadline, quick=args.quick, log=log, skip=skip)
        # the peer's own correctness last: its compile time is already paid by then
        if time.perf_counter() < deadline:
            records.append(measure.check_composition(gradients=("composition", "forward_backward") not in skip))
            log(f"composition self-check: {records[-1]}")
        summarise_gpu(result, records)
    result["records"] = records
    result["elapsed_s"] = time.perf_counter() - start
    return write_results(result, args.out)


def summarise_gpu(result: dict, records: list) -> None:
    """Ratios (decode against sdpa_kvcache too: same shape, mode "decode"), fractions of the copy
    bandwidth and SPEC verdicts of one GPU run's records, into ``result``."""
    for r in records:
        if r.get("gbs") and result.get("copy_bandwidth_gbs"):
            r["fraction_of_copy_bandwidth"] = r["gbs"] / result["copy_bandwidth_gbs"]
    result["records"] = records
    result["ratios"] = measure.ratio_table(records)
    result["targets"] = targets.evaluate(result)


def from_records(path: str, meta_path: str | None = None) -> dict:
    """The result of a GPU run from its streamed records (NHA_GPU_RECORDS): the metadata line the
    run wrote first, or that of ``meta_path`` (a results.json of the same host), then the records."""
    meta, records = None, []
    with open(path) as f:
        for line in filter(str.strip, f):
            item = json.loads(line)
            if "meta" in item:
                meta = item["meta"]
            else:
                records.append(item)
    if meta is None:
        if meta_path is None:
            raise SystemExit(f"{path} has no metadata line (runs before 2026-12-02 wrote none): pass --meta")
        with open(meta_path) as f:
            meta = {k: v for k, v in json.load(f).items()
                    if k in ("device", "date", "commit", "mode", "quick", "versions", "copy_bandwidth_gbs", "triton_config")}
        meta["meta_from"] = os.path.relpath(meta_path, HERE)
    result = dict(meta, mode="gpu", from_records=os.path.basename(path))
    result["shapes"] = list(dict.fromkeys(r["shape"] for r in records))
    result["shape_defs"] = {s: common.SHAPES[s].__dict__ for s in result["shapes"] if s in common.SHAPES}
    summarise_gpu(result, records)
    return result


def write_results(result: dict, out: str) -> int:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    md = to_markdown(result)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + "\n")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
