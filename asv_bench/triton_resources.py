"""Registers, spills and shared memory of every Triton kernel, compiled for a GPU we do not have.

    python3 asv_bench/triton_resources.py [--shape gpu-a | --shape B,HQ,H,T,K,V,M,W] [--dtype bfloat16,float32] [--arch 90]
                                          [--kernel bwd_slot,bwd_q] [--set NAME=VALUE ...] [--dump DIR]

Runs the real host code of ``forward``, ``backward`` and ``decode`` (backends/triton) on
``meta`` tensors (no memory, no device), intercepts every kernel launch, and compiles that
launch for ``GPUTarget("cuda", arch, 32)`` (default sm_90 = H100/H200) with the same
constexprs, pointer-alignment specialisation, ``num_warps`` and ``num_stages`` a CUDA launch
would get. Prints one row per distinct kernel variant: registers per thread, spill bytes
(``n_spills``: bytes of local-memory stores ptxas reported), dynamic shared memory, warps and
stages. No GPU and no CUDA driver are needed, only the ptxas that ships with Triton.

``--set configs.NAME=VALUE`` overrides a knob of backends/triton/configs.py before the host
code runs (``--set BWD_BF16_X1=True``; values are Python literals), so two variants of a kernel
can be compared offline. Registers and spills are what ptxas decides; they predict, not
measure: a variant that removes spills usually runs faster, but only the GPU can tell by how
much. Relies on Triton internals (``create_function_from_signature``, ``_pack_args``) that
exist in Triton 3.4-3.9.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.6's default; silences 3.9's warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as _jit  # noqa: E402

# Triton ships cuobjdump next to ptxas
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
if not os.path.exists(CUOBJDUMP):
    CUOBJDUMP = shutil.which("cuobjdump") or CUOBJDUMP

SHAPES = {  # name: B, HQ, H, T, K, V, M, W  (SPEC §6)
    "gpu-a": (8, 16, 16, 4096, 64, 64, 64, 512), "gpu-a64": (8, 16, 16, 4096, 64, 64, 64, 64),
    "gpu-b": (1, 16, 16, 32768, 64, 64, 64, 2048), "gpu-c": (1, 16, 16, 16384, 128, 128, 64, 512),
    "decode": (64, 32, 8, 32768, 128, 128, 64, 2048),
}


def shape_dims(text: str) -> tuple:
    """A SHAPES name, or eight comma-separated integers B,HQ,H,T,K,V,M,W (e.g. a test case's)."""
    if text in SHAPES:
        return SHAPES[text]
    dims = tuple(int(x) for x in text.split(","))
    if len(dims) != 8:
        raise ValueError(f"--shape {text!r}: a name of {sorted(SHAPES)} or B,HQ,H,T,K,V,M,W")
    return dims


class Capture:
    """Replaces JITFunction.run: compiles each launch for ``target`` instead of running it."""

    def __init__(self, target, only=(), dump=None):
        self.target = target
        self.only = only
        self.dump = dump
        self.backend = make_backend(target)
        self.rows = {}

    def run(self, fn, *args, grid, warmup, **kwargs):
        binder = _jit.create_function_from_signature(fn.signature, fn.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound_args, specialization,
                                                              options)
        src = ASTSource(fn, signature, constexprs, attrs)
        if self.only and not any(name in fn.__name__ for name in self.only):
            return None
        key = (fn.__name__, str(sorted(constexprs.items())), options.num_warps, options.num_stages, options.maxnreg)
        if key not in self.rows:
            k = triton.compile(src, target=self.target, options=options.__dict__)
            md = k.metadata
            flags = {fn.arg_names[i[0]]: v for i, v in constexprs.items()
                     if isinstance(v, (bool, str)) and fn.arg_names[i[0]].isupper() and len(i) == 1}
            res = resource_usage(k.asm["cubin"])
            ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
            if self.dump:   # the lowered kernel, to read what the compiler made of it
                stem = os.path.join(self.dump, f"{fn.__name__}-{len(self.rows)}")
                for ext, text in (("ttgir", ttgir), ("ptx", ptx), ("sass", sass(k.asm["cubin"]))):
                    with open(f"{stem}.{ext}", "w") as f:
                        f.write(text)
            # layout conversions between the dots' and the elementwise layouts (each a trip
            # through shared memory or shuffles): what a chain of dependent small dots costs
            cvt = ttgir.count("ttg.convert_layout") + ttgir.count("triton_gpu.convert_layout")
            self.rows[key] = dict(kernel=fn.__name__, regs=res["REG"], spills=res["STACK"], smem=md.shared,
                                  mma=f"{ptx.count('wgmma.mma_async')}/{ptx.count('mma.sync')}", cvt=cvt,
                                  warps=md.num_warps, stages=md.num_stages, grid=grid,
                                  flags=" ".join(f"{n}={v}" for n, v in flags.items()
                                                 if n in ("LOWP", "HAS_SLOTS", "HAS_S", "DOT", "SPLIT")))
        return None


def cuobjdump(cubin: bytes, flag: str) -> str:
    """cuobjdump's ``flag`` report of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([CUOBJDUMP, flag, f.name], capture_output=True, text=True, check=True).stdout


def sass(cubin: bytes) -> str:
    return cuobjdump(cubin, "-sass")


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK (bytes of per-thread local memory: the spills), SHARED ... from cuobjdump."""
    text = cuobjdump(cubin, "--dump-resource-usage")
    return {k: int(v) for k, v in re.findall(r"\b([A-Z]+):(\d+)", text.split("Function", 1)[1])}


def run_host(dims, dtype):
    """Call the Triton host functions at ``dims`` (shape_dims) on meta tensors (launches are intercepted)."""
    from nha_core.problem import Problem
    from nha_core.state import NHAState
    from nha_core.backends.triton import backward as bwd
    from nha_core.backends.triton import decode as dec
    from nha_core.backends.triton import forward as fwd

    B, HQ, H, T, K, V, M, W = dims
    dt = getattr(torch, dtype)
    dev = "meta"
    t = lambda *s, d=dt: torch.empty(*s, dtype=d, device=dev)  # noqa: E731
    base = Problem(mode="forward", B=B, T=T, HQ=HQ, H=H, K=K, V=V, M=M, W=W, N=B, dtype=dtype,
                   device="cuda:0", array_kind="torch", scale=K ** -0.5)
    mk = lambda mode, **kw: dataclasses.replace(base, mode=mode, **kw)  # noqa: E731
    q, k, v, g = t(B, T, HQ, K), t(B, T, H, K), t(B, T, H, V), t(B, T, H, M)
    o, lse = t(B, T, HQ, V), t(B, HQ, T, d=torch.float32)
    fwd.forward(mk("forward"), q, k, v, g, None, None, None, None, None, None)
    bwd.backward(mk("backward"), o, q, k, v, g, None, None, None, o, lse, None, None, None)
    bwd.backward(mk("backward", has_s=True), o, q, k, v, g, g, None, None, o, lse, None, None, None)
    N = B
    f32 = lambda *s: t(*s, d=torch.float32)  # noqa: E731
    state = NHAState(hk=f32(N, H, K, M), hv=f32(N, H, M, V), k_cache=t(N, W, H, K), v_cache=t(N, W, H, V),
                     g_cache=t(N, W, H, M), seen=torch.empty(N, dtype=torch.int64, device=dev), window_size=W)
    dec.decode(mk("decode", B=N, T=1), q[:, 0], k[:, 0], v[:, 0], g[:, 0], None, None, None, state)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpu-a", help=f"one of {sorted(SHAPES)} or B,HQ,H,T,K,V,M,W")
    ap.add_argument("--dtype", default="bfloat16,float32")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--kernel", default="", help="comma-separated substrings: compile only these kernels")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override backends/triton/configs.NAME (a Python literal)")
    ap.add_argument("--dump", metavar="DIR", help="write each compiled kernel's TTGIR and PTX there")
    args = ap.parse_args(argv)
    try:
        dims = shape_dims(args.shape)
    except ValueError as error:
        ap.error(str(error))
    from nha_core.backends.triton import configs

    try:
        configs.override(";".join(item.removeprefix("configs.") for item in args.set))
    except ValueError as error:
        ap.error(f"--set: {error}")
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    cap = Capture(GPUTarget("cuda", args.arch, 32), tuple(x for x in args.kernel.split(",") if x), args.dump)
    orig = _jit.JITFunction.run
    _jit.JITFunction.run = lambda fn, *a, **kw: cap.run(fn, *a, **kw)
    try:
        print(f"# triton {triton.__version__}, sm_{args.arch}, shape {args.shape} {dims} "
              f"(B, HQ, H, T, K, V, M, W); overrides: {args.set or 'none'}")
        print(f"{'dtype':9} {'kernel':22} {'regs':>5} {'spill B':>8} {'smem B':>7} {'warps':>5} {'stages':>6} {'wgmma/mma':>9} {'cvt':>4}  flags")
        for dtype in args.dtype.split(","):
            cap.rows = {}
            run_host(dims, dtype)
            for r in cap.rows.values():
                print(f"{dtype:9} {r['kernel']:22} {r['regs']:5d} {r['spills']:8d} {r['smem']:7d} {r['warps']:5d} "
                      f"{r['stages']:6d} {r['mma']:>9} {r['cvt']:4d}  {r['flags']}", flush=True)
    finally:
        _jit.JITFunction.run = orig


if __name__ == "__main__":
    main()
