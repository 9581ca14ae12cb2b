"""The peers NHA is measured against (SPEC section 6), written the way a user would call them.

GPU peers (torch tensors on CUDA):
  * ``sdpa_causal``      PyTorch SDPA, full causal softmax attention         [B,HQ,T,K] layout
  * ``flex_window``      FlexAttention, torch.compile'd, mask 0 <= q-k < W    [B,HQ,T,K] layout
  * ``fla_chunk_gsa``    fla's chunk_gsa (gated slot attention alone)         [B,T,H,*] layout
  * ``composition``      NHA assembled from parts: chunk_gsa on k, v, s, g shifted right by W
                         (the slot branch; MATH.md section 1) plus FlexAttention over the window,
                         merged through their log-sum-exps (SPEC section 2, last bullet).
  * ``sdpa_kvcache_decode``  one query per sequence against a full KV cache (decode peer).
CPU peers: ``sdpa_causal`` on float32 CPU tensors and ``per_token_loop`` (NumPy, token by token).

The log-sum-exp of each part:
  * FlexAttention returns the natural-log LSE [B,HQ,T] with ``return_aux=AuxRequest(lse=True)``
    (``return_lse=True`` before torch 2.9); it is differentiable, so the merge trains.
  * fla's public ``chunk_gsa`` returns only the normalised slot output. Its slot logits ``ok``
    [B,T,HQ,M] exist inside ``fla.ops.gsa.chunk_fwd.chunk_gsa_fwd``, so :class:`GSAWithLSE`
    calls fla's own forward/backward pieces (the same calls ``ChunkGSAFunction`` makes, fla-core
    0.6) and adds what the LSE needs: ``lse = logsumexp(ok)`` forward, and ``dok += p * dlse``
    backward (d lse / d ok = softmax(ok) = p). Nothing else changes, so its time is chunk_gsa's
    plus one reduction over M.
"""
from __future__ import annotations

import functools
import math

# ----------------------------------------------------------------------------------------------
# shared helpers


def shift_right(x, W: int):
    """[B,T,...] -> [B,T,...] with x[:, t] = x[:, t-W] for t >= W and zeros before (contiguous).

    Zero rows are identity tokens for the slot recurrence: g = 0 (no decay), s = 0 (no write).
    """
    import torch

    T = x.shape[1]
    out = torch.zeros_like(x)
    if W < T:
        out[:, W:] = x[:, : T - W]
    return out.contiguous()


def merge_by_lse(o_a, lse_a, o_b, lse_b):
    """Merge two separately normalised softmax branches. o_* [B,T,HQ,V], lse_* [B,T,HQ] (float32)."""
    import torch

    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).unsqueeze(-1)
    o = w_a * o_a.float() + w_b * o_b.float()
    return o.to(o_a.dtype), lse


# ----------------------------------------------------------------------------------------------
# full causal softmax attention


