"""The public API: ``attention``, ``attention_backward``, ``init_state``, ``decode_step``.

Every call goes: validate and describe (:func:`_describe` -> ``Problem``) -> pick a backend
(:func:`nha_core.registry.select`) -> view inputs as the backend's arrays (DLPack) -> run the
kernel entry point -> hand results back as the caller's array type. Shapes (SPEC §2)::

    q, q_slot [B,T,HQ,K]   k, k_slot [B,T,H,K]   v [B,T,H,V]   g, s [B,T,H,M]
    o [B,T,HQ,V]           lse [B,HQ,T] (float32; float64 for float64 inputs)

Which memory holds which token, for the query at time t (W = window_size)::

    tokens:  0  1  ...  t-W | t-W+1  ...  t-1  t  | t+1 ...
             `-- M slots ---' `---- window (W) ----'  not visible
             (gated recurrence)  (exact keys/values)

Slots start empty (M logits of 0 with zero values) and absorb token j, with its own gate g_j
and write weight s_j, at step j + W. One softmax runs over the M slot logits and the window.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import NamedTuple

import numpy as np

from . import interop, registry
from .problem import FLOAT_DTYPES, Problem, check_cu_seqlens, check_scale, check_window_size
from .state import NHAState


class NHAGrads(NamedTuple):
    """Gradients returned by :func:`attention_backward`; a field is None where it does not apply.

    ``ds`` only when ``s`` was given (a derived ``s = 1 - exp(g)`` sends its gradient into
    ``dg``); ``dq_slot`` / ``dk_slot`` only when ``q_slot`` / ``k_slot`` were given; ``dstate``
    (an :class:`NHAState` of gradients, ``seen`` copied) only with ``initial_state``.
    """

    dq: object
    dk: object
    dv: object
    dg: object
    ds: object = None
    dq_slot: object = None
    dk_slot: object = None
    dstate: object = None


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

# Each tensor argument: (dims it must have, letters naming them).
_SHAPES = {
    "q": "B T HQ K", "k": "B T H K", "v": "B T H V", "g": "B T H M", "s": "B T H M",
    "q_slot": "B T HQ K", "k_slot": "B T H K", "do": "B T HQ V", "o": "B T HQ V", "lse": "B HQ T",
}


_SPECS = {name: tuple(spec.split()) for name, spec in _SHAPES.items()}


def _bind_dims(arrays: dict, letters: dict) -> dict:
    """Check ranks and that every letter means one size across all arrays; return the sizes."""
    dims: dict[str, int] = dict(letters)
    origin: dict[str, str] = {}
    for name, x in arrays.items():
        if x is None:
            continue
        spec = _SPECS[name]
        shape = tuple(map(int, x.shape))
        if len(shape) != len(spec):
            raise ValueError(
                f"{name}: expected {len(spec)} dims [{','.join(spec)}], got shape {list(shape)}"
            )
        for letter, size in zip(spec, shape):
            if letter in dims and dims[letter] != size:
                where = f"{origin[letter]}" if letter in origin else "the state"
                raise ValueError(
                    f"{name}: expected {letter} = {dims[letter]} (from {where}) in [{','.join(spec)}], "
                    f"got shape {list(shape)}"
                )
            dims[letter] = size
            origin.setdefault(letter, name)
    return dims


def _describe(mode, arrays, *, window_size, scale, initial_state, cu_seqlens,
              output_final_state=False, return_lse=False):
    """Validate everything and return (Problem, caller kind, host cu_seqlens or None)."""
    W = check_window_size(window_size)
    present = {n: x for n, x in arrays.items() if x is not None}
    kinds = {n: interop.array_kind(x, n) for n, x in present.items()}
    devices = {n: interop.device_of(x, kinds[n]) for n, x in present.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(
            "inputs: expected all arrays on one device, got " + ", ".join(f"{n} on {d}" for n, d in devices.items())
        )
    dtypes = {n: interop.dtype_name(x, kinds[n]) for n, x in present.items() if n != "lse"}
    first = "q" if "q" in dtypes else next(iter(dtypes))
    for n, dt in dtypes.items():
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"{n}: expected a floating dtype {list(FLOAT_DTYPES)}, got {dt}")
        if dt != dtypes[first]:
            raise TypeError(f"{n}: expected dtype {dtypes[first]} (the dtype of {first}), got {dt}")
    if "lse" in present:
        want = "float64" if dtypes[first] == "float64" else "float32"
        got = interop.dtype_name(present["lse"], kinds["lse"])
        if got != want:
            raise TypeError(f"lse: expected dtype {want} (as returned by attention), got {got}")
    dims = _bind_dims(present, {})
    if dims["H"] == 0 or dims["HQ"] % dims["H"] != 0:
        raise ValueError(
            f"k: expected the KV heads H to divide the query heads HQ (GQA), got HQ = {dims['HQ']}, H = {dims['H']}"
        )
    if W == 0 and dims["M"] == 0:
        raise ValueError("window_size: W = 0 with M = 0 slots leaves nothing to attend to; use W >= 1 or M >= 1")
    B, T = dims["B"], dims["T"]
    cu_host = None
    if cu_seqlens is not None:
        cu_kind = interop.array_kind(cu_seqlens, "cu_seqlens")
        cu_host = check_cu_seqlens(np.asarray(interop.to_host(cu_seqlens, cu_kind)), B, T)
    N = B if cu_host is None else len(cu_host) - 1
    p = Problem(
        mode=mode, B=B, T=T, HQ=dims["HQ"], H=dims["H"], K=dims["K"], V=dims["V"], M=dims["M"], W=W, N=N,
        dtype=dtypes[first], device=devices["q"], array_kind=kinds["q"], scale=check_scale(scale, dims["K"]),
        has_s=arrays.get("s") is not None, has_q_slot=arrays.get("q_slot") is not None,
        has_k_slot=arrays.get("k_slot") is not None, has_initial_state=initial_state is not None,
        output_final_state=bool(output_final_state), return_lse=bool(return_lse), varlen=cu_host is not None,
    )
    if initial_state is not None:
        _check_state(initial_state, p, "initial_state")
    return p, cu_host


def _check_state(state, p: Problem, name: str) -> None:
    if not isinstance(state, NHAState):
        raise TypeError(f"{name}: expected an nha_core.NHAState, got {type(state).__name__}")
    if state.window_size != p.W:
        raise ValueError(f"{name}: expected a state of window_size {p.W}, got one of window_size {state.window_size}")
    expect = {
        "hk": (p.N, p.H, p.K, p.M), "hv": (p.N, p.H, p.M, p.V), "k_cache": (p.N, p.W, p.H, p.K),
        "v_cache": (p.N, p.W, p.H, p.V), "g_cache": (p.N, p.W, p.H, p.M), "s_cache": (p.N, p.W, p.H, p.M),
        "k_slot_cache": (p.N, p.W, p.H, p.K), "seen": (p.N,),
    }
    for field, x in state.arrays().items():
        shape = tuple(int(d) for d in x.shape)
        if shape != expect[field]:
            raise ValueError(f"{name}.{field}: expected shape {list(expect[field])}, got {list(shape)}")
        kind = interop.array_kind(x, f"{name}.{field}")
        dev = interop.device_of(x, kind)
        if dev != p.device:
            raise ValueError(f"{name}.{field}: expected an array on {p.device} (like q), got one on {dev}")
        dt = interop.dtype_name(x, kind)
        want = "int64" if field == "seen" else p.state_dtype if field in ("hk", "hv") else p.dtype
        if dt != want:
            raise TypeError(f"{name}.{field}: expected dtype {want}, got {dt}")


# ----------------------------------------------------------------------------------------------
# packing: sequences, the window cache of an initial state, and the final state's ring buffer
# ----------------------------------------------------------------------------------------------

def _rows(a, trailing: tuple):
    """[X, Y, *trailing] -> [X*Y, *trailing] (spelled out: -1 is ambiguous for empty arrays)."""
    return a.reshape((int(a.shape[0]) * int(a.shape[1]),) + trailing)


class _Layout:
    """Host-side index plan for one call.

    Without an initial window cache the kernels see the caller's arrays as they are. With one,
    each sequence is extended in front by its cached tokens (oldest first) and everything is
    packed into one varlen batch: the kernels then run the exact recurrence over
    ``cache ++ new tokens`` and the prefix outputs are dropped.
    """

    def __init__(self, p: Problem, cu_host, state: NHAState | None):
        self.W, self.N, self._p, self._cu_host = p.W, p.N, p, cu_host
        self._seen_given = None
        if state is not None:
            kind = interop.array_kind(state.seen, "initial_state.seen")
            self._seen_given = np.asarray(interop.to_host(state.seen, kind), dtype=np.int64)
        # A call without a state never extends; it needs none of the arrays below unless it
        # returns a state, so they are built on first use (host time before the first kernel
        # launch is GPU idle time in a short call).
        self.extended = self._seen_given is not None and bool(self.prefix.any())

    @functools.cached_property
    def lens(self):
        if self._cu_host is None:
            return np.full(self._p.B, self._p.T, dtype=np.int64)
        return np.diff(self._cu_host)

    @functools.cached_property
    def starts(self):
        if self._cu_host is None:
            return np.arange(self._p.B, dtype=np.int64) * self._p.T
        return self._cu_host[:-1]

    @functools.cached_property
    def seen(self):
        return self._seen_given if self._seen_given is not None else np.zeros(self.N, np.int64)

    @functools.cached_property
    def prefix(self):
        return np.minimum(self.seen, self.W)

    @functools.cached_property
    def ext_lens(self):
        """Extended, packed positions: sequence n occupies [ext_cu[n], ext_cu[n+1])."""
        return self.prefix + self.lens

    @functools.cached_property
    def ext_cu(self):
        return np.concatenate([[0], np.cumsum(self.ext_lens)]).astype(np.int64)

    @functools.cached_property
    def final_seen(self):
        return self.seen + self.lens

    @functools.cached_property
    def _sources(self):
        """Source of each extended position: a token of the call, or a row of the ring buffer."""
        total, W = int(self.ext_cu[-1]), self.W
        src_token = np.full(total, -1, np.int64)
        src_ring = np.full(total, -1, np.int64)
        for n in range(self.N):
            c, e0, L = int(self.prefix[n]), int(self.ext_cu[n]), int(self.lens[n])
            absolute = np.arange(int(self.seen[n]) - c, int(self.seen[n]))
            if c:
                src_ring[e0:e0 + c] = n * W + absolute % W
            src_token[e0 + c:e0 + c + L] = self.starts[n] + np.arange(L)
        return src_token, src_ring

    @property
    def src_token(self):
        return self._sources[0]

    @property
    def src_ring(self):
        return self._sources[1]

    @functools.cached_property
    def real(self):
        """Extended position of each token of the call, in the call's order."""
        real = np.nonzero(self.src_token >= 0)[0]
        return real[np.argsort(self.src_token[real])]

    @functools.cached_property
    def cached(self):
        """Extended positions of the ring-buffer prefix."""
        return np.nonzero(self.src_ring >= 0)[0]

    @functools.cached_property
    def final_src(self):
        """Final ring buffer: row (absolute index % W) holds the last min(len, W) tokens."""
        W = self.W
        final_src = np.full(self.N * W, -1, np.int64)
        for n in range(self.N):
            L = int(self.ext_lens[n])
            e = np.arange(L - min(L, W), L)
            first_abs = int(self.seen[n]) - int(self.prefix[n])
            final_src[n * W + (first_abs + e) % W] = int(self.ext_cu[n]) + e
        return final_src

    def gather(self, ops, tokens, ring, trailing: tuple, dtype: str):
        """Extended packed array [1, T_ext, *trailing] from the call's tokens and ring rows."""
        parts = [ops.zeros((1,) + trailing, dtype)]  # row 0: zeros for what has no source
        flat_tokens = _rows(tokens, trailing) if tokens is not None else None
        index = np.zeros(len(self.src_token), np.int64)
        offset = 1
        if ring is not None:
            parts.append(_rows(ring, trailing))
            has = self.src_ring >= 0
            index[has] = offset + self.src_ring[has]
            offset += int(ring.shape[0] * ring.shape[1])
        if flat_tokens is not None:
            parts.append(flat_tokens)
            has = self.src_token >= 0
            index[has] = offset + self.src_token[has]
        return ops.take(ops.cat(parts, 0), index, 0)[None]

    def ring_from(self, ops, ext, trailing: tuple, dtype: str, N: int, W: int):
        """Final ring buffer [N, W, *trailing] from an extended (or unextended) array."""
        source = ops.cat([ops.zeros((1,) + trailing, dtype), _rows(ext, trailing)], 0)
        return ops.take(source, self.final_src + 1, 0).reshape((N, W) + trailing)


