"""The API's side of the cupy backend's bfloat16 convention, on the CPU (no CuPy, no GPU).

CuPy has no bfloat16 dtype before v14, so nha_core keeps bfloat16 data on the cupy side as its
uint16 bits (``interop.BF16_BITS``) and views it back as bfloat16 for the caller. Two bugs seen on
an H200 (torch 2.11, cupy-cuda13x 14.2) came from the API layer breaking that convention:

* ``attention(..., output_final_state=True, backend="cupy")`` on torch bfloat16 raised
  ``AttributeError: module 'cupy' has no attribute 'bfloat16'`` (``NativeOps.zeros`` building
  the final state's ring buffer);
* ``nha_core.torch.attention(..., backend="cupy")`` returned a ``torch.uint16`` output (the
  backend's bfloat16 bits went back through DLPack unviewed), so autograd gave it no grad_fn.

Here ``cupy`` is a NumPy-backed stand-in module and ``FakeCupy`` a backend with the real cupy
backend's array contract (bfloat16 in and out as uint16 bits, float32 states, derives_s) that
runs the NumPy kernels in float32. The same calls on the real GPU backend are in
tests/test_cupy_gpu.py.
"""
from __future__ import annotations

import dataclasses
import sys
import types

import numpy as np
import pytest

import nha_core
from nha_core import interop, reference, registry

from .cases import rel_err

torch = pytest.importorskip("torch")

TOL = 2e-2  # SPEC section 5, float16 / bfloat16
B, T, HQ, H, K, V, M, W = 2, 21, 4, 2, 8, 8, 4, 6


def _numpy_cupy():
    """A ``cupy`` module that is NumPy: host arrays, the same spellings."""
    mod = types.ModuleType("cupy")
    mod.__getattr__ = lambda name: getattr(np, name)
    mod.from_dlpack = np.from_dlpack
    return mod


def _up(a, dtype):
    """A native input of the fake backend -> float32 values (bfloat16 must come as uint16 bits)."""
    if a is None:
        return None
    if dtype == "bfloat16":
        assert a.dtype == np.uint16, f"bfloat16 reached the cupy backend as {a.dtype}, not uint16 bits"
        return interop.bf16_bits_to_float32(a)
    assert a.dtype == np.dtype(dtype), (a.dtype, dtype)
    return a.astype(np.float32)


def _down(a, dtype):
    """float32 result -> what the cupy backend returns: bfloat16 as uint16 bits (configs.ARRAY_DTYPE)."""
    if a is None:
        return None
    return interop.float32_to_bf16_bits(a) if dtype == "bfloat16" else a.astype(dtype)


class FakeCupy(nha_core.Backend):
    """backends/cupy's array contract on the CPU; kernels: the NumPy backend in float32."""

    name, priority, devices, dtypes, array_kind = "fake_cupy", 90, ("cpu",), ("float16", "bfloat16"), "cupy"
    auto_devices = ()
    derives_s = True

    @property
    def _numpy(self):
        return registry.get("numpy")

    def forward(self, p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu_seqlens):
        up = lambda a: _up(a, p.dtype)  # noqa: E731
        o, lse, hk, hv = self._numpy.forward(dataclasses.replace(p, dtype="float32"), up(q), up(k), up(v), up(g),
                                             up(s), up(q_slot), up(k_slot), hk0, hv0, cu_seqlens)
        return _down(o, p.dtype), lse, hk, hv

    def backward(self, p, do, q, k, v, g, s, q_slot, k_slot, o, lse, hk0, hv0, cu_seqlens):
        up = lambda a: _up(a, p.dtype)  # noqa: E731
        grads = self._numpy.backward(dataclasses.replace(p, dtype="float32"), up(do), up(q), up(k), up(v), up(g),
                                     up(s), up(q_slot), up(k_slot), up(o), lse, hk0, hv0, cu_seqlens)
        return tuple(_down(a, p.dtype) for a in grads[:7]) + tuple(grads[7:])

    def decode(self, p, q, k, v, g, s, q_slot, k_slot, state):
        up = lambda a: _up(a, p.dtype)  # noqa: E731
        caches = {n: a for n, a in state.arrays().items() if n.endswith("_cache")}
        wide = state.replace(**{n: up(a) for n, a in caches.items()})  # hk, hv, seen shared: updated in place
        o, lse = self._numpy.decode(dataclasses.replace(p, dtype="float32"), up(q), up(k), up(v), up(g), up(s),
                                    up(q_slot), up(k_slot), wide)
        for n, a in caches.items():
            a[...] = _down(getattr(wide, n), p.dtype)
        return _down(o, p.dtype), lse


