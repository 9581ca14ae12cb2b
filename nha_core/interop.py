"""DLPack interop: accept any DLPack array, run on the backend's native type, return the caller's.

Conversions are zero-copy where the protocol allows (``from_dlpack``); nothing crosses devices.
Only NumPy is imported at module load; torch / CuPy / JAX are imported when their arrays appear.
"""
from __future__ import annotations

import numpy as np

_DLPACK_CPU, _DLPACK_CUDA = 1, 2

# CuPy has no bfloat16 dtype before v14 (v14 borrows ml_dtypes'), so on the cupy side bfloat16 data
# is always its uint16 bit pattern: backends/cupy reads it as __nv_bfloat16 and allocates its
# bfloat16 outputs as uint16. It crosses DLPack as int16 (every CuPy and torch version knows int16)
# and is viewed back as bfloat16 for the caller (to_native / to_caller). NumPy stays as it is.
BF16_BITS = "uint16"


def bf16_bits_to_float32(bits):
    """uint16 bfloat16 bit patterns -> the float32 values they hold (exact); NumPy or CuPy."""
    return (bits.astype("uint32") << 16).view("float32")


def float32_to_bf16_bits(x):
    """float32 values -> uint16 bfloat16 bit patterns, rounded to nearest even; NumPy or CuPy."""
    b = x.astype("float32").view("uint32")
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(BF16_BITS)


def caller_stream(caller_kind: str, native_kind: str, device: str):
    """Context for a backend's work on ``native_kind`` arrays made from the caller's
    ``caller_kind`` arrays on ``device``: the caller's device and current CUDA stream become the
    backend framework's own, so the work is ordered with the caller's (a torch side stream, a
    CuPy stream) as SPEC section 3 asks. Without it CuPy would launch on its default stream
    whatever torch stream the caller is on, and the reverse.

    torch caller, CuPy backend: ``cupy.cuda.ExternalStream`` of torch's current stream, and CuPy
    allocates from torch's caching allocator (torch_allocator): the memory shows in torch's
    counters, a CUDA graph capture gets it from the graph's own pool (CuPy's pool would call
    cudaMalloc inside the capture, which ends it), and an output handed to torch keeps its block.
    CuPy caller, torch backend (Triton): ``torch.cuda.ExternalStream`` of CuPy's current stream.
    Same framework, other frameworks (they synchronise through DLPack's ``stream`` argument) and
    CPU arrays: nothing to do.
    """
    import contextlib

    scope = contextlib.ExitStack()
    if not device.startswith("cuda") or caller_kind == native_kind:
        return scope
    index = int(device.partition(":")[2] or 0)
    with contextlib.ExitStack() as entering:   # closes what was entered if a later step fails
        if native_kind == "cupy":
            import cupy

            entering.enter_context(cupy.cuda.Device(index))
            if caller_kind == "torch":
                import torch

                stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream, index)
                entering.enter_context(stream)
                entering.enter_context(cupy.cuda.using_allocator(torch_allocator(index)))
        elif native_kind == "torch" and caller_kind == "cupy":
            import cupy
            import torch

            ptr = cupy.cuda.get_current_stream(index).ptr
            entering.enter_context(torch.cuda.device(index))
            stream = torch.cuda.default_stream(index) if ptr == 0 else torch.cuda.ExternalStream(ptr, device=index)
            entering.enter_context(torch.cuda.stream(stream))
        scope = entering.pop_all()
    return scope


def torch_allocator(index: int):
    """A CuPy allocator (``cupy.cuda.using_allocator``) that takes each block from torch's caching
    allocator on device ``index`` and the current torch stream; the CuPy memory owns the torch
    tensor, so the block returns to torch when the last CuPy array (or the torch tensor made from
    it through DLPack) on it is gone."""
    import cupy
    import torch

    def allocate(nbytes: int):
        block = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=f"cuda:{index}")
        memory = cupy.cuda.UnownedMemory(block.data_ptr(), block.numel(), block, index)
        return cupy.cuda.MemoryPointer(memory, 0)

    return allocate


