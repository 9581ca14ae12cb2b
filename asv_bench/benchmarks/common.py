"""Shapes, input makers, timers and skip rules shared by the asv suites and compare.py.

Nothing here imports torch at module level: asv imports every benchmark module to discover the
suite, and a CPU-only run must not pay for (or fail on) a CUDA stack.

Letters are the SPEC's: B batch, T time, HQ query heads, H key/value heads, K/V head dims,
M slots, W window, N sequences (decode).
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark problem. For ``decode`` shapes, ``B`` is N (sequences) and ``T`` the context."""

    name: str
    B: int
    HQ: int
    H: int
    T: int
    K: int
    V: int
    M: int
    W: int
    device: str  # "cuda" or "cpu"
    dtype: str   # the SPEC's dtype for this shape
    decode: bool = False

    def describe(self) -> str:
        lead = f"N={self.B}" if self.decode else f"B={self.B}"
        ctx = "context " if self.decode else ""
        return (f"{lead} HQ/H={self.HQ}/{self.H} T={ctx}{self.T} K={self.K} V={self.V} "
                f"M={self.M} W={self.W} {self.dtype}")


def _shape(name, B, HQ, H, T, KV, W, device, dtype, M=64, decode=False):
    return Shape(name, B, HQ, H, T, KV, KV, M, W, device, dtype, decode)


# SPEC section 6, verbatim, plus small shapes that keep CPU runs and smoke tests short.
SHAPES = {
    s.name: s
    for s in (
        _shape("gpu-a", 8, 16, 16, 4096, 64, 512, "cuda", "bfloat16"),
        _shape("gpu-a64", 8, 16, 16, 4096, 64, 64, "cuda", "bfloat16"),
        _shape("gpu-b", 1, 16, 16, 32768, 64, 2048, "cuda", "bfloat16"),
        _shape("gpu-c", 1, 16, 16, 16384, 128, 512, "cuda", "bfloat16"),
        _shape("decode", 64, 32, 8, 32768, 128, 2048, "cuda", "bfloat16", decode=True),
        _shape("cpu-a", 1, 8, 8, 4096, 64, 512, "cpu", "float32"),
        _shape("cpu-b", 1, 8, 8, 16384, 64, 512, "cpu", "float32"),
        # not in the SPEC: quick checks (GQA on purpose, odd sizes where cheap)
        _shape("gpu-s", 2, 8, 4, 1024, 64, 128, "cuda", "bfloat16"),
        _shape("cpu-xs", 1, 4, 2, 256, 32, 64, "cpu", "float32", M=16),
        _shape("decode-cpu", 4, 8, 4, 4096, 64, 512, "cpu", "float32", decode=True),
    )
}
GPU_SHAPES = ("gpu-a", "gpu-a64", "gpu-b", "gpu-c")
GPU_DECODE_SHAPES = ("decode",)
CPU_SHAPES = ("cpu-xs", "cpu-a", "cpu-b")
CPU_DECODE_SHAPES = ("decode-cpu",)
GPU_DTYPES = ("bfloat16",)
CPU_DTYPES = ("float32",)
GPU_BACKENDS = ("triton", "cupy")

GATE_DIVISOR = 16.0  # g = logsigmoid(x) / 16: per-token decays near 0.96, as trained GSA/NHA gates


# ----------------------------------------------------------------------------------------------
# skip rules: asv skips a parameter combination when setup raises NotImplementedError


def nha_or_skip():
    """The nha_core module with the public API, or NotImplementedError saying what is missing."""
    try:
        import nha_core
    except Exception as error:  # pragma: no cover - broken install
        raise NotImplementedError(f"import nha_core failed: {type(error).__name__}: {error}")
    for name in ("attention", "backends"):
        if not hasattr(nha_core, name):
            raise NotImplementedError(f"nha_core.{name} does not exist in this commit")
    return nha_core


def require_backend(name: str):
    """Skip unless backend ``name`` is registered and usable here; the registry's reason is the message."""
    nha_core = nha_or_skip()
    info = nha_core.backends().get(name)
    if info is None:
        raise NotImplementedError(f"nha_core backend {name!r} is not registered")
    if not info.get("usable", False):
        raise NotImplementedError(f"nha_core backend {name!r} unusable: {info.get('reason')}")
    return nha_core