def sdpa_causal(q, k, v):
    """q [B,HQ,T,K], k/v [B,H,T,*] -> o [B,HQ,T,V]; GQA through enable_gqa."""
    import torch.nn.functional as F

    if q.shape[1] != k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_kvcache_decode(q, k_cache, v_cache):
    """Full-KV-cache decode: q [N,HQ,1,K] against k_cache/v_cache [N,H,Tctx,*] -> [N,HQ,1,V]."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=q.shape[1] != k_cache.shape[1])


# ----------------------------------------------------------------------------------------------
# FlexAttention sliding window


@functools.lru_cache(maxsize=None)
def _flex():
    import torch
    from torch.nn.attention import flex_attention as fa

    # One compiled graph per (shape, requires_grad, return_lse) that a run meets: a full compare
    # run needs more than dynamo's default 8 recompiles of one function, and past the limit
    # flex_attention silently falls back to an unfused kernel that materialises T x T scores
    # (seen 2026-12-02, H200: gpu-c forward+backward "314 ms", 107 GB peak).
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    return torch.compile(fa.flex_attention, dynamic=False), fa


@functools.lru_cache(maxsize=16)
def sliding_window_mask(T: int, W: int, device: str):
    """Block mask for 0 <= q - k < W (the window holds tokens (t-W, t]); built once per (T, W)."""
    _, fa = _flex()

    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < W)

    try:
        return fa.create_block_mask(window, None, None, T, T, device=device, _compile=True)
    except TypeError:
        return fa.create_block_mask(window, None, None, T, T, device=device)


def flex_window(q, k, v, W: int, *, scale=None, return_lse: bool = False):
    """q [B,HQ,T,K], k/v [B,H,T,*] -> o [B,HQ,T,V] (and lse [B,HQ,T], natural log)."""
    flex, fa = _flex()
    mask = sliding_window_mask(q.shape[2], W, str(q.device))
    gqa = q.shape[1] != k.shape[1]
    if not return_lse:
        return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    if hasattr(fa, "AuxRequest"):
        o, aux = flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa, return_aux=fa.AuxRequest(lse=True))
        return o, aux.lse
    return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa, return_lse=True)


# ----------------------------------------------------------------------------------------------
# fla gated slot attention


def fla_available() -> str | None:
    """None when ``fla.ops.gsa.chunk_gsa`` imports, else why not (for skips and reports)."""
    try:
        from fla.ops.gsa import chunk_gsa  # noqa: F401
    except Exception as error:
        return f"fla (package fla-core) not importable: {type(error).__name__}: {error}"
    return None


def fla_chunk_gsa(q, k, v, s, g, *, scale=None):
    """fla chunk_gsa: q [B,T,HQ,K], k [B,T,H,K], v [B,T,H,V], s/g [B,T,H,M] -> o [B,T,HQ,V]."""
    from fla.ops.gsa import chunk_gsa

    o, _ = chunk_gsa(q.contiguous(), k.contiguous(), v.contiguous(), s.contiguous(), g.contiguous(), scale=scale)
    return o


def _gsa_with_lse_function():
    """Build the autograd Function lazily: torch and fla load only when the composition runs."""
    import torch
    from fla.ops.gsa.chunk_bwd import chunk_gsa_bwd_k
    from fla.ops.gsa.chunk_fwd import chunk_gsa_fwd
    from fla.ops.gla.chunk import chunk_gla_bwd
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2
    from fla.ops.utils.softmax import softmax_bwd

    BT = 64  # fla's default GSA chunk

    class GSAWithLSE(torch.autograd.Function):
        """(o, lse) of gated slot attention; HQ == H here (the caller repeats KV heads for GQA)."""

        @staticmethod
        def forward(ctx, q, k, v, s, g, scale):
            # fla keeps the chunk-local cumulative gate in log2 units so its kernels use exp2.
            g_cum = chunk_local_cumsum(g=g, chunk_size=BT, scale=RCP_LN2)
            hk, _, ok, p, Av, hv, _, ov = chunk_gsa_fwd(
                q=q, k=k, v=v, s=s, g=g_cum, initial_state=(None, None),
                output_final_state=False, scale=scale, chunk_size=BT,
            )
            lse = torch.logsumexp(ok.float(), dim=-1)  # [B,T,HQ]
            # like chunk_gsa's default checkpoint_level=2: keep raw g, recompute states backward
            ctx.save_for_backward(q, k, v, s, g, ok, p, Av)
            ctx.scale = scale
            return ov, lse

        @staticmethod
        def backward(ctx, do, dlse):
            q, k, v, s, g, ok, p, Av = ctx.saved_tensors
            g_cum = chunk_local_cumsum(g=g, chunk_size=BT, scale=RCP_LN2)
            dqv, dsv, dv, dg, _ = chunk_gla_bwd(
                q=p.to(q.dtype), k=s, v=v, g=None, g_cumsum=g_cum, scale=1.0, initial_state=None,
                h=None, A=Av, do=do.contiguous(), dht=None, chunk_size=BT,
            )
            dok = softmax_bwd(p, dqv, dtype=ok.dtype)
            if dlse is not None:  # the merge's path into the slot logits
                dok = (dok.float() + p * dlse.unsqueeze(-1)).to(ok.dtype)
            dq, dk, dsk, dg, _ = chunk_gsa_bwd_k(
                q=q, k=k, v=s, g=g_cum, h0=None, h=None, o=ok, do=dok, dht=None, dg=dg,
                scale=ctx.scale, chunk_size=BT,
            )
            ds = dsv.add_(dsk)
            return dq, dk, dv, ds, dg.to(s.dtype), None

    return GSAWithLSE


@functools.lru_cache(maxsize=None)
def _gsa_with_lse():
    return _gsa_with_lse_function()


def fla_gsa_with_lse(q, k, v, s, g, *, scale):
    """Slot branch with its LSE: q [B,T,HQ,K] ... -> (o [B,T,HQ,V], lse [B,T,HQ] float32)."""
    G = q.shape[2] // k.shape[2]
    if G > 1:
        k, v, s, g = (x.repeat_interleave(G, dim=2) for x in (k, v, s, g))
    return _gsa_with_lse().apply(q.contiguous(), k.contiguous(), v.contiguous(), s.contiguous(), g.contiguous(), scale)


def flex_window_with_lse(q, k, v, W, *, scale):
    """Window branch: [B,T,heads,dim] in, (o [B,T,HQ,V], lse [B,T,HQ]) out, via FlexAttention."""
    o, lse = flex_window(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), W, scale=scale, return_lse=True)
    return o.transpose(1, 2), lse.transpose(1, 2)


def composition(q, k, v, g, s, W: int, *, scale=None, slot_fn=None, window_fn=None, return_lse=False):
    """NHA from parts. q [B,T,HQ,K] k [B,T,H,K] v [B,T,H,V] g, s [B,T,H,M] -> o [B,T,HQ,V].

    The slot branch is gated slot attention on k, v, s, g shifted right by W (token j enters the
    slots at step j + W with its own gate), the window branch softmax over (t-W, t]; one
    normalisation over both is the LSE merge of the two. ``slot_fn`` / ``window_fn`` default to
    fla / FlexAttention; tests pass small torch versions to check the assembly on CPU.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    slot_fn = slot_fn or fla_gsa_with_lse
    window_fn = window_fn or flex_window_with_lse
    o_s, lse_s = slot_fn(q, shift_right(k, W), shift_right(v, W), shift_right(s, W), shift_right(g, W), scale=scale)
    o_w, lse_w = window_fn(q, k, v, W, scale=scale)
    o, lse = merge_by_lse(o_s, lse_s.float(), o_w, lse_w.float())
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------------------------
# small torch parts for checking the composition where fla/FlexAttention cannot run (CPU)