def array_kind(x, name: str) -> str:
    """The array library of ``x``: numpy, torch, cupy, jax or other (any ``__dlpack__`` object)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    root = type(x).__module__.split(".")[0]
    if root in ("torch", "cupy"):
        return root
    if root in ("jax", "jaxlib"):
        return "jax"
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return "other"
    raise TypeError(
        f"{name}: expected an array (NumPy, PyTorch, CuPy, JAX or any DLPack-capable array), "
        f"got {type(x).__name__}"
    )


def device_of(x, kind: str) -> str:
    """``"cpu"`` or ``"cuda:<index>"``."""
    if kind == "numpy":
        return "cpu"
    if kind == "torch":
        d = x.device
        return "cpu" if d.type == "cpu" else f"{d.type}:{d.index or 0}"
    if kind == "cupy":
        return f"cuda:{x.device.id}"
    dev_type, dev_id = x.__dlpack_device__()
    if int(dev_type) == _DLPACK_CPU:
        return "cpu"
    if int(dev_type) == _DLPACK_CUDA:
        return f"cuda:{dev_id}"
    return f"dlpack{int(dev_type)}:{dev_id}"


def dtype_name(x, kind: str) -> str:
    """Dtype as a plain name: float16, bfloat16, float32, float64, int32, ..."""
    if kind == "torch":
        return str(x.dtype).removeprefix("torch.")
    return str(np.dtype(x.dtype).name) if kind in ("numpy", "cupy") else str(x.dtype)


def to_native(x, target: str, kind: str):
    """View ``x`` as the backend's array type (``numpy``, ``torch`` or ``cupy``) without copying."""
    if x is None:
        return x
    if kind == "torch":
        x = x.detach()  # the plain API is not differentiable; nha_core.torch adds autograd
    if target == "cupy":
        return _to_cupy(x, kind)
    if kind == target:
        return x
    if target == "numpy":
        return np.from_dlpack(x)
    if target == "torch":
        import torch

        if kind == "numpy":
            # torch.from_numpy keeps strides; negative strides need a copy.
            return torch.from_numpy(x if all(s >= 0 for s in x.strides) else x.copy())
        return torch.from_dlpack(x)
    raise ValueError(f"unknown native array kind {target!r}")


def _to_cupy(x, kind: str):
    """``x`` as a CuPy array; bfloat16 as its uint16 bits (:data:`BF16_BITS`)."""
    import cupy

    if dtype_name(x, kind) != "bfloat16":
        return x if kind == "cupy" else cupy.from_dlpack(x)
    if kind == "torch":
        import torch

        x = x.view(torch.int16)  # DLPack bf16 needs CuPy 14; int16 does not
    a = x if kind == "cupy" else cupy.from_dlpack(x)
    return a.view(cupy.uint16)


def _bf16_from_cupy(y, kind: str):
    """CuPy bfloat16 bits -> a bfloat16 array of the caller's library (zero copy)."""
    import cupy

    if kind == "torch":
        import torch

        return torch.from_dlpack(y.view(cupy.int16)).view(torch.bfloat16)
    if kind == "cupy":
        try:
            import ml_dtypes  # CuPy 14's bfloat16 dtype
        except ImportError:
            raise TypeError("bfloat16: this CuPy has no bfloat16 dtype (CuPy 14 with ml_dtypes has); "
                            "pass torch tensors for bfloat16") from None
        return y.view(ml_dtypes.bfloat16)
    if kind == "jax":
        import jax.dlpack
        import jax.numpy as jnp

        return jax.lax.bitcast_convert_type(jax.dlpack.from_dlpack(y.view(cupy.int16)), jnp.bfloat16)
    return y  # NumPy / other callers never hold CUDA bfloat16


