"""Random NHA problems for the tests: sizes first, then data (fp64, then cast).

* Property tests: a :class:`Case` is a readable id plus a seed; ``inputs(case)`` rebuilds the
  same arrays.
* Kernel-level tests (tests/test_numpy_kernels.py, test_triton_interpret.py, test_triton_gpu.py):
  ``kernel_inputs`` builds fp64 arrays plus the hand-built :class:`Problem` the kernels take, and
  ``oracle_forward`` / ``oracle_backward`` run the fp64 reference on them.
* ``naive_attention``: SPEC section 2 written the plain way in PyTorch, the yardstick for the
  float16/bfloat16 accuracy rule of SPEC section 5 (``naive_results``, ``LOWP_FLOOR``).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import strategies as st

import nha_core.reference as ref
from nha_core.problem import Problem


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    T: int
    HQ: int
    H: int
    K: int
    V: int
    M: int
    W: int
    seed: int
    explicit_s: bool = False
    slot_inputs: bool = False
    seqlens: tuple | None = None   # varlen: lengths of the packed sequences (B == 1)
    hard_gates: bool = False       # some g = -inf and some very negative
    big_logits: bool = False

    @property
    def id(self) -> str:
        text = f"B{self.B}-T{self.T}-HQ{self.HQ}-H{self.H}-K{self.K}-V{self.V}-M{self.M}-W{self.W}"
        flags = [n for n, on in (("s", self.explicit_s), ("slotqk", self.slot_inputs), ("hard", self.hard_gates),
                                 ("big", self.big_logits)) if on]
        if self.seqlens is not None:
            flags.append("varlen" + "_".join(map(str, self.seqlens)))
        return "-".join([text, *flags, f"seed{self.seed}"])

    @property
    def cu_seqlens(self):
        if self.seqlens is None:
            return None
        return np.concatenate([[0], np.cumsum(self.seqlens)]).astype(np.int64)


@st.composite
def cases(draw, max_T=40, max_dim=9, max_M=7, varlen=True, flags=True):
    """Awkward sizes on purpose: T=0/1, T<W, W=0, W>=T, M=0, odd dims, GQA, empty sequences."""
    H = draw(st.integers(1, 2))
    HQ = H * draw(st.integers(1, 2))
    K = draw(st.integers(1, max_dim))
    V = draw(st.integers(1, max_dim))
    M = draw(st.integers(0, max_M))
    seqlens = None
    if varlen and draw(st.booleans()):
        seqlens = tuple(draw(st.lists(st.integers(0, max_T // 2), min_size=1, max_size=3)))
        B, T = 1, sum(seqlens)
    else:
        B, T = draw(st.integers(1, 2)), draw(st.integers(0, max_T))
    W = draw(st.one_of(st.just(0), st.just(1), st.integers(0, max_T + 4)))
    # One logit per row (M = 1, W = 0 or M = 0, W = 1) makes every logit gradient exactly 0, so
    # the computed one is pure rounding noise and relative error means nothing: draw at least two
    # logits per row (W = 0 with M = 0 is refused by the API, see test_api_contract).
    if W == 0:
        M = max(M, 2)
    if M == 0:
        W = max(W, 2)
    return Case(
        B=B, T=T, HQ=HQ, H=H, K=K, V=V, M=M, W=W, seed=draw(st.integers(0, 2**31 - 1)),
        explicit_s=flags and draw(st.booleans()), slot_inputs=flags and draw(st.booleans()),
        seqlens=seqlens, hard_gates=flags and draw(st.integers(0, 4)) == 0,
        big_logits=flags and draw(st.integers(0, 6)) == 0,
    )


@st.composite
def tile_cases(draw, max_T=200):
    """Sizes the tensor-core paths take: K, V, M multiples of 16 (the CuPy register-tile kernels,
    the Triton bf16 dots) over several 64-row chunks; the rest as awkward as cases() draws it."""
    dim = st.sampled_from((16, 32, 48, 64))
    H = draw(st.integers(1, 2))
    HQ = H * draw(st.integers(1, 2))
    K, V, M = draw(dim), draw(dim), draw(dim)
    seqlens = None
    if draw(st.booleans()):
        seqlens = tuple(draw(st.lists(st.integers(0, max_T // 2), min_size=1, max_size=3)))
        B, T = 1, sum(seqlens)
    else:
        B, T = draw(st.integers(1, 2)), draw(st.integers(1, max_T))
    W = draw(st.one_of(st.just(0), st.just(1), st.integers(0, max_T + 4)))
    return Case(
        B=B, T=T, HQ=HQ, H=H, K=K, V=V, M=M, W=W, seed=draw(st.integers(0, 2**31 - 1)),
        explicit_s=draw(st.booleans()), slot_inputs=draw(st.booleans()), seqlens=seqlens,
        hard_gates=draw(st.integers(0, 4)) == 0, big_logits=draw(st.integers(0, 6)) == 0,
    )


def inputs(case: Case) -> dict:
    """Float64 inputs for ``case``: gates like gated slot attention, logsigmoid(x) / 4."""
    rng = np.random.default_rng(case.seed)
    B, T, HQ, H, K, V, M = case.B, case.T, case.HQ, case.H, case.K, case.V, case.M
    x = {
        "q": rng.standard_normal((B, T, HQ, K)),
        "k": rng.standard_normal((B, T, H, K)),
        "v": rng.standard_normal((B, T, H, V)),
        "g": -np.logaddexp(0.0, -rng.standard_normal((B, T, H, M))) / 4,
    }
    if case.big_logits:
        x["q"] *= 30.0
        x["k"] *= 30.0
    if case.hard_gates and x["g"].size:
        pick = rng.random(x["g"].shape)
        x["g"][pick < 0.1] = -np.inf
        x["g"][(pick >= 0.1) & (pick < 0.2)] = -80.0
    if case.explicit_s:
        x["s"] = rng.random((B, T, H, M))
    if case.slot_inputs:
        x["q_slot"] = rng.standard_normal((B, T, HQ, K))
        x["k_slot"] = rng.standard_normal((B, T, H, K))
    return x


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64 (absolute when ref is 0); NaN anywhere gives inf."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not np.isfinite(out).all():
        return float("inf")
    if out.size == 0:
        return 0.0
    num = np.linalg.norm(out - ref)
    den = np.linalg.norm(ref)
    return float(num / den) if den > 0 else float(num)


# SPEC §5 bounds, per dtype, on the CPU and on the GPU.
TOL = {
    ("cpu", "float64"): 1e-12, ("cpu", "float32"): 1e-5,
    ("cuda", "float64"): 1e-12, ("cuda", "float32"): 1e-3, ("cuda", "float16"): 2e-2, ("cuda", "bfloat16"): 2e-2,
}


def property_tolerance(case: Case, dtype: str, device: str) -> float:
    """The property suite's relative bound: SPEC section 5 (TOL), widened for big_logits cases."""
    tol = TOL[(device, dtype)]
    if case.big_logits:
        # Logits of order 1e3 leave ~|logit| * eps of absolute error in every probability: the
        # contract there is finiteness and agreement to the conditioning of the problem.
        tol = max(tol, {"float64": 1e-9, "float32": 1e-3}.get(dtype, 5e-2))
    return tol


