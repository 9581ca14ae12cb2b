"""Write BENCHMARKS.md from committed numbers only: asv results and compare.py's results.json.

    python asv_bench/make_benchmarks_md.py [--compare asv_bench/compare_results/*/results.json]
                                           [--out BENCHMARKS.md]

Sources (each table names the file its numbers come from, so every number traces to a commit):
  * asv_bench/results/<machine>/<commit>-*.json  (asv run; machine.json gives the machine)
  * results.json files written by compare.py (default: asv_bench/compare_results/*/results.json)
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from benchmarks import targets as spec_targets  # noqa: E402  (standard library only)


def _rel(path):
    return os.path.relpath(path, ROOT)


def _fmt_time(seconds):
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "n/a"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def _fmt_mib(x):
    return "n/a" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.3g}"


def _fmt(x):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


# ----------------------------------------------------------------------------------------------
# asv results


def _asv_rows(result_file):
    """(benchmark name, params dict, value, unit) for every finished measurement in one file."""
    with open(result_file) as f:
        data = json.load(f)
    columns = data.get("result_columns", ["result", "params"])
    bench_meta = {}
    meta_file = os.path.join(HERE, "results", "benchmarks.json")
    if os.path.exists(meta_file):
        with open(meta_file) as f:
            bench_meta = json.load(f)
    for name, row in data.get("results", {}).items():
        row = dict(zip(columns, row))
        values, params = row.get("result"), row.get("params") or []
        if values is None:
            continue
        meta = bench_meta.get(name, {})
        unit = meta.get("unit", "seconds")
        names = meta.get("param_names", [f"p{i}" for i in range(len(params))])
        combos = list(itertools.product(*params)) if params else [()]
        if not isinstance(values, list):
            values = [values]
        for combo, value in zip(combos, values):
            p = {n: v.strip("'") for n, v in zip(names, combo)}
            yield name, p, value, unit
    return data


def asv_section(results_dir):
    lines = []
    files = sorted(glob.glob(os.path.join(results_dir, "*", "*.json")))
    files = [f for f in files if os.path.basename(f) != "machine.json"]
    for path in files:
        with open(path) as f:
            data = json.load(f)
        machine_file = os.path.join(os.path.dirname(path), "machine.json")
        machine = {}
        if os.path.exists(machine_file):
            with open(machine_file) as f:
                machine = json.load(f)
        params = data.get("params", {})
        date = data.get("date")
        if isinstance(date, (int, float)):
            import datetime

            date = datetime.datetime.fromtimestamp(date / 1000, datetime.timezone.utc).date().isoformat()
        gpu = f"gpu {machine['gpu']} · " if machine.get("gpu") else ""
        lines += [f"### asv: machine `{params.get('machine', '?')}`, commit {data.get('commit_hash', '?')[:10]}", "",
                  f"source: `{_rel(path)}` · date {date} · {gpu}cpu {machine.get('cpu', '?')} · "
                  f"{machine.get('num_cpu', '?')} cores · python {params.get('python', '?')}", ""]
        rows = list(_asv_rows(path))
        # skipped (NaN: setup raised NotImplementedError) and failed (None) combinations: counted, not listed
        missing = [r for r in rows if r[2] is None or (isinstance(r[2], float) and math.isnan(r[2]))]
        rows = [r for r in rows if r not in missing]
        if missing:
            names = sorted({r[0] for r in missing})
            lines += [f"{len(missing)} parameter combinations skipped or failed (not measured on this machine) in: "
                      + ", ".join(f"`{n}`" for n in names), ""]
        times = [r for r in rows if r[0].split(".")[-1].startswith("time_")]
        ratios = [r for r in rows if r[3] == "ratio"]
        others = [r for r in rows if r not in times and r not in ratios]
        by_key = {}
        for name, p, value, unit in times:
            key = (name.rsplit(".", 1)[-1], p.get("shape"), p.get("dtype"))
            by_key.setdefault(key, {})[p.get("impl")] = value
        if by_key:
            lines += ["| benchmark | shape | dtype | implementation: time per call |", "|---|---|---|---|"]
            for (bench, shape, dtype), impls in sorted(by_key.items(), key=lambda kv: [str(x) for x in kv[0]]):
                cells = "; ".join(f"{i} {_fmt_time(v)}" for i, v in impls.items())
                lines.append(f"| {bench} | {shape} | {dtype} | {cells} |")
            lines.append("")
        # other numbers (track_*, peakmem_*; bench_gpu.Summary's): one row per benchmark and the other
        # parameters, the peer / impl / backend (else the last parameter) values as cells
        tracked = ratios + others
        if tracked:
            grouped = {}
            for name, p, value, unit in tracked:
                col = next((k for k in ("peer", "impl", "backend") if k in p), list(p)[-1] if p else None)
                lead = ", ".join(f"{k}={v}" for k, v in p.items() if k != col)
                cell = f"{col}={p[col]} **{_fmt(value)}**" if col else f"**{_fmt(value)}**"
                grouped.setdefault((name.split(".", 1)[-1], unit, lead), []).append(cell)
            lines += ["| benchmark | unit | parameters | values |", "|---|---|---|---|"]
            for (bench, unit, lead), cells in grouped.items():
                lines.append(f"| {bench} | {unit} | {lead} | {'; '.join(cells)} |")
            lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------
# compare.py results


def compare_section(path, res):
    """One compare.py run (``res``, read from ``path``)."""
    lines = [f"### compare.py on {res['device']} ({res['mode']}{', quick' if res.get('quick') else ''})", "",
             f"source: `{_rel(path)}` · date {res['date']} · commit {_commit_text(res.get('commit'))} · "
             + ", ".join(f"{k} {v}" for k, v in res.get("versions", {}).items()
                         if k in ("torch", "triton", "cupy", "fla")), ""]
    lines += [f"* edited after the run: {e}" for e in res.get("edits", [])] + ([""] if res.get("edits") else [])
    recs = res["records"]
    for shape in res["shapes"]:
        rows = [r for r in recs if r["shape"] == shape and r["mode"] != "accuracy"]
        if not rows:
            continue
        lines += [f"**{shape}** — " + _shape_text(res, shape), "",
                  "| implementation | mode | median time | peak extra memory | note |", "|---|---|---|---|---|"]
        for r in rows:
            note = "" if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
            if r.get("gbs"):
                note = f"{r['gbs']:.0f} GB/s on the bytes a step must touch"
                if r.get("fraction_of_copy_bandwidth"):
                    note += f" ({100 * r['fraction_of_copy_bandwidth']:.0f}% of measured copy bandwidth)"
            ms = r.get("ms")
            lines.append(f"| {r['impl']} | {r['mode']} | {_fmt_time(ms / 1e3) if ms is not None else 'n/a'} | "
                         f"{_fmt_mib(r.get('peak_mib'))}{' MiB' if r.get('peak_mib') is not None else ''} | {note} |")
        ratios = [x for x in res.get("ratios", []) if x["shape"] == shape]
        if ratios:
            lines += ["", "| NHA | mode | peer | NHA time / peer time |", "|---|---|---|---|"]
            lines += [f"| {x['impl']} | {x['mode']} | {x['peer']} | {_fmt(x['ratio'])} |" for x in ratios]
        acc = [r for r in recs if r["shape"] == shape and r["mode"] == "accuracy" and r["status"] == "ok"]
        if acc:
            lines += ["", "relative error vs the composition: "
                      + ", ".join(f"{r['impl']} {_fmt(r['rel_err_vs_composition'])}" for r in acc)]
        lines.append("")
    if res.get("mode") == "gpu":
        rows = res.get("targets") or spec_targets.evaluate(res)  # older files: checked here
        lines += targets_lines(rows, recorded="targets" in res, edited=bool(res.get("edits")))
    for r in recs:
        if r["impl"] == "composition" and r["mode"] == "accuracy":
            lines += [f"composition self-check ({r['status']}): output rel. error vs float32 token loop "
                      f"{_fmt(r.get('rel_err_vs_fp32_loop'))}, gradients {r.get('grad_rel_err_vs_fp32_loop', 'not run')}", ""]
    return lines


def latest_targets_lines(runs):
    """For every SPEC target, shape and NHA backend: the verdict of the newest GPU run that measured
    it (``runs``: (path, result) pairs of compare.py files)."""
    latest = {}
    for path, res in sorted(runs, key=lambda run: run[1]["date"]):
        if res.get("mode") != "gpu":
            continue
        for t in res.get("targets") or spec_targets.evaluate(res):
            if t["met"] is not None:
                latest[(t["shape"], t["impl"], t["target"])] = (t, res, path)
    if not latest:
        return []
    shapes = list(spec_targets.GPU_TARGET_SHAPES)
    order = lambda key: (shapes.index(key[0]) if key[0] in shapes else len(shapes), key[1], key[2])  # noqa: E731
    lines = ["## Latest verdict per SPEC target", "",
             "Each row comes from the newest run below that measured it; runs of different dates and commits "
             "are mixed here, ratios never are.", "",
             "| target | shape | NHA | value | limit | met | run |", "|---|---|---|---|---|---|---|"]
    for key in sorted(latest, key=order):
        t, res, path = latest[key]
        note = f" ({t['detail']})" if t.get("detail") else ""
        lines.append(f"| {t['target']} | {t['shape']} | {t['impl']} | {_fmt(t['value'])} | {t['op']} {t['limit']:g} | "
                     f"{'yes' if t['met'] else '**no**'}{note} | {res['date'][:10]}, {_commit_text(res.get('commit'))}, "
                     f"`{os.path.basename(os.path.dirname(path))}` |")
    return lines + [""]


def targets_lines(rows, recorded=True, edited=False):
    """SPEC section 6 targets of one run: value, limit, met / not met / not measured."""
    met = [t for t in rows if t["met"]]
    missed = [t for t in rows if t["met"] is False]
    unknown = [t for t in rows if t["met"] is None]
    source = "recorded by compare.py" if recorded else "checked from the records above"
    if edited:
        source = "re-evaluated by benchmarks/targets.py after the edits above"
    lines = [f"**SPEC section 6 targets** ({source}): "
             f"{len(met)} met, {len(missed)} not met, {len(unknown)} not measured", "",
             "| target | shape | NHA | value | limit | met |", "|---|---|---|---|---|---|"]
    for t in rows:
        if t["met"] is None:
            continue
        note = f" ({t['detail']})" if t.get("detail") else ""
        lines.append(f"| {t['target']} | {t['shape']} | {t['impl']} | {_fmt(t['value'])} | {t['op']} {t['limit']:g} | "
                     f"{'yes' if t['met'] else '**no**'}{note} |")
    if unknown:
        reasons = {}
        for t in unknown:
            reasons.setdefault(t.get("reason") or "not measured", []).append(f"{t['shape']} {t['impl']}: {t['target']}")
        lines += ["", "not measured:"] + [f"* {', '.join(v)} — {k}" for k, v in reasons.items()]
    return lines + [""]


def _commit_text(commit):
    if not commit:
        return "?"
    is_hash = len(commit) == 40 and all(c in "0123456789abcdef" for c in commit)
    return commit[:10] if is_hash else commit


def _shape_text(res, shape):
    d = res.get("shape_defs", {}).get(shape)
    if not d:
        return ""
    lead = f"N={d['B']}" if d.get("decode") else f"B={d['B']}"
    return (f"{lead} HQ/H={d['HQ']}/{d['H']} T={d['T']} K={d['K']} V={d['V']} M={d['M']} W={d['W']} "
            f"{d['dtype']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", nargs="*", help="compare.py results.json files "
                    "(default: asv_bench/compare_results/*/results.json)")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    args = ap.parse_args(argv)
    compare_files = args.compare
    if compare_files is None:
        compare_files = sorted(glob.glob(os.path.join(HERE, "compare_results", "*", "results.json")))

    lines = ["# Benchmarks", "",
             "Generated by `python asv_bench/make_benchmarks_md.py` from committed result files; each "
             "section names its source. Ratios are NHA time / peer time measured in the same process "
             "(below 1 means NHA is faster). Shapes and targets: SPEC section 6. How to reproduce: "
             "`asv_bench/README.md`.", ""]
    if compare_files:
        runs = []
        for path in compare_files:
            with open(path) as f:
                runs.append((path, json.load(f)))
        lines += latest_targets_lines(runs)
        lines += ["## Peer comparison (compare.py), newest run first", ""]
        for path, res in sorted(runs, key=lambda run: run[1]["date"], reverse=True):
            lines += compare_section(path, res)
    notes = [os.path.join(HERE, "triton_tuning_notes.md"), os.path.join(ROOT, "backends", "cupy", "PERF_NOTES.md")]
    notes = [n for n in notes if os.path.exists(n)]
    if notes:
        lines += ["## Kernel tuning measurements (device runs during development)", ""]
        for path in notes:
            with open(path) as f:
                body = f.read().strip().splitlines()
            # demote the note's own headings below this section
            body = [("##" + line) if line.startswith("#") else line for line in body]
            lines += [f"source: `{_rel(path)}`", ""] + body + [""]
    asv_lines = asv_section(args.results_dir)
    if asv_lines:
        lines += ["## asv history (latest results per machine and commit)", ""] + asv_lines
    if not compare_files and not asv_lines:
        lines += ["No committed results yet.", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.out} from {len(compare_files)} compare file(s) and {args.results_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
