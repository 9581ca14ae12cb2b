"""The torch adapter: autograd against the reference, opcheck, torch.compile, the nn.Module."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import nha_core.torch as nt  # noqa: E402
from nha_core import reference  # noqa: E402

from .cases import rel_err  # noqa: E402


def tensors(B=2, T=9, HQ=4, H=2, K=5, V=3, M=3, dtype=torch.float64, seed=0, explicit=False):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    x = dict(q=make(B, T, HQ, K), k=make(B, T, H, K), v=make(B, T, H, V),
             g=torch.nn.functional.logsigmoid(make(B, T, H, M)) / 4)
    if explicit:
        x.update(s=torch.rand(B, T, H, M, generator=gen, dtype=dtype), q_slot=make(B, T, HQ, K),
                 k_slot=make(B, T, H, K))
    return {n: a.requires_grad_() for n, a in x.items()}


@pytest.mark.parametrize("explicit", [False, True])
def test_autograd_matches_reference_backward(explicit):
    x = tensors(explicit=explicit)
    o = nt.attention(**x, window_size=3, backend="numpy")
    do = torch.randn_like(o)
    (o * do).sum().backward()
    np_x = {n: a.detach().numpy() for n, a in x.items()}
    ref = reference.backward(do.numpy(), np_x.pop("q"), np_x.pop("k"), np_x.pop("v"), np_x.pop("g"),
                             window_size=3, **np_x)
    for name, a in x.items():
        key = "d" + name
        assert rel_err(a.grad.numpy(), ref[key]) <= 1e-12, name


def test_opcheck_forward_op():
    x = tensors(dtype=torch.float32)
    args = (x["q"], x["k"], x["v"], x["g"], None, None, None, None, 3, 0.5, "numpy")
    torch.library.opcheck(torch.ops.nha_core.fwd.default, args)


def test_compile_fullgraph_traces_through_nha():
    x = tensors(dtype=torch.float32)

    def f(q, k, v, g):
        return (nt.attention(q, k, v, g, window_size=3, backend="numpy") * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = f(*(x[n].detach() for n in "qkvg"))
    got = compiled(*(x[n] for n in "qkvg"))
    torch.testing.assert_close(got, expected)
    got.backward()
    assert all(x[n].grad is not None and torch.isfinite(x[n].grad).all() for n in "qkvg")


def test_layer_trains_one_step():
    layer = nt.NHA(hidden_size=16, num_heads=4, num_kv_heads=2, num_slots=4, window_size=3, backend="numpy")
    x = torch.randn(2, 7, 16)
    loss = layer(x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_lse_carries_no_gradient():
    x = tensors(dtype=torch.float32)
    o, lse = nt.attention(x["q"], x["k"], x["v"], x["g"], window_size=3, return_lse=True, backend="numpy")
    assert not lse.requires_grad
