"""Command line: ``python -m nha_core info`` (the registry) and ``python -m nha_core demo``."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def info(_args) -> int:
    import nha_core

    print(f"nha_core {nha_core.__version__}  (numpy {np.__version__})")
    for name, row in nha_core.backends().items():
        mark = "usable" if row["usable"] else "not usable"
        print(f"  {name:8s} {mark:11s} priority {row['priority']:3d}  devices {row['devices']}  dtypes {row['dtypes']}")
        if row["reason"]:
            print(f"           why not: {row['reason']}")
    return 0


def _inputs(rng, B, T, HQ, H, K, V, M, dtype):
    q = rng.standard_normal((B, T, HQ, K)).astype(dtype)
    k = rng.standard_normal((B, T, H, K)).astype(dtype)
    v = rng.standard_normal((B, T, H, V)).astype(dtype)
    # Gated-slot-attention style gates: logsigmoid(x) / 16 keeps decays near 1.
    g = (-np.logaddexp(0.0, -rng.standard_normal((B, T, H, M))) / 16).astype(dtype)
    return q, k, v, g


def _rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _device(args):
    """cuda when torch sees a GPU (and --device is auto or cuda), else the CPU with NumPy arrays."""
    if args.device in ("auto", "cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                return "cuda"
        except ImportError:
            pass
        if args.device == "cuda":
            raise SystemExit("--device cuda: torch with a CUDA GPU is not available here")
    return "cpu"


def demo(args) -> int:
    import nha_core
    from nha_core import reference

    B, H, T, K, M, W, steps = 1, args.heads, args.tokens, args.dim, args.slots, args.window, args.decode
    device = _device(args)
    rng = np.random.default_rng(0)
    arrays = _inputs(rng, B, T + steps, H, H, K, K, M, np.float32)
    if device == "cuda":
        import torch

        dtype = getattr(torch, args.dtype)
        q, k, v, g = (torch.as_tensor(a, device="cuda").to(dtype) for a in arrays)
        host = lambda x: x.float().cpu().numpy()  # noqa: E731
        sync = torch.cuda.synchronize
        bound = {"float32": 1e-3}.get(args.dtype, 2e-2)
    else:
        q, k, v, g = (a.astype(args.dtype) for a in arrays)
        host, sync, bound = np.asarray, (lambda: None), 1e-5
    backend = args.backend
    if backend == "auto":
        usable = [n for n, r in nha_core.backends().items() if r["usable"] and device in r["devices"]]
        backend = usable[0]
    print(f"NHA demo: B={B} H={H} T={T} K=V={K} M={M} W={W}, {args.dtype} on {device}, backend {backend}")

    nha_core.attention(q[:, :64], k[:, :64], v[:, :64], g[:, :64], window_size=W, backend=backend)  # warm-up
    sync()
    t0 = time.perf_counter()
    o, _, state = nha_core.attention(q[:, :T], k[:, :T], v[:, :T], g[:, :T], window_size=W,
                                     output_final_state=True, backend=backend)
    sync()
    prefill = time.perf_counter() - t0
    print(f"prefill : {T} tokens in {prefill:.3f} s  ({T / prefill:,.0f} tokens/s)")

    outs = []
    t0 = time.perf_counter()
    for t in range(T, T + steps):
        o_t, state = nha_core.decode_step(q[:, t], k[:, t], v[:, t], g[:, t], state, backend=backend, in_place=True)
        outs.append(o_t)
    sync()
    decode = time.perf_counter() - t0
    print(f"decode  : {steps} steps in {decode:.3f} s  ({steps / decode:,.0f} tokens/s, "
          f"{1e3 * decode / steps:.2f} ms/step)")

    n = min(T, args.check)
    ref_o, _, _, _ = reference.forward(*(host(x[:, :n]).astype(np.float64) for x in (q, k, v, g)), window_size=W)
    err_prefill = _rel(host(o[:, :n]), ref_o)
    full = nha_core.attention(q, k, v, g, window_size=W, backend=backend)
    err_decode = _rel(np.stack([host(x) for x in outs], 1), host(full[:, T:]).astype(np.float64))
    print(f"check   : prefill tokens 0..{n - 1} vs the fp64 reference: rel. error {err_prefill:.1e}; "
          f"decoded tokens vs one-shot prefill: rel. error {err_decode:.1e}")

    state_bytes = state.nbytes()
    itemsize = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    kv_bytes = 2 * (T + steps) * H * K * itemsize
    print(f"memory  : NHA state {state_bytes / 2**20:.2f} MiB per sequence (slots {M} + window {W}, constant); "
          f"a full KV cache at {T + steps} tokens needs {kv_bytes / 2**20:.2f} MiB "
          f"({kv_bytes / state_bytes:.1f}x) and grows with context")
    ok = err_prefill <= bound and err_decode <= bound
    print("result  : OK" if ok else f"result  : FAILED (error above the {args.dtype} bound {bound:g})")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nha_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list backends, whether each is usable here, and why not")
    d = sub.add_parser("demo", help="prefill + decode a realistic problem and check it against the reference")
    d.add_argument("--tokens", type=int, default=8192)
    d.add_argument("--heads", type=int, default=8)
    d.add_argument("--dim", type=int, default=64)
    d.add_argument("--slots", type=int, default=64)
    d.add_argument("--window", type=int, default=512)
    d.add_argument("--decode", type=int, default=256)
    d.add_argument("--check", type=int, default=1024, help="prefill tokens checked against the fp64 reference")
    d.add_argument("--backend", default="auto")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when torch sees a GPU, else cpu (NumPy arrays)")
    d.add_argument("--dtype", default="float32", help="float32 (CPU: also float64; CUDA: also bfloat16, float16)")
    args = parser.parse_args(argv)
    return {"info": info, "demo": demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