def torch_or_skip():
    try:
        import torch
    except Exception as error:
        raise NotImplementedError(f"torch is not importable: {type(error).__name__}: {error}")
    return torch


def cuda_or_skip():
    torch = torch_or_skip()
    if not torch.cuda.is_available():
        raise NotImplementedError("no CUDA device")
    return torch


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


# ----------------------------------------------------------------------------------------------
# inputs


def gate_from_logits(x, lib):
    """g = logsigmoid(x) / 16 (g <= 0), computed stably for NumPy or torch arrays."""
    if lib == "numpy":
        import numpy as np

        return -np.logaddexp(0.0, -x) / GATE_DIVISOR
    import torch.nn.functional as F

    return F.logsigmoid(x) / GATE_DIVISOR


def derived_s(g):
    """s = 1 - exp(g), the SPEC default, as -expm1(g) (exact for small |g|)."""
    import numpy as np

    if isinstance(g, np.ndarray):
        return -np.expm1(g)
    return -g.expm1()


def make_inputs(shape: Shape, *, lib: str, dtype: str | None = None, seed: int = 0,
                tokens: int | None = None, device: str | None = None) -> dict:
    """Random q [B,T,HQ,K], k [B,T,H,K], v [B,T,H,V], g [B,T,H,M] (and s = 1 - exp(g)).

    ``lib`` is "numpy" or "torch"; torch arrays go to ``device`` (default: the shape's). ``tokens``
    overrides T (decode prefills use it). g is logsigmoid(randn)/16, computed in float32 and then
    cast, so every dtype sees the same gates.
    """
    dtype = dtype or shape.dtype
    T = shape.T if tokens is None else tokens
    B, HQ, H, K, V, M = shape.B, shape.HQ, shape.H, shape.K, shape.V, shape.M
    dims = {"q": (B, T, HQ, K), "k": (B, T, H, K), "v": (B, T, H, V), "x": (B, T, H, M)}
    if lib == "numpy":
        import numpy as np

        rng = np.random.default_rng(seed)
        out = {n: rng.standard_normal(d, dtype=np.float32) for n, d in dims.items()}
        out["g"] = gate_from_logits(out.pop("x"), "numpy")
        out["s"] = derived_s(out["g"])
        return {n: a.astype(dtype) for n, a in out.items()}
    import torch

    device = device or shape.device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {n: torch.randn(d, generator=gen, device=device, dtype=torch.float32) for n, d in dims.items()}
    out["g"] = gate_from_logits(out.pop("x"), "torch")
    out["s"] = derived_s(out["g"])
    return {n: a.to(torch_dtype(dtype)).contiguous() for n, a in out.items()}


# ----------------------------------------------------------------------------------------------
# timers


def cuda_sync():
    import torch

    torch.cuda.synchronize()


def gpu_time_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median device time of ``fn()`` in ms: triton.testing.do_bench when present, else CUDA events.

    do_bench flushes L2 between calls and budgets its warmup and repetitions by time, so a slow
    first (compile/autotune) call must be made before calling this.
    """
    try:
        from triton.testing import do_bench
    except Exception:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    one = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(warmup_ms / one))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / one))):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(statistics.median(times))


def cpu_time_s(fn, *, repeat: int = 3, min_time: float = 0.0, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < repeat or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def gpu_peak_bytes(fn) -> int:
    """Device memory ``fn()`` allocates at its peak, above what was allocated before the call."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def gpu_copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = gpu_time_ms(lambda: dst.copy_(src), warmup_ms=10, rep_ms=50)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def decode_bytes(shape: Shape, itemsize: int = 2) -> int:
    """Bytes one NHA decode step must touch: read+write fp32 slots, read the window cache once.

    hk [N,H,K,M] and hv [N,H,M,V] in fp32 (read and written); the window's keys and values
    [N,W,H,K+V] in the input dtype (read). The gates of the window are not needed (only the
    evicted row's), and q, o, the new token and the evicted row are negligible.
    """
    N, H, K, V, M, W = shape.B, shape.H, shape.K, shape.V, shape.M, shape.W
    slots = N * H * (K * M + M * V) * 4 * 2
    window = N * W * H * (K + V) * itemsize
    return slots + window


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() not in ("", "0", "false", "no")


def ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(b) and b > 0 else float("nan")