@pytest.fixture
def fake_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _numpy_cupy())
    monkeypatch.setattr(registry, "_registry", dict(registry.all_backends()))
    nha_core.register(FakeCupy())
    return "fake_cupy"


def _inputs(dtype, seed=0):
    """fp64 inputs rounded to ``dtype`` (the oracle runs on the rounded values) and the torch tensors."""
    rng = np.random.default_rng(seed)
    x = {"q": rng.standard_normal((B, T, HQ, K)), "k": rng.standard_normal((B, T, H, K)),
         "v": rng.standard_normal((B, T, H, V)), "g": -rng.uniform(0.02, 1.5, (B, T, H, M))}
    dev = {n: torch.from_numpy(a).to(getattr(torch, dtype)) for n, a in x.items()}
    return {n: a.double().numpy() for n, a in dev.items()}, dev


def _host(a):
    assert a.dtype in (torch.float16, torch.bfloat16, torch.float32), a.dtype
    return a.detach().double().numpy()


def test_bf16_bits_round_to_nearest_even_like_torch():
    x = np.concatenate([np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 1e3,
                        np.float32([0.0, -0.0, 1.0, np.inf, -np.inf, 3.3895314e38, 1e-40])])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    bits = interop.float32_to_bf16_bits(x)
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits, want)
    np.testing.assert_array_equal(interop.bf16_bits_to_float32(bits),
                                  torch.from_numpy(want.view(np.int16)).view(torch.bfloat16).float().numpy())


def test_native_ops_keep_cupy_bf16_as_bits(fake_cupy):
    """The ops _final_state / _Layout / backward use: no cupy.bfloat16, results stay uint16 bits."""
    ops = interop.NativeOps("cupy", "cpu")
    z = ops.zeros((1, 2), "bfloat16")
    assert z.dtype == np.uint16 and not z.any()
    a = interop.float32_to_bf16_bits(np.float32([[1.5, -2.0], [0.25, 3.0]]))
    assert ops.cat([z, a], 0).dtype == np.uint16
    assert ops.take(ops.cat([z, a], 0), np.array([2, 0]), 0).dtype == np.uint16
    np.testing.assert_array_equal(ops.widen(ops.add(a, a)), [[3.0, -4.0], [0.5, 6.0]])
    np.testing.assert_array_equal(ops.widen(ops.from_host(np.ones((1, 2)), like=a)), [[1.0, 1.0]])
    assert ops.full((1,), np.inf, "float32").dtype == np.float32