# ----------------------------------------------------------------------------------------------
# shared preparation of forward and backward
# ----------------------------------------------------------------------------------------------

class _Prepared(NamedTuple):
    p: Problem
    backend: registry.Backend
    ops: interop.NativeOps
    layout: _Layout
    x: dict          # native kernel inputs (extended and packed when layout.extended)
    cu: object       # native cu_seqlens for the kernels, or None
    hk0: object
    hv0: object
    derived_s: bool        # the call's s was derived from g
    state_s_cache: bool    # the initial state carries explicit s for its window tokens
    state_k_slot_cache: bool


def _derive_s(ops, g):
    """s = 1 - exp(g) = -expm1(g), in fp32 or better so that small decays keep their digits."""
    if ops.native == "torch":
        wide = g.float() if g.dtype in (ops.lib.float16, ops.lib.bfloat16) else g
        return (-ops.lib.expm1(wide)).to(g.dtype)
    wide = ops.widen(g)  # CuPy bfloat16 bits -> float32 values
    wide = wide if wide.dtype in (np.float32, np.float64) else wide.astype(np.float32)
    return ops.narrow(-ops.lib.expm1(wide), like=g)


def _prepare(mode, arrays, *, window_size, scale, initial_state, cu_seqlens, backend, scope,
             output_final_state=False, return_lse=False) -> _Prepared:
    """Validate, pick the backend and convert the arrays to its native type; from the conversion
    on, the call runs inside ``scope`` on the caller's CUDA stream (interop.caller_stream)."""
    p, cu_host = _describe(mode, arrays, window_size=window_size, scale=scale, initial_state=initial_state,
                           cu_seqlens=cu_seqlens, output_final_state=output_final_state, return_lse=return_lse)
    b = registry.select(p, backend)
    scope.enter_context(interop.caller_stream(interop.array_kind(arrays["q"], "q"), b.array_kind, p.device))
    ops = interop.NativeOps(b.array_kind, p.device)
    native = {n: interop.to_native(x, b.array_kind, interop.array_kind(x, n)) if x is not None else None
              for n, x in arrays.items()}
    state = {}
    if initial_state is not None:
        state = {f: interop.to_native(a, b.array_kind, interop.array_kind(a, f))
                 for f, a in initial_state.arrays().items()}
    derived_s = native["s"] is None
    layout = _Layout(p, cu_host, initial_state)
    state_s_cache = initial_state is not None and initial_state.s_cache is not None
    state_k_slot_cache = initial_state is not None and initial_state.k_slot_cache is not None
    # Backends that derive s = 1 - exp(g) inside their kernels get s = None (no extra pass over
    # [B,T,H,M]); the others, and a prefix that mixes explicit and derived s, get it materialised.
    if derived_s and (not b.derives_s or (layout.extended and state_s_cache)):
        native["s"] = _derive_s(ops, native["g"])
    cu = None if cu_host is None else ops.index(cu_host)
    if layout.extended:
        T_ext = int(layout.ext_cu[-1])
        ring = {
            "k": state["k_cache"], "v": state["v_cache"], "g": state["g_cache"],
            "s": state.get("s_cache"), "k_slot": state.get("k_slot_cache", state["k_cache"]),
        }
        if ring["s"] is None and native["s"] is not None:
            ring["s"] = _derive_s(ops, state["g_cache"])
        if native["k_slot"] is None and "k_slot_cache" in state:
            native["k_slot"] = native["k"]  # new tokens read k; cached ones their own k_slot
        if native["k_slot"] is None:
            ring["k_slot"] = None
        for n, x in list(native.items()):
            if x is None or n in ("lse",):
                continue
            trailing = tuple(int(d) for d in x.shape[2:])
            native[n] = layout.gather(ops, x, ring.get(n), trailing, p.dtype)
        if native.get("lse") is not None:
            # Prefix rows get lse = +inf: their probabilities exp(logit - lse) are exactly 0.
            lse = native["lse"]
            flat = ops.cat([lse[i] for i in range(p.B)], 1)  # [HQ, B*T], column b*T + t
            source = ops.cat([ops.full((p.HQ, 1), float("inf"), p.state_dtype), flat], 1)
            index = np.zeros(T_ext, np.int64)
            index[layout.real] = 1 + np.arange(len(layout.real))
            native["lse"] = ops.take(source, index, 1)[None]
        cu = ops.index(layout.ext_cu)
        p = dataclasses.replace(p, B=1, T=T_ext, varlen=True, has_k_slot=native["k_slot"] is not None)
    hk0 = state.get("hk")
    hv0 = state.get("hv")
    return _Prepared(p, b, ops, layout, native, cu, hk0, hv0, derived_s, state_s_cache, state_k_slot_cache)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------

