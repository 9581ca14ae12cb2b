"""Triton backend kernels under the Triton interpreter (CPU tensors) against the fp64 oracle.

CI has no GPU, so ``TRITON_INTERPRET=1`` is set before the kernel modules are imported: their
``@triton.jit`` functions then run as NumPy on CPU tensors. The variable is restored right after
the import, so other test modules (which may dispatch with ``backend="auto"``) do not see it.
With a CUDA device present this module skips: ``tests/test_triton_gpu.py`` runs the compiled
kernels there, and interpreted kernels in the same process would shadow them.

Small tiles (BT = BS = 16) make a T of ~40 span several chunks and window blocks, so the
chunk-state passes, the band walk and the varlen block map are all exercised while the file
stays within a few minutes on two cores.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if torch.cuda.is_available():
    pytest.skip("CUDA present: tests/test_triton_gpu.py runs the compiled Triton kernels",
                allow_module_level=True)
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    # triton.language's own @jit helpers (tl.zeros, tl.cumsum, ...) were built for compilation
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set, so its kernels are "
                "compiled, not interpreted; run this file in its own pytest process "
                "(or with TRITON_INTERPRET=1 in the environment)", allow_module_level=True)

_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported: jit decoration reads it
try:
    pytest.importorskip("triton")
    tf = importlib.import_module("nha_core.backends.triton.forward")
    tb = importlib.import_module("nha_core.backends.triton.backward")
    td = importlib.import_module("nha_core.backends.triton.decode")
    tc = importlib.import_module("nha_core.backends.triton.configs")
finally:
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved
if type(tf.nha_fwd_kernel).__name__ != "InterpretedFunction":
    pytest.skip("the Triton kernels were imported before TRITON_INTERPRET=1 was set (compiled, not "
                "interpreted); run this file in its own pytest process", allow_module_level=True)

import nha_core.reference as ref  # noqa: E402
from nha_core.problem import Problem  # noqa: E402
from nha_core.state import NHAState  # noqa: E402

from .cases import (assert_within_twice_naive, kernel_inputs, oracle_backward, oracle_forward,  # noqa: E402
                    triton_lowp_results)

TOL = {"float32": 2e-5, "float16": 2e-2}
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(tc, "chunk_rows", lambda K, V, M, backward=False: 16)
    monkeypatch.setattr(tc, "window_rows", lambda K, V: 16)
    monkeypatch.setattr(tc, "decode_window_rows", lambda K, V: 16)
    # the state scan (not the walk "auto" picks for so few chunks) in several steps of 2 chunks
    # and several element blocks with a ragged tail
    monkeypatch.setattr(tc, "STATE_PASS", "scan")
    monkeypatch.setattr(tc, "scan_rows", lambda: 2)
    monkeypatch.setattr(tc, "scan_width", lambda K, V, M, pairs, backward=False: 32)


def rel(out, want):
    out = out.detach().to("cpu", torch.float64).numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    want = np.asarray(want, dtype=np.float64)
    assert out.shape == want.shape
    fin = np.isfinite(want)
    assert np.isfinite(out[fin]).all()
    assert (out[~fin] == want[~fin]).all()
    norm = np.linalg.norm(want[fin])
    return np.linalg.norm(out[fin] - want[fin]) / (norm if norm > 0 else 1.0)


@contextlib.contextmanager
def counted_allocations():
    """While active, torch.empty and torch.zeros count the bytes of the floating-point tensors
    they make, until each is freed: yields {"now": bytes alive, "peak": the most at once}."""
    live = {"now": 0, "peak": 0}

    def tracked(make_tensor):
        def alloc(*a, **kw):
            t = make_tensor(*a, **kw)
            if t.is_floating_point():
                size = t.numel() * t.element_size()
                live["now"] += size
                live["peak"] = max(live["peak"], live["now"])
                weakref.finalize(t, lambda: live.__setitem__("now", live["now"] - size))
            return t
        return alloc

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", tracked(torch.empty))
        patch.setattr(torch, "zeros", tracked(torch.zeros))
        yield live


def make(seed, B, T, HQ, H, K, V, M, W, *, hard=False, dtype="float32", **options):
    """The shared builder (tests/cases.py) with this file's defaults: float32, torch arrays on
    the CPU; ``hard``: strong decay (chunk cumsums past SAFE_LIMIT) with exact resets."""
    return kernel_inputs(seed, B, T, HQ, H, K, V, M, W, dtype, hard="strong" if hard else None,
                         array_kind="torch", **options)


def native(p, x, derive_in_kernel=True):
    """Torch inputs; s stays None (the kernels derive s = 1 - exp(g), ``derives_s``) unless it
    was given or ``derive_in_kernel`` is False (then it is materialised as the API used to)."""
    dt = TORCH_DTYPE[p.dtype]
    out = {}
    for name, a in x.items():
        if a is None or name == "cu":
            out[name] = None if a is None else torch.from_numpy(a)
        else:
            out[name] = torch.from_numpy(a).to(torch.float32 if name in ("hk0", "hv0") else dt)
    if x["s"] is None and not derive_in_kernel:
        out["s"] = torch.from_numpy(-np.expm1(x["g"])).to(dt)
    return out


def check(p, x, tol=None, backward=True, derive_in_kernel=True):
    tol = TOL[p.dtype] if tol is None else tol
    n = native(p, x, derive_in_kernel)
    args = (n["q"], n["k"], n["v"], n["g"], n["s"], n["q_slot"], n["k_slot"], n["hk0"], n["hv0"], n["cu"])
    o, lse, hk, hv = tf.forward(p, *args)
    assert o.dtype == n["q"].dtype and lse.dtype == torch.float32
    ro, rlse, rhk, rhv = oracle_forward(p, x)
    for name, a, b in (("o", o, ro), ("lse", lse, rlse), ("hk", hk, rhk), ("hv", hv, rhv)):
        assert rel(a, b) <= tol, (name, rel(a, b))
    if not backward:
        return
    do = np.random.default_rng(7).standard_normal(o.shape)
    grads = tb.backward(p, torch.from_numpy(do).to(o.dtype), n["q"], n["k"], n["v"], n["g"], n["s"],
                        n["q_slot"], n["k_slot"], o, lse, n["hk0"], n["hv0"], n["cu"])
    dq, dk, dv, dg, ds, dq_slot, dk_slot, dhk0, dhv0 = grads
    want = oracle_backward(p, x, do)
    dg = dg.double()
    if x["s"] is None:
        # the path through the derived s = 1 - exp(g): in the kernel (configs.BWD_CHAIN_DERIVED_S,
        # ds is then None) or added by the API
        assert (ds is None) == (n["s"] is None and tc.BWD_CHAIN_DERIVED_S)
        if ds is not None:
            dg = dg + ds.double() * -torch.from_numpy(np.exp(x["g"]))
    else:
        assert rel(ds, want["ds"]) <= tol, ("ds", rel(ds, want["ds"]))
    got = {"dq": dq, "dk": dk, "dv": dv, "dg": dg, "dq_slot": dq_slot, "dk_slot": dk_slot,
           "dhk0": dhk0, "dhv0": dhv0}
    for name, a in got.items():
        assert (a is None) == (want[name] is None), name
        if a is not None:
            assert rel(a, want[name]) <= tol, (name, rel(a, want[name]))


CASES = [
    dict(B=2, T=37, HQ=4, H=2, K=16, V=12, M=5, W=7),                       # GQA, 3 chunks, W not aligned
    dict(B=1, T=40, HQ=2, H=1, K=12, V=16, M=16, W=0, explicit=True, initial=True),  # pure GSA
    dict(B=1, T=33, HQ=2, H=2, K=16, V=16, M=0, W=9),                       # pure sliding window
    dict(B=1, T=30, HQ=2, H=1, K=16, V=16, M=5, W=40, explicit=True),      # W >= T: no slot writes
    dict(B=1, T=40, HQ=2, H=1, K=16, V=16, M=5, W=3, seqlens=(7, 0, 23, 10), explicit=True, initial=True),
    dict(B=1, T=35, HQ=2, H=1, K=16, V=16, M=5, W=1, hard=True),           # resets, explicit path
]


@pytest.mark.parametrize("pairs", [False, True], ids=["one-chunk-steps", "two-chunk-steps"])
@pytest.mark.parametrize("case", CASES[:2] + CASES[4:5], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_state_walk_small_tiles(case, pairs, small_tiles, monkeypatch):
    """The other chunk-state pass (configs.STATE_PASS "walk": one program walks the chunks), one
    or two chunks per loop step (configs.STATE_WALK_PAIRS; the varlen case has sequences of an
    odd and an even number of chunks, and an empty one)."""
    monkeypatch.setattr(tc, "STATE_PASS", "walk")
    monkeypatch.setattr(tc, "STATE_WALK_PAIRS", pairs)
    check(**dict(zip(("p", "x"), make(0, **case))))


def test_backward_chunks_differently_from_forward(small_tiles, monkeypatch):
    """The backward recomputes its chunk states, so its BT may differ from the forward's
    (configs.BWD_CHUNK_ROWS_128): 16-row forward chunks, 32-row backward chunks, varlen."""
    monkeypatch.setattr(tc, "chunk_rows", lambda K, V, M, backward=False: 32 if backward else 16)
    check(*make(4, **CASES[4]))


def test_state_pass_choice():
    """"auto" walks when the chains are short and the programs many (gpu-a: B = 8, T = 4096,
    64 chunks per sequence) and scans long single sequences (gpu-b: B = 1, T = 32768)."""
    assert tc.state_pass(8, 16, 64, 64, 64, 64, 8 * 64) == "walk"
    assert tc.state_pass(1, 16, 64, 64, 64, 512, 512) == "scan"


def test_scan_width_choice():
    """The state scan's tile narrows when few (sequence, head) pairs would leave the card with
    few programs: the backward's four-head groups at gpu-b (4 pairs) take 64, its groups at
    gpu-a (32 pairs) 256; the forward's all-heads passes take 512 at gpu-c (K = V = 128, 16
    pairs) and at gpu-a (128 pairs), 256 at gpu-b (16 pairs of 64-wide heads)."""
    assert tc.scan_width(64, 64, 64, 4, backward=True) == 64
    assert tc.scan_width(64, 64, 64, 32, backward=True) == 256
    assert tc.scan_width(64, 64, 64, 16) == 256
    assert tc.scan_width(128, 128, 64, 16) == 512
    assert tc.scan_width(64, 64, 64, 128) == 512


def test_config_override_sets_literals_and_names_mistakes(monkeypatch):
    """configs.override (NHA_TEST_TRITON_CONFIG, compare.py --triton-config): literal values,
    tuples included; an unknown name or a non-literal value is refused by name."""
    monkeypatch.setattr(tc, "BWD_BF16_DOTS", tc.BWD_BF16_DOTS)
    monkeypatch.setattr(tc, "STATE_PASS", tc.STATE_PASS)
    assert tc.override("BWD_BF16_DOTS=('state', 'slot'); STATE_PASS='walk'") == {
        "BWD_BF16_DOTS": ("state", "slot"), "STATE_PASS": "walk"}
    assert tc.BWD_BF16_DOTS == ("state", "slot") and tc.STATE_PASS == "walk"
    with pytest.raises(ValueError, match="no setting 'BWD_DOTS'"):
        tc.override("BWD_DOTS=()")
    with pytest.raises(ValueError, match="not a Python literal"):
        tc.override("STATE_PASS=walk")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_forward_backward_small_tiles(case, small_tiles):
    p, x = make(1, **case)
    check(p, x)


@pytest.mark.parametrize("case", CASES[:1] + CASES[4:], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_bwd_slot_in_two_launches(case, small_tiles, monkeypatch):
    """nha_bwd_slot_kernel split into its factored and pairwise launches (configs.BWD_SLOT_SPLIT),
    which bf16 inputs take on a GPU and the interpreter cannot run: with resets (the last case) the
    pairwise launch does the flagged chunks."""
    monkeypatch.setattr(tc, "BWD_SLOT_SPLIT", "always")
    check(**dict(zip(("p", "x"), make(2, **case))))


def test_materialised_s_matches_derived(small_tiles):
    """s = 1 - exp(g) passed as an array (as a backend without derives_s gets it) and derived
    inside the kernels give the same results (the resets of `hard` included)."""
    p, x = make(6, 1, 35, 2, 1, 16, 16, 5, 4, hard=True)
    check(p, x, derive_in_kernel=False)
    check(p, x, derive_in_kernel=True)


@pytest.mark.parametrize("chain", [True, False], ids=["chain-in-kernel", "chain-in-api"])
@pytest.mark.parametrize("side", ["default", "fp32"], ids=["side-default", "side-fp32"])
def test_float16_backward_knobs(chain, side, small_tiles, monkeypatch):
    """The backward's precision knobs (configs.BWD_*): the derived-s chain inside the slot kernel
    or in the caller, the bf16 side buffers or all-fp32 ones (the pre-split behaviour), on a
    fp16 case with resets (g = -inf: exp(g) = 0 in the chained path) and one with explicit s."""
    monkeypatch.setattr(tc, "BWD_CHAIN_DERIVED_S", chain)
    if side == "fp32":
        for name, value in (("BWD_BF16_DOTS", ()), ("BWD_BF16_PS_DLS", False), ("BWD_BF16_DH", False),
                            ("BWD_BF16_STATES", False), ("BWD_BF16_X1", False)):
            monkeypatch.setattr(tc, name, value)
    check(*make(4, 1, 24, 2, 1, 16, 16, 4, 5, dtype="float16"))
    check(*make(5, 1, 35, 2, 1, 16, 16, 5, 3, hard=True, dtype="float16"))
    check(*make(6, 1, 96, 2, 2, 32, 32, 16, 8, explicit=True, dtype="float16"))


def test_default_tiles_one_chunk_and_explicit_path(monkeypatch):
    """BT = 64 as on the GPU; then the same problem with the factored path switched off."""
    p, x = make(2, 1, 40, 2, 1, 16, 12, 5, 6, explicit=True)
    check(p, x)
    monkeypatch.setattr(tc, "SAFE_LIMIT", -1.0)   # every chunk takes the explicit per-pair path
    check(p, x)


def test_no_memory_at_all():
    """M = 0 and W = 0: nothing to attend to, o = 0 and lse = -inf as in the reference."""
    p, x = make(3, 1, 5, 2, 1, 16, 16, 0, 0)
    check(p, x, backward=False)


def test_float16_forward_backward(small_tiles):
    """16-bit operands on the tensor-core dots. (bfloat16 is left to the GPU test: the Triton 3.9
    interpreter's tl.dot on bfloat16 operands returns garbage even for a bare 16x16 product.)"""
    p, x = make(4, 1, 24, 2, 1, 16, 16, 4, 5, dtype="float16")
    check(p, x)


@pytest.mark.parametrize("T,W,M,explicit", [(0, 4, 5, False), (9, 4, 5, True), (12, 0, 3, False), (6, 5, 0, True)])
def test_decode_continues_prefill(T, W, M, explicit, small_tiles):
    N, H, G, K, V, steps = 2, 2, 2, 16, 12, 4
    p, x = make(5, N, T + steps, G * H, H, K, V, M, W, explicit=explicit, mode="decode")
    pre = {n: (None if a is None or n == "cu" else a[:, :T]) for n, a in x.items()}
    _, _, hk, hv = ref.forward(pre["q"], pre["k"], pre["v"], pre["g"], window_size=W, s=pre["s"],
                               q_slot=pre["q_slot"], k_slot=pre["k_slot"])
    want = ref.state_from_prefill(pre["k"], pre["v"], pre["g"], hk, hv, window_size=W, s=pre["s"],
                                  k_slot=pre["k_slot"])
    state = NHAState(**{name: (a if name == "window_size" or a is None else
                               torch.from_numpy(np.array(a)).to(torch.int64 if name == "seen" else torch.float32))
                        for name, a in want.items()})
    dp = Problem(**{**p.__dict__, "B": N, "T": 1})
    for i in range(T, T + steps):
        step = {n: (None if a is None or n == "cu" else a[:, i]) for n, a in x.items()}
        t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).float()
        # s None when not given: the kernel derives s = 1 - exp(g) (derives_s)
        o, lse = td.decode(dp, t(step["q"]), t(step["k"]), t(step["v"]), t(step["g"]), t(step["s"]),
                           t(step["q_slot"]), t(step["k_slot"]), state)
        ro, rlse, want = ref.decode_step(step["q"], step["k"], step["v"], step["g"], want, s=step["s"],
                                         q_slot=step["q_slot"], k_slot=step["k_slot"])
        assert rel(o, ro) <= TOL["float32"] and rel(lse, rlse) <= TOL["float32"]
    for name in ("hk", "hv", "k_cache", "v_cache", "g_cache", "s_cache", "k_slot_cache"):
        a, b = getattr(state, name), want[name]
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel(a, b) <= TOL["float32"], name
    assert (state.seen.numpy() == want["seen"]).all()


