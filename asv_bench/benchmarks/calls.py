"""Ready-to-time calls: one zero-argument function per (shape, implementation, mode).

``make_call(shape, impl, mode)`` builds the inputs, makes the first (compiling / autotuning) call,
synchronises, and returns a function that runs the operation once more. It raises
NotImplementedError, with the reason, when the implementation cannot run here; asv turns that
into a skip and compare.py into a "missing" row.

impl: ``nha_numpy``, ``nha_triton``, ``nha_cupy`` (nha_core backends) and the peers
``sdpa_causal``, ``flex_window``, ``fla_chunk_gsa``, ``composition``, ``per_token_loop``
(CPU forward only) and, for decode, ``sdpa_kvcache``.
mode: ``forward``, ``forward_backward`` or ``decode``.
"""
from __future__ import annotations

import os

from . import common, peers
from .common import Shape

NHA_IMPLS = ("nha_numpy", "nha_triton", "nha_cupy")
GPU_PEERS = ("flex_window", "sdpa_causal", "fla_chunk_gsa", "composition")
CPU_PEERS = ("sdpa_causal", "per_token_loop")
DECODE_PEERS = ("sdpa_kvcache",)
DECODE_PREFILL_EXTRA = 16  # decode starts after W + 16 tokens: the window is full, slots in use


class Call:
    """A prepared operation: ``run()`` does it once; ``sync()`` waits for the device."""

    def __init__(self, run, *, device: str, keep=None, info: dict | None = None):
        self.run = run
        self.device = device
        self.keep = keep  # inputs the closure needs alive
        self.info = info or {}

    def sync(self):
        if self.device == "cuda":
            common.cuda_sync()

    def __call__(self):
        self.run()


def _check_device(shape: Shape):
    if shape.device == "cuda":
        return common.cuda_or_skip()
    return None


def _nha_backend(impl: str) -> str:
    return impl.split("_", 1)[1]


def _nha_torch_attention(nha_core, backend):
    """nha_core.torch.attention with ``backend`` pinned (keyword if accepted, else env var)."""
    try:
        import nha_core.torch as nha_torch
    except Exception as error:
        raise NotImplementedError(f"nha_core.torch adapter not importable: {type(error).__name__}: {error}")

    def attention(*args, **kwargs):
        try:
            return nha_torch.attention(*args, backend=backend, **kwargs)
        except TypeError as error:
            if "backend" not in str(error):
                raise
            os.environ["NHA_CORE_BACKEND"] = backend
            return nha_torch.attention(*args, **kwargs)

    return attention


def make_call(shape: Shape, impl: str, mode: str, *, dtype: str | None = None, seed: int = 0) -> Call:
    dtype = dtype or shape.dtype
    if mode == "decode":
        if not shape.decode:
            raise NotImplementedError(f"shape {shape.name} is not a decode shape")
        call = _decode_call(shape, impl, dtype, seed)
    else:
        if shape.decode:
            raise NotImplementedError(f"shape {shape.name} is a decode shape")
        if impl.startswith("nha_"):
            call = _nha_call(shape, impl, mode, dtype, seed)
        else:
            call = _peer_call(shape, impl, mode, dtype, seed)
    call.run()  # first call: compile / autotune / allocate
    call.sync()
    return call


# ----------------------------------------------------------------------------------------------
# nha_core


def _nha_call(shape, impl, mode, dtype, seed):
    backend = _nha_backend(impl)
    nha_core = common.require_backend(backend)
    _check_device(shape)
    W = shape.W
    # CPU shapes take NumPy arrays; CUDA shapes take torch tensors for every CUDA backend (the
    # API hands them to CuPy through DLPack, as a torch user of the cupy backend would).
    if shape.device == "cpu":
        x = common.make_inputs(shape, lib="numpy", dtype=dtype, seed=seed)
    else:
        x = common.make_inputs(shape, lib="torch", dtype=dtype, seed=seed)
    q, k, v, g = x["q"], x["k"], x["v"], x["g"]

    if mode == "forward":
        def run():
            return nha_core.attention(q, k, v, g, window_size=W, backend=backend)
        return Call(run, device=shape.device, keep=x)

    if mode != "forward_backward":
        raise ValueError(mode)
    if shape.device == "cpu":
        # no autograd on NumPy: the explicit backward entry point, as a NumPy user calls it
        if not hasattr(nha_core, "attention_backward"):
            raise NotImplementedError("nha_core.attention_backward does not exist in this commit")
        import numpy as np

        do = np.random.default_rng(seed + 1).standard_normal((shape.B, shape.T, shape.HQ, shape.V)).astype(dtype)

        def run():
            o, lse, _ = nha_core.attention(q, k, v, g, window_size=W, return_lse=True, backend=backend)
            return nha_core.attention_backward(do, q, k, v, g, o, lse, window_size=W, backend=backend)
        return Call(run, device=shape.device, keep=x)

    import torch

    attention = _nha_torch_attention(nha_core, backend)
    leaves = [a.detach().requires_grad_(True) for a in (q, k, v, g)]
    do = torch.randn(shape.B, shape.T, shape.HQ, shape.V, device=q.device, dtype=q.dtype)

    def run():
        o = attention(*leaves, window_size=W)
        return torch.autograd.grad(o, leaves, do)
    return Call(run, device=shape.device, keep=(leaves, do))


# ----------------------------------------------------------------------------------------------
# peers