def attention(q, k, v, g, *, window_size, s=None, q_slot=None, k_slot=None, scale=None, initial_state=None,
              output_final_state=False, cu_seqlens=None, return_lse=False, backend="auto"):
    """Native Hybrid Attention forward.

    Args:
        q: queries [B,T,HQ,K]; ``k`` keys [B,T,H,K]; ``v`` values [B,T,H,V]; ``HQ % H == 0``
            (query head i reads KV head ``i // (HQ // H)``).
        g: log forget gates of the slots [B,T,H,M] (``g <= 0``; ``-inf`` resets a slot exactly).
        window_size: W >= 0 tokens of exact context, the current token included. ``W = 0`` is
            gated slot attention; ``W >= T`` with ``M = 0`` is causal softmax attention.
        s: slot write weights [B,T,H,M]; default ``1 - exp(g)``.
        q_slot, k_slot: what the slot branch reads instead of ``q`` [B,T,HQ,K] / ``k`` [B,T,H,K]
            (e.g. ``q``/``k`` before rotary embedding); default ``q``/``k``.
        scale: logit scale for both branches; default ``K ** -0.5``.
        initial_state: an :class:`NHAState` to continue from (chunked prefill).
        output_final_state: also return the state after the last token.
        cu_seqlens: int [N+1] offsets of N packed sequences (``B == 1``), FlashAttention style.
        return_lse: also return ``lse`` [B,HQ,T], natural-log log-sum-exp of all logits.
        backend: ``"auto"`` (best usable backend for the inputs' device) or a registered name;
            a named backend never falls back.

    Returns:
        ``o`` [B,T,HQ,V] in the input dtype; with ``return_lse`` or ``output_final_state``
        the tuple ``(o, lse or None, state or None)``.
    """
    arrays = dict(q=q, k=k, v=v, g=g, s=s, q_slot=q_slot, k_slot=k_slot)
    with contextlib.ExitStack() as scope:   # the caller's CUDA stream from here on (_prepare)
        pre = _prepare("forward", arrays, window_size=window_size, scale=scale, initial_state=initial_state,
                       cu_seqlens=cu_seqlens, backend=backend, scope=scope,
                       output_final_state=output_final_state, return_lse=return_lse)
        p, x, ops, layout = pre.p, pre.x, pre.ops, pre.layout
        o, lse, hk, hv = pre.backend.forward(p, x["q"], x["k"], x["v"], x["g"], x["s"], x["q_slot"], x["k_slot"],
                                             pre.hk0, pre.hv0, pre.cu)
        B, T = q.shape[0], q.shape[1]
        if layout.extended:
            o = ops.take(o, layout.real, 1).reshape((B, T) + tuple(o.shape[2:]))
            lse = ops.take(lse, layout.real, 2)
            lse = ops.cat([lse[:, :, i * T:(i + 1) * T] for i in range(B)], 0) if B > 1 else lse
        kind, native = interop.array_kind(q, "q"), pre.backend.array_kind
        if not (return_lse or output_final_state):
            return interop.to_caller(o, kind, native)
        state = None
        if output_final_state:
            state = _final_state(pre, hk, hv, x)
            state = NHAState(**{f: interop.to_caller(a, kind, native) if f != "window_size" else a
                                for f, a in state.__dict__.items()})
        return (interop.to_caller(o, kind, native), interop.to_caller(lse, kind, native) if return_lse else None,
                state)


