"""Triton backward of NHA (formulas: notes/MATH.md §3), deterministic: no atomics anywhere.

Every float output element is written by exactly one program, so results do not depend on
scheduling. In order:

1. ``chunk_states`` (forward.py) recomputes the chunk states Hk_c, Hv_c.
2. ``nha_bwd_q_kernel`` grid ``(blocks, HQ)``: per BT query rows and query head, recomputes the
   slot logits Ls, the probabilities from the saved lse, ``D = rowsum(do * o)``, the slot readout
   gradient ``dov = do . Hv(t)`` and ``dLs = Ps * (dov - D)``; writes dq (window part + slot part,
   or the slot part to dq_slot when q_slot was given) and, for the KV-side kernels, Ps, dLs
   (bfloat16 for bfloat16 inputs, configs.BWD_BF16_PS_DLS), ``X1 = dLs * Ls + Ps * dov`` (fp32,
   the <dH(t), H(t)> term of the gate gradient, built from the rounded Ps, dLs) and D.
3. State gradients, the forward's state pass run backwards (configs.STATE_PASS):
   ``dH_start = exp(Gc_last) dH_end + sum_heads [scale Qs^T (dLs e^Gc) | (Ps e^Gc)^T do]``,
   either every chunk's own term at once (``nha_bwd_state_local_kernel``) chained by
   ``nha_state_scan_kernel`` in reverse, or ``nha_bwd_state_kernel`` walking the chunks back;
   stores dH at every chunk start and after the last chunk (rows as the states), dhk0/dhv0.
4. ``nha_state_carry_kernel``: per state row and slot, the carry ``<dH, H>`` (the gate gradient's
   part from every later chunk), after which the recomputed states are freed: at gpu-b they are
   the largest side buffers (2 x 134 MB fp32), and the slot kernel's dks/dvs scratch (the same
   size) is allocated only then, so the two never coexist.
5. ``nha_bwd_slot_kernel`` grid ``(blocks, H)``: per chunk and KV head, sums over the group's
   query heads the slot-branch gradients of the shifted tokens, dKs, dVs, dS, and the gate
   gradient as a reverse cumsum inside the chunk plus the carry of the state after the chunk
   (exact: sum over later chunks of the same terms); writes them un-shifted (token p - W).
6. ``nha_bwd_kv_kernel`` grid ``(blocks, H)``: per BT keys and KV head, walks the group's query
   blocks inside the band ``t in [j, j+W)`` (FlashAttention-2 key-side loop) for the window dk,
   dv, adds the slot parts of step 5 and writes dk, dv once; it also writes the zero ds, dg of
   the last W tokens of each sequence (they never reach the slots), so no output is memset.

As in the forward, Gc is recomputed from g in each kernel (log2 units, exp2), s = 1 - exp(g) is
derived in-kernel when s is None, and only the first and last band blocks are masked.

Steps 1-6 run for all KV heads at once, or once per group of KV heads when the scratch would pass
configs.BWD_SCRATCH_LIMIT (head_groups): then each group's scratch is freed before the next
group's is allocated. In the kernels, H and HQ are the heads of the launch (its grid and its
scratch) and HS the KV heads of the inputs and outputs, which they get as views starting at the
group's first head.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .forward import (DECAY_ANY, DECAY_FACTORED, DECAY_PAIRWISE, OP_BF16, TWO_LAUNCHES, _op, block_span, chunk_states, decay_apply, decay_apply_t, decay_weights, dot_precision, flag_unsafe, flat,
                      decay_to_end, load_gates, load_slot_rows, load_states, lowp, nha_state_scan_kernel, operand_mode, plan, safe2,
                      scan_grid, sequence_span, state_pass, store_chunk_row, window_ranges)


@triton.jit
def dq_block(b_q, b_do, b_lse2, b_D, p_k, p_v, i_s, o_t, T_n, W, b_dq, qk2,
             HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
             BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MASK: tl.constexpr, DOT: tl.constexpr):
    """dq [BT, BK] (unscaled) += dS @ K for the window keys i_s .. i_s+BS."""
    o_s = i_s + tl.arange(0, BS)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    p_ks = p_k + o_s[:, None] * HK + o_k[None, :]
    p_vs = p_v + o_s[:, None] * HV + o_v[None, :]
    if MASK:
        m_s = o_s < T_n
        b_k = tl.load(p_ks, mask=m_s[:, None] & (o_k < K)[None, :], other=0.0)           # [BS, BK]
        b_v = tl.load(p_vs, mask=m_s[:, None] & (o_v < V)[None, :], other=0.0)           # [BS, BV]
    else:
        b_k = tl.load(p_ks, mask=(o_k < K)[None, :], other=0.0)
        b_v = tl.load(p_vs, mask=(o_v < V)[None, :], other=0.0)
    b_p = tl.exp2(tl.dot(b_q, tl.trans(b_k), input_precision=DOT) * qk2 - b_lse2[:, None])  # [BT, BS]
    if MASK:
        m_band = (o_s[None, :] <= o_t[:, None]) & (o_s[None, :] > o_t[:, None] - W) & (o_s < T_n)[None, :]
        b_p = tl.where(m_band, b_p, 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT)
    b_ds = b_p * (b_dp - b_D[:, None])
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT)


@triton.jit
def nha_bwd_q_kernel(
    q, k, v, qs, ks, g, s, hk_c, hv_c, o, do, lse, cu, chunk_off, block_map,
    dq, dq_slot, ps_buf, dls_buf, x1_buf, d_buf,
    scale, W, T_lse, HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    HAS_SLOTS: tl.constexpr, HAS_S: tl.constexpr, HAS_QSLOT: tl.constexpr, IS_VARLEN: tl.constexpr,
    G_FLOOR: tl.constexpr, SAFE2: tl.constexpr, LOWP: tl.constexpr, LOWP_DQ: tl.constexpr, DOT: tl.constexpr,
):
    """dq [B*T,HQ,K] (and dq_slot); Ps, dLs [B*T,HQ,M] (bf16 or fp32), X1 [B*T,HQ,M] fp32;
    D [B*T,HQ] fp32. Slot dots: LOWP for the logits and readout gradients, LOWP_DQ for dq's.
    H, HQ: the heads of this launch (grid, scratch); HS, HS * G: those of the inputs and outputs
    (head groups, see backward)."""
    HQS: tl.constexpr = HS * G
    i_b, i_hq = tl.program_id(0), tl.program_id(1)
    i_h = i_hq // G
    i_n, i_c, bos, T_n = block_span(block_map, cu, i_b)
    t0 = i_c * BT
    o_t = t0 + tl.arange(0, BT)
    m_t = o_t < T_n
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_m = tl.arange(0, BM)
    m_k, m_v, m_m = o_k < K, o_v < V, o_m < M
    r_t = bos + o_t
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    qk2 = scale * 1.4426950408889634
    b_q = tl.load(q + (r_t[:, None] * HQS + i_hq) * K + o_k[None, :], mask=m_tk, other=0.0)      # [BT, BK]
    b_do = tl.load(do + (r_t[:, None] * HQS + i_hq) * V + o_v[None, :], mask=m_tv, other=0.0)    # [BT, BV]
    b_o = tl.load(o + (r_t[:, None] * HQS + i_hq) * V + o_v[None, :], mask=m_tv, other=0.0)
    b_D = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)                                   # [BT]
    if IS_VARLEN:
        p_lse = lse + i_hq * T_lse + bos + o_t
    else:
        p_lse = lse + (i_n * HQS + i_hq) * T_lse + o_t
    b_lse = tl.load(p_lse, mask=m_t, other=0.0)
    # rows with no logit at all (M = 0, W = 0) have lse = -inf and no gradient
    b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
    tl.store(d_buf + r_t * HQ + i_hq, b_D, mask=m_t)

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    if HAS_SLOTS:
        c0 = tl.load(chunk_off + i_n).to(tl.int64)
        b_gc, b_glast, b_sx, b_g2 = load_gates(g, s, bos, T_n, i_c, i_h, W, o_m, HS, M, BT, HAS_S, G_FLOOR)
        b_ks, b_vs = load_slot_rows(ks, v, bos, T_n, i_c, i_h, W, HS, K, V, BT, BK, BV)
        b_hk, b_hv = load_states(hk_c, hv_c, (c0 + i_c) * H + i_h, K, V, M, BK, BV, BM)
        b_qs = _op(tl.load(qs + (r_t[:, None] * HQS + i_hq) * K + o_k[None, :], mask=m_tk, other=0.0), LOWP)
        b_dof = _op(b_do, LOWP)
        b_eg = tl.exp2(b_gc)
        b_a = tl.dot(b_qs, tl.trans(_op(b_ks, LOWP)), input_precision=DOT)                        # [BT, BT]
        b_ls = tl.dot(b_qs, _op(b_hk, LOWP), input_precision=DOT) * b_eg
        b_ls = (b_ls + decay_apply(b_a, b_sx, b_gc, b_g2, BT, SAFE2, LOWP, DOT, DECAY_ANY)) * qk2                   # [BT, BM] log2
        b_ps = tl.exp2(b_ls - b_lse2[:, None])
        if M < BM:
            b_ps = tl.where(m_m[None, :], b_ps, 0.0)
        b_adv = tl.dot(b_dof, tl.trans(_op(b_vs, LOWP)), input_precision=DOT)                    # [BT, BT]
        b_dov = tl.dot(b_dof, tl.trans(_op(b_hv, LOWP)), input_precision=DOT) * b_eg
        b_dov += decay_apply(b_adv, b_sx, b_gc, b_g2, BT, SAFE2, LOWP, DOT, DECAY_ANY)                              # [BT, BM]
        # Ps and dLs as the slot kernel will read them back (rounded to the buffers' dtype), so
        # the S dS terms it subtracts from X1 carry the same rounding as X1 and cancel with it
        b_ps = b_ps.to(ps_buf.dtype.element_ty).to(tl.float32)
        b_dls = (b_ps * (b_dov - b_D[:, None])).to(dls_buf.dtype.element_ty).to(tl.float32)
        m_tm = m_t[:, None] & m_m[None, :]
        o_tm = (r_t[:, None] * HQ + i_hq) * M + o_m[None, :]
        tl.store(ps_buf + o_tm, b_ps.to(ps_buf.dtype.element_ty), mask=m_tm)
        tl.store(dls_buf + o_tm, b_dls.to(dls_buf.dtype.element_ty), mask=m_tm)
        tl.store(x1_buf + o_tm, (b_dls * (b_ls * 0.6931471805599453) + b_ps * b_dov).to(x1_buf.dtype.element_ty),
                 mask=m_tm)
        b_dqs = tl.dot(_op(b_dls * b_eg, LOWP_DQ), tl.trans(_op(b_hk, LOWP_DQ)), input_precision=DOT)
        b_dqs += tl.dot(_op(decay_weights(b_dls, b_sx, b_gc, b_g2, BT, SAFE2, LOWP_DQ, DOT, DECAY_ANY), LOWP_DQ), _op(b_ks, LOWP_DQ),
                        input_precision=DOT)
        if HAS_QSLOT:
            tl.store(dq_slot + (r_t[:, None] * HQS + i_hq) * K + o_k[None, :],
                     (b_dqs * scale).to(dq_slot.dtype.element_ty), mask=m_tk)
        else:
            b_dq += b_dqs

    if W > 0:
        b_w = tl.zeros([BT, BK], dtype=tl.float32)
        p_k = k + (bos * HS + i_h) * K
        p_v = v + (bos * HS + i_h) * V
        lo, a, b0, b1, c, hi = window_ranges(t0, T_n, W, BT, BS)
        for i_s in range(lo, a, BS):
            b_w = dq_block(b_q, b_do, b_lse2, b_D, p_k, p_v, i_s, o_t, T_n, W, b_w, qk2,
                           HS * K, HS * V, K, V, BS, BK, BV, True, DOT)
        for i_s in range(b0, b1, BS):
            b_w = dq_block(b_q, b_do, b_lse2, b_D, p_k, p_v, i_s, o_t, T_n, W, b_w, qk2,
                           HS * K, HS * V, K, V, BS, BK, BV, False, DOT)
        for i_s in range(c, hi, BS):
            b_w = dq_block(b_q, b_do, b_lse2, b_D, p_k, p_v, i_s, o_t, T_n, W, b_w, qk2,
                           HS * K, HS * V, K, V, BS, BK, BV, True, DOT)
        b_dq += b_w
    tl.store(dq + (r_t[:, None] * HQS + i_hq) * K + o_k[None, :], (b_dq * scale).to(dq.dtype.element_ty),
             mask=m_tk)


@triton.jit
def bwd_chunk_update(qs, do, g, ps_buf, dls_buf, bos, T_n, i_c, i_h, W, o_m, scale,
                     HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     M: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
                     G_FLOOR: tl.constexpr, LOWP: tl.constexpr, DOT: tl.constexpr):
    """What chunk i_c does to the state gradient (slots o_m): dH_start = a * dH_end + (Lk, Lv),
    a = 2^Gc_last [BM], Lk = scale sum_heads Qs^T (dLs 2^Gc) [BK, BM], Lv = sum_heads (Ps 2^Gc)^T do.
    Ps, dLs have HQ heads, qs, do, g HS * G and HS (nha_bwd_q_kernel)."""
    HQS: tl.constexpr = HS * G
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k, m_v, m_m = o_k < K, o_v < V, o_m < M
    b_gc, b_glast, b_s, b_g2 = load_gates(g, g, bos, T_n, i_c, i_h, W, o_m, HS, M, BT, False, G_FLOOR)
    b_eg = tl.exp2(b_gc)
    o_t = i_c * BT + tl.arange(0, BT)
    m_t = o_t < T_n
    r_t = bos + o_t
    m_tm = m_t[:, None] & m_m[None, :]
    b_lk = tl.zeros([BK, BM], dtype=tl.float32)
    b_lv = tl.zeros([BM, BV], dtype=tl.float32)
    for i_g in range(0, G):
        i_hq = i_h * G + i_g
        o_tm = (r_t[:, None] * HQ + i_hq) * M + o_m[None, :]
        b_qs = tl.load(qs + (r_t[:, None] * HQS + i_hq) * K + o_k[None, :],
                       mask=m_t[:, None] & m_k[None, :], other=0.0)                          # [BT, BK]
        b_do = tl.load(do + (r_t[:, None] * HQS + i_hq) * V + o_v[None, :],
                       mask=m_t[:, None] & m_v[None, :], other=0.0)                          # [BT, BV]
        b_dls = tl.load(dls_buf + o_tm, mask=m_tm, other=0.0).to(tl.float32)                 # [BT, BM]
        b_ps = tl.load(ps_buf + o_tm, mask=m_tm, other=0.0).to(tl.float32)
        b_lk += tl.dot(tl.trans(_op(b_qs, LOWP)), _op(b_dls * b_eg, LOWP), input_precision=DOT) * scale
        b_lv += tl.dot(tl.trans(_op(b_ps * b_eg, LOWP)), _op(b_do, LOWP), input_precision=DOT)
    return tl.exp2(b_glast), b_lk, b_lv


@triton.jit
def nha_bwd_state_kernel(
    qs, do, g, ps_buf, dls_buf, dh_k, dh_v, dhk0, dhv0, cu, chunk_off,
    scale, W, HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    HAS_H0: tl.constexpr, G_FLOOR: tl.constexpr, LOWP: tl.constexpr, DOT: tl.constexpr,
):
    """State-gradient walk (configs.STATE_PASS "walk"), slots i_m*BM ..: dh_k [R,H,K,M],
    dh_v [R,H,M,V] row chunk_off + c = gradient w.r.t. the state at the start of chunk c (the
    last row, after the last chunk, is 0); dhk0, dhv0 [N,HS,..] fp32 (HS: nha_bwd_q_kernel)."""
    i_n, i_h, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, T_n = sequence_span(cu, i_n)
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
        i_state = (c0 + i_c + 1) * H + i_h
        tl.store(dh_k + i_state * K * M + o_km, b_dhk.to(dh_k.dtype.element_ty), mask=m_km)
        tl.store(dh_v + i_state * M * V + o_mv, b_dhv.to(dh_v.dtype.element_ty), mask=m_mv)
        b_a, b_lk, b_lv = bwd_chunk_update(qs, do, g, ps_buf, dls_buf, bos, T_n, i_c, i_h, W, o_m, scale,
                                           HQ, H, HS, G, K, V, M, BT, BK, BV, BM, G_FLOOR, LOWP, DOT)
        b_dhk = b_dhk * b_a[None, :] + b_lk
        b_dhv = b_dhv * b_a[:, None] + b_lv
    tl.store(dh_k + (c0 * H + i_h) * K * M + o_km, b_dhk.to(dh_k.dtype.element_ty), mask=m_km)
    tl.store(dh_v + (c0 * H + i_h) * M * V + o_mv, b_dhv.to(dh_v.dtype.element_ty), mask=m_mv)
    if HAS_H0:
        tl.store(dhk0 + (i_n * HS + i_h) * K * M + o_km, b_dhk, mask=m_km)
        tl.store(dhv0 + (i_n * HS + i_h) * M * V + o_mv, b_dhv, mask=m_mv)


@triton.jit
def nha_bwd_state_local_kernel(
    qs, do, g, ps_buf, dls_buf, dh_k, dh_v, a_c, cu, chunk_off, block_map,
    scale, W, HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    G_FLOOR: tl.constexpr, LOWP: tl.constexpr, DOT: tl.constexpr,
):
    """State-gradient scan, step 1 (configs.STATE_PASS "scan"): every chunk's own (a, Lk, Lv)
    into row chunk_off + i_c of a_c, dh_k, dh_v; nha_state_scan_kernel (REVERSE) chains them."""
    i_b, i_h, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_c, bos, T_n = block_span(block_map, cu, i_b)
    c0 = tl.load(chunk_off + i_n).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    b_a, b_lk, b_lv = bwd_chunk_update(qs, do, g, ps_buf, dls_buf, bos, T_n, i_c, i_h, W, o_m, scale,
                                       HQ, H, HS, G, K, V, M, BT, BK, BV, BM, G_FLOOR, LOWP, DOT)
    store_chunk_row(dh_k, dh_v, a_c, (c0 + i_c) * H + i_h, b_a, b_lk, b_lv, o_m, K, V, M, BK, BV)


@triton.jit
def nha_state_carry_kernel(dh_k, dh_v, hk_c, hv_c, carry, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                           BKC: tl.constexpr, BVC: tl.constexpr, BMC: tl.constexpr):
    """carry [R,H,M] fp32, row r = sum_k dH_k[r,:,k,m] H_k[r,:,k,m] + sum_v dH_v[r,:,m,v] H_v[r,:,m,v]
    for slots i_m*BMC ..; grid (R*H, cdiv(M, BMC)), K and V walked in BKC / BVC rows."""
    i_rh, i_m = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BMC + tl.arange(0, BMC)
    m_m = o_m < M
    b_c = tl.zeros([BMC], dtype=tl.float32)
    base_k = i_rh.to(tl.int64) * K * M
    for k0 in range(0, K, BKC):
        o_k = k0 + tl.arange(0, BKC)
        o_km = base_k + o_k[:, None] * M + o_m[None, :]
        m_km = (o_k < K)[:, None] & m_m[None, :]
        b_c += tl.sum(tl.load(dh_k + o_km, mask=m_km, other=0.0).to(tl.float32)
                      * tl.load(hk_c + o_km, mask=m_km, other=0.0).to(tl.float32), 0)
    base_v = i_rh.to(tl.int64) * M * V
    for v0 in range(0, V, BVC):
        o_v = v0 + tl.arange(0, BVC)
        o_mv = base_v + o_m[:, None] * V + o_v[None, :]
        m_mv = m_m[:, None] & (o_v < V)[None, :]
        b_c += tl.sum(tl.load(dh_v + o_mv, mask=m_mv, other=0.0).to(tl.float32)
                      * tl.load(hv_c + o_mv, mask=m_mv, other=0.0).to(tl.float32), 1)
    tl.store(carry + i_rh.to(tl.int64) * M + o_m, b_c, mask=m_m)


@triton.jit
def nha_bwd_slot_kernel(
    qs, ks, v, g, s, do, carry, dh_k, dh_v, ps_buf, dls_buf, x1_buf, cu, chunk_off, block_map,
    dks, dvs, ds, dg, unsafe,
    scale, W, HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    HAS_S: tl.constexpr, CHAIN: tl.constexpr, G_FLOOR: tl.constexpr, SAFE2: tl.constexpr, LOWP: tl.constexpr,
    LOWP_KV: tl.constexpr, DOT: tl.constexpr, PATH: tl.constexpr,
):
    """Slot-branch gradients of the chunk's shifted tokens, stored at their tokens p - W:
    dks [B*T,H,K], dvs [B*T,H,V] (fp32 scratch), ds, dg [B*T,H,M] (input dtype). CHAIN (s
    derived): dg includes the path through s = 1 - exp(g), dg - ds exp(g), and ds is not stored.
    Operand modes: LOWP for the dots behind ds and dg (X1 - S dS cancels), LOWP_KV for those
    that only build dks, dvs. PATH: DECAY_ANY, one launch choosing the decays per chunk at run
    time; or the two launches of TWO_LAUNCHES with unsafe [blocks, H], as nha_fwd_kernel
    (configs.BWD_SLOT_SPLIT). H, HQ: the heads of this launch, HS: those of the inputs and ds, dg
    (nha_bwd_q_kernel)."""
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    run = True
    if PATH == DECAY_PAIRWISE:
        run = tl.load(unsafe + i_b * H + i_h) != 0
    if run:
        i_n, i_c, bos, T_n = block_span(block_map, cu, i_b)
        b_gc, b_glast, b_sx, b_g2 = load_gates(g, s, bos, T_n, i_c, i_h, W, tl.arange(0, BM), HS, M, BT, HAS_S,
                                               G_FLOOR)
        go = True
        if PATH == DECAY_FACTORED:
            go = flag_unsafe(unsafe, i_b * H + i_h, b_gc, SAFE2)
        if go:
            bwd_slot_chunk(qs, ks, v, g, do, carry, dh_k, dh_v, ps_buf, dls_buf, x1_buf, chunk_off, dks, dvs, ds, dg,
                           b_gc, b_glast, b_g2, b_sx, i_n, i_c, bos, T_n, i_h, scale, W, HQ, H, HS, G, K, V, M,
                           BT, BK, BV, BM, CHAIN, G_FLOOR, SAFE2, LOWP, LOWP_KV, DOT, PATH)


@triton.jit
def bwd_slot_chunk(qs, ks, v, g, do, carry, dh_k, dh_v, ps_buf, dls_buf, x1_buf, chunk_off, dks, dvs, ds, dg,
                   b_gc, b_glast, b_g2, b_sx, i_n, i_c, bos, T_n, i_h, scale, W,
                   HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   M: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
                   CHAIN: tl.constexpr, G_FLOOR: tl.constexpr, SAFE2: tl.constexpr, LOWP: tl.constexpr,
                   LOWP_KV: tl.constexpr, DOT: tl.constexpr, PATH: tl.constexpr):
    """nha_bwd_slot_kernel's work for chunk i_c of sequence i_n and KV head i_h, its gates
    (Gc, Gc_last, the gates G2, S) loaded, decays by PATH. HQ, H: the launch's heads, HS * G, HS the inputs'."""
    HQS: tl.constexpr = HS * G
    c0 = tl.load(chunk_off + i_n).to(tl.int64)
    o_t = i_c * BT + tl.arange(0, BT)
    m_t = o_t < T_n
    r_t = bos + o_t
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_m = tl.arange(0, BM)
    m_k, m_v, m_m = o_k < K, o_v < V, o_m < M
    # row c + 1: the state after the chunk and the gradient w.r.t. it (0 after the last chunk)
    i_next = (c0 + i_c + 1) * H + i_h
    b_dhk, b_dhv = load_states(dh_k, dh_v, i_next, K, V, M, BK, BV, BM)
    b_carry = tl.load(carry + i_next * M + o_m, mask=m_m, other=0.0)                             # [BM]

    # Ks, Vs stay in the input dtype (half the registers of fp32) and are widened at each dot
    b_ks, b_vs = load_slot_rows(ks, v, bos, T_n, i_c, i_h, W, HS, K, V, BT, BK, BV)
    # paths through the states of later chunks: decay from token j to the chunk end, <= 1
    b_dec = tl.exp2(decay_to_end(b_gc, b_glast, g, bos, T_n, i_c, i_h, W, o_m, HS, M, BT, G_FLOOR, SAFE2, PATH))
    b_wend = _op(b_sx * b_dec, LOWP_KV)
    b_dks = tl.dot(b_wend, tl.trans(_op(b_dhk, LOWP_KV)), input_precision=DOT)                 # [BT, BK]
    b_dvs = tl.dot(b_wend, _op(b_dhv, LOWP_KV), input_precision=DOT)                           # [BT, BV]
    b_ds = (tl.dot(_op(b_ks, LOWP), _op(b_dhk, LOWP), input_precision=DOT)
            + tl.dot(_op(b_vs, LOWP), tl.trans(_op(b_dhv, LOWP)), input_precision=DOT)) * b_dec         # [BT, BM]
    b_x1 = tl.zeros([BT, BM], dtype=tl.float32)
    m_tm = m_t[:, None] & m_m[None, :]
    for i_g in range(0, G):
        i_hq = i_h * G + i_g
        o_tm = (r_t[:, None] * HQ + i_hq) * M + o_m[None, :]
        b_qs = _op(tl.load(qs + (r_t[:, None] * HQS + i_hq) * K + o_k[None, :],
                           mask=m_t[:, None] & m_k[None, :], other=0.0), LOWP)              # [BT, BK]
        b_do = _op(tl.load(do + (r_t[:, None] * HQS + i_hq) * V + o_v[None, :],
                           mask=m_t[:, None] & m_v[None, :], other=0.0), LOWP)              # [BT, BV]
        b_dls = tl.load(dls_buf + o_tm, mask=m_tm, other=0.0).to(tl.float32)                  # [BT, BM]
        b_ps = tl.load(ps_buf + o_tm, mask=m_tm, other=0.0).to(tl.float32)
        b_x1 += tl.load(x1_buf + o_tm, mask=m_tm, other=0.0).to(tl.float32)
        # readouts at t >= j inside the chunk
        b_a = tl.dot(b_qs, tl.trans(_op(b_ks, LOWP)), input_precision=DOT)                      # [BT, BT]
        b_ds += decay_apply_t(b_a, b_dls, b_gc, b_g2, BT, SAFE2, LOWP, DOT, PATH) * scale
        b_a = tl.dot(b_do, tl.trans(_op(b_vs, LOWP)), input_precision=DOT)
        b_ds += decay_apply_t(b_a, b_ps, b_gc, b_g2, BT, SAFE2, LOWP, DOT, PATH)
        b_w = decay_weights(b_dls, b_sx, b_gc, b_g2, BT, SAFE2, LOWP_KV, DOT, PATH)                          # [BT(t), BT(j)]
        if LOWP_KV != LOWP:
            b_qs = _op(b_qs, LOWP_KV)
            b_do = _op(b_do, LOWP_KV)
        b_dks += tl.dot(tl.trans(_op(b_w, LOWP_KV)), b_qs, input_precision=DOT) * scale
        b_w = decay_weights(b_ps, b_sx, b_gc, b_g2, BT, SAFE2, LOWP_KV, DOT, PATH)
        b_dvs += tl.dot(tl.trans(_op(b_w, LOWP_KV)), b_do, input_precision=DOT)

    # gate: dGt[p] = sum_{p' >= p} (X1 - S dS)[p'], the part beyond this chunk is <dH_end, H_next>
    b_dg = tl.cumsum(b_x1 - b_sx * b_ds, 0, reverse=True) + b_carry[None, :]

    o_j = o_t - W
    m_j = m_t & (o_j >= 0)
    r_j = bos + o_j
    tl.store(dks + (r_j[:, None] * H + i_h) * K + o_k[None, :], b_dks, mask=m_j[:, None] & m_k[None, :])
    tl.store(dvs + (r_j[:, None] * H + i_h) * V + o_v[None, :], b_dvs, mask=m_j[:, None] & m_v[None, :])
    m_jm = m_j[:, None] & m_m[None, :]
    o_jm = (r_j[:, None] * HS + i_h) * M + o_m[None, :]
    if CHAIN:
        # ds/dg = -exp(g) for the derived s; reloaded (L2-hot) rather than kept live, exp(G_FLOOR) = 0
        b_g = tl.maximum(tl.load(g + o_jm, mask=m_jm, other=0.0).to(tl.float32), G_FLOOR)      # [BT, BM]
        b_dg -= b_ds * tl.exp(b_g)
    else:
        tl.store(ds + o_jm, b_ds.to(ds.dtype.element_ty), mask=m_jm)
    tl.store(dg + o_jm, b_dg.to(dg.dtype.element_ty), mask=m_jm)


@triton.jit
def dkv_block(b_k, b_v, p_q, p_do, p_lse, p_D, i_t, o_s, T_n, W, b_dk, b_dv, qk2, scale,
              HQK: tl.constexpr, HQV: tl.constexpr, HQ: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MASK: tl.constexpr, DOT: tl.constexpr):
    """dk, dv [BT, *] += the window terms of the queries i_t .. i_t+BT."""
    o_t = i_t + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    if MASK:
        m_t = o_t < T_n
    else:
        m_t = o_t >= 0
    b_q = tl.load(p_q + o_t[:, None] * HQK + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
    b_do = tl.load(p_do + o_t[:, None] * HQV + o_v[None, :], mask=m_t[:, None] & (o_v < V)[None, :], other=0.0)
    b_lse2 = tl.load(p_lse + o_t, mask=m_t, other=0.0) * 1.4426950408889634                     # [BT]
    b_D = tl.load(p_D + o_t * HQ, mask=m_t, other=0.0)
    b_pt = tl.exp2(tl.dot(b_k, tl.trans(b_q), input_precision=DOT) * qk2 - b_lse2[None, :])     # [BT(s), BT(t)]
    if MASK:
        m_band = (o_t[None, :] >= o_s[:, None]) & (o_t[None, :] < o_s[:, None] + W) & m_t[None, :]
        b_pt = tl.where(m_band, b_pt, 0.0)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT)
    b_dst = b_pt * (b_dpt - b_D[None, :])
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT)
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT) * scale
    return b_dk, b_dv


@triton.jit
def nha_bwd_kv_kernel(
    q, k, v, do, lse, d_buf, dks, dvs, cu, block_map, dk, dv, ds, dg,
    scale, W, T_lse, HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    HAS_SLOTS: tl.constexpr, ADD_KS: tl.constexpr, HAS_DS: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
):
    """dk [B*T,H,K], dv [B*T,H,V]: window part over the group's queries + slot parts dks, dvs;
    zeros into ds, dg [B*T,H,M] for the tokens that never reach the slots (j >= T_n - W). d_buf,
    dks, dvs have the launch's HQ, H heads; inputs and outputs HS * G, HS (nha_bwd_q_kernel)."""
    HQS: tl.constexpr = HS * G
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_c, bos, T_n = block_span(block_map, cu, i_b)
    s0 = i_c * BT
    o_s = s0 + tl.arange(0, BT)           # this program's keys
    m_s = o_s < T_n
    r_s = bos + o_s
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_sk = m_s[:, None] & m_k[None, :]
    m_sv = m_s[:, None] & m_v[None, :]
    qk2 = scale * 1.4426950408889634
    b_k = tl.load(k + (r_s[:, None] * HS + i_h) * K + o_k[None, :], mask=m_sk, other=0.0)       # [BT, BK]
    b_v = tl.load(v + (r_s[:, None] * HS + i_h) * V + o_v[None, :], mask=m_sv, other=0.0)       # [BT, BV]
    # the slot parts seed the accumulators (loaded after the window loop they stayed live
    # through it and doubled the register spills)
    if HAS_SLOTS:
        m_slot = m_s & (o_s + W < T_n)      # tokens that reached the slots
        b_dv = tl.load(dvs + (r_s[:, None] * H + i_h) * V + o_v[None, :],
                       mask=m_slot[:, None] & m_v[None, :], other=0.0)                           # [BT, BV]
        if ADD_KS:
            b_dk = tl.load(dks + (r_s[:, None] * H + i_h) * K + o_k[None, :],
                           mask=m_slot[:, None] & m_k[None, :], other=0.0)                       # [BT, BK]
        else:
            b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        o_m = tl.arange(0, BM)
        m_tail = (m_s & (o_s + W >= T_n))[:, None] & (o_m < M)[None, :]
        o_sm = (r_s[:, None] * HS + i_h) * M + o_m[None, :]
        b_zero = tl.zeros([BT, BM], dtype=tl.float32)
        if HAS_DS:
            tl.store(ds + o_sm, b_zero.to(ds.dtype.element_ty), mask=m_tail)
        tl.store(dg + o_sm, b_zero.to(dg.dtype.element_ty), mask=m_tail)
    else:
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    if W > 0:
        # queries that see key j: t in [j, j + W); one masked loop (the mask is a few compares
        # next to four dots per block)
        hi = tl.minimum(s0 + BT - 1 + W, T_n)
        for i_g in range(0, G):
            i_hq = i_h * G + i_g
            p_q = q + (bos * HQS + i_hq) * K
            p_do = do + (bos * HQS + i_hq) * V
            if IS_VARLEN:
                p_lse = lse + i_hq * T_lse + bos
            else:
                p_lse = lse + (i_n * HQS + i_hq) * T_lse
            p_D = d_buf + bos * HQ + i_hq
            for i_t in range(s0, hi, BT):
                b_dk, b_dv = dkv_block(b_k, b_v, p_q, p_do, p_lse, p_D, i_t, o_s, T_n, W, b_dk, b_dv, qk2, scale,
                                       HQS * K, HQS * V, HQ, K, V, BT, BK, BV, True, DOT)
    tl.store(dk + (r_s[:, None] * HS + i_h) * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_sk)
    tl.store(dv + (r_s[:, None] * HS + i_h) * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_sv)


