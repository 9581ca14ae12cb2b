"""Triton backward of NHA (formulas: notes/MATH.md §3), deterministic: no atomics anywhere.

Every float output element is written by exactly one program, so results do not depend on
scheduling. Five launches, in order:

1. ``nha_fwd_state_kernel`` (forward.py) recomputes the chunk states Hk_c, Hv_c and the chunk
   cumsums Gc; only the [NC,H,K,M] + [NC,H,M,V] states and Gc [B*T,H,M] are stored.
2. ``nha_bwd_q_kernel`` grid ``(blocks, HQ)``: per BT query rows and query head, recomputes the
   slot logits Ls, the probabilities from the saved lse, ``D = rowsum(do * o)``, the slot readout
   gradient ``dov = do . Hv(t)`` and ``dLs = Ps * (dov - D)``; writes dq (window part + slot part,
   or the slot part to dq_slot when q_slot was given) and, for the KV-side kernels, Ps, dLs,
   ``X1 = dLs * Ls + Ps * dov`` (the <dH(t), H(t)> term of the gate gradient) and D.
3. ``nha_bwd_state_kernel`` grid ``(N, H, cdiv(M, BM))``: reverse pass over chunks,
   ``dH_start = exp(Gc_last) dH_end + sum_heads [scale Qs^T (dLs e^Gc) | (Ps e^Gc)^T do]``;
   stores dH_end per chunk and dhk0/dhv0.
4. ``nha_bwd_slot_kernel`` grid ``(blocks, H)``: per chunk and KV head, sums over the group's
   query heads the slot-branch gradients of the shifted tokens, dKs, dVs, dS, and the gate
   gradient as a reverse cumsum inside the chunk plus the carry ``<dH_end, H_next>`` per slot
   (exact: sum over later chunks of the same terms); writes them un-shifted (token p - W).
5. ``nha_bwd_kv_kernel`` grid ``(blocks, H)``: per BT keys and KV head, walks the group's query
   blocks inside the band ``t in [j, j+W)`` (FlashAttention-2 key-side loop) for the window dk,
   dv, adds the slot parts of step 4 and writes dk, dv once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .forward import (chunk_states, decay_apply, decay_apply_t, decay_weights, dot_precision, flat,
                      load_slot_chunk, plan)


@triton.jit
def nha_bwd_q_kernel(
    q, k, v, qs, ks, s, gc, hk_c, hv_c, o, do, lse, cu, chunk_off, block_map,
    dq, dq_slot, ps_buf, dls_buf, x1_buf, d_buf,
    scale, W, T_lse, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    HAS_SLOTS: tl.constexpr, HAS_QSLOT: tl.constexpr, IS_VARLEN: tl.constexpr,
    SAFE_LIMIT: tl.constexpr, DOT: tl.constexpr,
):
    """dq [B*T,HQ,K] (and dq_slot); Ps, dLs, X1 [B*T,HQ,M] fp32; D [B*T,HQ] fp32."""
    i_b, i_hq = tl.program_id(0), tl.program_id(1)
    i_h = i_hq // G
    i_n = tl.load(block_map + i_b * 2).to(tl.int64)
    i_c = tl.load(block_map + i_b * 2 + 1).to(tl.int64)
    bos = tl.load(cu + i_n).to(tl.int64)
    T_n = tl.load(cu + i_n + 1).to(tl.int64) - bos
    o_t = i_c * BT + tl.arange(0, BT)
    m_t = o_t < T_n
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_m = tl.arange(0, BM)
    m_k, m_v, m_m = o_k < K, o_v < V, o_m < M
    r_t = bos + o_t
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_q = tl.load(q + (r_t[:, None] * HQ + i_hq) * K + o_k[None, :], mask=m_tk, other=0.0)      # [BT, BK]
    b_do = tl.load(do + (r_t[:, None] * HQ + i_hq) * V + o_v[None, :], mask=m_tv, other=0.0)    # [BT, BV]
    b_o = tl.load(o + (r_t[:, None] * HQ + i_hq) * V + o_v[None, :], mask=m_tv, other=0.0)
    b_D = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)                                   # [BT]
    if IS_VARLEN:
        p_lse = lse + i_hq * T_lse + bos + o_t
    else:
        p_lse = lse + (i_n * HQ + i_hq) * T_lse + o_t
    b_lse = tl.load(p_lse, mask=m_t, other=0.0)
    # rows with no logit at all (M = 0, W = 0) have lse = -inf and no gradient
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)
    tl.store(d_buf + r_t * HQ + i_hq, b_D, mask=m_t)

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    if HAS_SLOTS:
        c0 = tl.load(chunk_off + i_n).to(tl.int64)
        b_ks, b_vs, b_sx, b_gc, b_hk, b_hv = load_slot_chunk(
            ks, v, s, gc, hk_c, hv_c, bos, T_n, i_c, c0, i_h, W, H, K, V, M, BT, BK, BV, BM)
        b_qs = tl.load(qs + (r_t[:, None] * HQ + i_hq) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_dof = b_do.to(tl.float32)
        b_eg = tl.exp(b_gc)
        b_a = tl.dot(b_qs, tl.trans(b_ks), input_precision=DOT)                                 # [BT, BT]
        b_ls = tl.dot(b_qs, b_hk, input_precision=DOT) * b_eg
        b_ls = (b_ls + decay_apply(b_a, b_sx, b_gc, BT, SAFE_LIMIT, DOT)) * scale               # [BT, BM]
        b_ps = tl.where(m_m[None, :], tl.exp(b_ls - b_lse[:, None]), 0.0)
        b_adv = tl.dot(b_dof, tl.trans(b_vs), input_precision=DOT)                              # [BT, BT]
        b_dov = tl.dot(b_dof, tl.trans(b_hv), input_precision=DOT) * b_eg
        b_dov += decay_apply(b_adv, b_sx, b_gc, BT, SAFE_LIMIT, DOT)                             # [BT, BM]
        b_dls = b_ps * (b_dov - b_D[:, None])
        b_dqs = tl.dot(b_dls * b_eg, tl.trans(b_hk), input_precision=DOT)
        b_dqs += tl.dot(decay_weights(b_dls, b_sx, b_gc, BT, SAFE_LIMIT, DOT), b_ks, input_precision=DOT)
        b_dqs *= scale                                                                           # [BT, BK]
        m_tm = m_t[:, None] & m_m[None, :]
        o_tm = (r_t[:, None] * HQ + i_hq) * M + o_m[None, :]
        tl.store(ps_buf + o_tm, b_ps, mask=m_tm)
        tl.store(dls_buf + o_tm, b_dls, mask=m_tm)
        tl.store(x1_buf + o_tm, b_dls * b_ls + b_ps * b_dov, mask=m_tm)
        if HAS_QSLOT:
            tl.store(dq_slot + (r_t[:, None] * HQ + i_hq) * K + o_k[None, :],
                     b_dqs.to(dq_slot.dtype.element_ty), mask=m_tk)
        else:
            b_dq += b_dqs

    if W > 0:
        lo = tl.maximum(i_c * BT - W + 1, 0)
        hi = tl.minimum(i_c * BT + BT, T_n)
        for i_s in range((lo // BS) * BS, hi, BS):
            o_s = i_s + tl.arange(0, BS)
            m_s = o_s < T_n
            r_s = bos + o_s
            b_k = tl.load(k + (r_s[:, None] * H + i_h) * K + o_k[None, :],
                          mask=m_s[:, None] & m_k[None, :], other=0.0)                         # [BS, BK]
            b_v = tl.load(v + (r_s[:, None] * H + i_h) * V + o_v[None, :],
                          mask=m_s[:, None] & m_v[None, :], other=0.0)                         # [BS, BV]
            b_sc = tl.dot(b_q, tl.trans(b_k), input_precision=DOT) * scale                     # [BT, BS]
            m_band = (o_s[None, :] <= o_t[:, None]) & (o_s[None, :] > o_t[:, None] - W) & m_s[None, :]
            b_p = tl.where(m_band, tl.exp(b_sc - b_lse[:, None]), 0.0)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT)
            b_ds = b_p * (b_dp - b_D[:, None])
            b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT) * scale
    tl.store(dq + (r_t[:, None] * HQ + i_hq) * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)


@triton.jit
def nha_bwd_state_kernel(
    qs, do, gc, ps_buf, dls_buf, dh_k, dh_v, dhk0, dhv0, cu, chunk_off,
    scale, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    HAS_H0: tl.constexpr, DOT: tl.constexpr,
):
    """dh_k [NC,H,K,M], dh_v [NC,H,M,V]: gradient w.r.t. the state AFTER each chunk."""
    i_n, i_h, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu + i_n).to(tl.int64)
    T_n = tl.load(cu + i_n + 1).to(tl.int64) - bos
    c0 = tl.load(chunk_off + i_n).to(tl.int64)
    NT = tl.cdiv(T_n, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_m = i_m * BM + tl.arange(0, BM)
    m_k, m_v, m_m = o_k < K, o_v < V, o_m < M
    m_km = m_k[:, None] & m_m[None, :]
    m_mv = m_m[:, None] & m_v[None, :]
    o_km = o_k[:, None] * M + o_m[None, :]
    o_mv = o_m[:, None] * V + o_v[None, :]
    b_dhk = tl.zeros([BK, BM], dtype=tl.float32)
    b_dhv = tl.zeros([BM, BV], dtype=tl.float32)
    for i_r in range(0, NT):
        i_c = NT - 1 - i_r
        i_state = (c0 + i_c) * H + i_h
        tl.store(dh_k + i_state * K * M + o_km, b_dhk, mask=m_km)
        tl.store(dh_v + i_state * M * V + o_mv, b_dhv, mask=m_mv)
        o_t = i_c * BT + tl.arange(0, BT)
        m_t = o_t < T_n
        r_t = bos + o_t
        m_tm = m_t[:, None] & m_m[None, :]
        b_gc = tl.load(gc + (r_t[:, None] * H + i_h) * M + o_m[None, :], mask=m_tm, other=0.0)   # [BT, BM]
        r_last = bos + tl.minimum(i_c * BT + BT, T_n) - 1
        b_glast = tl.load(gc + (r_last * H + i_h) * M + o_m, mask=m_m, other=0.0)                # [BM]
        b_eg = tl.exp(b_gc)
        b_dhk *= tl.exp(b_glast)[None, :]
        b_dhv *= tl.exp(b_glast)[:, None]
        for i_g in range(0, G):
            i_hq = i_h * G + i_g
            o_tm = (r_t[:, None] * HQ + i_hq) * M + o_m[None, :]
            b_qs = tl.load(qs + (r_t[:, None] * HQ + i_hq) * K + o_k[None, :],
                           mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)        # [BT, BK]
            b_do = tl.load(do + (r_t[:, None] * HQ + i_hq) * V + o_v[None, :],
                           mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)        # [BT, BV]
            b_dls = tl.load(dls_buf + o_tm, mask=m_tm, other=0.0)                              # [BT, BM]
            b_ps = tl.load(ps_buf + o_tm, mask=m_tm, other=0.0)
            b_dhk += tl.dot(tl.trans(b_qs), b_dls * b_eg, input_precision=DOT) * scale
            b_dhv += tl.dot(tl.trans(b_ps * b_eg), b_do, input_precision=DOT)
    if HAS_H0:
        tl.store(dhk0 + (i_n * H + i_h) * K * M + o_km, b_dhk, mask=m_km)
        tl.store(dhv0 + (i_n * H + i_h) * M * V + o_mv, b_dhv, mask=m_mv)


@triton.jit
def nha_bwd_slot_kernel(
    qs, ks, v, s, do, gc, hk_c, hv_c, dh_k, dh_v, ps_buf, dls_buf, x1_buf, cu, chunk_off, block_map,
    dks, dvs, ds, dg,
    scale, W, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    SAFE_LIMIT: tl.constexpr, DOT: tl.constexpr,
):
    """Slot-branch gradients of the chunk's shifted tokens, stored at their tokens p - W:
    dks [B*T,H,K], dvs [B*T,H,V], ds, dg [B*T,H,M] (all fp32)."""
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(block_map + i_b * 2).to(tl.int64)
    i_c = tl.load(block_map + i_b * 2 + 1).to(tl.int64)
    bos = tl.load(cu + i_n).to(tl.int64)
    T_n = tl.load(cu + i_n + 1).to(tl.int64) - bos
    c0 = tl.load(chunk_off + i_n).to(tl.int64)
    o_t = i_c * BT + tl.arange(0, BT)
    m_t = o_t < T_n
    r_t = bos + o_t
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_m = tl.arange(0, BM)
    m_k, m_v, m_m = o_k < K, o_v < V, o_m < M
    m_km = m_k[:, None] & m_m[None, :]
    m_mv = m_m[:, None] & m_v[None, :]
    b_ks, b_vs, b_sx, b_gc, b_hk, b_hv = load_slot_chunk(
        ks, v, s, gc, hk_c, hv_c, bos, T_n, i_c, c0, i_h, W, H, K, V, M, BT, BK, BV, BM)
    i_state = (c0 + i_c) * H + i_h
    b_dhk = tl.load(dh_k + i_state * K * M + o_k[:, None] * M + o_m[None, :], mask=m_km, other=0.0)  # [BK, BM]
    b_dhv = tl.load(dh_v + i_state * M * V + o_m[:, None] * V + o_v[None, :], mask=m_mv, other=0.0)  # [BM, BV]
    # the state after this chunk (only read when a later chunk exists: dH_end is 0 otherwise)
    has_next = i_c * BT + BT < T_n
    i_next = tl.where(has_next, i_state + H, i_state)
    f_next = tl.where(has_next, 1.0, 0.0)
    b_hkn = tl.load(hk_c + i_next * K * M + o_k[:, None] * M + o_m[None, :], mask=m_km, other=0.0) * f_next
    b_hvn = tl.load(hv_c + i_next * M * V + o_m[:, None] * V + o_v[None, :], mask=m_mv, other=0.0) * f_next
    r_last = bos + tl.minimum(i_c * BT + BT, T_n) - 1
    b_glast = tl.load(gc + (r_last * H + i_h) * M + o_m, mask=m_m, other=0.0)                    # [BM]

    # paths through the states of later chunks: decay from token j to the chunk end, <= 1
    b_wend = b_sx * tl.exp(b_glast[None, :] - b_gc)                                             # [BT, BM]
    b_dks = tl.dot(b_wend, tl.trans(b_dhk), input_precision=DOT)                                # [BT, BK]
    b_dvs = tl.dot(b_wend, b_dhv, input_precision=DOT)                                          # [BT, BV]
    b_ds = (tl.dot(b_ks, b_dhk, input_precision=DOT) + tl.dot(b_vs, tl.trans(b_dhv), input_precision=DOT)) \
        * tl.exp(b_glast[None, :] - b_gc)                                                       # [BT, BM]
    b_x1 = tl.zeros([BT, BM], dtype=tl.float32)
    m_tm = m_t[:, None] & m_m[None, :]
    for i_g in range(0, G):
        i_hq = i_h * G + i_g
        o_tm = (r_t[:, None] * HQ + i_hq) * M + o_m[None, :]
        b_qs = tl.load(qs + (r_t[:, None] * HQ + i_hq) * K + o_k[None, :],
                       mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)            # [BT, BK]
        b_do = tl.load(do + (r_t[:, None] * HQ + i_hq) * V + o_v[None, :],
                       mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)            # [BT, BV]
        b_dls = tl.load(dls_buf + o_tm, mask=m_tm, other=0.0)                                  # [BT, BM]
        b_ps = tl.load(ps_buf + o_tm, mask=m_tm, other=0.0)
        b_x1 += tl.load(x1_buf + o_tm, mask=m_tm, other=0.0)
        # readouts at t >= j inside the chunk
        b_a = tl.dot(b_qs, tl.trans(b_ks), input_precision=DOT)                                 # [BT, BT]
        b_ds += decay_apply_t(b_a, b_dls, b_gc, BT, SAFE_LIMIT, DOT) * scale
        b_a = tl.dot(b_do, tl.trans(b_vs), input_precision=DOT)
        b_ds += decay_apply_t(b_a, b_ps, b_gc, BT, SAFE_LIMIT, DOT)
        b_w = decay_weights(b_dls, b_sx, b_gc, BT, SAFE_LIMIT, DOT)                             # [BT(t), BT(j)]
        b_dks += tl.dot(tl.trans(b_w), b_qs, input_precision=DOT) * scale
        b_w = decay_weights(b_ps, b_sx, b_gc, BT, SAFE_LIMIT, DOT)
        b_dvs += tl.dot(tl.trans(b_w), b_do, input_precision=DOT)

    # gate: dGt[p] = sum_{p' >= p} (X1 - S dS)[p'], the part beyond this chunk is <dH_end, H_next>
    b_carry = tl.sum(b_dhk * b_hkn, 0) + tl.sum(b_dhv * b_hvn, 1)                              # [BM]
    b_dg = tl.cumsum(b_x1 - b_sx * b_ds, 0, reverse=True) + b_carry[None, :]

    o_j = o_t - W
    m_j = m_t & (o_j >= 0)
    r_j = bos + o_j
    tl.store(dks + (r_j[:, None] * H + i_h) * K + o_k[None, :], b_dks, mask=m_j[:, None] & m_k[None, :])
    tl.store(dvs + (r_j[:, None] * H + i_h) * V + o_v[None, :], b_dvs, mask=m_j[:, None] & m_v[None, :])
    m_jm = m_j[:, None] & m_m[None, :]
    tl.store(ds + (r_j[:, None] * H + i_h) * M + o_m[None, :], b_ds, mask=m_jm)
    tl.store(dg + (r_j[:, None] * H + i_h) * M + o_m[None, :], b_dg, mask=m_jm)


@triton.jit
def nha_bwd_kv_kernel(
    q, k, v, do, lse, d_buf, dks, dvs, cu, block_map, dk, dv,
    scale, W, T_lse, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    ADD_KS: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
):
    """dk [B*T,H,K], dv [B*T,H,V]: window part over the group's queries + slot parts dks, dvs."""
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(block_map + i_b * 2).to(tl.int64)
    i_c = tl.load(block_map + i_b * 2 + 1).to(tl.int64)
    bos = tl.load(cu + i_n).to(tl.int64)
    T_n = tl.load(cu + i_n + 1).to(tl.int64) - bos
    o_s = i_c * BT + tl.arange(0, BT)           # this program's keys
    m_s = o_s < T_n
    r_s = bos + o_s
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_sk = m_s[:, None] & m_k[None, :]
    m_sv = m_s[:, None] & m_v[None, :]
    b_k = tl.load(k + (r_s[:, None] * H + i_h) * K + o_k[None, :], mask=m_sk, other=0.0)       # [BT, BK]
    b_v = tl.load(v + (r_s[:, None] * H + i_h) * V + o_v[None, :], mask=m_sv, other=0.0)       # [BT, BV]
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    if W > 0:
        # queries that see key j: t in [j, j + W)
        hi = tl.minimum(i_c * BT + BT - 1 + W, T_n)
        for i_g in range(0, G):
            i_hq = i_h * G + i_g
            for i_t in range(i_c * BT, hi, BT):
                o_t = i_t + tl.arange(0, BT)
                m_t = o_t < T_n
                r_t = bos + o_t
                b_q = tl.load(q + (r_t[:, None] * HQ + i_hq) * K + o_k[None, :],
                              mask=m_t[:, None] & m_k[None, :], other=0.0)                     # [BT, BK]
                b_do = tl.load(do + (r_t[:, None] * HQ + i_hq) * V + o_v[None, :],
                               mask=m_t[:, None] & m_v[None, :], other=0.0)                    # [BT, BV]
                if IS_VARLEN:
                    p_lse = lse + i_hq * T_lse + bos + o_t
                else:
                    p_lse = lse + (i_n * HQ + i_hq) * T_lse + o_t
                b_lse = tl.load(p_lse, mask=m_t, other=0.0)
                b_D = tl.load(d_buf + r_t * HQ + i_hq, mask=m_t, other=0.0)
                b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT) * scale                 # [BT(s), BT(t)]
                m_band = (o_t[None, :] >= o_s[:, None]) & (o_t[None, :] < o_s[:, None] + W) & m_t[None, :]
                b_pt = tl.where(m_band, tl.exp(b_st - b_lse[None, :]), 0.0)
                b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT)
                b_dst = b_pt * (b_dpt - b_D[None, :])
                b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT)
                b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT) * scale
    b_dv += tl.load(dvs + (r_s[:, None] * H + i_h) * V + o_v[None, :], mask=m_sv, other=0.0)
    if ADD_KS:
        b_dk += tl.load(dks + (r_s[:, None] * H + i_h) * K + o_k[None, :], mask=m_sk, other=0.0)
    tl.store(dk + (r_s[:, None] * H + i_h) * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_sk)
    tl.store(dv + (r_s[:, None] * H + i_h) * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_sv)