def _final_state(pre: _Prepared, hk, hv, x) -> NHAState:
    p0, ops, layout = pre.p, pre.ops, pre.layout
    N, W, H = len(layout.lens), p0.W, p0.H
    K, V, M = int(x["k"].shape[-1]), int(x["v"].shape[-1]), int(x["g"].shape[-1])
    dt = p0.dtype
    ring = lambda a, d: layout.ring_from(ops, a, (H, d), dt, N, W)  # noqa: E731
    keep_s = not pre.derived_s or pre.state_s_cache
    return NHAState(
        hk=hk, hv=hv, k_cache=ring(x["k"], K), v_cache=ring(x["v"], V), g_cache=ring(x["g"], M),
        s_cache=ring(x["s"], M) if keep_s and x["s"] is not None else None,
        k_slot_cache=ring(x["k_slot"], K) if x["k_slot"] is not None else None,
        seen=ops.index(layout.final_seen), window_size=W,
    )


def attention_backward(do, q, k, v, g, o, lse, *, window_size, s=None, q_slot=None, k_slot=None, scale=None,
                       initial_state=None, cu_seqlens=None, backend="auto") -> NHAGrads:
    """Gradients of ``sum(o * do)`` for the output ``o`` and ``lse`` of :func:`attention`.

    Takes the forward's inputs and options unchanged plus ``do`` [B,T,HQ,V], ``o`` [B,T,HQ,V]
    and ``lse`` [B,HQ,T]. Returns :class:`NHAGrads` ``(dq, dk, dv, dg, ds, dq_slot, dk_slot,
    dstate)``; the gradient through a final state is not part of the loss.
    """
    arrays = dict(q=q, k=k, v=v, g=g, s=s, q_slot=q_slot, k_slot=k_slot, do=do, o=o, lse=lse)
    with contextlib.ExitStack() as scope:   # the caller's CUDA stream from here on (_prepare)
        pre = _prepare("backward", arrays, window_size=window_size, scale=scale, initial_state=initial_state,
                       cu_seqlens=cu_seqlens, backend=backend, scope=scope)
        p, x, ops, layout = pre.p, pre.x, pre.ops, pre.layout
        dq, dk, dv, dg, ds, dq_slot, dk_slot, dhk0, dhv0 = pre.backend.backward(
            p, x["do"], x["q"], x["k"], x["v"], x["g"], x["s"], x["q_slot"], x["k_slot"], x["o"], x["lse"],
            pre.hk0, pre.hv0, pre.cu)
        # A derived s = 1 - exp(g) passes its gradient on to g: dg -= ds * exp(g). A backend with
        # chains_derived_s did that inside its kernel when it got s = None (then every s was derived).
        chained = x["s"] is None and pre.backend.chains_derived_s
        derived = np.zeros(int(x["g"].shape[1]), bool)
        if pre.derived_s:
            derived[layout.real if layout.extended else slice(None)] = True
        if layout.extended and not pre.state_s_cache:
            derived[layout.cached] = True
        if derived.any() and not chained:
            chain = ops.widen(ds) * ops.exp(ops.widen(x["g"]))
            if not derived.all():
                chain = chain * ops.from_host(derived.reshape(1, -1, 1, 1), like=chain)
            dg = ops.narrow(ops.widen(dg) - chain, like=dg)
        kind, native = interop.array_kind(q, "q"), pre.backend.array_kind
        out = lambda a: interop.to_caller(a, kind, native)  # noqa: E731
        if not layout.extended:
            dstate = None
            if initial_state is not None:
                dstate = _zero_like_state(ops, p, initial_state, dhk0, dhv0)
                dstate = NHAState(**{f: out(a) if f != "window_size" else a for f, a in dstate.__dict__.items()})
            return NHAGrads(out(dq), out(dk), out(dv), out(dg), out(ds) if s is not None else None,
                            out(dq_slot) if q_slot is not None else None,
                            out(dk_slot) if k_slot is not None else None, dstate)
        B, T = q.shape[0], q.shape[1]
        real = lambda a: ops.take(a, layout.real, 1).reshape((B, T) + tuple(a.shape[2:]))  # noqa: E731
        if k_slot is None and dk_slot is not None:   # k_slot was k for the new tokens
            dk_real = ops.add(real(dk), real(dk_slot))
        else:
            dk_real = real(dk)
        N, W = len(layout.lens), p.W
        ring_index = np.zeros(N * W, np.int64)
        ring_index[layout.src_ring[layout.cached]] = 1 + layout.cached

        def ring(a):
            trailing = tuple(int(d) for d in a.shape[2:])
            source = ops.cat([ops.zeros((1,) + trailing, p.dtype), _rows(a, trailing)], 0)
            return ops.take(source, ring_index, 0).reshape((N, W) + trailing)

        dk_cache = ring(dk)
        if dk_slot is not None and not pre.state_k_slot_cache:  # cached k_slot was k_cache
            dk_cache = ops.add(dk_cache, ring(dk_slot))
        dstate = NHAState(
            hk=dhk0, hv=dhv0, k_cache=dk_cache, v_cache=ring(dv), g_cache=ring(dg),
            s_cache=ring(ds) if pre.state_s_cache else None,
            k_slot_cache=ring(dk_slot) if pre.state_k_slot_cache else None,
            seen=ops.index(layout.seen), window_size=W,
        )
        dstate = NHAState(**{f: out(a) if f != "window_size" else a for f, a in dstate.__dict__.items()})
        return NHAGrads(out(real(dq)), out(dk_real), out(real(dv)), out(real(dg)),
                        out(real(ds)) if s is not None else None,
                        out(real(dq_slot)) if q_slot is not None else None,
                        out(real(dk_slot)) if k_slot is not None else None, dstate)