def scratch_per_head(p, low: bool, R: int) -> int:
    """Bytes of scratch one KV head holds at the backward's fullest step: D, Ps, dLs, X1, the
    state gradients, the scan's decays or the carries, and either the recomputed chunk states
    (state pass, carry) or the slot parts of dk, dv (slot kernel); the two never coexist (module
    docstring, step 4)."""
    rows, G, K, V, M = p.B * p.T, p.G, p.K, p.V, p.M
    if M == 0 or p.T == 0:
        return rows * G * 4
    size = lambda bf16: 2 if low and bf16 else 4  # noqa: E731
    side = rows * G * M * (2 * size(configs.BWD_BF16_PS_DLS) + size(configs.BWD_BF16_X1))
    dh = R * (K * M + M * V) * size(configs.BWD_BF16_DH)
    states = R * (K * M + M * V) * size(configs.BWD_BF16_STATES)
    return rows * G * 4 + side + dh + R * M * 4 + max(states, rows * (K + V) * 4)


def head_groups(p, low: bool, R: int, item: int) -> int:
    """How many groups of KV heads the backward runs in turn (configs.BWD_SCRATCH_LIMIT): the
    fewest, dividing H, whose scratch stays within the limit times the bytes of the inputs q, k,
    v, g, do, the output o and the gradients; one when all heads need less than
    configs.BWD_SCRATCH_SPLIT_BYTES. ``item``: bytes per input element."""
    per_head = scratch_per_head(p, low, R)
    if configs.BWD_SCRATCH_LIMIT is None or per_head * p.H < configs.BWD_SCRATCH_SPLIT_BYTES:
        return 1
    rows = p.B * p.T
    io = 2 * rows * (p.HQ * p.K + p.H * (p.K + p.V + p.M) + p.HQ * p.V) * item
    for groups in range(1, p.H + 1):
        if p.H % groups == 0 and per_head * (p.H // groups) <= configs.BWD_SCRATCH_LIMIT * io:
            return groups
    return p.H


def backward(p, do, q, k, v, g, s, q_slot, k_slot, o, lse, hk0, hv0, cu_seqlens):
    """(dq, dk, dv, dg, ds, dq_slot, dk_slot, dhk0, dhv0); see nha_core.registry for shapes.
    ``s`` None means s = 1 - exp(g) (computed in the kernels); with configs.BWD_CHAIN_DERIVED_S
    dg then includes the path through that s and ds is None, otherwise ds is the gradient
    w.r.t. the derived s and the API chains it into dg.

    The kernels run once per group of KV heads (head_groups; one group unless the scratch would
    pass configs.BWD_SCRATCH_LIMIT): each group's scratch is allocated and freed before the next
    group's, and its kernels take the inputs and outputs as views that start at the group's first
    head (their head stride stays the problem's)."""
    B, T, HQ, H, G = p.B, p.T, p.HQ, p.H, p.G
    dev, dt = q.device, q.dtype
    cu, chunk_off, block_map, NB, R, BT, longest = plan(p, cu_seqlens, dev, backward=True)
    flats = dict(q=flat(q, HQ), k=flat(k, H), v=flat(v, H), g=flat(g, H), do=flat(do, HQ), o=flat(o, HQ),
                 s=flat(s, H) if s is not None else None,
                 qs=flat(q_slot, HQ) if q_slot is not None else None,
                 ks=flat(k_slot, H) if k_slot is not None else None,
                 hk0=hk0.contiguous().float() if hk0 is not None else None,
                 hv0=hv0.contiguous().float() if hv0 is not None else None)
    lse = lse.contiguous()
    chain = s is None and configs.BWD_CHAIN_DERIVED_S
    # Outputs are allocated where the first group first writes them (the single-group peak is
    # the largest step's working set, not the sum of all), and kept for the later groups.
    out = dict(dq=None, dq_slot=None, dk=None, dv=None, dg=None, ds=None, dk_slot=None,
               dhk0=torch.zeros(p.N, H, p.K, p.M, dtype=torch.float32, device=dev) if hk0 is not None else None,
               dhv0=torch.zeros(p.N, H, p.M, p.V, dtype=torch.float32, device=dev) if hk0 is not None else None)
    groups = head_groups(p, lowp(p), R, q.element_size())
    HG = H // groups
    for h0 in range(0, H, HG):
        kv_heads, q_heads = slice(h0, h0 + HG), slice(h0 * G, (h0 + HG) * G)
        view = {name: (None if x is None else x[:, q_heads] if name in ("q", "do", "o", "qs") else x[:, kv_heads])
                for name, x in flats.items()}
        backward_heads(p, HG, view, lse[:, q_heads], out, q_heads, kv_heads, chain, cu, chunk_off, block_map,
                       NB, R, BT, longest, cu_seqlens is not None, dt)
    shape = lambda x, heads: x.reshape(B, T, heads, x.shape[-1])  # noqa: E731
    return (shape(out["dq"], HQ), shape(out["dk"], H), shape(out["dv"], H), shape(out["dg"], H),
            None if chain else shape(out["ds"], H),
            shape(out["dq_slot"], HQ) if q_slot is not None else None,
            shape(out["dk_slot"], H) if k_slot is not None else None, out["dhk0"], out["dhv0"])


def backward_heads(p, H, x, lse, out, q_heads, kv_heads, chain, cu, chunk_off, block_map, NB, R, BT, longest,
                   varlen, dt):
    """The backward of KV heads ``kv_heads`` (H of them, with their HQ = H * G query heads): ``x``
    holds the inputs as views from the group's first head, ``out`` the outputs (allocated here
    when None, for all heads). Scratch has the group's heads only."""
    B, T, G, K, V, M, HS = p.B, p.T, p.G, p.K, p.V, p.M, p.H
    HQ = H * G
    dev = x["q"].device
    f32 = dict(dtype=torch.float32, device=dev)
    BK, BV, BM = configs.pad(K), configs.pad(V), configs.slot_tile(M, lowp(p))
    # bfloat16 inputs (forward.lowp): which slot-branch data are bfloat16 is configs data (BWD_BF16_*); the gate
    # gradient dg is a reverse cumsum of X1 - S dS whose terms nearly cancel, so each choice
    # there is an accuracy decision (see configs).
    low = lowp(p)
    DOTS = configs.BWD_BF16_DOTS if low else ()
    def mode(*names):   # the operand mode of dots that take bf16 when any of ``names`` is chosen
        return operand_mode(p, any(name in DOTS for name in names))

    LOWP_Q, LOWP_DQ = mode("q", "q_probs"), mode("q")
    LOWP_ST, LOWP_SL, LOWP_KV = mode("state"), mode("slot"), mode("slot", "slot_kv")
    DOT = dot_precision(p)
    SAFE2 = safe2()
    warps = configs.bwd_num_warps(K, V, M)
    stages = configs.bwd_num_stages(K, V, M)
    qf, kf, vf, gf, sf, dof, of = x["q"], x["k"], x["v"], x["g"], x["s"], x["do"], x["o"]
    qsf = x["qs"] if x["qs"] is not None else qf
    ksf = x["ks"] if x["ks"] is not None else kf
    hk0, hv0 = x["hk0"], x["hv0"]
    has_slots = M > 0 and T > 0
    b16 = lambda on: torch.bfloat16 if low and on else torch.float32  # noqa: E731

    def output(name, width, query_side=False, zero=False):   # output [B*T, all heads, width]: the group's view
        if out[name] is None:
            out[name] = (torch.zeros if zero else torch.empty)(B * T, p.HQ if query_side else HS, width, dtype=dt,
                                                               device=dev)
        return out[name][:, q_heads if query_side else kv_heads]

    dq = output("dq", K, query_side=True)
    dq_slot = output("dq_slot", K, query_side=True, zero=True) if x["qs"] is not None else None
    d_buf = torch.empty(B * T, HQ, **f32)
    dhk0 = out["dhk0"][:, kv_heads] if hk0 is not None else None
    dhv0 = out["dhv0"][:, kv_heads] if hk0 is not None else None
    s_arg = sf if sf is not None else gf

    if has_slots:
        hk_c, hv_c, _, _ = chunk_states(p, ksf, vf, gf, sf, hk0, hv0, cu, chunk_off, block_map, NB, R, BT,
                                        longest, False, low and configs.BWD_BF16_STATES, heads=H, backward=True)
        ps_buf = torch.empty(B * T, HQ, M, dtype=b16(configs.BWD_BF16_PS_DLS), device=dev)
        dls_buf = torch.empty(B * T, HQ, M, dtype=b16(configs.BWD_BF16_PS_DLS), device=dev)
        x1_buf = torch.empty(B * T, HQ, M, dtype=b16(configs.BWD_BF16_X1), device=dev)
    else:   # placeholders: no kernel reads them without slots
        hk_c = hv_c = ps_buf = dls_buf = x1_buf = dvs = d_buf
        dks = torch.zeros(B * T, H, K, dtype=dt, device=dev) if x["ks"] is not None else d_buf
    if NB > 0 and T > 0:
        nha_bwd_q_kernel[(NB, HQ)](
            qf, kf, vf, qsf, ksf, gf, s_arg, hk_c, hv_c, of, dof, lse, cu, chunk_off, block_map,
            dq, dq_slot if dq_slot is not None else dq, ps_buf, dls_buf, x1_buf, d_buf,
            p.scale, p.W, T, HQ, H, HS, G, K, V, M, BT, BT, BK, BV, BM,
            has_slots, sf is not None, x["qs"] is not None, varlen,
            configs.G_FLOOR, SAFE2, LOWP_Q, LOWP_DQ, DOT,
            num_warps=warps, num_stages=stages,
        )
    if has_slots:
        dh_k = torch.empty(R, H, K, M, dtype=b16(configs.BWD_BF16_DH), device=dev)
        dh_v = torch.empty(R, H, M, V, dtype=b16(configs.BWD_BF16_DH), device=dev)
        BMS = configs.state_slot_tile(M)
        common = dict(scale=p.scale, W=p.W, HQ=HQ, H=H, HS=HS, G=G, K=K, V=V, M=M, BT=BT, BK=BK, BV=BV, BM=BMS,
                      G_FLOOR=configs.G_FLOOR, LOWP=LOWP_ST, DOT=DOT)
        dh0k, dh0v = (dhk0, dhv0) if dhk0 is not None else (dh_k, dh_v)
        if state_pass(p, NB, longest, H) == "walk":
            nha_bwd_state_kernel[(p.N, H, triton.cdiv(M, BMS))](
                qsf, dof, gf, ps_buf, dls_buf, dh_k, dh_v, dh0k, dh0v, cu, chunk_off,
                HAS_H0=hk0 is not None, **common, num_warps=4,
            )
        else:
            a_c = torch.empty(R, H, M, **f32)
            BML = configs.state_local_slot_tile(M, backward=True)
            nha_bwd_state_local_kernel[(NB, H, triton.cdiv(M, BML))](
                qsf, dof, gf, ps_buf, dls_buf, dh_k, dh_v, a_c, cu, chunk_off, block_map, **{**common, "BM": BML},
                num_warps=4,
            )
            grid, BE = scan_grid(p, H, backward=True)
            nha_state_scan_kernel[grid](
                dh_k, dh_v, a_c, dh_k, dh_v, dh0k, dh0v, cu, chunk_off, H, HS, K, V, M, BT, BE, configs.scan_rows(),
                False, hk0 is not None, True,
                num_warps=configs.scan_num_warps(),
            )
            del a_c
        carry = torch.empty(R, H, M, **f32)
        BMC = min(configs.pad(M), 64)
        nha_state_carry_kernel[(R * H, triton.cdiv(M, BMC))](
            dh_k, dh_v, hk_c, hv_c, carry, K, V, M, min(BK, 64), min(BV, 64), BMC, num_warps=4,
        )
        del hk_c, hv_c   # freed before dks, dvs exist (module docstring, step 4)
        dg = output("dg", M)
        ds = dg if chain else output("ds", M)   # never written when chained
        # the slot kernel writes the tokens that reach the slots, the kv kernel zeros the rest of
        # ds, dg; dks is returned as dk_slot when k_slot was given, so only then it needs zeros
        dks = torch.zeros(B * T, H, K, **f32) if x["ks"] is not None else torch.empty(B * T, H, K, **f32)
        dvs = torch.empty(B * T, H, V, **f32)
        split = {"always": True, "never": False, "bf16": LOWP_SL == LOWP_KV == OP_BF16}[configs.BWD_SLOT_SPLIT]
        unsafe = torch.empty(NB, H, dtype=torch.int8, device=dev) if split else carry   # carry: never read
        for path in TWO_LAUNCHES if split else (DECAY_ANY.value,):
            nha_bwd_slot_kernel[(NB, H)](
                qsf, ksf, vf, gf, s_arg, dof, carry, dh_k, dh_v, ps_buf, dls_buf, x1_buf,
                cu, chunk_off, block_map, dks, dvs, ds, dg, unsafe,
                p.scale, p.W, HQ, H, HS, G, K, V, M, BT, BK, BV, BM, sf is not None, chain, configs.G_FLOOR, SAFE2,
                LOWP_SL, LOWP_KV, DOT, path,
                num_warps=warps,
            )
        del ps_buf, dls_buf, x1_buf, dh_k, dh_v, dh0k, dh0v, carry   # (dh0k/dh0v: dh_k/dh_v or the outputs dhk0/dhv0)
    else:
        dg = output("dg", M)
        ds = dg if chain else output("ds", M)
    dk = output("dk", K)
    dv = output("dv", V)
    if NB > 0 and T > 0:
        nha_bwd_kv_kernel[(NB, H)](
            qf, kf, vf, dof, lse, d_buf, dks, dvs, cu, block_map, dk, dv, ds, dg,
            p.scale, p.W, T, HQ, H, HS, G, K, V, M, BT, BK, BV, BM,
            has_slots, x["ks"] is None, not chain, varlen, DOT,
            num_warps=configs.kv_num_warps(K, V), num_stages=stages,
        )
    if x["ks"] is not None:
        output("dk_slot", K).copy_(dks)
