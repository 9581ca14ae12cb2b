"""A few calls of one backend at one shape and nothing else: the program to run under a profiler.

    ncu --clock-control none --kernel-name regex:nha_fwd_kernel --launch-skip 2 --launch-count 1 \\
        python3 asv_bench/one_call.py --shape gpu-a --mode forward --calls 3
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from tune_gpu import make_mode, parse_shape  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--shape", default="gpu-a", help="as tune_gpu.py: NAME or NAME@FIELD=INT,...")
    ap.add_argument("--mode", default="forward", choices=("forward", "backward", "decode"))
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    shape = parse_shape(args.shape)
    x = common.make_inputs(shape, lib="torch", tokens=1) if shape.decode else common.make_inputs(shape, lib="torch")
    fn = make_mode(shape, args.backend, args.mode, x)
    for _ in range(args.calls):
        fn()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
