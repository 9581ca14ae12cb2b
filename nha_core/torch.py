"""PyTorch adapter: autograd, ``torch.compile`` and an ``nn.Module`` for NHA.

The forward and backward are ``torch.library`` custom ops (``nha_core::fwd``,
``nha_core::bwd``) with fake (meta) kernels, and the forward has an autograd formula, so
``torch.compile(fullgraph=True)`` traces through NHA and ``torch.library.opcheck`` passes.
Both ops run whatever backend ``backend`` selects (``"auto"``: Triton on CUDA, NumPy on CPU).

    import nha_core.torch as nt
    o = nt.attention(q, k, v, g, window_size=512)       # differentiable in q, k, v, g, s, q_slot, k_slot

States (``initial_state`` / ``output_final_state``) are for inference and chunked prefill:
call :func:`nha_core.attention` for those; gradients through a state are not provided here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import api

Tensor = torch.Tensor


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("nha_core::fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, s: Optional[Tensor], q_slot: Optional[Tensor],
         k_slot: Optional[Tensor], cu_seqlens: Optional[Tensor], window_size: int, scale: float,
         backend: str) -> tuple[Tensor, Tensor]:
    o, lse, _ = api.attention(q, k, v, g, window_size=window_size, s=s, q_slot=q_slot, k_slot=k_slot,
                              scale=scale, cu_seqlens=cu_seqlens, return_lse=True, backend=backend)
    return o, lse


@_fwd.register_fake
def _(q, k, v, g, s, q_slot, k_slot, cu_seqlens, window_size, scale, backend):
    B, T, HQ, _ = q.shape
    return q.new_empty((B, T, HQ, v.shape[-1])), q.new_empty((B, HQ, T), dtype=_lse_dtype(q))


@torch.library.custom_op("nha_core::bwd", mutates_args=())
def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, s: Optional[Tensor], q_slot: Optional[Tensor],
         k_slot: Optional[Tensor], o: Tensor, lse: Tensor, cu_seqlens: Optional[Tensor], window_size: int,
         scale: float, backend: str) -> list[Tensor]:
    grads = api.attention_backward(do, q, k, v, g, o, lse, window_size=window_size, s=s, q_slot=q_slot,
                                   k_slot=k_slot, scale=scale, cu_seqlens=cu_seqlens, backend=backend)
    # A custom op has a fixed output list: an empty tensor stands for "not applicable".
    return [x if x is not None else q.new_empty((0,)) for x in grads[:7]]


@_bwd.register_fake
def _(do, q, k, v, g, s, q_slot, k_slot, o, lse, cu_seqlens, window_size, scale, backend):
    like = lambda x: torch.empty_like(x) if x is not None else q.new_empty((0,))  # noqa: E731
    return [like(q), like(k), like(v), like(g), like(s), like(q_slot), like(k_slot)]


def _setup_context(ctx, inputs, output):
    q, k, v, g, s, q_slot, k_slot, cu_seqlens, window_size, scale, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, g, s, q_slot, k_slot, cu_seqlens, o, lse)
    ctx.options = (window_size, scale, backend)
    ctx.mark_non_differentiable(lse)  # lse is for merging / checking, not a training target
    ctx.set_materialize_grads(False)


def _backward(ctx, do, _dlse):
    q, k, v, g, s, q_slot, k_slot, cu_seqlens, o, lse = ctx.saved_tensors
    if do is None:
        return (None,) * 11
    window_size, scale, backend = ctx.options
    dq, dk, dv, dg, ds, dq_slot, dk_slot = _bwd(do.contiguous(), q, k, v, g, s, q_slot, k_slot, o, lse, cu_seqlens,
                                               window_size, scale, backend)
    pick = lambda grad, given: grad if given is not None else None  # noqa: E731
    return dq, dk, dv, dg, pick(ds, s), pick(dq_slot, q_slot), pick(dk_slot, k_slot), None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, g, *, window_size: int, s=None, q_slot=None, k_slot=None, scale=None, cu_seqlens=None,
              return_lse: bool = False, backend: str = "auto"):
    """Differentiable NHA for torch tensors; arguments as :func:`nha_core.attention`.

    Returns ``o`` [B,T,HQ,V], or ``(o, lse)`` with ``return_lse`` (``lse`` [B,HQ,T] carries
    no gradient).
    """
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    o, lse = _fwd(q, k, v, g, s, q_slot, k_slot, cu_seqlens, int(window_size), scale, backend)
    return (o, lse.detach()) if return_lse else o


class NHA(torch.nn.Module):
    """A Native Hybrid Attention layer: projections, gated slots, sliding window, output.

    ``x`` [B,T,D] -> [B,T,D]. Gates follow gated slot attention: ``g = logsigmoid(x W_g) /
    gate_normalizer``, so decays stay close to 1; ``s = 1 - exp(g)``.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_slots: int, window_size: int, *,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None, gate_normalizer: float = 16.0,
                 backend: str = "auto"):
        super().__init__()
        self.HQ, self.H = num_heads, num_kv_heads or num_heads
        if self.HQ % self.H:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads = {self.HQ}, got {self.H}")
        self.K = head_dim or hidden_size // num_heads
        self.M, self.W, self.backend, self.gate_normalizer = num_slots, window_size, backend, gate_normalizer
        self.q_proj = torch.nn.Linear(hidden_size, self.HQ * self.K, bias=False)
        self.k_proj = torch.nn.Linear(hidden_size, self.H * self.K, bias=False)
        self.v_proj = torch.nn.Linear(hidden_size, self.H * self.K, bias=False)
        self.g_proj = torch.nn.Linear(hidden_size, self.H * self.M, bias=False)
        self.o_proj = torch.nn.Linear(self.HQ * self.K, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.HQ, self.K)
        k = self.k_proj(x).view(B, T, self.H, self.K)
        v = self.v_proj(x).view(B, T, self.H, self.K)
        g = F.logsigmoid(self.g_proj(x).float()).to(x.dtype).view(B, T, self.H, self.M) / self.gate_normalizer
        o = attention(q, k, v, g, window_size=self.W, backend=self.backend)
        return self.o_proj(o.reshape(B, T, self.HQ * self.K))
