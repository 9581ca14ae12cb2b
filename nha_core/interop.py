"""DLPack interop: accept any DLPack array, run on the backend's native type, return the caller's.

Conversions are zero-copy where the protocol allows (``from_dlpack``); nothing crosses devices.
Only NumPy is imported at module load; torch / CuPy / JAX are imported when their arrays appear.
"""
from __future__ import annotations

import numpy as np

_DLPACK_CPU, _DLPACK_CUDA = 1, 2


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
    if target == "cupy":
        import cupy

        return cupy.from_dlpack(x)
    raise ValueError(f"unknown native array kind {target!r}")


def to_caller(y, kind: str, native: str):
    """Return the backend's result ``y`` as the caller's array type (``other`` gets NumPy)."""
    if y is None or kind == native:
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
        return getattr(self.lib, name)

    def index(self, host_index: np.ndarray):
        """A host int64 index array moved to the native device."""
        if self.native == "torch":
            return self.lib.as_tensor(host_index, device=self.device)
        return self.lib.asarray(host_index)

    def from_host(self, host: np.ndarray, like):
        """A host array moved to the native device with the dtype of ``like``."""
        if self.native == "torch":
            return self.lib.as_tensor(host, device=self.device).to(like.dtype)
        return self.lib.asarray(host).astype(like.dtype)

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
