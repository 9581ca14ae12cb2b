"""Triton decode: one new token for each of N sequences, state updated in place.

One program per (sequence, KV head) serves the whole GQA group, so the slot state and the ring
buffer rows of a KV head are read once and written once per step:

1. evict: once ``seen >= W`` the ring row ``seen % W`` (token ``seen - W``) enters the slots
   with its own gate, ``Hk = Hk exp(g) + k_slot (x) s``, ``Hv = exp(g) Hv + s (x) v``
   (``W = 0``: the new token itself enters, before it is read, as in gated slot attention);
2. read: the group's queries [G, K] take ``M`` slot logits, the new token's logit (from
   registers) and the other ``min(seen, W - 1)`` valid ring rows; one online softmax over ring
   blocks of BS rows; o and lse are written;
3. append: after a barrier, the new token's k, v, g (and s, k_slot when the state keeps them)
   go to row ``seen % W`` and the slot state is stored. Reading the new token from registers
   and writing last means no thread ever reads a row another thread of the program writes.

``seen`` is read on the device (never synchronised to the host); ``state.seen`` is advanced
afterwards with one tiny in-place add.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .forward import derive_s, dot_precision


@triton.jit
def nha_decode_kernel(
    q, k, v, g, s, qs, ks, hk, hv, k_cache, v_cache, g_cache, s_cache, ks_cache, seen, o, lse,
    scale, W, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BG: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    HAS_S: tl.constexpr, HAS_S_CACHE: tl.constexpr, HAS_KS_CACHE: tl.constexpr, G_FLOOR: tl.constexpr,
    DOT: tl.constexpr,
):
    """q, qs [N,HQ,K]; k, ks [N,H,K]; v [N,H,V]; g, s [N,H,M]; hk [N,H,K,M], hv [N,H,M,V] (fp32,
    in place); caches [N,W,H,*] (in place); o [N,HQ,V]; lse [N,HQ] fp32."""
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    i_n = i_n.to(tl.int64)
    n_seen = tl.load(seen + i_n)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_m = tl.arange(0, BM)
    o_g = tl.arange(0, BG)
    m_k, m_v, m_m, m_g = o_k < K, o_v < V, o_m < M, o_g < G
    m_km = m_k[:, None] & m_m[None, :]
    m_mv = m_m[:, None] & m_v[None, :]
    p_hk = hk + (i_n * H + i_h) * K * M + o_k[:, None] * M + o_m[None, :]
    p_hv = hv + (i_n * H + i_h) * M * V + o_m[:, None] * V + o_v[None, :]
    i_kv = i_n * H + i_h
    qk2 = scale * 1.4426950408889634
    b_k = tl.load(k + i_kv * K + o_k, mask=m_k, other=0.0)                                      # [BK]
    b_v = tl.load(v + i_kv * V + o_v, mask=m_v, other=0.0)                                      # [BV]
    b_g = tl.load(g + i_kv * M + o_m, mask=m_m, other=0.0)                                      # [BM]
    if HAS_S:
        b_s = tl.load(s + i_kv * M + o_m, mask=m_m, other=0.0)
    else:
        b_s = tl.where(m_m, derive_s(tl.maximum(b_g.to(tl.float32), G_FLOOR)), 0.0)
    b_ks = tl.load(ks + i_kv * K + o_k, mask=m_k, other=0.0)

    if M > 0:
        b_hk = tl.load(p_hk, mask=m_km, other=0.0)                                               # [BK, BM]
        b_hv = tl.load(p_hv, mask=m_mv, other=0.0)                                               # [BM, BV]
    r_new = n_seen % tl.maximum(W, 1)
    p_row = (i_n * W + r_new) * H + i_h
    if W == 0:
        # the new token enters the slots before it is read
        if M > 0:
            b_a = tl.exp(tl.maximum(b_g.to(tl.float32), G_FLOOR))
            b_hk = b_hk * b_a[None, :] + b_ks.to(tl.float32)[:, None] * b_s.to(tl.float32)[None, :]
            b_hv = b_hv * b_a[:, None] + b_s.to(tl.float32)[:, None] * b_v.to(tl.float32)[None, :]
    else:
        if n_seen >= W:
            b_ke = tl.load(k_cache + p_row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
            if HAS_KS_CACHE:
                b_ke = tl.load(ks_cache + p_row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
            b_ve = tl.load(v_cache + p_row * V + o_v, mask=m_v, other=0.0).to(tl.float32)
            b_ge = tl.maximum(tl.load(g_cache + p_row * M + o_m, mask=m_m, other=0.0).to(tl.float32), G_FLOOR)
            b_a = tl.exp(b_ge)
            if HAS_S_CACHE:
                b_se = tl.load(s_cache + p_row * M + o_m, mask=m_m, other=0.0).to(tl.float32)
            else:
                b_se = tl.where(m_m, derive_s(b_ge), 0.0)     # s = 1 - exp(g) when s was not given
            if M > 0:
                b_hk = b_hk * b_a[None, :] + b_ke[:, None] * b_se[None, :]
                b_hv = b_hv * b_a[:, None] + b_se[:, None] * b_ve[None, :]

    # read: the group's G queries, padded to BG >= 16 rows for tl.dot
    i_q = i_n * HQ + i_h * G + o_g
    b_q = tl.load(q + i_q[:, None] * K + o_k[None, :], mask=m_g[:, None] & m_k[None, :], other=0.0)  # [BG, BK]
    if M > 0:
        b_qs = tl.load(qs + i_q[:, None] * K + o_k[None, :], mask=m_g[:, None] & m_k[None, :], other=0.0)
        b_ls = tl.dot(b_qs.to(tl.float32), b_hk, input_precision=DOT) * qk2                     # [BG, BM]
        b_ls = tl.where(m_m[None, :], b_ls, float("-inf"))
        b_mi = tl.max(b_ls, 1)
        b_p = tl.exp2(b_ls - b_mi[:, None])
        b_li = tl.sum(b_p, 1)
        b_acc = tl.dot(b_p, b_hv, input_precision=DOT)                                           # [BG, BV]
    else:
        b_mi = tl.full([BG], float("-inf"), dtype=tl.float32)
        b_li = tl.zeros([BG], dtype=tl.float32)
        b_acc = tl.zeros([BG, BV], dtype=tl.float32)
    if W > 0:
        # the new token, from registers
        b_sn = tl.sum(b_q.to(tl.float32) * b_k.to(tl.float32)[None, :], 1) * qk2                  # [BG]
        b_mn = tl.maximum(b_mi, b_sn)
        b_alpha = tl.exp2(b_mi - b_mn)
        b_pn = tl.exp2(b_sn - b_mn)
        b_li = b_li * b_alpha + b_pn
        b_acc = b_acc * b_alpha[:, None] + b_pn[:, None] * b_v.to(tl.float32)[None, :]
        b_mi = b_mn
        # the other valid ring rows: 0 .. min(seen, W) - 1 except the row being replaced
        n_valid = tl.minimum(n_seen + 1, W)
        p_kc = k_cache + (i_n * W * H + i_h) * K
        p_vc = v_cache + (i_n * W * H + i_h) * V
        for i_s in range(0, n_valid, BS):
            o_s = i_s + tl.arange(0, BS)
            m_s = (o_s < n_valid) & (o_s != r_new)
            b_kw = tl.load(p_kc + o_s[:, None] * (H * K) + o_k[None, :], mask=m_s[:, None] & m_k[None, :],
                           other=0.0)                                                            # [BS, BK]
            b_vw = tl.load(p_vc + o_s[:, None] * (H * V) + o_v[None, :], mask=m_s[:, None] & m_v[None, :],
                           other=0.0)                                                            # [BS, BV]
            b_sc = tl.dot(b_q, tl.trans(b_kw), input_precision=DOT) * qk2                        # [BG, BS]
            b_sc = tl.where(m_s[None, :], b_sc, float("-inf"))
            b_mn = tl.maximum(b_mi, tl.max(b_sc, 1))
            b_alpha = tl.exp2(b_mi - b_mn)
            b_pw = tl.exp2(b_sc - b_mn[:, None])
            b_li = b_li * b_alpha + tl.sum(b_pw, 1)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_pw.to(b_vw.dtype), b_vw, input_precision=DOT)
            b_mi = b_mn
    b_ok = b_li > 0
    b_o = b_acc / tl.where(b_ok, b_li, 1.0)[:, None]
    b_lse = tl.where(b_ok, (b_mi + tl.log2(tl.where(b_ok, b_li, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(o + i_q[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_g[:, None] & m_v[None, :])
    tl.store(lse + i_q, b_lse, mask=m_g)

    # append and store the state only after every thread has read what it needed
    tl.debug_barrier()
    if W > 0:
        tl.store(k_cache + p_row * K + o_k, b_k, mask=m_k)
        tl.store(v_cache + p_row * V + o_v, b_v, mask=m_v)
        tl.store(g_cache + p_row * M + o_m, b_g, mask=m_m)
        if HAS_S_CACHE:
            tl.store(s_cache + p_row * M + o_m, b_s.to(s_cache.dtype.element_ty), mask=m_m)
        if HAS_KS_CACHE:
            tl.store(ks_cache + p_row * K + o_k, b_ks, mask=m_k)
    if M > 0:
        tl.store(p_hk, b_hk, mask=m_km)
        tl.store(p_hv, b_hv, mask=m_mv)


def decode(p, q, k, v, g, s, q_slot, k_slot, state):
    """o [N,HQ,V] (input dtype), lse [N,HQ] fp32; ``state`` (NHAState of torch tensors) in place.
    ``s`` None means s = 1 - exp(g), computed in the kernel (and stored in s_cache if kept)."""
    N, HQ, H, K, V, M, W = p.N, p.HQ, p.H, p.K, p.V, p.M, p.W
    for name, x in state.arrays().items():
        if name != "seen" and not x.is_contiguous():
            raise ValueError(f"state.{name}: the triton decode updates the state in place and needs "
                             f"contiguous tensors, got strides {tuple(x.stride())}")
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    s = s.contiguous() if s is not None else None
    qs = q_slot.contiguous() if q_slot is not None else q
    ks = k_slot.contiguous() if k_slot is not None else k
    o = torch.empty(N, HQ, V, dtype=q.dtype, device=q.device)
    lse = torch.empty(N, HQ, dtype=torch.float32, device=q.device)
    if N == 0:
        return o, lse
    dummy = state.k_cache
    nha_decode_kernel[(N, H)](
        q, k, v, g, s if s is not None else g, qs, ks, state.hk, state.hv, state.k_cache, state.v_cache,
        state.g_cache,
        state.s_cache if state.s_cache is not None else dummy,
        state.k_slot_cache if state.k_slot_cache is not None else dummy,
        state.seen, o, lse,
        p.scale, W, HQ, H, p.G, K, V, M,
        configs.pad(p.G), configs.decode_window_rows(K, V), configs.pad(K), configs.pad(V), configs.pad(M),
        s is not None, state.s_cache is not None, state.k_slot_cache is not None, configs.G_FLOOR,
        dot_precision(p),
        num_warps=configs.decode_num_warps(K, V), num_stages=configs.decode_num_stages(K, V),
    )
    state.seen.add_(1)
    return o, lse
