"""API contract: signatures, import hygiene, error text (SPEC §3-4), registry, DLPack, CLI."""
from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest

import nha_core
from nha_core import registry


def small(B=1, T=6, HQ=2, H=1, K=4, V=3, M=2, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, T, HQ, K)).astype(dtype), rng.standard_normal((B, T, H, K)).astype(dtype),
            rng.standard_normal((B, T, H, V)).astype(dtype), -rng.random((B, T, H, M)).astype(dtype))


# ---------------------------------------------------------------- signatures and imports

@pytest.mark.parametrize("fn, positional", [
    (nha_core.attention, ["q", "k", "v", "g"]),
    (nha_core.attention_backward, ["do", "q", "k", "v", "g", "o", "lse"]),
    (nha_core.decode_step, ["q_t", "k_t", "v_t", "g_t", "state"]),
])
def test_options_are_keyword_only(fn, positional):
    params = inspect.signature(fn).parameters.values()
    assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == positional
    assert all(p.kind is p.KEYWORD_ONLY for p in params if p.name not in positional)


def test_attention_signature_matches_spec():
    params = inspect.signature(nha_core.attention).parameters
    expected = {"window_size": inspect.Parameter.empty, "s": None, "q_slot": None, "k_slot": None, "scale": None,
                "initial_state": None, "output_final_state": False, "cu_seqlens": None, "return_lse": False,
                "backend": "auto"}
    assert {n: params[n].default for n in expected} == expected


def test_import_loads_only_numpy():
    """`import nha_core` and a NumPy call under backend="auto" load no GPU framework."""
    code = ("import sys, numpy as np, nha_core; x = np.ones((1, 3, 1, 2), np.float32); "
            "nha_core.attention(x, x, x, -x, window_size=1); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'cupy', 'jax')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_backends_listing_has_reasons():
    listing = nha_core.backends()
    assert {"numpy", "triton", "cupy"} <= set(listing)
    assert listing["numpy"]["usable"]
    for name, row in listing.items():
        assert row["usable"] or row["reason"], name


# ---------------------------------------------------------------- bad input (SPEC §4)

@pytest.mark.parametrize("mutate, error, text", [
    (lambda a: {**a, "q": a["q"][0]}, ValueError, "q: expected 4 dims [B,T,HQ,K], got shape [6, 2, 4]"),
    (lambda a: {**a, "k": a["k"][:, :5]}, ValueError, "k: expected T = 6"),
    (lambda a: {**a, "v": np.zeros((2, 6, 1, 3), np.float32)}, ValueError, "v: expected B = 1"),
    (lambda a: {**a, "k": np.zeros((1, 6, 1, 5), np.float32)}, ValueError, "k: expected K = 4"),
    (lambda a: {**a, "g": np.zeros((1, 6, 2, 2), np.float32)}, ValueError, "g: expected H = 1"),
    (lambda a: {**a, "q": np.zeros((1, 6, 3, 4), np.float32), "k": np.zeros((1, 6, 2, 4), np.float32),
                "v": np.zeros((1, 6, 2, 3), np.float32), "g": np.zeros((1, 6, 2, 2), np.float32)},
     ValueError, "HQ = 3, H = 2"),
    (lambda a: {**a, "window_size": -1}, ValueError, "window_size: expected a non-negative int, got -1"),
    (lambda a: {**a, "window_size": 2.5}, TypeError, "window_size: expected a non-negative int, got float 2.5"),
    (lambda a: {**a, "window_size": True}, TypeError, "window_size: expected a non-negative int, got bool"),
    (lambda a: {**a, "g": a["g"].astype(np.float64)}, TypeError, "g: expected dtype float32 (the dtype of q), got float64"),
    (lambda a: {**a, "q": a["q"].astype(np.int32)}, TypeError, "q: expected a floating dtype"),
    (lambda a: {**a, "q": [[1.0]]}, TypeError, "q: expected an array"),
    (lambda a: {**a, "cu_seqlens": np.array([0, 3, 6], np.float32)}, TypeError, "cu_seqlens: expected an integer dtype"),
    (lambda a: {**a, "cu_seqlens": np.array([1, 3, 6])}, ValueError, "cu_seqlens: must start at 0"),
    (lambda a: {**a, "cu_seqlens": np.array([0, 4, 3, 6])}, ValueError, "cu_seqlens: must be non-decreasing"),
    (lambda a: {**a, "cu_seqlens": np.array([0, 3, 5])}, ValueError, "cu_seqlens: last entry must equal T = 6, got 5"),
    (lambda a: {**a, "window_size": 0, "g": a["g"][..., :0]}, ValueError, "W = 0 with M = 0 slots"),
    (lambda a: {**a, "scale": float("nan")}, ValueError, "scale: expected a finite float"),
    (lambda a: {**a, "backend": "nope"}, ValueError, "backend: expected 'auto' or one of"),
])
def test_bad_input_is_named(mutate, error, text):
    q, k, v, g = small()
    args = mutate(dict(q=q, k=k, v=v, g=g, window_size=2))
    with pytest.raises(error) as info:
        nha_core.attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), **args)
    assert text in str(info.value)


