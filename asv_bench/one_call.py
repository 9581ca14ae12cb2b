"""A few calls of one backend at one shape and nothing else: the program to run under a profiler.

    ncu --clock-control none --kernel-name regex:nha_fwd_kernel --launch-skip 2 --launch-count 1 \\
        python3 asv_bench/one_call.py --shape gpu-a --mode forward --calls 3

``--host`` times the host side instead: how long a call takes to return (no synchronisation, so
the launches' Python and driver cost; a call whose host time passes its kernels' time is
host-bound) and where that time goes (cProfile, the top functions by own time).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

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
    ap.add_argument("--host", action="store_true", help="host time per call and its cProfile")
    args = ap.parse_args()
    shape = parse_shape(args.shape)
    x = common.make_inputs(shape, lib="torch", tokens=1) if shape.decode else common.make_inputs(shape, lib="torch")
    fn = make_mode(shape, args.backend, args.mode, x)
    if args.host:
        return host_profile(fn, args.calls)
    for _ in range(args.calls):
        fn()
    torch.cuda.synchronize()


def host_profile(fn, calls: int) -> None:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):  # compiles, caches
        fn()
    sync()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        sync()  # the next call starts on an idle queue: nothing hides its launches
    times.sort()
    print(f"host time per call: median {1e3 * times[len(times) // 2]:.3f} ms, min {1e3 * times[0]:.3f} ms ({calls} calls)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    sync()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