@pytest.mark.parametrize("case", [
    dict(B=2, T=150, HQ=4, H=2, K=32, V=32, M=16, W=40),                    # GQA, W < T, several chunks
    dict(B=1, T=130, HQ=4, H=1, K=16, V=24, M=8, W=17, seqlens=(60, 0, 1, 69), explicit=True, initial=True),
    dict(B=1, T=100, HQ=2, H=1, K=16, V=16, M=16, W=0),                     # pure gated slot attention
    dict(B=1, T=70, HQ=2, H=2, K=16, V=16, M=8, W=200),                     # W >= T: slots never written
    # the case whose dq failed the rule on an H200 with one-product TF32 slot dots (2.44x);
    # here it gives 2.5x with FP16_SLOT_DOTS = "tf32" (emulated rounding: dq 2.01e-3 vs naive 8.1e-4,
    # the GPU run measured 2.01e-3 vs 8.2e-4), 1.8x with "tf32x3"
    dict(B=1, T=200, HQ=2, H=1, K=64, V=64, M=32, W=0),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_float16_within_twice_naive(case):
    """SPEC section 5's rule for float16: no output, state or gradient more than 2x the error of
    the naive fp16 computation. The interpreter computes what the GPU does here: fp16 window
    dots accumulate in fp32; the slot dots take fp32 operands on split-TF32 dots
    (configs.FP16_SLOT_DOTS "tf32x3", about fp32, which the interpreter's exact dots stand for) or,
    with "tf32", operands rounded to TF32 in the kernel (forward._op), which the tensor cores then
    read exactly. (bfloat16 cannot run here: the interpreter's bf16 dots are wrong;
    tests/test_triton_gpu.py covers it on a GPU.)"""
    p, x = kernel_inputs(13, **case, dtype="float16", gates="logsigmoid", device="cpu", array_kind="torch")
    got, naive, want = triton_lowp_results(p, x, "cpu")
    assert_within_twice_naive(got, naive, want, "float16", rel)


def test_backward_side_buffers_live_one_step_at_a_time(small_tiles):
    """The backward allocates each output and scratch buffer where it is first written and drops
    side buffers after their last reader (the recomputed chunk states before the dks/dvs scratch
    exists, dk/dv only for the last kernel), so its peak is the larger of the state-pass and the
    slot-kernel working sets, not the sum of every buffer (SPEC's peak-memory target at gpu-b)."""
    B, T, HQ, H, K, V, M, W = 1, 48, 1, 1, 16, 16, 16, 8
    p, x = make(9, B, T, HQ, H, K, V, M, W)
    n = native(p, x)
    args = (n["q"], n["k"], n["v"], n["g"], n["s"], n["q_slot"], n["k_slot"], n["hk0"], n["hv0"], n["cu"])
    o, lse, _, _ = tf.forward(p, *args)
    do = torch.ones_like(o)

    with counted_allocations() as live:
        grads = tb.backward(p, do, n["q"], n["k"], n["v"], n["g"], n["s"], n["q_slot"], n["k_slot"], o, lse,
                            n["hk0"], n["hv0"], n["cu"])
    assert grads[0] is not None

    f32, R, N = 4, T // 16 + 1, B * T            # BT = 16 (small_tiles): 3 chunks + the row after
    kept = N * HQ * K + N * HQ                    # dq, D
    side = 3 * N * HQ * M                         # Ps, dLs, X1
    states = R * H * (K * M + M * V)              # one [R,H,K,M] + [R,H,M,V] pair
    state_pass = kept + side + 2 * states + R * H * M          # recomputed states + dH + the scan's a_c
    slot_kernel = kept + side + states + R * H * M + N * H * M + N * H * (K + V)  # dH, carry, dg, dks/dvs
    allowed = f32 * max(state_pass, slot_kernel)
    everything = f32 * (state_pass + N * H * M + N * H * (K + V) + N * H * (K + V))  # + dg, dks/dvs, dk/dv
    assert live["peak"] <= allowed < everything, (live["peak"], allowed, everything)


def _backward(p, x, n, o, lse, do):
    return tb.backward(p, do, n["q"], n["k"], n["v"], n["g"], n["s"], n["q_slot"], n["k_slot"], o, lse,
                       n["hk0"], n["hv0"], n["cu"])


@pytest.mark.parametrize("case", [
    dict(B=2, T=37, HQ=8, H=4, K=16, V=12, M=5, W=7),                              # GQA 2, the walk
    dict(B=1, T=40, HQ=4, H=4, K=16, V=16, M=5, W=3, seqlens=(7, 0, 23, 10), explicit=True, initial=True),
    dict(B=1, T=33, HQ=4, H=4, K=16, V=16, M=0, W=9),                              # no slots
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_backward_head_groups_match_all_heads(case, small_tiles, monkeypatch):
    """The backward over groups of KV heads (configs.BWD_SCRATCH_LIMIT) computes what it computes
    with all heads at once, bit for bit: every program does the same work on views that start at
    its group's first head. Groups of 2 and of 1 head, GQA, varlen with an initial state, q_slot /
    k_slot / s given, and the chunk-state walk as well as the scan."""
    p, x = make(11, **case)
    if case["B"] == 2:
        monkeypatch.setattr(tc, "STATE_PASS", "walk")
    n = native(p, x)
    o, lse, _, _ = tf.forward(p, n["q"], n["k"], n["v"], n["g"], n["s"], n["q_slot"], n["k_slot"],
                              n["hk0"], n["hv0"], n["cu"])
    do = torch.from_numpy(np.random.default_rng(3).standard_normal(o.shape)).to(o.dtype)
    groups = []
    monkeypatch.setattr(tb, "head_groups", lambda *a: groups[-1])
    results = {}
    for count in (1, 2, 4):
        groups.append(count)
        results[count] = _backward(p, x, n, o, lse, do)
    for count in (2, 4):
        for name, a, b in zip(("dq", "dk", "dv", "dg", "ds", "dq_slot", "dk_slot", "dhk0", "dhv0"),
                              results[1], results[count]):
            assert (a is None) == (b is None), name
            assert a is None or torch.equal(a, b), (count, name)
    check(p, x)   # and the grouped result against the oracle (one group here: small problem)


def test_head_groups_choice(monkeypatch):
    """Four groups of four heads at gpu-a and gpu-b (bf16, K = V = M = 64), where all heads at once
    would hold about the io bytes of scratch; one group for a problem whose scratch is small, or
    with the limit off."""
    import types

    gpu_b = types.SimpleNamespace(B=1, T=32768, HQ=16, H=16, G=1, K=64, V=64, M=64)
    gpu_a = types.SimpleNamespace(B=8, T=4096, HQ=16, H=16, G=1, K=64, V=64, M=64)
    assert tb.head_groups(gpu_b, True, 32768 // 64 + 1, 2) == 4
    assert tb.head_groups(gpu_a, True, 8 * 4096 // 64 + 8, 2) == 4
    assert tb.head_groups(types.SimpleNamespace(B=1, T=4096, HQ=16, H=16, G=1, K=64, V=64, M=64),
                          True, 65, 2) == 1
    monkeypatch.setattr(tc, "BWD_SCRATCH_LIMIT", None)
    assert tb.head_groups(gpu_b, True, 32768 // 64 + 1, 2) == 1


def test_backward_head_groups_bound_the_scratch(small_tiles, monkeypatch):
    """With KV heads in groups the scratch alive at once is one group's: four single-head groups
    peak at the outputs plus a quarter of the all-heads scratch (the allocations counted as in
    test_backward_side_buffers_live_one_step_at_a_time)."""
    B, T, HQ, H, K, V, M, W = 1, 48, 4, 4, 16, 16, 16, 8
    p, x = make(9, B, T, HQ, H, K, V, M, W)
    n = native(p, x)
    o, lse, _, _ = tf.forward(p, n["q"], n["k"], n["v"], n["g"], n["s"], n["q_slot"], n["k_slot"],
                              n["hk0"], n["hv0"], n["cu"])
    do = torch.ones_like(o)
    peaks = {}
    for count in (1, 4):
        monkeypatch.setattr(tb, "head_groups", lambda *a: count)
        with counted_allocations() as live:
            grads = _backward(p, x, n, o, lse, do)
        peaks[count] = live["peak"]
        del grads
    f32, R, N = 4, T // 16 + 1, B * T
    outputs = f32 * N * (HQ * K + H * (M + K + V))                   # dq, dg, dk, dv
    per_head = tb.scratch_per_head(p, False, R)
    assert per_head * H > f32 * N * HQ * M                           # the scratch is worth splitting
    assert peaks[4] <= outputs + per_head < peaks[1], (peaks, outputs, per_head)