def _peer_call(shape, impl, mode, dtype, seed):
    W = shape.W
    if impl == "per_token_loop":
        if shape.device != "cpu" or mode != "forward":
            raise NotImplementedError("per_token_loop is the CPU forward peer only")
        x = common.make_inputs(shape, lib="numpy", dtype=dtype, seed=seed)
        return Call(lambda: peers.per_token_loop(x["q"], x["k"], x["v"], x["g"], W, s=x["s"]),
                    device="cpu", keep=x)

    torch = common.torch_or_skip()
    _check_device(shape)
    if shape.device == "cpu" and impl != "sdpa_causal":
        raise NotImplementedError(f"{impl} is a GPU peer")
    if impl in ("fla_chunk_gsa", "composition"):
        why = peers.fla_available()
        if why:
            raise NotImplementedError(why)
    x = common.make_inputs(shape, lib="torch", dtype=dtype, seed=seed)
    grad = mode == "forward_backward"

    if impl in ("sdpa_causal", "flex_window"):
        # each peer gets its own preferred layout, made outside the timed region
        names = ("q", "k", "v")
        x = {n: x[n].transpose(1, 2).contiguous() for n in names}
    elif impl == "fla_chunk_gsa":
        names = ("q", "k", "v", "s", "g")
    elif impl == "composition":
        names = ("q", "k", "v", "g")  # s = 1 - exp(g) inside, so g gets both gradients as in NHA
    else:
        raise NotImplementedError(f"unknown peer {impl!r}")
    leaves = [x[n].detach().requires_grad_(grad) for n in names]

    if impl == "sdpa_causal":
        def forward(q, k, v):
            return peers.sdpa_causal(q, k, v)
    elif impl == "flex_window":
        def forward(q, k, v):
            return peers.flex_window(q, k, v, W)
    elif impl == "fla_chunk_gsa":
        def forward(q, k, v, s, g):
            return peers.fla_chunk_gsa(q, k, v, s, g)
    else:
        def forward(q, k, v, g):
            return peers.composition(q, k, v, g, common.derived_s(g), W)

    if not grad:
        def run():
            with torch.no_grad():
                return forward(*leaves)
        return Call(run, device=shape.device, keep=leaves)

    with torch.no_grad():
        do = torch.randn_like(forward(*leaves))

    def run():
        return torch.autograd.grad(forward(*leaves), leaves, do)
    return Call(run, device=shape.device, keep=(leaves, do))


# ----------------------------------------------------------------------------------------------
# decode


def _decode_call(shape, impl, dtype, seed):
    N, HQ, H, K, V = shape.B, shape.HQ, shape.H, shape.K, shape.V
    if impl == "sdpa_kvcache":
        torch = common.torch_or_skip()
        _check_device(shape)
        gen = torch.Generator(device=shape.device).manual_seed(seed)
        td = common.torch_dtype(dtype)
        q = torch.randn(N, HQ, 1, K, generator=gen, device=shape.device, dtype=td)
        kc = torch.randn(N, H, shape.T, K, generator=gen, device=shape.device, dtype=td)
        vc = torch.randn(N, H, shape.T, V, generator=gen, device=shape.device, dtype=td)

        def run():
            with torch.no_grad():
                return peers.sdpa_kvcache_decode(q, kc, vc)
        return _graphed(Call(run, device=shape.device, keep=(q, kc, vc)))

    if not impl.startswith("nha_"):
        raise NotImplementedError(f"{impl} has no decode")
    backend = _nha_backend(impl)
    nha_core = common.require_backend(backend)
    if not hasattr(nha_core, "decode_step"):
        raise NotImplementedError("nha_core.decode_step does not exist in this commit")
    _check_device(shape)
    # The state's size and a step's work do not grow with context once the window is full, so a
    # prefill of W + 16 tokens stands for the SPEC's 32768-token context.
    tokens = shape.W + DECODE_PREFILL_EXTRA
    lib = "numpy" if shape.device == "cpu" else "torch"
    x = common.make_inputs(shape, lib=lib, dtype=dtype, seed=seed, tokens=tokens + 1)
    pre = {n: a[:, :tokens] for n, a in x.items()}
    step = {n: a[:, tokens] for n, a in x.items()}                  # [N,heads,dim]
    _, _, state = nha_core.attention(pre["q"], pre["k"], pre["v"], pre["g"], window_size=shape.W,
                                     output_final_state=True, backend=backend)
    box = {"state": state}

    def run():
        try:
            o, box["state"] = nha_core.decode_step(step["q"], step["k"], step["v"], step["g"], box["state"],
                                                   backend=backend, in_place=True)
        except TypeError as error:
            if "in_place" not in str(error):
                raise
            o, box["state"] = nha_core.decode_step(step["q"], step["k"], step["v"], step["g"], box["state"],
                                                   backend=backend)
        return o
    return _graphed(Call(run, device=shape.device, keep=(x, box), info={"bytes": common.decode_bytes(shape)}))


def _graphed(call: Call) -> Call:
    """A decode step is a few microseconds of kernels behind tens of microseconds of Python, so
    serving stacks replay it from a CUDA graph; time it that way when it can be captured. The
    eager call stays in ``info["eager_run"]`` (measure.py times both) and ``info["timing"]``
    says which one ``run`` is. CPU calls and steps that cannot be captured (e.g. CuPy kernels
    launched on CuPy's own stream) stay eager, with the reason."""
    if call.device != "cuda":
        call.info["timing"] = "eager"
        return call
    import torch

    eager = call.run
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # compile and allocate outside the capture
                eager()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as error:
        torch.cuda.synchronize()
        call.info["timing"] = f"eager (CUDA graph capture failed: {type(error).__name__}: {str(error)[:120]})"
        return call
    call.info.update(timing="cuda graph", eager_run=eager, graph=graph)
    call.run = graph.replay
    return call