def gradient_check(got, ref, do, case: Case, dtype: str, device: str) -> tuple[float, float]:
    """(error, bound) of one gradient in the backward property: ``‖got − ref‖`` against the
    relative bound plus an absolute noise floor on the gradient's natural scale ‖do‖. A gradient
    that cancels to ~0 (a single logit, a saturated softmax, a gate whose state was still empty)
    carries only the rounding noise of its terms; the floor is the larger of tol * 1e-3 and 10 ulp
    of float32 (float64 for float64), and big_logits cases scale every term by 30 * 30."""
    tol = property_tolerance(case, dtype, device)
    ulp = np.finfo(np.float32 if dtype != "float64" else np.float64).eps
    floor = max(tol * 1e-3, 10 * ulp) * np.linalg.norm(do) * (900.0 if case.big_logits else 1.0)
    err = float(np.linalg.norm(np.asarray(got, np.float64) - ref))
    return err, float(tol * np.linalg.norm(ref) + floor)


# --- kernel-level problems ------------------------------------------------------------------------

def _random_resets(g, r):
    """~T/5 random tokens reset one random slot (g = -inf); draws from the input generator."""
    B, T, H, M = g.shape
    if T and M:
        g[:, r.integers(0, T, size=max(1, T // 5)), :, r.integers(0, M)] = -np.inf


def _strong_and_resets(g, r):
    """Every gate x30 (chunk cumsums past the factored form's SAFE_LIMIT), every 5th token resets
    slot 0."""
    if g.size:
        g *= 30.0
        g[:, ::5, :, 0] = -np.inf


def _resets_and_spikes(g, r):
    """Every 37th token resets the first half of the slots; every 41st token's gates x200."""
    M = g.shape[-1]
    if M:
        g[:, ::37, :, : M // 2] = -np.inf
        g[:, 5::41] *= 200.0


HARD_GATES = {"random-resets": _random_resets, "strong": _strong_and_resets, "spikes": _resets_and_spikes}


def kernel_inputs(seed, B, T, HQ, H, K, V, M, W, dtype, *, explicit=False, initial=False, seqlens=None,
                  gates="abs", gscale=1.0, qscale=1.0, hard=None, device="cpu", array_kind="numpy",
                  mode="forward"):
    """Float64 NumPy inputs for a kernel call, plus the :class:`Problem` describing them.

    Returns ``(p, x)``. ``x`` holds q [B,T,HQ,K] (times ``qscale``), k [B,T,H,K], v [B,T,H,V],
    g [B,T,H,M]; s [B,T,H,M] in [0, 1), q_slot [B,T,HQ,K], k_slot [B,T,H,K] with ``explicit``
    (else None: s derived, slots read q / k); hk0 [N,H,K,M], hv0 [N,H,M,V] with ``initial``
    (else None); cu [N+1] int64 with ``seqlens`` (N packed sequences, B = 1; else None, N = B).

    gates: ``"abs"``: g = -|z| * gscale; ``"logsigmoid"``: g = logsigmoid(z) / 4 (gated slot
    attention's gates). hard: None or a key of ``HARD_GATES`` (resets g = -inf, strong decay).
    The generator draws in a fixed order (q, k, v, g, hard, s, q_slot, k_slot, hk0, hv0), so a
    seed gives the same arrays in every test file. ``p.scale`` is K ** -0.5, the default.
    """
    r = np.random.default_rng(seed)
    x = {"q": r.standard_normal((B, T, HQ, K)) * qscale, "k": r.standard_normal((B, T, H, K)),
         "v": r.standard_normal((B, T, H, V))}
    z = r.standard_normal((B, T, H, M))
    if gates == "abs":
        x["g"] = -np.abs(z) * gscale
    elif gates == "logsigmoid":
        x["g"] = np.log(1 / (1 + np.exp(-z))) / 4
    else:
        raise ValueError(f"gates: expected 'abs' or 'logsigmoid', got {gates!r}")
    if hard is not None:
        HARD_GATES[hard](x["g"], r)
    x["s"] = r.random((B, T, H, M)) if explicit else None
    x["q_slot"] = r.standard_normal((B, T, HQ, K)) if explicit else None
    x["k_slot"] = r.standard_normal((B, T, H, K)) if explicit else None
    cu = None if seqlens is None else np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int64)
    N = B if cu is None else len(cu) - 1
    x["hk0"] = r.standard_normal((N, H, K, M)) if initial else None
    x["hv0"] = r.standard_normal((N, H, M, V)) if initial else None
    x["cu"] = cu
    p = Problem(mode=mode, B=B, T=T, HQ=HQ, H=H, K=K, V=V, M=M, W=W, N=N, dtype=dtype, device=device,
                array_kind=array_kind, scale=K ** -0.5, has_s=explicit, has_q_slot=explicit,
                has_k_slot=explicit, has_initial_state=initial, output_final_state=True,
                varlen=cu is not None)
    return p, x


def _ref_kwargs(p, x):
    return dict(window_size=p.W, s=x["s"], q_slot=x["q_slot"], k_slot=x["k_slot"], hk0=x["hk0"],
                hv0=x["hv0"], cu_seqlens=x["cu"])


def oracle_forward(p, x):
    """fp64 reference on ``kernel_inputs``' arrays: o [B,T,HQ,V], lse [B,HQ,T], hk, hv."""
    return ref.forward(x["q"], x["k"], x["v"], x["g"], **_ref_kwargs(p, x))


def oracle_backward(p, x, do):
    """fp64 reference gradients of sum(o * do) (a dict, see ``reference.backward``)."""
    return ref.backward(do, x["q"], x["k"], x["v"], x["g"], **_ref_kwargs(p, x))


# --- the naive low-precision yardstick (SPEC section 5) --------------------------------------------

def naive_attention(q, k, v, g, *, window_size, s=None, q_slot=None, k_slot=None, scale=None,
                    hk0=None, hv0=None, cu_seqlens=None):
    """SPEC section 2 written the plain way in PyTorch, every tensor in q's dtype.

    This is "the same computation done naively in that dtype" that SPEC section 5 measures
    float16/bfloat16 kernels against: no chunks, no fp32 state, no fp32 softmax of our own.
    The slot states come from the token recurrence, the logits form one dense masked [T, M + T]
    matrix per head, and torch.softmax / torch.logsumexp normalise it::

        columns:  M slots (state after tokens <= t-W) | tokens 0 ... t-W | t-W+1 ... t | t+1 ...
        row t:    read                                 | -inf (in slots)  | read        | -inf

    Shapes and defaults as ``reference.forward`` (torch tensors; hk0 / hv0 are cast to q's
    dtype). Returns o [B,T,HQ,V], lse [B,HQ,T], hk [N,H,K,M], hv [N,H,M,V], all in q's dtype and
    differentiable by autograd (the naive backward). Needs at least one logit per row
    (M > 0 or W > 0).
    """
    import torch

    if cu_seqlens is not None:          # each packed sequence alone, then joined again
        bounds = [int(c) for c in cu_seqlens]
        parts = [naive_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], window_size=window_size,
            s=None if s is None else s[:, a:b], q_slot=None if q_slot is None else q_slot[:, a:b],
            k_slot=None if k_slot is None else k_slot[:, a:b], scale=scale,
            hk0=None if hk0 is None else hk0[n:n + 1], hv0=None if hv0 is None else hv0[n:n + 1])
            for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        return tuple(torch.cat([part[i] for part in parts], dim=d) for i, d in enumerate((1, 2, 0, 0)))

    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[3], g.shape[3]
    G, W, dt = HQ // H, window_size, q.dtype
    scale = K ** -0.5 if scale is None else scale
    s = -torch.expm1(g) if s is None else s
    q_slot = q if q_slot is None else q_slot
    k_slot = k if k_slot is None else k_slot
    hk = q.new_zeros(B, H, K, M) if hk0 is None else hk0.to(dt)
    hv = q.new_zeros(B, H, M, V) if hv0 is None else hv0.to(dt)

    # slot states: states[t] is what query t reads (every token <= t - W absorbed, own gate)
    hks, hvs = [], []
    for t in range(T):
        j = t - W
        if j >= 0:
            alpha = torch.exp(g[:, j])                                                  # [B,H,M]
            hk = hk * alpha[:, :, None, :] + k_slot[:, j, :, :, None] * s[:, j, :, None, :]
            hv = hv * alpha[:, :, :, None] + s[:, j, :, :, None] * v[:, j, :, None, :]
        hks.append(hk)
        hvs.append(hv)
    HK = torch.stack(hks, 1) if T else hk.new_zeros(B, 0, H, K, M)                    # [B,T,H,K,M]
    HV = torch.stack(hvs, 1) if T else hv.new_zeros(B, 0, H, M, V)                    # [B,T,H,M,V]

    qh = q.reshape(B, T, H, G, K)                  # query head i reads KV head i // G
    qs = q_slot.reshape(B, T, H, G, K)
    slot_logits = scale * torch.einsum("bthgk,bthkm->bhgtm", qs, HK)                  # [B,H,G,T,M]
    token_logits = scale * torch.einsum("bthgk,bshk->bhgts", qh, k)                   # [B,H,G,T,T]
    t_idx = torch.arange(T, device=q.device)
    back = t_idx[:, None] - t_idx[None, :]                                            # t - j
    in_window = (back >= 0) & (back < W)                                              # j in (t-W, t]
    token_logits = token_logits.masked_fill(~in_window, float("-inf"))
    logits = torch.cat([slot_logits, token_logits], dim=-1)                           # [B,H,G,T,M+T]
    p = torch.softmax(logits, dim=-1)
    o = (torch.einsum("bhgtm,bthmv->bthgv", p[..., :M], HV)
         + torch.einsum("bhgts,bshv->bthgv", p[..., M:], v))                          # [B,T,H,G,V]
    lse = torch.logsumexp(logits, dim=-1)                                             # [B,H,G,T]
    return o.reshape(B, T, HQ, V), lse.reshape(B, HQ, T), hk, hv


# SPEC section 5: a float16/bfloat16 result is never more than 2x the error of naive_attention in
# that dtype, each measured against the fp64 oracle on the same (rounded) inputs. The absolute
# floor, a quarter of the dtype's unit roundoff (float16 2^-13 ~ 1.2e-4, bfloat16 2^-10 ~ 9.8e-4),
# only matters where the naive error is itself at or below rounding noise: a result that both
# compute exactly (a state no token entered, a gradient that is 0) gives err_naive = 0, and a
# kernel keeping it in fp32 may differ from it in the 7th digit; rounding the exact result once to
# the dtype already costs about u / 2 in relative L2 error, so anything under u / 4 is noise.
LOWP_FLOOR = {"float16": 2.0 ** -13, "bfloat16": 2.0 ** -10}

GRAD_OF = {"dq": "q", "dk": "k", "dv": "v", "dg": "g", "ds": "s", "dq_slot": "q_slot", "dk_slot": "k_slot",
           "dhk0": "hk0", "dhv0": "hv0"}


def naive_results(p, low, cu_seqlens, do):
    """``naive_attention`` on ``low`` (kernel_inputs' names -> torch tensors in one dtype, None
    where absent; "cu" is ignored, pass ``cu_seqlens``) and its autograd backward for ``sum(o * do)``.

    Returns {"o", "lse", "hk", "hv", "dq", "dk", ...}: the outputs, then the gradient of every
    given input under the oracle's names (zeros where no path reaches it, e.g. g when W >= T).
    """
    import torch

    leaf = {n: None if a is None else a.detach().clone().requires_grad_() for n, a in low.items() if n != "cu"}
    out = naive_attention(leaf["q"], leaf["k"], leaf["v"], leaf["g"], window_size=p.W, s=leaf["s"],
                          q_slot=leaf["q_slot"], k_slot=leaf["k_slot"], scale=p.scale, hk0=leaf["hk0"],
                          hv0=leaf["hv0"], cu_seqlens=cu_seqlens)
    out[0].backward(do)
    res = dict(zip(("o", "lse", "hk", "hv"), (a.detach() for a in out)))
    for name, arg in GRAD_OF.items():
        if leaf[arg] is not None:
            grad = leaf[arg].grad
            res[name] = torch.zeros_like(leaf[arg]) if grad is None else grad
    return res


def assert_within_twice_naive(got: dict, naive: dict, want: dict, dtype: str, rel, tol: float = 2e-2):
    """SPEC section 5 for float16/bfloat16: every output, state and gradient of ``got`` is within
    ``tol`` of the fp64 oracle ``want`` and within twice the error of ``naive`` (naive_results)
    plus LOWP_FLOOR. ``rel(a, ref)`` is the caller's relative error for its array type."""
    for name in ("o", "lse", "hk", "hv", *GRAD_OF):
        assert (got[name] is None) == (want[name] is None), name
        if want[name] is None:
            continue
        err, err_naive = rel(got[name], want[name]), rel(naive[name], want[name])
        assert err <= tol and err <= 2 * err_naive + LOWP_FLOOR[dtype], (name, err, err_naive)


def triton_lowp_results(p, x, device):
    """The Triton kernels, ``naive_results`` and the fp64 oracle on the same inputs rounded to
    ``p.dtype`` first (the initial state too), so the errors measure arithmetic alone.

    ``x``: kernel_inputs' float64 arrays; ``device``: "cuda", or "cpu" under TRITON_INTERPRET=1.
    Returns (got, naive, want), dicts by output/gradient name; a derived s's gradient is folded
    into dg (in the kernel with BWD_CHAIN_DERIVED_S, or here) and ds is None.
    """
    import torch

    from nha_core.backends.triton.backward import backward
    from nha_core.backends.triton.forward import forward

    dt = getattr(torch, p.dtype)
    low = {n: None if a is None or n == "cu" else torch.from_numpy(a).to(device, dt) for n, a in x.items()}
    x = {n: a if a is None or n == "cu" else low[n].double().cpu().numpy() for n, a in x.items()}
    cu = None if x["cu"] is None else torch.from_numpy(x["cu"]).to(device)
    hk0 = None if low["hk0"] is None else low["hk0"].float()   # kernels take the state in fp32
    hv0 = None if low["hv0"] is None else low["hv0"].float()
    ins = (low["q"], low["k"], low["v"], low["g"], low["s"], low["q_slot"], low["k_slot"])
    o, lse, hk, hv = forward(p, *ins, hk0, hv0, cu)
    do = torch.from_numpy(np.random.default_rng(3).standard_normal(o.shape)).to(device, dt)
    dq, dk, dv, dg, ds, dq_slot, dk_slot, dhk0, dhv0 = backward(p, do, *ins, o, lse, hk0, hv0, cu)
    dg = dg.double()
    if x["s"] is None:
        if ds is not None:
            dg = dg + ds.double() * -torch.from_numpy(np.exp(x["g"])).to(device)
        ds = None
    got = {"o": o, "lse": lse, "hk": hk, "hv": hv, "dq": dq, "dk": dk, "dv": dv, "dg": dg, "ds": ds,
           "dq_slot": dq_slot, "dk_slot": dk_slot, "dhk0": dhk0, "dhv0": dhv0}
    naive = naive_results(p, low, x["cu"], do)
    want = dict(zip(("o", "lse", "hk", "hv"), oracle_forward(p, x)))
    want.update(oracle_backward(p, x, do.double().cpu().numpy()))
    return got, naive, want
