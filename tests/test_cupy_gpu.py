"""CuPy backend against the fp64 oracle (needs a CUDA GPU and cupy: `pytest -m gpu`).

Inputs are rounded to the tested dtype first and the oracle runs on the rounded values, so the
bounds (relative L2 error; SPEC section 5: fp32 <= 1e-3, fp16/bf16 <= 2e-2 on GPU) measure the
kernels' arithmetic only.
"""
import numpy as np
import pytest

from nha_core.problem import Problem
from nha_core.state import NHAState
from nha_core import reference

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy", reason="cupy: not installed")
try:
    _N_DEV = cupy.cuda.runtime.getDeviceCount()
except Exception:  # no driver
    _N_DEV = 0
if _N_DEV < 1:
    pytest.skip("cupy: no CUDA device", allow_module_level=True)

from nha_core.backends.cupy import BACKEND  # noqa: E402

TOL = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 2e-2}


def round_to(x, dtype):
    """float64 -> values exactly representable in dtype (bf16: round to nearest even)."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "float32":
        return x.astype(np.float32).astype(np.float64)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float64)
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32).astype(np.float64)


def to_dev(x, dtype):
    """Host float64 (already rounded) -> CuPy array of the kernel dtype (bf16 as uint16 bits)."""
    if x is None:
        return None
    if dtype == "bfloat16":
        bits = (np.asarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return cupy.asarray(bits)
    return cupy.asarray(np.asarray(x, dtype=dtype))


def to_host(x, dtype):
    x = cupy.asnumpy(x)
    if dtype == "bfloat16" and x.dtype == np.uint16:
        return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return x.astype(np.float64)


def rel(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(out).all(), "non-finite values"
    if ref.size == 0:
        return 0.0
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (den if den > 0 else 1.0))


CASES = {
    # id: B, T, HQ, H, K, V, M, W, options
    "B2-T63-HQ4-H2-K20-V24-M8-W16": (2, 63, 4, 2, 20, 24, 8, 16, {}),
    "B1-T1-HQ2-H2-K16-V16-M4-W4": (1, 1, 2, 2, 16, 16, 4, 4, {}),
    "B2-T10-HQ2-H1-K8-V12-M5-W32-TltW": (2, 10, 2, 1, 8, 12, 5, 32, {}),
    "B1-T70-HQ2-H2-K16-V8-M6-W0": (1, 70, 2, 2, 16, 8, 6, 0, {}),
    "B1-T40-HQ2-H2-K16-V16-M4-W40-WgeT": (1, 40, 2, 2, 16, 16, 4, 40, {}),
    "B1-T40-HQ2-H2-K16-V16-M0-W100-M0": (1, 40, 2, 2, 16, 16, 0, 100, {}),
    "B1-T50-HQ3-H3-K12-V12-M0-W7-M0": (1, 50, 3, 3, 12, 12, 0, 7, {}),
    "B1-T80-HQ2-H2-K16-V16-M8-W1": (1, 80, 2, 2, 16, 16, 8, 1, {}),
    "B1-T70-HQ4-H2-K24-V16-M8-W7-varlen-init": (1, 70, 4, 2, 24, 16, 8, 7, {"cu": [0, 5, 5, 37, 70], "init": True}),
    "B2-T90-HQ2-H2-K16-V16-M8-W5-ninf": (2, 90, 2, 2, 16, 16, 8, 5, {"ninf": True}),
    "B2-T90-HQ4-H1-K16-V16-M8-W9-slots-init": (2, 90, 4, 1, 16, 16, 8, 9, {"slots": True, "init": True}),
    "B1-T100-HQ2-H2-K128-V128-M64-W24": (1, 100, 2, 2, 128, 128, 64, 24, {}),
    "B1-T40-HQ1-H1-K256-V256-M256-W16": (1, 40, 1, 1, 256, 256, 256, 16, {"init": True}),
    # tensor-core forward (16-bit, K/V/M multiples of 16): weak gates take the factored slot path,
    # strong ones and -inf resets the explicit one; several window tiles, GQA, varlen
    "B2-T300-HQ4-H2-K64-V32-M32-W100-tc-weak": (2, 300, 4, 2, 64, 32, 32, 100, {"weak": True}),
    "B1-T300-HQ2-H1-K32-V64-M16-W70-tc-varlen": (1, 300, 2, 1, 32, 64, 16, 70,
                                                {"cu": [0, 130, 131, 300], "ninf": True, "init": True,
                                                 "slots": True}),
    # register-tile forward (bfloat16, nha_fwd_main_mma): chunks whose decays factor run there, the
    # ones with early -inf resets go to nha_fwd_redo in the same call; varlen with 1-token sequences
    # and W >= T; M = 48 (not a divisor of the 128 threads: two gate threads per slot column in
    # nha_fwd_main_mma, 32 threads idle there; three 16-slot tiles in the state walk)
    "B2-T200-HQ4-H2-K64-V64-M64-W70-mma-mixed": (2, 200, 4, 2, 64, 64, 64, 70,
                                                 {"weak": True, "reset_early": True, "slots": True, "init": True}),
    "B1-T150-HQ2-H2-K128-V128-M64-W600-mma-varlen": (1, 150, 2, 2, 128, 128, 64, 600,
                                                     {"weak": True, "cu": [0, 1, 64, 65, 150]}),
    "B1-T90-HQ2-H1-K16-V48-M48-W1-mma": (1, 90, 2, 1, 16, 48, 48, 1, {"weak": True}),
}
MMA_CASES = [name for name in CASES if "-mma" in name] + ["B2-T300-HQ4-H2-K64-V32-M32-W100-tc-weak"]


def make(case, dtype, seed=0):
    B, T, HQ, H, K, V, M, W, opt = case
    rng = np.random.default_rng(seed)
    r = lambda *shape: round_to(rng.standard_normal(shape), dtype)  # noqa: E731
    x = {"q": r(B, T, HQ, K), "k": r(B, T, H, K), "v": r(B, T, H, V)}
    g = -rng.uniform(0.02, 1.5, (B, T, H, M))
    if opt.get("weak"):
        g = -rng.uniform(0.001, 0.2, (B, T, H, M))
    if opt.get("ninf"):
        g[rng.random(g.shape) < 0.1] = -np.inf
    if opt.get("reset_early"):  # resets in the first tokens of the first sequence only
        g[0, :20][rng.random(g[0, :20].shape) < 0.2] = -np.inf
    x["g"] = round_to(g, dtype)
    x["s"] = round_to(-np.expm1(x["g"]), dtype)
    x["q_slot"] = r(B, T, HQ, K) if opt.get("slots") else None
    x["k_slot"] = r(B, T, H, K) if opt.get("slots") else None
    cu = opt.get("cu")
    N = len(cu) - 1 if cu else B
    x["hk0"] = 0.3 * rng.standard_normal((N, H, K, M)) if opt.get("init") else None
    x["hv0"] = 0.3 * rng.standard_normal((N, H, M, V)) if opt.get("init") else None
    x["cu"] = None if cu is None else np.asarray(cu, dtype=np.int64)
    p = Problem(mode="forward", B=B, T=T, HQ=HQ, H=H, K=K, V=V, M=M, W=W, N=N, dtype=dtype,
                device="cuda:0", array_kind="cupy", scale=K ** -0.5, has_s=True,
                has_q_slot=x["q_slot"] is not None, has_k_slot=x["k_slot"] is not None,
                has_initial_state=x["hk0"] is not None, output_final_state=True, return_lse=True,
                varlen=cu is not None)
    return p, x


def ref_kwargs(p, x):
    return dict(window_size=p.W, s=x["s"], q_slot=x["q_slot"], k_slot=x["k_slot"], scale=p.scale,
                hk0=x["hk0"], hv0=x["hv0"], cu_seqlens=x["cu"])


def dev_args(p, x):
    d = lambda a: to_dev(a, p.dtype)  # noqa: E731
    f = lambda a: None if a is None else cupy.asarray(a, dtype=cupy.float32)  # noqa: E731
    cu = None if x["cu"] is None else cupy.asarray(x["cu"])
    return (d(x["q"]), d(x["k"]), d(x["v"]), d(x["g"]), d(x["s"]), d(x["q_slot"]), d(x["k_slot"]),
            f(x["hk0"]), f(x["hv0"]), cu)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward(name, dtype):
    p, x = make(CASES[name], dtype)
    o, lse, hk, hv = BACKEND.forward(p, *dev_args(p, x))
    o_r, lse_r, hk_r, hv_r = reference.forward(x["q"], x["k"], x["v"], x["g"], **ref_kwargs(p, x))
    tol = TOL[dtype]
    assert rel(to_host(o, dtype), o_r) <= tol
    assert rel(cupy.asnumpy(lse), lse_r) <= tol
    assert rel(cupy.asnumpy(hk), hk_r) <= tol
    assert rel(cupy.asnumpy(hv), hv_r) <= tol


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", list(CASES))
def test_backward(name, dtype):
    p, x = make(CASES[name], dtype)
    p = Problem(**{**p.__dict__, "mode": "backward", "output_final_state": False})
    args = dev_args(p, x)
    o, lse, _, _ = BACKEND.forward(p, *args)
    rng = np.random.default_rng(1)
    do = round_to(rng.standard_normal(o.shape), dtype)
    q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu = args
    grads = BACKEND.backward(p, to_dev(do, dtype), q, k, v, g, s, q_slot, k_slot, o, lse, hk0, hv0, cu)
    names = ("dq", "dk", "dv", "dg", "ds", "dq_slot", "dk_slot", "dhk0", "dhv0")
    ref = reference.backward(do, x["q"], x["k"], x["v"], x["g"], **ref_kwargs(p, x))
    for key, out in zip(names, grads):
        if ref[key] is None:
            assert out is None, key
            continue
        assert out is not None, key
        err = rel(to_host(out, dtype), ref[key])
        assert err <= TOL[dtype], f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", ["B2-T63-HQ4-H2-K20-V24-M8-W16", "B1-T70-HQ2-H2-K16-V8-M6-W0",
                                  "B2-T10-HQ2-H1-K8-V12-M5-W32-TltW", "B1-T50-HQ3-H3-K12-V12-M0-W7-M0",
                                  "B2-T90-HQ4-H1-K16-V16-M8-W9-slots-init"])
def test_decode_after_prefill(name, dtype):
    """Prefill with the oracle, then 5 decode steps on the GPU against reference.decode_step."""
    p, x = make(CASES[name], dtype)
    _, _, hk, hv = reference.forward(x["q"], x["k"], x["v"], x["g"], **ref_kwargs(p, x))
    st = reference.state_from_prefill(x["k"], x["v"], x["g"], hk, hv, window_size=p.W, s=None,
                                      k_slot=x["k_slot"], cu_seqlens=x["cu"])
    N = hk.shape[0]
    d = lambda a: to_dev(a, dtype)  # noqa: E731
    state = NHAState(hk=cupy.asarray(st["hk"], dtype=cupy.float32), hv=cupy.asarray(st["hv"], dtype=cupy.float32),
                     k_cache=d(st["k_cache"]), v_cache=d(st["v_cache"]), g_cache=d(st["g_cache"]),
                     seen=cupy.asarray(st["seen"]), window_size=p.W,
                     k_slot_cache=d(st["k_slot_cache"]))
    st["hk"] = cupy.asnumpy(state.hk).astype(np.float64)  # the oracle continues from the same fp32 state
    st["hv"] = cupy.asnumpy(state.hv).astype(np.float64)
    pd = Problem(**{**p.__dict__, "mode": "decode", "B": N, "T": 1, "N": N, "varlen": False,
                    "has_initial_state": True, "output_final_state": False})
    rng = np.random.default_rng(2)
    for step in range(5):
        r = lambda *shape: round_to(rng.standard_normal(shape), dtype)  # noqa: E731
        q, k, v = r(N, p.HQ, p.K), r(N, p.H, p.K), r(N, p.H, p.V)
        g = round_to(-rng.uniform(0.02, 1.5, (N, p.H, p.M)), dtype)
        s = round_to(-np.expm1(g), dtype)
        q_slot = r(N, p.HQ, p.K) if x["q_slot"] is not None else None
        k_slot = r(N, p.H, p.K) if x["k_slot"] is not None else None
        o, lse = BACKEND.decode(pd, d(q), d(k), d(v), d(g), d(s), d(q_slot), d(k_slot), state)
        o_r, lse_r, st = reference.decode_step(q, k, v, g, st, s=s, q_slot=q_slot, k_slot=k_slot, scale=p.scale)
        assert rel(to_host(o, dtype), o_r) <= TOL[dtype], f"step {step}: o"
        assert rel(cupy.asnumpy(lse), lse_r) <= TOL[dtype], f"step {step}: lse"
        assert rel(cupy.asnumpy(state.hk), st["hk"]) <= TOL[dtype], f"step {step}: hk"
        assert (cupy.asnumpy(state.seen) == st["seen"]).all()


# Decode against reference.decode_step from a random state (any state is a valid one). Each case
# lists ``seen`` per sequence, so one launch mixes an empty ring, a partly filled one (its unwritten
# rows are NaN on the device: reading them fails the test), a just-full one, a wrapped one and a huge
# count. ``splits`` forces configs.DECODE_SPLITS (None: picked from the SM count as in production).
DECODE_CASES = {
    # id: HQ, H, K, V, M, W, seen per sequence, options
    "N4-HQ8-H2-K128-V128-M64-W2048-G4-spec-tile": (8, 2, 128, 128, 64, 2048, [2048, 4100, 700, 1_000_003], {}),
    "N3-HQ8-H2-K128-V128-M64-W300-G4-splits4": (8, 2, 128, 128, 64, 300, [301, 299, 40], {"splits": 4}),
    "N3-HQ4-H1-K128-V64-M32-W700-G4-splits1": (4, 1, 128, 64, 32, 700, [1400, 3, 699], {"splits": 1}),
    "N2-HQ2-H2-K20-V24-M8-W37-G1-unaligned": (2, 2, 20, 24, 8, 37, [90, 11], {}),
    "N2-HQ6-H2-K12-V8-M5-W7-G3": (6, 2, 12, 8, 5, 7, [7, 30], {"ninf": True}),
    "N3-HQ8-H1-K64-V32-M16-W100-G8-two-query-chunks": (8, 1, 64, 32, 16, 100, [250, 0, 64], {"splits": 2}),
    "N2-HQ4-H2-K16-V16-M0-W50-M0": (4, 2, 16, 16, 0, 50, [60, 20], {}),
    "N2-HQ4-H2-K16-V16-M8-W0-W0": (4, 2, 16, 16, 8, 0, [0, 33], {"ninf": True}),
    "N3-HQ4-H2-K16-V16-M8-W1-W1": (4, 2, 16, 16, 8, 1, [0, 1, 5], {}),
    "N2-HQ4-H2-K32-V32-M16-W40-explicit-s-slots": (4, 2, 32, 32, 16, 40, [45, 9], {"s": True, "slots": True}),
    "N2-HQ4-H2-K32-V32-M16-W0-explicit-s-slots": (4, 2, 32, 32, 16, 0, [3, 8], {"s": True, "slots": True}),
    "N2-HQ2-H1-K256-V256-M256-W80-max-dims": (2, 1, 256, 256, 256, 80, [100, 50], {"splits": 2}),
}


def _poison_cupy_empty(monkeypatch):
    """Fresh CuPy buffers start as NaN (bf16 bits as 0x7FC0): unwritten outputs and partials fail loudly."""
    make = cupy.empty

    def alloc(*args, **kwargs):
        out = make(*args, **kwargs)
        if out.dtype.kind == "f":
            out.fill(np.nan)
        elif out.dtype == cupy.uint16:
            out.fill(0x7FC0)
        return out

    monkeypatch.setattr(cupy, "empty", alloc)


def make_decode_state(case, dtype, rng):
    """Reference state (float64, zeros in rows never written) and the device NHAState (those rows NaN)."""
    HQ, H, K, V, M, W, seen, opt = case
    N = len(seen)
    seen = np.asarray(seen, dtype=np.int64)
    r = lambda *shape: round_to(rng.standard_normal(shape), dtype)  # noqa: E731
    g = -rng.uniform(0.02, 1.5, (N, W, H, M))
    if opt.get("ninf"):
        g[rng.random(g.shape) < 0.1] = -np.inf
    if opt.get("reset_early"):  # resets in the first tokens of the first sequence only
        g[0, :20][rng.random(g[0, :20].shape) < 0.2] = -np.inf
    st = {"hk": 0.3 * rng.standard_normal((N, H, K, M)).astype(np.float32).astype(np.float64),
          "hv": 0.3 * rng.standard_normal((N, H, M, V)).astype(np.float32).astype(np.float64),
          "k_cache": r(N, W, H, K), "v_cache": r(N, W, H, V), "g_cache": round_to(g, dtype),
          "s_cache": None, "k_slot_cache": r(N, W, H, K) if opt.get("slots") else None,
          "seen": seen, "window_size": W}
    if opt.get("s"):
        st["s_cache"] = round_to(-np.expm1(st["g_cache"]), dtype)
    written = np.arange(W)[None, :] < np.minimum(seen, W)[:, None]  # [N, W]: rows holding a token
    dev = {}
    for name in ("k_cache", "v_cache", "g_cache", "s_cache", "k_slot_cache"):
        if st[name] is None:
            continue
        st[name] = np.where(written[:, :, None, None], st[name], 0.0)
        dev[name] = to_dev(np.where(written[:, :, None, None], st[name], np.nan), dtype)
    state = NHAState(hk=cupy.asarray(st["hk"], dtype=cupy.float32), hv=cupy.asarray(st["hv"], dtype=cupy.float32),
                     seen=cupy.asarray(seen), window_size=W, **dev)
    return st, state


@pytest.mark.parametrize("variant", ["split", "split-stages0", "split-stages3", "per_head"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode(name, dtype, variant, monkeypatch):
    """3 decode steps from a random state against reference.decode_step: o, lse, the slots, the ring
    rows holding tokens and seen after every step. "split-stages0" / "split-stages3": the window rows
    through the register prefetch / the cp.async ring (configs.DECODE_STAGES = 0 / 3, the ring where
    decode_stages allows it), whatever the default."""
    from nha_core.backends.cupy import configs

    case = DECODE_CASES[name]
    HQ, H, K, V, M, W, seen, opt = case
    N = len(seen)
    kernel_set, _, stages = variant.partition("-stages")
    monkeypatch.setattr(configs, "DECODE_VARIANT", kernel_set)
    monkeypatch.setattr(configs, "DECODE_STAGES", int(stages) if stages else configs.DECODE_STAGES)
    monkeypatch.setattr(configs, "DECODE_SPLITS", opt.get("splits"))
    _poison_cupy_empty(monkeypatch)
    rng = np.random.default_rng(3)
    st, state = make_decode_state(case, dtype, rng)
    pd = Problem(mode="decode", B=N, T=1, HQ=HQ, H=H, K=K, V=V, M=M, W=W, N=N, dtype=dtype, device="cuda:0",
                 array_kind="cupy", scale=K ** -0.5, has_s=bool(opt.get("s")), has_q_slot=bool(opt.get("slots")),
                 has_k_slot=bool(opt.get("slots")), has_initial_state=True)
    d = lambda a: to_dev(a, dtype)  # noqa: E731
    tol = TOL[dtype]
    for step in range(3):
        r = lambda *shape: round_to(rng.standard_normal(shape), dtype)  # noqa: E731
        q, k, v = r(N, HQ, K), r(N, H, K), r(N, H, V)
        g = round_to(-rng.uniform(0.02, 1.5, (N, H, M)), dtype)
        s = round_to(-np.expm1(g), dtype) if opt.get("s") else None
        q_slot = r(N, HQ, K) if opt.get("slots") else None
        k_slot = r(N, H, K) if opt.get("slots") else None
        o, lse = BACKEND.decode(pd, d(q), d(k), d(v), d(g), d(s), d(q_slot), d(k_slot), state)
        o_r, lse_r, st = reference.decode_step(q, k, v, g, st, s=s, q_slot=q_slot, k_slot=k_slot, scale=pd.scale)
        assert rel(to_host(o, dtype), o_r) <= tol, f"step {step}: o"
        assert rel(cupy.asnumpy(lse), lse_r) <= tol, f"step {step}: lse"
        if M > 0:
            assert rel(cupy.asnumpy(state.hk), st["hk"]) <= tol, f"step {step}: hk"
            assert rel(cupy.asnumpy(state.hv), st["hv"]) <= tol, f"step {step}: hv"
        assert (cupy.asnumpy(state.seen) == st["seen"]).all()
        written = np.arange(W)[None, :] < np.minimum(st["seen"], W)[:, None]
        for cache in ("k_cache", "v_cache", "g_cache", "s_cache", "k_slot_cache"):
            if getattr(state, cache) is None:
                continue
            got = to_host(getattr(state, cache), dtype)[written]
            want = st[cache][written]
            assert np.array_equal(got, want), f"step {step}: {cache} rows holding tokens"


def test_decode_split_tiles():
    """The spec decode shape takes the tile ptxas was checked at (BG = 4 query heads, one 16-byte chunk
    per lane, 128 registers, no spills) and several splits per (sequence, KV head) on an H200."""
    from nha_core.backends.cupy import configs

    assert configs.decode_tiles(4, 128, 128, 2) == (4, 1)
    S, RS = configs.decode_splits(64, 8, 1, 2048, 132)
    assert S > 1 and RS % configs.DECODE_BR == 0 and (S - 1) * RS < 2048 <= S * RS


@pytest.mark.parametrize("dtype,name", [("bfloat16", "B2-T300-HQ4-H2-K64-V32-M32-W100-tc-weak"),
                                        ("float32", "B2-T300-HQ4-H2-K64-V32-M32-W100-tc-weak"),
                                        ("bfloat16", "B2-T200-HQ4-H2-K64-V64-M64-W70-mma-mixed")])
def test_forward_derived_s(dtype, name):
    """s = None (derives_s): the same result as passing s = 1 - exp(g)."""
    p, x = make(CASES[name], dtype)
    args = list(dev_args(p, x))
    o1, lse1, hk1, _ = BACKEND.forward(p, *args)
    args[4] = None
    o2, lse2, hk2, _ = BACKEND.forward(p, *args)
    assert rel(to_host(o2, dtype), to_host(o1, dtype)) <= 1e-2
    assert rel(cupy.asnumpy(lse2), cupy.asnumpy(lse1)) <= 1e-3
    assert rel(cupy.asnumpy(hk2), cupy.asnumpy(hk1)) <= 1e-2


@pytest.mark.parametrize("name", MMA_CASES)
def test_forward_mma_matches_wmma_kernel(name, monkeypatch):
    """The bf16 cases above do run the register-tile kernels (nha_fwd_state_mma, nha_fwd_main_mma),
    and agree with the WMMA kernels they replaced."""
    from nha_core.backends.cupy import configs

    p, x = make(CASES[name], "bfloat16")
    assert configs.use_mma(p)
    o1, lse1, hk1, hv1 = BACKEND.forward(p, *dev_args(p, x))
    monkeypatch.setattr(configs, "FWD_MMA", False)
    o2, lse2, hk2, hv2 = BACKEND.forward(p, *dev_args(p, x))
    assert rel(to_host(o1, "bfloat16"), to_host(o2, "bfloat16")) <= 1e-2
    assert rel(cupy.asnumpy(lse1), cupy.asnumpy(lse2)) <= 1e-3
    assert rel(cupy.asnumpy(hk1), cupy.asnumpy(hk2)) <= 1e-2
    assert rel(cupy.asnumpy(hv1), cupy.asnumpy(hv2)) <= 1e-2


@pytest.mark.parametrize("name", MMA_CASES)
def test_forward_state_scan(name, monkeypatch):
    """configs.MMA_STATE_PASS = "scan" (every chunk's own update, then a chain per state element)
    against the oracle and against the walk: chunk states enter o, lse and the final state."""
    from nha_core.backends.cupy import configs

    p, x = make(CASES[name], "bfloat16")
    monkeypatch.setattr(configs, "MMA_STATE_PASS", "walk")
    o1, lse1, hk1, hv1 = BACKEND.forward(p, *dev_args(p, x))
    monkeypatch.setattr(configs, "MMA_STATE_PASS", "scan")
    o2, lse2, hk2, hv2 = BACKEND.forward(p, *dev_args(p, x))
    o_r, lse_r, hk_r, hv_r = reference.forward(x["q"], x["k"], x["v"], x["g"], **ref_kwargs(p, x))
    assert rel(to_host(o2, "bfloat16"), o_r) <= TOL["bfloat16"]
    assert rel(cupy.asnumpy(lse2), lse_r) <= TOL["bfloat16"]
    assert rel(cupy.asnumpy(hk2), hk_r) <= TOL["bfloat16"]
    assert rel(cupy.asnumpy(hv2), hv_r) <= TOL["bfloat16"]
    assert rel(to_host(o2, "bfloat16"), to_host(o1, "bfloat16")) <= 1e-2
    assert rel(cupy.asnumpy(hk2), cupy.asnumpy(hk1)) <= 1e-2
    assert rel(cupy.asnumpy(hv2), cupy.asnumpy(hv1)) <= 1e-2


def test_availability_reason():
    assert BACKEND.availability() is None


# ----------------------------------------------------------------------------------------------
# Through the public API and the torch adapter, with torch CUDA tensors (as asv_bench/benchmarks/
# calls.py drives them). Regressions from an H200 run (torch 2.11, cupy-cuda13x 14.2):
#  - attention(..., output_final_state=True, backend="cupy") on bfloat16 raised AttributeError:
#    module 'cupy' has no attribute 'bfloat16' (the final state's ring buffer, NativeOps.zeros);
#  - nha_core.torch.attention(..., backend="cupy") on bfloat16 returned a torch.uint16 output (the
#    backend's bfloat16 bits came back through DLPack unviewed), so it had no grad_fn and
#    torch.autograd.grad raised "element 0 of tensors does not require grad".
# The CPU side of the same convention is in tests/test_cupy_interop.py.

API_CASES = {
    # id: B, T, HQ, H, K, V, M, W
    "B2-T40-HQ4-H2-K32-V32-M16-W9-tc": (2, 40, 4, 2, 32, 32, 16, 9),       # tensor-core forward
    "B2-T23-HQ4-H2-K20-V12-M5-W6-cuda-core": (2, 23, 4, 2, 20, 12, 5, 6),  # CUDA-core forward
}


def _torch_rounded(shape_or_array, dtype, rng=None):
    """fp64 data -> (the CUDA tensor in ``dtype``, the fp64 values it holds for the oracle)."""
    import torch

    a = rng.standard_normal(shape_or_array) if rng is not None else shape_or_array
    t = torch.as_tensor(np.asarray(a), device="cuda").to(getattr(torch, dtype))
    return t, t.double().cpu().numpy()


def _torch_host(t, dtype):
    import torch

    assert t.dtype == getattr(torch, dtype), f"expected {dtype}, got {t.dtype}"
    return t.detach().double().cpu().numpy()


def _api_inputs(case, dtype, seed=0):
    B, T, HQ, H, K, V, M, W = case
    rng = np.random.default_rng(seed)
    dev, ref = {}, {}
    for n, shape in (("q", (B, T, HQ, K)), ("k", (B, T, H, K)), ("v", (B, T, H, V))):
        dev[n], ref[n] = _torch_rounded(shape, dtype, rng)
    dev["g"], ref["g"] = _torch_rounded(-rng.uniform(0.02, 1.5, (B, T, H, M)), dtype)
    return dev, ref


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(API_CASES))
def test_api_torch_prefill_state_then_decode_in_place(name, dtype):
    """attention(output_final_state=True, backend="cupy") on torch tensors, then 3 in-place
    decode_step calls: outputs, state dtypes (torch, the input dtype for the caches) and values."""
    torch = pytest.importorskip("torch")
    import nha_core

    case = API_CASES[name]
    B, T, HQ, H, K, V, M, W = case
    dev, ref = _api_inputs(case, dtype)
    o, _, state = nha_core.attention(dev["q"], dev["k"], dev["v"], dev["g"], window_size=W,
                                     output_final_state=True, backend="cupy")
    o_r, _, hk_r, hv_r = reference.forward(ref["q"], ref["k"], ref["v"], ref["g"], window_size=W)
    assert rel(_torch_host(o, dtype), o_r) <= TOL[dtype]
    assert state.hk.dtype == torch.float32 and state.seen.dtype == torch.int64
    assert rel(state.hk.cpu().numpy(), hk_r) <= TOL[dtype] and rel(state.hv.cpu().numpy(), hv_r) <= TOL[dtype]
    st = reference.state_from_prefill(ref["k"], ref["v"], ref["g"], hk_r, hv_r, window_size=W)
    for f in ("k_cache", "v_cache", "g_cache"):
        assert np.array_equal(_torch_host(getattr(state, f), dtype), st[f]), f
    st["hk"] = state.hk.double().cpu().numpy()  # the oracle continues from the same fp32 state
    st["hv"] = state.hv.double().cpu().numpy()

    rng = np.random.default_rng(4)
    for step in range(3):
        t_dev, t_ref = {}, {}
        for n, shape in (("q", (B, HQ, K)), ("k", (B, H, K)), ("v", (B, H, V))):
            t_dev[n], t_ref[n] = _torch_rounded(shape, dtype, rng)
        t_dev["g"], t_ref["g"] = _torch_rounded(-rng.uniform(0.02, 1.5, (B, H, M)), dtype)
        o_t, new = nha_core.decode_step(t_dev["q"], t_dev["k"], t_dev["v"], t_dev["g"], state, backend="cupy",
                                        in_place=True)
        o_r, _, st = reference.decode_step(t_ref["q"], t_ref["k"], t_ref["v"], t_ref["g"], st)
        assert rel(_torch_host(o_t, dtype), o_r) <= TOL[dtype], f"step {step}: o"
        assert new.k_cache.data_ptr() == state.k_cache.data_ptr(), "in_place: the caller's arrays"
        assert rel(state.hk.cpu().numpy(), st["hk"]) <= TOL[dtype], f"step {step}: hk"
        assert (state.seen.cpu().numpy() == st["seen"]).all()
        for f in ("k_cache", "v_cache", "g_cache"):
            assert np.array_equal(_torch_host(getattr(state, f), dtype), st[f]), f"step {step}: {f}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(API_CASES))
def test_torch_adapter_forward_backward(name, dtype):
    """nha_core.torch.attention(backend="cupy") on leaves, then torch.autograd.grad (the asv
    forward_backward call): o and dq, dk, dv, dg in the input dtype within SPEC section 5."""
    torch = pytest.importorskip("torch")
    import nha_core.torch as nt

    case = API_CASES[name]
    B, T, HQ, H, K, V, M, W = case
    dev, ref = _api_inputs(case, dtype)
    leaves = [dev[n].detach().requires_grad_(True) for n in ("q", "k", "v", "g")]
    o = nt.attention(*leaves, window_size=W, backend="cupy")
    assert o.dtype == leaves[0].dtype and o.grad_fn is not None
    do, do_r = _torch_rounded((B, T, HQ, V), dtype, np.random.default_rng(1))
    grads = torch.autograd.grad(o, leaves, do)
    o_r = reference.forward(ref["q"], ref["k"], ref["v"], ref["g"], window_size=W)[0]
    assert rel(_torch_host(o, dtype), o_r) <= TOL[dtype]
    g_r = reference.backward(do_r, ref["q"], ref["k"], ref["v"], ref["g"], window_size=W)
    for key, grad in zip(("dq", "dk", "dv", "dg"), grads):
        err = rel(_torch_host(grad, dtype), g_r[key])
        assert err <= TOL[dtype], f"{key}: relative error {err:.2e}"


def test_work_runs_on_the_callers_stream(monkeypatch):
    """SPEC section 3 / issue 4: results on the caller's stream. A torch caller on a side stream
    gets CuPy kernels on that stream (interop.caller_stream), a CuPy caller on its own stream
    gets the Triton kernels on it; the outputs match a call on the default streams."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    import importlib

    import nha_core

    seen = []

    def spy(real, backend, current_stream):
        def forward(*args):
            seen.append((backend, current_stream()))
            return real(*args)
        return forward

    for backend, current_stream in (("cupy", lambda: cupy.cuda.get_current_stream().ptr),
                                    ("triton", lambda: torch.cuda.current_stream().cuda_stream)):
        module = importlib.import_module(f"nha_core.backends.{backend}.forward")
        monkeypatch.setattr(module, "forward", spy(module.forward, backend, current_stream))
    B, T, HQ, H, K, V, M, W = API_CASES[list(API_CASES)[0]]
    dev, _ = _api_inputs((B, T, HQ, H, K, V, M, W), "bfloat16")
    want = nha_core.attention(dev["q"], dev["k"], dev["v"], dev["g"], window_size=W, backend="cupy")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    seen.clear()
    with torch.cuda.stream(side):
        o = nha_core.attention(dev["q"], dev["k"], dev["v"], dev["g"], window_size=W, backend="cupy")
    side.synchronize()
    assert seen == [("cupy", side.cuda_stream)]
    assert torch.equal(o, want)

    x = {n: cupy.from_dlpack(dev[n].float()) for n in ("q", "k", "v", "g")}
    want_t = nha_core.attention(x["q"], x["k"], x["v"], x["g"], window_size=W, backend="triton")
    stream = cupy.cuda.Stream(non_blocking=True)
    seen.clear()
    with stream:
        o_t = nha_core.attention(x["q"], x["k"], x["v"], x["g"], window_size=W, backend="triton")
    stream.synchronize()
    assert seen == [("triton", stream.ptr)]
    assert bool((o_t == want_t).all())


def test_decode_captured_in_a_torch_cuda_graph():
    """A torch caller can capture the CuPy decode step in a CUDA graph (CuPy allocates from
    torch's allocator inside the call: interop.torch_allocator) and replay it: each replay
    matches an eager in-place step on a copy of the same state."""
    torch = pytest.importorskip("torch")
    import nha_core

    B, T, HQ, H, K, V, M, W = API_CASES[list(API_CASES)[0]]
    dev, _ = _api_inputs((B, T, HQ, H, K, V, M, W), "bfloat16")
    _, _, state = nha_core.attention(dev["q"], dev["k"], dev["v"], dev["g"], window_size=W,
                                     output_final_state=True, backend="cupy")
    twin = nha_core.NHAState(**{n: (a.clone() if isinstance(a, torch.Tensor) else a)
                                for n, a in state.__dict__.items()})
    rng = np.random.default_rng(7)
    step = {n: _torch_rounded(shape, "bfloat16", rng)[0]
            for n, shape in (("q", (B, HQ, K)), ("k", (B, H, K)), ("v", (B, H, V)))}
    step["g"] = _torch_rounded(-rng.uniform(0.02, 1.5, (B, H, M)), "bfloat16")[0]

    def run(st):
        return nha_core.decode_step(step["q"], step["k"], step["v"], step["g"], st, backend="cupy", in_place=True)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(state)                  # compiles and warms CuPy's module cache outside the capture
        run(twin)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph = run(state)
    for _ in range(3):
        graph.replay()
        o_eager = run(twin)
        torch.cuda.synchronize()
        assert torch.equal(o_graph, o_eager)
        assert torch.equal(state.hk, twin.hk) and torch.equal(state.seen, twin.seen)