def naive_gsa_with_lse(q, k, v, s, g, *, scale):
    """Gated slot attention token by token in float32: (o [B,T,HQ,V], lse [B,T,HQ])."""
    import torch

    B, T, HQ, K = q.shape
    H, M, V = k.shape[2], g.shape[3], v.shape[3]
    G = HQ // H
    f = {n: x.float() for n, x in dict(q=q, k=k, v=v, s=s, g=g).items()}
    hk = q.new_zeros(B, H, K, M, dtype=torch.float32)
    hv = q.new_zeros(B, H, M, V, dtype=torch.float32)
    o = q.new_empty(B, T, HQ, V, dtype=torch.float32)
    lse = q.new_empty(B, T, HQ, dtype=torch.float32)
    for t in range(T):
        a = f["g"][:, t].exp()                                                   # [B,H,M]
        hk = hk * a[:, :, None, :] + f["k"][:, t, :, :, None] * f["s"][:, t, :, None, :]
        hv = hv * a[:, :, :, None] + f["s"][:, t, :, :, None] * f["v"][:, t, :, None, :]
        qt = f["q"][:, t].reshape(B, H, G, K)
        logits = scale * qt @ hk                                                 # [B,H,G,M]
        lse[:, t] = torch.logsumexp(logits, -1).reshape(B, HQ)
        o[:, t] = (logits.softmax(-1) @ hv).reshape(B, HQ, V)
    return o.to(q.dtype), lse


def dense_window_with_lse(q, k, v, W, *, scale):
    """Sliding-window softmax with an explicit [T,T] mask (small T only): (o, lse) as above."""
    import torch

    B, T, HQ, K = q.shape
    G = HQ // k.shape[2]
    kk = k.float().repeat_interleave(G, dim=2).transpose(1, 2)                   # [B,HQ,T,K]
    vv = v.float().repeat_interleave(G, dim=2).transpose(1, 2)
    logits = scale * q.float().transpose(1, 2) @ kk.transpose(-1, -2)            # [B,HQ,T,T]
    i = torch.arange(T, device=q.device)
    keep = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < W)
    logits = logits.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(logits, -1)                                            # [B,HQ,T]
    o = torch.exp(logits - lse[..., None]) @ vv
    return o.transpose(1, 2).to(q.dtype), lse.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# CPU: the per-token loop a user would write in NumPy


def per_token_loop(q, k, v, g, W: int, *, s=None, scale=None):
    """NHA token by token in NumPy, vectorised over B and heads (SPEC section 2).

    q [B,T,HQ,K] k [B,T,H,K] v [B,T,H,V] g [B,T,H,M] (s default 1 - exp(g)) -> o [B,T,HQ,V].
    """
    import numpy as np

    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[3], g.shape[3]
    G = HQ // H
    scale = K ** -0.5 if scale is None else scale
    s = -np.expm1(g) if s is None else s
    a = np.exp(g)
    hk = np.zeros((B, H, K, M), q.dtype)
    hv = np.zeros((B, H, M, V), q.dtype)
    kt = np.ascontiguousarray(k.transpose(0, 2, 3, 1))                   # [B,H,K,T]
    vt = np.ascontiguousarray(v.transpose(0, 2, 1, 3))                   # [B,H,T,V]
    qg = (q * scale).reshape(B, T, H, G, K)
    o = np.empty((B, T, HQ, V), q.dtype)
    for t in range(T):
        j = t - W
        if j >= 0:  # token j leaves the window and enters the slots with its own gate
            hk = hk * a[:, j, :, None, :] + k[:, j, :, :, None] * s[:, j, :, None, :]
            hv = hv * a[:, j, :, :, None] + s[:, j, :, :, None] * v[:, j, :, None, :]
        lo = max(0, t - W + 1)
        qt = qg[:, t]                                                     # [B,H,G,K]
        logits = np.concatenate([qt @ hk, qt @ kt[:, :, :, lo:t + 1]], axis=-1)  # [B,H,G,M+nw]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o[:, t] = (p[..., :M] @ hv + p[..., M:] @ vt[:, :, lo:t + 1]).reshape(B, HQ, V)
    return o
