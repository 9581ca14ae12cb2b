"""Host time of one Triton-backend forward call, and how much of it the kernel launches take.

    python3 asv_bench/host_overhead.py [SHAPE ...]     # default: gpu-a64 at T = 256, then gpu-a

The device time of a short call can be smaller than the Python work that launches it; then every
eager call leaves the GPU idle and benchmarks time the host. For each shape this prints the host
time per call (a loop of calls without synchronising, best of several rounds), the time spent
inside the kernel launches (each ``kernel[grid](...)`` wrapped and timed), and the device time
(the same loop, synchronised).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import nha_core  # noqa: E402
from benchmarks import common  # noqa: E402
from nha_core.backends.triton import forward as tf  # noqa: E402

LAUNCH = {"s": 0.0, "n": 0}


class TimedLaunch:
    """kernel[grid](...) with the host time of the launch added to LAUNCH."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            t = time.perf_counter()
            out = launch(*args, **kwargs)
            LAUNCH["s"] += time.perf_counter() - t
            LAUNCH["n"] += 1
            return out
        return run


def main(names):
    for name in ("nha_fwd_kernel", "nha_fwd_state_kernel", "nha_fwd_state_local_kernel", "nha_state_scan_kernel"):
        setattr(tf, name, TimedLaunch(getattr(tf, name)))
    print(f"# {torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d %H:%M')} torch {torch.__version__}")
    for name in names:
        base, _, t = name.partition("@T=")
        shape = common.SHAPES[base]
        shape = dataclasses.replace(shape, T=int(t)) if t else shape
        x = common.make_inputs(shape, lib="torch")
        call = lambda: nha_core.attention(x["q"], x["k"], x["v"], x["g"], window_size=shape.W,  # noqa: E731
                                          backend="triton")
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        host, launch, device = 1e9, 1e9, 1e9
        for _ in range(5):
            LAUNCH.update(s=0.0, n=0)
            t = time.perf_counter()
            for _ in range(30):
                call()
            host = min(host, (time.perf_counter() - t) / 30)
            launch = min(launch, LAUNCH["s"] / 30)
            torch.cuda.synchronize()
            device = min(device, (time.perf_counter() - t) / 30)
        print(f"{name}: host {host * 1e3:.3f} ms per call, of which {launch * 1e3:.3f} in "
              f"{LAUNCH['n'] // 30} kernel launches; with the device {device * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["gpu-a64@T=256", "gpu-a64", "gpu-a"])