def _zero_like_state(ops, p, state, dhk0, dhv0) -> NHAState:
    z = lambda a: None if a is None else ops.zeros(tuple(a.shape), p.dtype)  # noqa: E731
    return NHAState(hk=dhk0, hv=dhv0, k_cache=z(state.k_cache), v_cache=z(state.v_cache), g_cache=z(state.g_cache),
                    s_cache=z(state.s_cache), k_slot_cache=z(state.k_slot_cache),
                    seen=ops.index(np.asarray(interop.to_host(state.seen, interop.array_kind(state.seen, "seen")))),
                    window_size=state.window_size)


def init_state(N, H, K, V, M, *, window_size, dtype="float32", like=None, with_s=False, with_k_slot=False):
    """An empty :class:`NHAState` for ``N`` sequences, to prefill or decode from scratch.

    ``hk`` [N,H,K,M] and ``hv`` [N,H,M,V] are zeros (float32; float64 when ``dtype`` is
    float64); the window cache [N,W,H,*] holds ``dtype``. ``like`` is an array whose library and
    device the state takes (default: NumPy on the CPU). ``with_s`` / ``with_k_slot`` keep caches
    for explicit ``s`` / ``k_slot``, which later calls must then pass.
    """
    W = check_window_size(window_size)
    for name, val in (("N", N), ("H", H), ("K", K), ("V", V), ("M", M)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {val!r}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {list(FLOAT_DTYPES)}, got {dtype!r}")
    kind = "numpy" if like is None else interop.array_kind(like, "like")
    device = "cpu" if like is None else interop.device_of(like, kind)
    ops = interop.NativeOps(kind if kind in ("torch", "cupy") else "numpy", device)
    sdt = "float64" if dtype == "float64" else "float32"
    if ops.native == "numpy" and dtype == "bfloat16":
        raise TypeError("dtype: NumPy has no bfloat16; pass like=<a torch tensor> for a bfloat16 state")
    state = NHAState(
        hk=ops.zeros((N, H, K, M), sdt), hv=ops.zeros((N, H, M, V), sdt),
        k_cache=ops.zeros((N, W, H, K), dtype), v_cache=ops.zeros((N, W, H, V), dtype),
        g_cache=ops.zeros((N, W, H, M), dtype), seen=ops.zeros((N,), "int64"), window_size=W,
        s_cache=ops.zeros((N, W, H, M), dtype) if with_s else None,
        k_slot_cache=ops.zeros((N, W, H, K), dtype) if with_k_slot else None,
    )
    if kind in ("numpy", "torch"):
        return state
    # CuPy's bfloat16 caches are uint16 bits: to_caller views them as the caller's bfloat16.
    return NHAState(**{f: interop.to_caller(a, kind, ops.native) if f != "window_size" else a
                       for f, a in state.__dict__.items()})


def decode_step(q_t, k_t, v_t, g_t, state, *, s_t=None, q_slot_t=None, k_slot_t=None, scale=None,
                backend="auto", in_place=False):
    """One decoding step for N sequences: evict into the slots, read slots + window, one softmax.

    Shapes: ``q_t`` [N,HQ,K] (or [N,1,HQ,K]), ``k_t`` [N,H,K], ``v_t`` [N,H,V], ``g_t`` /
    ``s_t`` [N,H,M], ``q_slot_t`` / ``k_slot_t`` like ``q_t`` / ``k_t``; ``state`` an
    :class:`NHAState` from :func:`attention` (``output_final_state=True``) or :func:`init_state`.
    Returns ``(o_t, state)`` with ``o_t`` [N,HQ,V] (or [N,1,HQ,V]) and the state after this
    token. With ``in_place=True`` the given state's arrays are updated and returned (CUDA
    graphs); otherwise they are left untouched.
    """
    squeeze = getattr(q_t, "ndim", len(getattr(q_t, "shape", ()))) == 3
    arrays = dict(q=q_t, k=k_t, v=v_t, g=g_t, s=s_t, q_slot=q_slot_t, k_slot=k_slot_t)
    for name, x in arrays.items():
        if x is None:
            continue
        nd = len(x.shape)
        if nd not in (3, 4) or (nd == 4 and int(x.shape[1]) != 1) or (nd == 3) != squeeze:
            want = "[N,HQ,K]" if name.startswith("q") else "[N,H,*]"
            raise ValueError(f"{name}_t: expected {want} (or with a time axis of 1, like q_t), got shape "
                             f"{[int(d) for d in x.shape]}")
        arrays[name] = x[:, None] if squeeze else x
    if not isinstance(state, NHAState):
        raise TypeError(f"state: expected an nha_core.NHAState, got {type(state).__name__}")
    if s_t is not None and state.s_cache is None:
        raise ValueError("s_t: the state has no s_cache; create it with init_state(..., with_s=True) "
                         "or prefill with s")
    if k_slot_t is not None and state.k_slot_cache is None:
        raise ValueError("k_slot_t: the state has no k_slot_cache; create it with init_state(..., with_k_slot=True) "
                         "or prefill with k_slot")
    p, _ = _describe("decode", arrays, window_size=state.window_size, scale=scale, initial_state=state,
                     cu_seqlens=None)
    b = registry.select(p, backend)
    kind = interop.array_kind(q_t, "q_t")
    if in_place and kind == "jax":
        raise ValueError("in_place: JAX arrays are immutable; call decode_step with in_place=False")
    with interop.caller_stream(kind, b.array_kind, p.device):   # the caller's CUDA stream (CUDA graphs)
        return _decode_native(p, b, kind, arrays, state, squeeze, in_place)


def _decode_native(p, b, kind, arrays, state, squeeze, in_place):
    """decode_step after validation: convert, run the backend, convert back."""
    ops = interop.NativeOps(b.array_kind, p.device)
    x = {n: None if a is None else interop.to_native(a, b.array_kind, interop.array_kind(a, n))[:, 0]
         for n, a in arrays.items()}
    if x["s"] is None and not b.derives_s:
        x["s"] = _derive_s(ops, x["g"])
    if x["k_slot"] is None and state.k_slot_cache is not None:
        x["k_slot"] = x["k"]
    native_state = NHAState(**{f: interop.to_native(a, b.array_kind, interop.array_kind(a, f))
                               if f != "window_size" and a is not None else a for f, a in state.__dict__.items()})
    if not in_place:
        native_state = NHAState(**{f: ops.copy(a) if f != "window_size" else a
                                   for f, a in native_state.__dict__.items()})
    o, _lse = b.decode(p, x["q"], x["k"], x["v"], x["g"], x["s"], x["q_slot"], x["k_slot"], native_state)
    o = interop.to_caller(o if squeeze else o[:, None], kind, b.array_kind)
    if in_place and b.array_kind == kind:
        return o, state
    new_state = NHAState(**{f: interop.to_caller(a, kind, b.array_kind) if f != "window_size" else a
                            for f, a in native_state.__dict__.items()})
    return o, new_state
