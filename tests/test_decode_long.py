"""SPEC §5: 10,000 decode steps after a prefill stay within the accuracy bound of one prefill."""
from __future__ import annotations

import numpy as np
import pytest

import nha_core

from .cases import rel_err


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_ten_thousand_decode_steps_match_one_shot_prefill(dtype, tol):
    rng = np.random.default_rng(7)
    N, HQ, H, K, V, M, W, T0, steps = 2, 4, 2, 8, 6, 4, 16, 100, 10_000
    T = T0 + steps
    q = rng.standard_normal((N, T, HQ, K)).astype(dtype)
    k = rng.standard_normal((N, T, H, K)).astype(dtype)
    v = rng.standard_normal((N, T, H, V)).astype(dtype)
    g = (-np.logaddexp(0.0, -rng.standard_normal((N, T, H, M))) / 16).astype(dtype)
    full = nha_core.attention(q, k, v, g, window_size=W, backend="numpy")
    _, _, state = nha_core.attention(q[:, :T0], k[:, :T0], v[:, :T0], g[:, :T0], window_size=W,
                                     output_final_state=True, backend="numpy")
    before = {n: a.copy() for n, a in state.arrays().items()}
    out = np.empty((N, steps, HQ, V), dtype)
    o_t, s1 = nha_core.decode_step(q[:, T0], k[:, T0], v[:, T0], g[:, T0], state, backend="numpy")
    for n, a in state.arrays().items():  # in_place=False leaves the caller's state alone
        np.testing.assert_array_equal(a, before[n], err_msg=n)
    out[:, 0], state = o_t, s1
    for i in range(1, steps):
        t = T0 + i
        out[:, i], state = nha_core.decode_step(q[:, t], k[:, t], v[:, t], g[:, t], state, backend="numpy",
                                                in_place=True)
    assert rel_err(out, full[:, T0:]) <= tol
    assert list(state.seen) == [T, T]