def to_caller(y, kind: str, native: str):
    """Return the backend's result ``y`` as the caller's array type (``other`` gets NumPy)."""
    if y is None:
        return y
    if native == "cupy" and y.dtype == BF16_BITS:
        return _bf16_from_cupy(y, kind)
    if kind == native:
        return y
    if kind in ("numpy", "other"):
        if native == "torch":
            return y.numpy() if y.device.type == "cpu" else np.from_dlpack(y)
        return np.from_dlpack(y)
    if kind == "torch":
        import torch

        return torch.from_numpy(y) if isinstance(y, np.ndarray) else torch.from_dlpack(y)
    if kind == "cupy":
        import cupy

        return cupy.from_dlpack(y)
    if kind == "jax":
        import jax.dlpack

        return jax.dlpack.from_dlpack(y)
    raise ValueError(f"unknown array kind {kind!r}")


def to_host(x, kind: str) -> np.ndarray:
    """A small host copy (used for ``cu_seqlens`` and ``seen`` only)."""
    if kind == "numpy":
        return x
    if kind == "torch":
        return x.detach().cpu().numpy()
    if kind == "cupy":
        return x.get()
    return np.asarray(x)


class NativeOps:
    """The handful of array operations the API layer needs, for one native library and device.

    NumPy, torch and CuPy spell these alike except for ``dim``/``axis`` and device placement.
    CuPy's bfloat16 arrays are uint16 bits (:data:`BF16_BITS`): arithmetic on them goes through
    :meth:`widen` / :meth:`narrow`.
    """

    def __init__(self, native: str, device: str):
        self.native, self.device = native, device
        if native == "torch":
            import torch

            self.lib = torch
        elif native == "cupy":
            import cupy

            self.lib = cupy
        else:
            self.lib = np

    def dtype(self, name: str):
        if self.native == "cupy" and name == "bfloat16":
            return np.dtype(BF16_BITS)
        return getattr(self.lib, name)

    def widen(self, x):
        """``x`` ready for arithmetic: CuPy bfloat16 bits as float32 values, anything else as is."""
        if self.native == "cupy" and x.dtype == BF16_BITS:
            return bf16_bits_to_float32(x)
        return x

    def narrow(self, y, like):
        """Arithmetic result ``y`` back in the dtype of ``like`` (bfloat16 bits round to nearest even)."""
        if self.native == "cupy" and like.dtype == BF16_BITS:
            return float32_to_bf16_bits(y)
        if self.native == "torch":
            return y.to(like.dtype)
        return y.astype(like.dtype, copy=False)

    def add(self, a, b):
        """a + b in the dtype of ``a``."""
        return self.narrow(self.widen(a) + self.widen(b), like=a)

    def index(self, host_index: np.ndarray):
        """A host int64 index array moved to the native device."""
        if self.native == "torch":
            return self.lib.as_tensor(host_index, device=self.device)
        return self.lib.asarray(host_index)

    def from_host(self, host: np.ndarray, like):
        """A host array moved to the native device with the dtype of ``like``."""
        if self.native == "torch":
            return self.lib.as_tensor(host, device=self.device).to(like.dtype)
        return self.narrow(self.lib.asarray(host), like)

    def zeros(self, shape, dtype: str):
        if self.native == "torch":
            return self.lib.zeros(tuple(shape), dtype=self.dtype(dtype), device=self.device)
        return self.lib.zeros(tuple(shape), dtype=self.dtype(dtype))

    def full(self, shape, value, dtype: str):
        if self.native == "torch":
            return self.lib.full(tuple(shape), value, dtype=self.dtype(dtype), device=self.device)
        return self.lib.full(tuple(shape), value, dtype=self.dtype(dtype))

    def cat(self, arrays, axis: int):
        if self.native == "torch":
            return self.lib.cat(list(arrays), dim=axis)
        return self.lib.concatenate(list(arrays), axis=axis)

    def take(self, x, host_index: np.ndarray, axis: int):
        """Rows of ``x`` along ``axis`` picked by a host index (always a new array)."""
        if self.native == "torch":
            return self.lib.index_select(x, axis, self.index(host_index))
        return self.lib.take(x, self.index(host_index), axis=axis)

    def copy(self, x):
        return None if x is None else (x.clone() if self.native == "torch" else x.copy())

    def exp(self, x):
        return self.lib.exp(x)
