"""NumPy backend: chunk-parallel NHA on the CPU with BLAS matrix products (float32, float64).

Large calls are split over KV heads into worker threads (see ``configs.num_workers``); each
worker runs the same chunked kernels on its heads with single-threaded BLAS.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses

import numpy as np

from nha_core.registry import Backend

from . import configs

_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _over_heads(p, run, inputs, out_axes):
    """Run ``run(sub_p, *sliced_inputs)`` on groups of KV heads in threads; join the outputs.

    ``inputs`` pairs every argument with its head axis and whether it is indexed by query heads
    (True) or KV heads (False); ``out_axes`` gives each output's head axis in the same way.
    """
    global _pool
    workers = configs.num_workers(p)
    if workers == 1:
        with _one_blas_thread():
            return run(p, *(a for a, _ in inputs))
    bounds = np.linspace(0, p.H, workers + 1).round().astype(int)
    G = p.G

    def part(i):
        h0, h1 = int(bounds[i]), int(bounds[i + 1])
        sub = dataclasses.replace(p, H=h1 - h0, HQ=(h1 - h0) * G)
        args = []
        for a, (axis, by_query) in inputs:
            if a is None or axis is None:
                args.append(a)
                continue
            lo, hi = (h0 * G, h1 * G) if by_query else (h0, h1)
            index = [slice(None)] * a.ndim
            index[axis] = slice(lo, hi)
            args.append(a[tuple(index)])
        return run(sub, *args)

    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(max(2, workers), thread_name_prefix="nha_core")
    with _one_blas_thread():
        parts = list(_pool.map(part, range(workers)))
    return tuple(None if parts[0][j] is None else np.concatenate([r[j] for r in parts], axis=axis)
                 for j, (axis, _) in enumerate(out_axes))


_blas = None  # a cached threadpoolctl controller: scanning the loaded libraries costs ~1 ms


@contextlib.contextmanager
def _one_blas_thread():
    """Hold BLAS to one thread: our parallelism is over heads, and the GEMMs are small."""
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController

            _blas = ThreadpoolController()
        except ImportError:  # still correct, only oversubscribed
            _blas = False
    if not _blas:
        yield
        return
    with _blas.limit(limits=1, user_api="blas"):
        yield


def _derived_s(run, s_index):
    """Wrap ``run`` so that s = None becomes -expm1(g) per worker (on its heads, in parallel)."""
    def wrapped(p, *args):
        if args[s_index] is None:
            g = args[s_index - 1]
            args = args[:s_index] + (-np.expm1(g),) + args[s_index + 1:]
        return run(p, *args)
    return wrapped


Q, KV, NONE = (2, True), (2, False), (None, False)   # head axis of [B,T,heads,dim] arrays
STATE = (1, False)                                     # head axis of [N,H,...] states / [B,HQ,T] lse
LSE = (1, True)


class NumpyBackend(Backend, configs=configs):
    array_kind = "numpy"
    derives_s = True  # s = -expm1(g) is computed per worker thread (np.expm1 is not vectorised)

    def forward(self, p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu_seqlens):
        from .forward import forward

        inputs = [(q, Q), (k, KV), (v, KV), (g, KV), (s, KV), (q_slot, Q), (k_slot, KV), (hk0, STATE),
                  (hv0, STATE), (cu_seqlens, NONE)]
        return _over_heads(p, _derived_s(forward, 4), inputs, [Q, LSE, STATE, STATE])

    def backward(self, p, do, q, k, v, g, s, q_slot, k_slot, o, lse, hk0, hv0, cu_seqlens):
        from .backward import backward

        inputs = [(do, Q), (q, Q), (k, KV), (v, KV), (g, KV), (s, KV), (q_slot, Q), (k_slot, KV), (o, Q),
                  (lse, LSE), (hk0, STATE), (hv0, STATE), (cu_seqlens, NONE)]
        return _over_heads(p, _derived_s(backward, 5), inputs, [Q, KV, KV, KV, KV, Q, KV, STATE, STATE])

    def decode(self, p, q, k, v, g, s, q_slot, k_slot, state):
        from .decode import decode

        return decode(p, q, k, v, g, -np.expm1(g) if s is None else s, q_slot, k_slot, state)


BACKEND = NumpyBackend()
