"""Per-kernel GPU times of one NHA backend at a SPEC §6 shape (torch.profiler), for tuning.

    python asv_bench/profile_gpu.py --backend triton --shape gpu-a [--mode forward,backward,decode]
"""
from __future__ import annotations

import argparse

import torch

import nha_core

SHAPES = {  # name: B, HQ, H, T, K, M, W  (SPEC §6; K = V)
    "gpu-a": (8, 16, 16, 4096, 64, 64, 512), "gpu-a64": (8, 16, 16, 4096, 64, 64, 64),
    "gpu-b": (1, 16, 16, 32768, 64, 64, 2048), "gpu-c": (1, 16, 16, 16384, 128, 64, 512),
    "decode": (64, 32, 8, 32768, 128, 64, 2048),
}


def inputs(B, HQ, H, T, K, M, dtype=torch.bfloat16):
    make = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, M, device="cuda")) / 16
    return make(B, T, HQ, K), make(B, T, H, K), make(B, T, H, K), g.to(dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--shape", default="gpu-a")
    ap.add_argument("--mode", default="forward,backward,decode")
    args = ap.parse_args()
    B, HQ, H, T, K, M, W = SHAPES[args.shape]
    print(f"# {torch.cuda.get_device_name()} backend {args.backend} shape {args.shape}", flush=True)
    for mode in args.mode.split(","):
        if mode == "decode":
            N = B
            state = nha_core.init_state(N, H, K, K, M, window_size=W, dtype="bfloat16", like=torch.empty(0, device="cuda"))
            q, k, v, g = inputs(N, HQ, H, 1, K, M)
            state.seen.fill_(T)
            run = lambda: nha_core.decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state, backend=args.backend,  # noqa: E731
                                               in_place=True)
        else:
            q, k, v, g = inputs(B, HQ, H, T, K, M)
            if mode == "forward":
                run = lambda: nha_core.attention(q, k, v, g, window_size=W, backend=args.backend)  # noqa: E731
            else:
                o, lse, _ = nha_core.attention(q, k, v, g, window_size=W, return_lse=True, backend=args.backend)
                do = torch.randn_like(o)
                run = lambda: nha_core.attention_backward(do, q, k, v, g, o, lse, window_size=W,  # noqa: E731
                                                          backend=args.backend)
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                run()
            torch.cuda.synchronize()
        print(f"## {mode} (5 calls)", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)


if __name__ == "__main__":
    main()