def test_torch_bf16_crosses_to_cupy_bits_and_back(fake_cupy):
    t = torch.randn(3, 4, dtype=torch.bfloat16)
    c = interop.to_native(t, "cupy", "torch")
    assert c.dtype == np.uint16
    back = interop.to_caller(c, "torch", "cupy")
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)
    assert interop.to_caller(np.zeros(2, np.int64), "torch", "cupy").dtype == torch.int64


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_prefill_state_then_decode_in_place(fake_cupy, dtype):
    """The asv decode call: attention(output_final_state=True) then decode_step(in_place=True)."""
    x, dev = _inputs(dtype)
    o, _, state = nha_core.attention(dev["q"], dev["k"], dev["v"], dev["g"], window_size=W,
                                     output_final_state=True, backend=fake_cupy)
    o_r, _, hk_r, hv_r = reference.forward(x["q"], x["k"], x["v"], x["g"], window_size=W)
    assert o.dtype == dev["q"].dtype and rel_err(_host(o), o_r) <= TOL
    for f in ("k_cache", "v_cache", "g_cache"):
        assert getattr(state, f).dtype == dev["q"].dtype, f
    assert state.hk.dtype == torch.float32 and rel_err(state.hk.numpy(), hk_r) <= TOL
    st = reference.state_from_prefill(x["k"], x["v"], x["g"], hk_r, hv_r, window_size=W)
    for f in ("k_cache", "v_cache", "g_cache"):
        np.testing.assert_array_equal(_host(getattr(state, f)), st[f])

    rng = np.random.default_rng(5)
    for step in range(3):
        t = {"q": rng.standard_normal((B, HQ, K)), "k": rng.standard_normal((B, H, K)),
             "v": rng.standard_normal((B, H, V)), "g": -rng.uniform(0.02, 1.5, (B, H, M))}
        t_dev = {n: torch.from_numpy(a).to(getattr(torch, dtype)) for n, a in t.items()}
        t = {n: a.double().numpy() for n, a in t_dev.items()}
        o_t, new = nha_core.decode_step(t_dev["q"], t_dev["k"], t_dev["v"], t_dev["g"], state, backend=fake_cupy,
                                        in_place=True)
        o_r, _, st = reference.decode_step(t["q"], t["k"], t["v"], t["g"], st)
        assert o_t.dtype == dev["q"].dtype and rel_err(_host(o_t), o_r) <= TOL, f"step {step}"
        assert new.k_cache.dtype == dev["q"].dtype
        assert new.k_cache.data_ptr() == state.k_cache.data_ptr()  # in place: the caller's arrays
        np.testing.assert_array_equal(_host(state.v_cache), st["v_cache"])
        assert rel_err(state.hv.numpy(), st["hv"]) <= TOL and (state.seen.numpy() == st["seen"]).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_adapter_forward_backward(fake_cupy, dtype):
    """The asv forward_backward call: nha_core.torch.attention on leaves, then torch.autograd.grad."""
    import nha_core.torch as nt

    x, dev = _inputs(dtype)
    leaves = [dev[n].clone().requires_grad_(True) for n in ("q", "k", "v", "g")]
    o = nt.attention(*leaves, window_size=W, backend=fake_cupy)
    assert o.dtype == leaves[0].dtype and o.grad_fn is not None
    do = torch.from_numpy(np.random.default_rng(1).standard_normal((B, T, HQ, V))).to(o.dtype)
    grads = torch.autograd.grad(o, leaves, do)
    ref = reference.backward(do.double().numpy(), x["q"], x["k"], x["v"], x["g"], window_size=W)
    assert rel_err(_host(o), reference.forward(x["q"], x["k"], x["v"], x["g"], window_size=W)[0]) <= TOL
    for name, grad in zip(("dq", "dk", "dv", "dg"), grads):
        assert grad.dtype == leaves[0].dtype, name
        assert rel_err(_host(grad), ref[name]) <= TOL, name


def test_cupy_caller_init_state_bf16_needs_a_bf16_cupy(fake_cupy, monkeypatch):
    """init_state(like=<cupy array>, dtype="bfloat16"): a clear error where CuPy has no bfloat16."""
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes fails
    like = sys.modules["cupy"].zeros(1, "float32")
    monkeypatch.setattr(interop, "array_kind", lambda x, name: "cupy")
    monkeypatch.setattr(interop, "device_of", lambda x, kind: "cuda:0")
    with pytest.raises(TypeError, match="bfloat16"):
        nha_core.init_state(1, 1, 4, 4, 2, window_size=3, dtype="bfloat16", like=like)


