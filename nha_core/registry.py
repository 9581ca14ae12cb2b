"""Backend registry: capabilities as data, refusals in plain words, one dispatch rule.

A backend is a subclass of :class:`Backend` that fills in the capability table and the three
kernel entry points. The API layer hands every entry point *native* arrays (``array_kind``:
NumPy arrays, torch tensors or CuPy arrays) that already passed validation, in the layout below.

Kernel contract (all shapes time-major, as in FlashAttention and fla)::

    forward(p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu_seqlens) -> (o, lse, hk, hv)
        q [B,T,HQ,K]  k [B,T,H,K]  v [B,T,H,V]  g [B,T,H,M]
        s [B,T,H,M]; None (= 1 - exp(g), computed in the kernels) only for backends that set
        ``derives_s``; backward then still returns ds, the gradient w.r.t. that derived s
        q_slot [B,T,HQ,K] or None (= q)      k_slot [B,T,H,K] or None (= k)
        hk0 [N,H,K,M], hv0 [N,H,M,V] in p.state_dtype, or None (= zeros)
        cu_seqlens: None, or native int64 [N+1] (B == 1); p.varlen says which
        o [B,T,HQ,V] in the input dtype; lse [B,HQ,T] in p.state_dtype (natural log)
        hk, hv: slot state after the last token, or None unless p.output_final_state

    backward(p, do, q, k, v, g, s, q_slot, k_slot, o, lse, hk0, hv0, cu_seqlens)
        -> (dq, dk, dv, dg, ds, dq_slot, dk_slot, dhk0, dhv0)
        dg is the gradient through the gate alone (the API adds the path through a derived s),
        except for backends with ``chains_derived_s``: given s = None, their dg already includes
        the derived path ``-ds * exp(g)`` and ds comes back None (nobody asked for it);
        dq_slot / dk_slot are None when q_slot / k_slot are None (their part is inside dq / dk);
        dhk0 / dhv0 are None when hk0 is None. Gradients come in the input dtype, except
        dhk0 / dhv0 in p.state_dtype.

    decode(p, q, k, v, g, s, q_slot, k_slot, state) -> (o, lse)
        one new token per sequence: q [N,HQ,K], k [N,H,K], v [N,H,V], g [N,H,M], s [N,H,M]
        (None only with ``derives_s``), q_slot / k_slot or None. ``state`` is an NHAState of native arrays
        that the backend UPDATES IN PLACE (the API copies it first unless asked not to):
        evict the token leaving the window into the slots, append the new token to the ring
        buffer, read slots + window with one softmax, and add 1 to ``state.seen``.
        o [N,HQ,V] in the input dtype; lse [N,HQ] in p.state_dtype.

Semantics per sequence and KV head (SPEC §2): the slots hold tokens ``<= t-W``, the window
tokens ``(t-W, t]``; one softmax over ``M`` slot logits and ``<= W`` window logits.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os

from .problem import Problem

ALL_FEATURES = frozenset(
    {"forward", "backward", "decode", "varlen", "gqa", "explicit_s", "slot_inputs", "initial_state", "final_state"}
)


class Backend:
    """Base class. Subclasses set the capability table and implement the kernel entry points."""

    name: str = ""
    priority: int = 100                 # lower wins under backend="auto"
    devices: tuple = ()                 # device types: "cpu", "cuda"
    dtypes: tuple = ()                  # "float16", "bfloat16", "float32", "float64"
    max_head_dim: int = 256             # limit on K and V
    max_slots: int = 256                # limit on M
    features: frozenset = ALL_FEATURES  # subset of ALL_FEATURES
    array_kind: str = "numpy"           # native arrays the entry points take: numpy | torch | cupy
    auto_devices: tuple | None = None   # device types `auto` may pick it for (None: all it runs on)
    derives_s: bool = False             # takes s = None and computes s = 1 - exp(g) in its kernels
    chains_derived_s: bool = False      # with s = None, backward's dg includes -ds * exp(g), ds is None

    def __init_subclass__(cls, configs=None, **kwargs):
        """``class X(Backend, configs=module)`` reads the capability table from a configs module
        (NAME, PRIORITY, DEVICES, DTYPES, MAX_HEAD_DIM, MAX_SLOTS, FEATURES)."""
        super().__init_subclass__(**kwargs)
        if configs is not None:
            cls.name, cls.priority = configs.NAME, configs.PRIORITY
            cls.devices, cls.dtypes = configs.DEVICES, configs.DTYPES
            cls.max_head_dim, cls.max_slots = configs.MAX_HEAD_DIM, configs.MAX_SLOTS
            cls.features = configs.FEATURES

    def availability(self) -> str | None:
        """Why this backend cannot run on this machine at all, or None when it can."""
        return None

    def devices_here(self) -> tuple:
        """Device types this backend can run on in this process; must not import a framework."""
        return self.devices

    def not_supported_reasons(self, p: Problem) -> list[str]:
        """Every reason this backend refuses ``p``, in plain words; empty when it accepts.

        The table is read first, so refusing a CPU call costs a GPU backend no import of its
        framework; only a call the table accepts asks :meth:`availability`.
        """
        reasons = []
        if p.device_type not in self.devices_here():
            reasons.append(f"device {p.device} not in {list(self.devices_here())}")
        if p.dtype not in self.dtypes:
            reasons.append(f"dtype {p.dtype} not in {list(self.dtypes)}")
        if max(p.K, p.V) > self.max_head_dim:
            reasons.append(f"head dim {max(p.K, p.V)} > {self.max_head_dim}")
        if p.M > self.max_slots:
            reasons.append(f"M = {p.M} slots > {self.max_slots}")
        missing = sorted(p.features - self.features)
        if missing:
            reasons.append(f"does not support {', '.join(missing)}")
        if not reasons:
            why = self.availability()
            if why:
                reasons.append(why)
        return reasons

    # Kernel entry points; see the module docstring for shapes. A backend that sets
    # ``kernel_package`` gets them from ``<kernel_package>.forward.forward`` (and backward,
    # decode), imported on first use so that a framework loads only when its backend runs.
    kernel_package: str | None = None

    def _kernel(self, name: str):
        if self.kernel_package is None:
            raise NotImplementedError(f"{self.name}: {name} is not implemented")
        return getattr(importlib.import_module(f"{self.kernel_package}.{name}"), name)

    def forward(self, p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu_seqlens):
        return self._kernel("forward")(p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu_seqlens)

    def backward(self, p, do, q, k, v, g, s, q_slot, k_slot, o, lse, hk0, hv0, cu_seqlens):
        return self._kernel("backward")(p, do, q, k, v, g, s, q_slot, k_slot, o, lse, hk0, hv0, cu_seqlens)

    def decode(self, p, q, k, v, g, s, q_slot, k_slot, state):
        return self._kernel("decode")(p, q, k, v, g, s, q_slot, k_slot, state)


_BUILTINS = ("numpy", "triton", "cupy")
_registry: dict[str, Backend] = {}
_loaded = False


def register(backend: Backend) -> Backend:
    """Add a backend instance (a later registration under the same name replaces the earlier)."""
    if not backend.name:
        raise ValueError("register: backend.name must be a non-empty string")
    _registry[backend.name] = backend
    return backend


class _Broken(Backend):
    """Placeholder for a backend whose module failed to import, so `info` can say why."""

    def __init__(self, name: str, error: Exception):
        self.name = name
        self._error = f"{name}: failed to load ({type(error).__name__}: {error})"

    def availability(self):
        return self._error


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in _BUILTINS:
        try:
            module = importlib.import_module(f"nha_core.backends.{name}")
            register(module.BACKEND)
        except Exception as error:  # a broken optional backend must not break import
            register(_Broken(name, error))
    for entry in importlib.metadata.entry_points(group="nha_core.backends"):
        try:
            obj = entry.load()
            register(obj() if isinstance(obj, type) else obj)
        except Exception as error:
            register(_Broken(entry.name, error))


def all_backends() -> dict[str, Backend]:
    _load()
    return dict(sorted(_registry.items(), key=lambda item: (item[1].priority, item[0])))


def get(name: str) -> Backend:
    backends = all_backends()
    if name not in backends:
        raise ValueError(f"backend: expected 'auto' or one of {list(backends)}, got {name!r}")
    return backends[name]


def select(p: Problem, backend: str = "auto") -> Backend:
    """The backend that runs ``p``. A named backend never falls back; ``auto`` tries all by priority.

    ``NHA_CORE_BACKEND`` in the environment replaces ``auto`` (useful in tests and benchmarks).
    """
    if backend == "auto":
        backend = os.environ.get("NHA_CORE_BACKEND", "auto")
    if backend != "auto":
        chosen = get(backend)
        reasons = chosen.not_supported_reasons(p)
        if reasons:
            raise NotImplementedError(
                f"nha_core: backend {chosen.name!r} cannot run {p.describe()}:\n  - " + "\n  - ".join(reasons)
            )
        return chosen
    refusals = []
    for candidate in all_backends().values():
        if candidate.auto_devices is not None and p.device_type not in candidate.auto_devices:
            refusals.append(f"{candidate.name}: runs on {p.device_type} only when named (not picked by auto)")
            continue
        reasons = candidate.not_supported_reasons(p)
        if not reasons:
            return candidate
        refusals.append(f"{candidate.name}: " + "; ".join(reasons))
    raise NotImplementedError(
        f"nha_core: no backend can run {p.describe()}:\n  - " + "\n  - ".join(refusals)
    )


def summary() -> dict[str, dict]:
    """Registered backends with whether each is usable here and, if not, why."""
    out = {}
    for name, b in all_backends().items():
        why = b.availability()
        out[name] = {
            "usable": why is None,
            "reason": why,
            "priority": b.priority,
            "devices": list(b.devices_here()) if why is None else list(b.devices),
            "dtypes": list(b.dtypes),
            "max_head_dim": b.max_head_dim,
            "max_slots": b.max_slots,
            "features": sorted(b.features),
        }
    return out
