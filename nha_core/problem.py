"""One frozen description of an NHA call, built once at the API boundary.

Validation, backend dispatch, error messages, tests and benchmarks all read this object
(the role of xFormers' ``Inputs`` or FlashInfer's ``plan``). Letters are the SPEC's:

    B batch   T time   HQ query heads   H key/value heads   K key dim   V value dim
    M slots   W window   N sequences (N == B without ``cu_seqlens``)
"""
from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class Problem:
    """Shapes, dtype, device and flags of one call; hashable, cheap, backend-independent.

    ``mode`` is ``"forward"``, ``"backward"`` or ``"decode"``. ``device`` is ``"cpu"`` or
    ``"cuda:<index>"``. ``array_kind`` is the caller's array library (``numpy``, ``torch``,
    ``cupy``, ``jax`` or ``other``). ``state_dtype`` is the dtype of the slot state and of
    ``lse``: float64 for float64 inputs, float32 otherwise.
    """

    mode: str
    B: int
    T: int
    HQ: int
    H: int
    K: int
    V: int
    M: int
    W: int
    N: int
    dtype: str
    device: str
    array_kind: str
    scale: float
    has_s: bool = False
    has_q_slot: bool = False
    has_k_slot: bool = False
    has_initial_state: bool = False
    output_final_state: bool = False
    return_lse: bool = False
    varlen: bool = False

    @property
    def G(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.HQ // self.H

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def state_dtype(self) -> str:
        return "float64" if self.dtype == "float64" else "float32"

    @property
    def features(self) -> frozenset:
        """Named optional features this call uses, matched against backend capability tables."""
        used = {self.mode}
        for flag, name in (
            (self.has_s, "explicit_s"),
            (self.has_q_slot or self.has_k_slot, "slot_inputs"),
            (self.has_initial_state, "initial_state"),
            (self.output_final_state, "final_state"),
            (self.varlen, "varlen"),
            (self.HQ != self.H, "gqa"),
        ):
            if flag:
                used.add(name)
        return frozenset(used)

    def describe(self) -> str:
        """One line used in errors and benchmark labels, e.g. ``B2-T63-HQ8-H2-K60-V60-M16-W32-bfloat16``."""
        text = f"B{self.B}-T{self.T}-HQ{self.HQ}-H{self.H}-K{self.K}-V{self.V}-M{self.M}-W{self.W}-{self.dtype}"
        if self.varlen:
            text += f"-N{self.N}"
        return f"{self.mode} {text} on {self.device}"


def check_window_size(window_size) -> int:
    """``window_size`` must be a non-negative int (bool and floats are refused)."""
    if isinstance(window_size, bool):
        raise TypeError(f"window_size: expected a non-negative int, got bool {window_size!r}")
    try:
        W = operator.index(window_size)
    except TypeError:
        raise TypeError(
            f"window_size: expected a non-negative int, got {type(window_size).__name__} {window_size!r}"
        ) from None
    if W < 0:
        raise ValueError(f"window_size: expected a non-negative int, got {W}")
    return W


def check_scale(scale, K: int) -> float:
    """``scale`` defaults to ``K ** -0.5``; any finite float is accepted."""
    if scale is None:
        return K ** -0.5 if K > 0 else 1.0
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale}")
    return scale


def check_cu_seqlens(cu_seqlens: np.ndarray, B: int, T: int) -> np.ndarray:
    """Validate host-side ``cu_seqlens`` ([N+1] ints, 0 ... T, non-decreasing, B == 1)."""
    if B != 1:
        raise ValueError(
            f"cu_seqlens: packs sequences along T and needs B == 1, got B = {B}; "
            "reshape q, k, v, g to [1, B*T, ...] first"
        )
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens: expected shape [N+1] with N >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.kind not in "iu":
        raise TypeError(f"cu_seqlens: expected an integer dtype (int32 or int64), got {cu_seqlens.dtype}")
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens: must start at 0, got cu_seqlens[0] = {int(cu_seqlens[0])}")
    steps = np.diff(cu_seqlens.astype(np.int64))
    if (steps < 0).any():
        i = int(np.argmax(steps < 0))
        raise ValueError(
            f"cu_seqlens: must be non-decreasing, got cu_seqlens[{i}] = {int(cu_seqlens[i])} > "
            f"cu_seqlens[{i + 1}] = {int(cu_seqlens[i + 1])}"
        )
    if int(cu_seqlens[-1]) != T:
        raise ValueError(f"cu_seqlens: last entry must equal T = {T}, got {int(cu_seqlens[-1])}")
    return cu_seqlens.astype(np.int64)