def test_cu_seqlens_needs_batch_one():
    q, k, v, g = small(B=2)
    with pytest.raises(ValueError, match=r"cu_seqlens: packs sequences along T and needs B == 1, got B = 2"):
        nha_core.attention(q, k, v, g, window_size=2, cu_seqlens=np.array([0, 6]))


def test_state_of_wrong_window_or_shape():
    q, k, v, g = small()
    _, _, state = nha_core.attention(q, k, v, g, window_size=2, output_final_state=True)
    with pytest.raises(ValueError, match="initial_state: expected a state of window_size 3, got one of window_size 2"):
        nha_core.attention(q, k, v, g, window_size=3, initial_state=state)
    q2, k2, v2, g2 = small(B=2)
    with pytest.raises(ValueError, match=r"initial_state.hk: expected shape \[2, 1, 4, 2\], got \[1, 1, 4, 2\]"):
        nha_core.attention(q2, k2, v2, g2, window_size=2, initial_state=state)
    with pytest.raises(TypeError, match="initial_state: expected an nha_core.NHAState"):
        nha_core.attention(q, k, v, g, window_size=2, initial_state={"hk": 0})


def test_unsupported_dtype_lists_every_backend():
    q, k, v, g = small(dtype=np.float16)
    with pytest.raises(NotImplementedError) as info:
        nha_core.attention(q, k, v, g, window_size=2)
    text = str(info.value)
    assert "no backend can run forward B1-T6-HQ2-H1-K4-V3-M2-W2-float16 on cpu" in text
    assert "numpy: dtype float16 not in ['float32', 'float64']" in text
    assert "triton:" in text and "cupy:" in text
    with pytest.raises(NotImplementedError, match="backend 'numpy' cannot run"):
        nha_core.attention(q, k, v, g, window_size=2, backend="numpy")


def test_named_backend_never_falls_back():
    q, k, v, g = small()
    if nha_core.backends()["cupy"]["usable"]:
        pytest.skip("cupy is usable here; the refusal path needs a machine without it")
    with pytest.raises(NotImplementedError, match="backend 'cupy' cannot run"):
        nha_core.attention(q, k, v, g, window_size=2, backend="cupy")


def test_decode_errors_name_the_argument():
    state = nha_core.init_state(2, 1, 4, 3, 2, window_size=3)
    q, k, v, g = small(B=2, T=1)
    with pytest.raises(ValueError, match="s_t: the state has no s_cache"):
        nha_core.decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state, s_t=-g[:, 0])
    with pytest.raises(ValueError, match=r"k_t: expected \[N,H,\*\]"):
        nha_core.decode_step(q[:, 0], k, v[:, 0], g[:, 0], state)
    with pytest.raises(ValueError, match="initial_state.hk: expected shape"):
        nha_core.decode_step(q[:1, 0], k[:1, 0], v[:1, 0], g[:1, 0], state)


def test_registry_refusal_reasons_are_plain_words():
    p = nha_core.Problem(mode="forward", B=1, T=4, HQ=1, H=1, K=2048, V=4, M=4, W=2, N=1, dtype="float16",
                         device="cuda:0", array_kind="torch", scale=1.0)
    reasons = registry.get("numpy").not_supported_reasons(p)
    assert "device cuda:0 not in ['cpu']" in reasons
    assert "dtype float16 not in ['float32', 'float64']" in reasons
    assert "head dim 2048 > 1024" in reasons