class _Recorder:
    """A context manager that logs its entry and exit under ``name`` into ``log``."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def __enter__(self):
        self.log.append(("enter", self.name))
        return self

    def __exit__(self, *exc):
        self.log.append(("exit", self.name))


def test_caller_stream_makes_the_callers_stream_current(monkeypatch):
    """interop.caller_stream: a torch caller's current stream becomes CuPy's (and its device),
    a CuPy caller's becomes torch's; same framework or CPU: nothing entered. Fake cupy and
    torch.cuda here (no GPU); tests/test_cupy_gpu.py checks the streams the kernels really see."""
    log = []
    cuda = types.SimpleNamespace(
        Device=lambda i: _Recorder(log, f"cupy.Device({i})"),
        ExternalStream=lambda ptr, i: _Recorder(log, f"cupy.ExternalStream({ptr}, {i})"),
        get_current_stream=lambda i: types.SimpleNamespace(ptr=77),
        using_allocator=lambda allocate: _Recorder(log, f"cupy.using_allocator({allocate.__qualname__})"))
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda i: types.SimpleNamespace(cuda_stream=1234 + i))
    monkeypatch.setattr(torch.cuda, "device", lambda i: _Recorder(log, f"torch.device({i})"))
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda ptr, device: f"torch.ExternalStream({ptr}, {device})")
    monkeypatch.setattr(torch.cuda, "stream", lambda s: _Recorder(log, f"torch.stream({s})"))

    with interop.caller_stream("torch", "cupy", "cuda:1"):
        log.append("work")
    alloc = "cupy.using_allocator(torch_allocator.<locals>.allocate)"
    assert log == [("enter", "cupy.Device(1)"), ("enter", "cupy.ExternalStream(1235, 1)"), ("enter", alloc), "work",
                   ("exit", alloc), ("exit", "cupy.ExternalStream(1235, 1)"), ("exit", "cupy.Device(1)")]
    log.clear()
    with interop.caller_stream("cupy", "torch", "cuda:0"):
        log.append("work")
    assert log == [("enter", "torch.device(0)"), ("enter", "torch.stream(torch.ExternalStream(77, 0))"), "work",
                   ("exit", "torch.stream(torch.ExternalStream(77, 0))"), ("exit", "torch.device(0)")]
    log.clear()
    for caller, native, device in (("torch", "torch", "cuda:0"), ("cupy", "cupy", "cuda:0"), ("torch", "cupy", "cpu"),
                                   ("numpy", "numpy", "cpu")):
        with interop.caller_stream(caller, native, device):
            pass
    assert log == []


def test_torch_allocator_lends_torch_blocks_to_cupy(monkeypatch):
    """interop.torch_allocator: each CuPy allocation is a torch uint8 block on the device, owned
    by the CuPy memory object (so it lives as long as the CuPy array or a DLPack view of it).
    Fake cupy and torch.empty here; tests/test_cupy_gpu.py captures a CuPy decode in a CUDA graph."""
    made = []

    def empty(n, dtype, device):
        made.append((n, dtype, device))
        return torch.zeros(n, dtype=dtype)

    cuda = types.SimpleNamespace(
        UnownedMemory=lambda ptr, size, owner, device: types.SimpleNamespace(ptr=ptr, size=size, owner=owner,
                                                                             device=device),
        MemoryPointer=lambda memory, offset: types.SimpleNamespace(mem=memory, offset=offset))
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(torch, "empty", empty)
    allocate = interop.torch_allocator(2)
    pointer = allocate(4096)
    assert made == [(4096, torch.uint8, "cuda:2")]
    assert pointer.offset == 0 and pointer.mem.size == 4096 and pointer.mem.device == 2
    assert pointer.mem.ptr == pointer.mem.owner.data_ptr() and pointer.mem.owner.numel() == 4096
    assert allocate(0).mem.size == 1   # a zero-byte request still gets a real (1-byte) block


@pytest.mark.parametrize("entry", ["attention", "attention_backward", "decode_step"])
def test_every_entry_point_runs_the_backend_on_the_callers_stream(fake_cupy, monkeypatch, entry):
    """The API converts, runs the backend and converts back inside interop.caller_stream."""
    log = []
    monkeypatch.setattr(interop, "caller_stream", lambda caller, native, device: _Recorder(log, (caller, native)))
    for name in ("forward", "backward", "decode"):
        kernel = getattr(FakeCupy, name)
        monkeypatch.setattr(FakeCupy, name, lambda self, *a, _k=kernel, _n=name: (log.append(_n), _k(self, *a))[1])
    _, dev = _inputs("float16")
    if entry == "attention":
        nha_core.attention(dev["q"], dev["k"], dev["v"], dev["g"], window_size=W, backend=fake_cupy)
    elif entry == "attention_backward":
        o, lse, _ = nha_core.attention(dev["q"], dev["k"], dev["v"], dev["g"], window_size=W, return_lse=True,
                                       backend=fake_cupy)
        log.clear()
        nha_core.attention_backward(torch.ones_like(o), dev["q"], dev["k"], dev["v"], dev["g"], o, lse,
                                    window_size=W, backend=fake_cupy)
    else:
        state = nha_core.init_state(B, H, K, V, M, window_size=W, dtype="float16", like=dev["q"])
        nha_core.decode_step(dev["q"][:, 0], dev["k"][:, 0], dev["v"][:, 0], dev["g"][:, 0], state,
                             backend=fake_cupy)
    kernel = {"attention": "forward", "attention_backward": "backward", "decode_step": "decode"}[entry]
    assert log == [("enter", ("torch", "cupy")), kernel, ("exit", ("torch", "cupy"))]
