"""The fastest checked variant of a tune_gpu.py run, as a setting for compare.py --triton-config.

    python3 asv_bench/pick_variant.py DIR/tune.json backward_ms   # -> NAME=VALUE;NAME=VALUE (or "")

Only variants without an error, whose fp64 check (if run) passed and whose backward gradients (if
timed) agree with the first variant's within 1e-3, are candidates; ties keep the earlier one.
Prints the chosen variant's overrides on stdout and a line naming it on stderr.
"""
from __future__ import annotations

import json
import sys


def main(path: str, key: str) -> None:
    records = [json.loads(line) for line in open(path) if line.strip()]
    ok = [r for r in records if key in r and "error" not in r and r.get("check_ok", True)
          and r.get("grads_vs_first", 0.0) <= 1e-3]
    if not ok:
        print("pick_variant: no usable variant", file=sys.stderr)
        return
    best = min(ok, key=lambda r: r[key])
    print(f"pick_variant: {best['variant']} {key} {best[key]:.3f}", file=sys.stderr)
    print(";".join(f"{name}={value!r}" for name, value in best["overrides"].items()))


if __name__ == "__main__":
    main(*sys.argv[1:3])