# ---------------------------------------------------------------- behaviour

def test_return_forms():
    q, k, v, g = small()
    o = nha_core.attention(q, k, v, g, window_size=2)
    assert isinstance(o, np.ndarray) and o.shape == (1, 6, 2, 3) and o.dtype == np.float32
    o2, lse, state = nha_core.attention(q, k, v, g, window_size=2, return_lse=True)
    assert state is None and lse.shape == (1, 2, 6) and lse.dtype == np.float32
    o3, lse3, state3 = nha_core.attention(q, k, v, g, window_size=2, output_final_state=True)
    assert lse3 is None and state3.hk.shape == (1, 1, 4, 2) and state3.k_cache.shape == (1, 2, 1, 4)
    np.testing.assert_array_equal(o, o2)


def test_extreme_inputs_stay_finite():
    q, k, v, g = small(T=20, M=3)
    q, k = q * 1e3, k * 1e3                      # logits ~ 1e6
    g[:, ::3] = -np.inf                          # exact resets
    g[:, 1::3] = -1e4
    o, lse, state = nha_core.attention(q, k, v, g, window_size=4, return_lse=True, output_final_state=True)
    assert np.isfinite(o).all() and np.isfinite(lse).all() and np.isfinite(state.hk).all()


def test_torch_cpu_tensors_round_trip():
    torch = pytest.importorskip("torch")
    q, k, v, g = small()
    out_np = nha_core.attention(q, k, v, g, window_size=2)
    out_t = nha_core.attention(*(torch.from_numpy(a) for a in (q, k, v, g)), window_size=2)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_array_equal(out_t.numpy(), out_np)


def test_generic_dlpack_input_comes_back_as_numpy():
    class Wrapped:  # a minimal DLPack producer that is not one of the known libraries
        def __init__(self, a):
            self.a = a
            self.shape, self.dtype = a.shape, a.dtype

        def __dlpack__(self, **kwargs):
            return self.a.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    q, k, v, g = small()
    out = nha_core.attention(Wrapped(q), Wrapped(k), Wrapped(v), Wrapped(g), window_size=2)
    np.testing.assert_array_equal(out, nha_core.attention(q, k, v, g, window_size=2))


def test_cli_info_and_small_demo():
    info = subprocess.run([sys.executable, "-m", "nha_core", "info"], capture_output=True, text=True, check=True)
    assert "numpy    usable" in info.stdout
    demo = subprocess.run([sys.executable, "-m", "nha_core", "demo", "--tokens", "300", "--heads", "2",
                           "--decode", "20", "--check", "100"], capture_output=True, text=True)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "result  : OK" in demo.stdout


def test_strided_torch_views_give_contiguous_results():
    torch = pytest.importorskip("torch")
    q, k, v, g = small(T=9)
    want = nha_core.attention(q, k, v, g, window_size=3)
    # [B,HQ,T,K] storage viewed as [B,T,HQ,K]: non-contiguous, as after a head-first projection
    views = [torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1, 3))).transpose(1, 2) for a in (q, k, v, g)]
    assert not views[0].is_contiguous()
    got = nha_core.attention(*views, window_size=3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_third_party_backend_plugs_into_auto_dispatch(monkeypatch):
    """A registered backend (what an entry point of group nha_core.backends yields) is dispatched to."""
    calls = []

    class Half(nha_core.Backend):  # a float16 CPU backend that delegates to the reference
        name, priority, devices, dtypes, array_kind = "half_ref", 60, ("cpu",), ("float16",), "numpy"

        def forward(self, p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu_seqlens):
            from nha_core import reference
            calls.append(p.describe())
            o, lse, hk, hv = reference.forward(q, k, v, g, window_size=p.W, s=s, scale=p.scale)
            return o.astype(q.dtype), lse.astype("float32"), hk, hv

    monkeypatch.setattr(registry, "_registry", dict(registry.all_backends()))
    nha_core.register(Half())
    q, k, v, g = small(dtype=np.float16)
    o = nha_core.attention(q, k, v, g, window_size=2)
    assert o.dtype == np.float16 and calls == ["forward B1-T6-HQ2-H1-K4-V3-M2-W2-float16 on cpu"]
    assert "half_ref" in nha_core.backends()