def backward(p, do, q, k, v, g, s, q_slot, k_slot, o, lse, hk0, hv0, cu_seqlens):
    """(dq, dk, dv, dg, ds, dq_slot, dk_slot, dhk0, dhv0); see nha_core.registry for shapes."""
    B, T, HQ, H, K, V, M, G = p.B, p.T, p.HQ, p.H, p.K, p.V, p.M, p.G
    dev, dt = q.device, q.dtype
    f32 = dict(dtype=torch.float32, device=dev)
    cu, chunk_off, block_map, NB, NC, BT = plan(p, cu_seqlens, dev)
    BK, BV, BM = configs.pad(K), configs.pad(V), configs.pad(M)
    DOT = dot_precision(p)
    warps = configs.num_warps(K, V, M)
    qf, kf, vf, gf, sf = flat(q, HQ), flat(k, H), flat(v, H), flat(g, H), flat(s, H)
    dof, of = flat(do, HQ), flat(o, HQ)
    lse = lse.contiguous()
    qsf = flat(q_slot, HQ) if q_slot is not None else qf
    ksf = flat(k_slot, H) if k_slot is not None else kf
    if hk0 is not None:
        hk0, hv0 = hk0.contiguous().float(), hv0.contiguous().float()
    has_slots = M > 0 and T > 0

    dq = torch.empty(B * T, HQ, K, dtype=dt, device=dev)
    dq_slot = torch.zeros(B * T, HQ, K, dtype=dt, device=dev) if q_slot is not None else None
    dk = torch.empty(B * T, H, K, dtype=dt, device=dev)
    dv = torch.empty(B * T, H, V, dtype=dt, device=dev)
    # tokens that never reach the slots (the last W of each sequence) keep these zeros
    dks = torch.zeros(B * T, H, K, **f32)
    dvs = torch.zeros(B * T, H, V, **f32)
    ds = torch.zeros(B * T, H, M, **f32)
    dg = torch.zeros(B * T, H, M, **f32)
    d_buf = torch.empty(B * T, HQ, **f32)
    dhk0 = torch.zeros(p.N, H, K, M, **f32) if hk0 is not None else None
    dhv0 = torch.zeros(p.N, H, M, V, **f32) if hk0 is not None else None

    if has_slots:
        hk_c, hv_c, gc, _, _ = chunk_states(p, ksf, vf, gf, sf, hk0, hv0, cu, chunk_off, NC, BT, False)
        ps_buf = torch.empty(B * T, HQ, M, **f32)
        dls_buf = torch.empty(B * T, HQ, M, **f32)
        x1_buf = torch.empty(B * T, HQ, M, **f32)
    else:
        hk_c = hv_c = gc = ps_buf = dls_buf = x1_buf = dks
    if NB > 0 and T > 0:
        nha_bwd_q_kernel[(NB, HQ)](
            qf, kf, vf, qsf, ksf, sf, gc, hk_c, hv_c, of, dof, lse, cu, chunk_off, block_map,
            dq, dq_slot if dq_slot is not None else dq, ps_buf, dls_buf, x1_buf, d_buf,
            p.scale, p.W, T, HQ, H, G, K, V, M, BT, BT, BK, BV, BM,
            has_slots, q_slot is not None, cu_seqlens is not None, configs.SAFE_LIMIT, DOT,
            num_warps=warps,
        )
    if has_slots:
        dh_k = torch.empty(NC, H, K, M, **f32)
        dh_v = torch.empty(NC, H, M, V, **f32)
        BMS = configs.state_slot_tile(M)
        nha_bwd_state_kernel[(p.N, H, triton.cdiv(M, BMS))](
            qsf, dof, gc, ps_buf, dls_buf, dh_k, dh_v,
            dhk0 if dhk0 is not None else dh_k, dhv0 if dhv0 is not None else dh_v, cu, chunk_off,
            p.scale, HQ, H, G, K, V, M, BT, BK, BV, BMS, hk0 is not None, DOT,
            num_warps=configs.num_warps(K, V, BMS),
        )
        nha_bwd_slot_kernel[(NB, H)](
            qsf, ksf, vf, sf, dof, gc, hk_c, hv_c, dh_k, dh_v, ps_buf, dls_buf, x1_buf,
            cu, chunk_off, block_map, dks, dvs, ds, dg,
            p.scale, p.W, HQ, H, G, K, V, M, BT, BK, BV, BM, configs.SAFE_LIMIT, DOT,
            num_warps=warps,
        )
    if NB > 0 and T > 0:
        nha_bwd_kv_kernel[(NB, H)](
            qf, kf, vf, dof, lse, d_buf, dks, dvs, cu, block_map, dk, dv,
            p.scale, p.W, T, HQ, H, G, K, V, BT, BK, BV,
            k_slot is None, cu_seqlens is not None, DOT,
            num_warps=warps,
        )
    shape = lambda x, heads: x.reshape(B, T, heads, x.shape[-1])
    dk_slot = shape(dks, H).to(dt) if k_slot is not None else None
    return (shape(dq, HQ), shape(dk, H), shape(dv, H), shape(dg, H).to(dt), shape(ds, H).to(dt),
            shape(dq_slot, HQ) if dq_slot is not None else None, dk_slot, dhk0, dhv0)
