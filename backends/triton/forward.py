"""Triton forward of NHA: a chunk-state pass, then one fused attention kernel.

Shift trick (notes/MATH.md §1): the slot branch is gated slot attention over tokens shifted right
by ``W``; shifted position ``p`` carries token ``p - W`` (an identity token, gate 0 and no write,
for ``p < W``). The query at ``t`` reads the slot state after shifted tokens ``0..t`` and the
window ``(t-W, t]``::

    time  ->   0 1 2 ... t-W | t-W+1 ... t-1 t
               `-- slots ---' `----- window ---'   (one softmax over both)

Kernels (one sequence of the packed batch is ``bos .. eos``; chunks of ``BT`` shifted tokens):

* Chunk states (``chunk_states``), by the pass ``state_pass`` picks (configs.STATE_PASS):
  ``"scan"``: ``nha_fwd_state_local_kernel`` grid ``(chunks, H, cdiv(M, BMS))`` computes what
  every chunk alone does to the state (``state_end = a * state_start + L``) at once, then
  ``nha_state_scan_kernel`` grid ``(N, H, element blocks)`` chains them in place, ``D`` chunks
  per step by an associative scan;
  ``"walk"``: ``nha_fwd_state_kernel`` grid ``(N, H, cdiv(M, BMS))`` walks the chunks in order,
  one program per slot tile. Either way the states land at every chunk start and after each
  sequence's last chunk (Hk_c [R,H,K,M], Hv_c [R,H,M,V], ``R`` rows as in ``plan``; bfloat16
  when they only feed bf16 dots, fp32 otherwise) and the final state in fp32.
* ``nha_fwd_kernel`` grid ``(blocks, HQ)``: one program per ``BT`` query rows (= one chunk) and
  query head. Slot logits = inter-chunk ``exp(Gc) * (Qs @ Hk_c)`` + intra-chunk decayed causal
  part; they seed an online softmax that then walks only the window key blocks that intersect
  ``(t-W, t]``, masking only the two boundary blocks. Nothing of size T*W or T*(M+W) ever exists;
  o and lse are written once. With slots it is launched twice (TWO_LAUNCHES): factored decays
  first, then the pairwise fallback for the chunks the first launch flagged.

Every kernel recomputes the chunk cumsum Gc of the gates it needs from ``g`` (one [BT, BM] load
and a cumsum: cheaper than storing and re-reading an fp32 copy) and, when ``s`` is not given,
``s = 1 - exp(g)`` from the same load. Exponentials are base 2: Gc is kept in log2 units and
log2(e) is folded into the logit scale.

The intra-chunk decay ``D[t,j,m] = exp(Gc[t,m] - Gc[j,m])`` (j <= t) is applied either factored,
``exp(Gc[t]) * exp(-Gc[j])`` inside two dots, when every Gc of the chunk lies in
``[-SAFE_LIMIT, SAFE_LIMIT]`` (no overflow possible), or explicitly pair by pair otherwise
(resets ``g = -inf`` and very strong decays; slower, never NaN; nha_fwd_kernel and, for bf16
operands, nha_bwd_slot_kernel run it in a launch of their own). ``decay_apply``,
``decay_apply_t`` and ``decay_weights`` below are the three contractions both paths provide; the
backward reuses them.

Precision: for bfloat16 inputs every slot dot takes bfloat16 operands with fp32 accumulation (states,
decays and probabilities are rounded to bf16 right before the dot; the error stays far inside
SPEC's 2e-2) when configs.BF16_SLOT_DOTS is on; float16 inputs keep fp32 slot operands on split-TF32
dots (configs.FP16_SLOT_DOTS, ~fp32 accuracy) and 16-bit window dots; where a bfloat16 slot dot
takes fp32 operands they are rounded to TF32 in ``_op`` (OP_TF32) for TF32 dots; float32 inputs keep
IEEE fp32 dots (SPEC's 1e-3).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import configs

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Triton's interpreter (3.9) computes tl.dot on bfloat16 operands wrongly; under it a bf16
# operand is rounded to bf16 and handed over as fp32, which keeps the rounding under test.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


# Dot operand modes (the LOWP constexpr of every kernel): how an operand reaches tl.dot.
OP_FP32, OP_BF16, OP_TF32 = 0, 1, 2


@triton.jit
def _op(x, LOWP: tl.constexpr):
    """A dot operand in mode LOWP: OP_FP32 fp32 as it is (IEEE dots of fp32 inputs), OP_BF16
    bfloat16 (fp32 accumulation), OP_TF32 fp32 rounded to nearest TF32 (10 mantissa bits).

    OP_TF32 rounds here because Triton hands the tensor cores the fp32 words as they are, and
    the results look truncated to TF32 (a bias that adds up over the long sums of the slot
    states): float16 'o' came out 2.6x the naive fp16 error on an H200 (SPEC section 5 allows
    2x); an interpreter emulation of truncation gave 1.4x on the same case, of rounding 0.6x.
    Values rounded here lose nothing to either reading, and the interpreter (exact fp32 dots)
    then computes what the GPU does. Not yet rerun on a GPU."""
    if LOWP == 1:
        if INTERPRET:
            return x.to(tl.float32).to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
        else:
            return x.to(tl.bfloat16)
    elif LOWP == 2:
        b_bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        return ((b_bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def sequence_span(cu, i_n):
    """(bos, T_n): first row and length of packed sequence i_n (int64)."""
    bos = tl.load(cu + i_n).to(tl.int64)
    return bos, tl.load(cu + i_n + 1).to(tl.int64) - bos


@triton.jit
def block_span(block_map, cu, i_b):
    """(i_n, i_c, bos, T_n) of block i_b: its sequence, its chunk in it, and the sequence's span."""
    i_n = tl.load(block_map + i_b * 2).to(tl.int64)
    i_c = tl.load(block_map + i_b * 2 + 1).to(tl.int64)
    bos, T_n = sequence_span(cu, i_n)
    return i_n, i_c, bos, T_n


@triton.jit
def derive_s(b_g):
    """s = 1 - exp(g) = -expm1(g) for clamped gates: a short series where |g| < 0.1 keeps the
    digits that 1 - exp(g) cancels away (relative error < 2e-9 there); g = G_FLOOR gives 1."""
    b_series = -b_g * (1.0 + b_g * (0.5 + b_g * (0.16666666666666666 + b_g * (0.041666666666666664
                                                                          + b_g * 0.008333333333333333))))
    return tl.where(tl.abs(b_g) < 0.1, b_series, 1.0 - tl.exp(b_g))


@triton.jit
def load_gates(g, s, bos, T_n, i_c, i_h, W, o_m, H: tl.constexpr, M: tl.constexpr, BT: tl.constexpr,
               HAS_S: tl.constexpr, G_FLOOR: tl.constexpr):
    """Shifted gates of chunk i_c for the slots o_m: (Gc [BT, BM] chunk-local cumsum in log2
    units, Gc_last [BM] its total, S [BT, BM] fp32, the gates themselves [BT, BM] in log2 units).
    Positions without a token (p < W, p >= T_n) are identity tokens: gate 0, write 0."""
    o_p = i_c * BT + tl.arange(0, BT)
    o_j = o_p - W
    m_p = o_p < T_n
    m_j = m_p & (o_j >= 0)
    m_jm = m_j[:, None] & (o_m < M)[None, :]
    o_jm = ((bos + o_j)[:, None] * H + i_h) * M + o_m[None, :]
    b_g = tl.maximum(tl.load(g + o_jm, mask=m_jm, other=0.0).to(tl.float32), G_FLOOR)     # [BT, BM]
    if HAS_S:
        b_s = tl.load(s + o_jm, mask=m_jm, other=0.0).to(tl.float32)                       # [BT, BM]
    else:
        b_s = tl.where(m_jm, derive_s(b_g), 0.0)
    b_g2 = b_g * 1.4426950408889634
    b_gc = tl.cumsum(b_g2, 0)
    # rows past the sequence end repeat the lowest cumsum, so no decay from a real token to them
    # exceeds 1 (their products are discarded, but inf * 0 would make NaN inside the tile)
    b_gc = tl.where(m_p[:, None], b_gc, tl.min(b_gc, 0)[None, :])
    return b_gc, tl.sum(b_g2, 0), b_s, b_g2


@triton.jit
def gates_to_end(g, bos, T_n, i_c, i_h, W, o_m, H: tl.constexpr, M: tl.constexpr, BT: tl.constexpr,
                 G_FLOOR: tl.constexpr):
    """[BT, BM] log2 decay from each shifted row of chunk i_c to the chunk's end, sum_{i>j} g_i:
    the rows after each one (loaded again, L1-hot) summed by a reverse cumsum. Taken as
    Gc_last - Gc[j] instead, it would inherit the rounding of two sums as large as the whole
    chunk's (-3000 in log2 after ten resets, 2.4e-4 apart in float32)."""
    o_r = tl.arange(0, BT) + 1
    o_p = i_c * BT + o_r
    o_j = o_p - W
    m_j = (o_r < BT) & (o_p < T_n) & (o_j >= 0)
    m_jm = m_j[:, None] & (o_m < M)[None, :]
    b_g = tl.maximum(tl.load(g + ((bos + o_j)[:, None] * H + i_h) * M + o_m[None, :], mask=m_jm,
                             other=0.0).to(tl.float32), G_FLOOR)
    return tl.cumsum(b_g * 1.4426950408889634, 0, reverse=True)


@triton.jit
def decay_to_end(b_gc, b_glast, g, bos, T_n, i_c, i_h, W, o_m, H: tl.constexpr, M: tl.constexpr, BT: tl.constexpr,
                 G_FLOOR: tl.constexpr, SAFE2: tl.constexpr, PATH: tl.constexpr):
    """[BT, BM] log2 decay from each row of chunk i_c to its end: Gc_last - Gc[j] where the chunk's
    decays factor (every |Gc| <= SAFE2, so the two sums differ by a few float32 ulps of SAFE2),
    else gates_to_end. The extra load and scan of gates_to_end sit on the chunk-state walk's
    dependent chain: taken for every chunk they made the walk 0.214 -> 0.365 ms at gpu-a (H200)."""
    if PATH == DECAY_ANY:
        # gates are <= 0, so Gc is lowest at the chunk's end: the chunk factors iff every
        # Gc_last >= -SAFE2 (the factored path's own test, _is_safe, also bounds Gc from above)
        factored = tl.min(b_glast, 0) >= -SAFE2
    else:
        factored = PATH == DECAY_FACTORED
    if factored:
        b_e = b_glast[None, :] - b_gc
    else:
        b_e = gates_to_end(g, bos, T_n, i_c, i_h, W, o_m, H, M, BT, G_FLOOR)
    return b_e


# ----------------------------------------------------------------------------------------------
# Intra-chunk decayed contractions, D[t,j,m] = 2^(Gc[t,m] - Gc[j,m]) for j <= t, else 0 (Gc in
# log2 units; SAFE2 = SAFE_LIMIT * log2(e)). PATH picks how: DECAY_ANY factored when _is_safe
# says so at run time, else pair by pair (segment sums of the gates G2, segment_decay);
# DECAY_FACTORED / DECAY_PAIRWISE one way only (the caller has checked), so the other path's code
# and registers are not in the kernel.
# ----------------------------------------------------------------------------------------------
DECAY_ANY, DECAY_FACTORED, DECAY_PAIRWISE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def segment_decay(b_seg, b_g2, j, BT: tl.constexpr):
    """One step of the pairwise path, which visits j = BT-1 .. 0: Seg [BT, BM] from the step
    before (sum_{j+1<i<=t} g_i) to sum_{j<i<=t} g_i, and D[t, j, :] = 2^Seg (0 for t < j). G2:
    the gates (log2 units). Each segment is summed from its own gates, in order: Gc[t] - Gc[j]
    would lose the digits that two cumsums as large as the chunk's (thousands after resets) drop."""
    o_r = tl.arange(0, BT)
    b_gn = tl.sum(tl.where(o_r[:, None] == j + 1, b_g2, 0.0), 0)      # [BM] gate j+1 (0 past the chunk)
    b_seg = tl.where(o_r[:, None] > j, b_seg + b_gn[None, :], 0.0)
    return b_seg, tl.exp2(tl.where(o_r[:, None] >= j, b_seg, float("-inf")))


# nha_fwd_kernel runs twice: PATH = DECAY_FACTORED for every chunk whose decays factor, flagging
# the others in an int8 [blocks, heads] buffer (flag_unsafe), then PATH = DECAY_PAIRWISE for the
# flagged programs only (the others return after reading their flag). Kept apart, the pairwise code
# does not raise the common path's registers. nha_bwd_slot_kernel does the same for bf16 slot
# operands (backward.py says why not for fp32 ones).
TWO_LAUNCHES = (DECAY_FACTORED.value, DECAY_PAIRWISE.value)


@triton.jit
def _is_safe(b_gc, SAFE2: tl.constexpr):
    return (tl.min(tl.min(b_gc, 1), 0) >= -SAFE2) & (tl.max(tl.max(b_gc, 1), 0) <= SAFE2)


@triton.jit
def flag_unsafe(unsafe, i_flag, b_gc, SAFE2: tl.constexpr):
    """Whether the chunk's decays factor; unsafe[i_flag] := 0 if so, 1 if the chunk is left to the
    DECAY_PAIRWISE launch."""
    safe = _is_safe(b_gc, SAFE2)
    tl.store(unsafe + i_flag, tl.where(safe, 0, 1).to(tl.int8))
    return safe


@triton.jit
def decay_apply(b_a, b_x, b_gc, b_g2, BT: tl.constexpr, SAFE2: tl.constexpr, LOWP: tl.constexpr, DOT: tl.constexpr,
                PATH: tl.constexpr):
    """R[t,m] = sum_{j<=t} A[t,j] X[j,m] D[t,j,m].   A [BT,BT], X and Gc [BT,BM] -> [BT,BM]."""
    o_r = tl.arange(0, BT)
    m_c = o_r[:, None] >= o_r[None, :]
    if PATH == DECAY_ANY:
        factored = _is_safe(b_gc, SAFE2)
    else:
        factored = PATH == DECAY_FACTORED
    if factored:
        b_r = tl.dot(_op(tl.where(m_c, b_a, 0.0), LOWP), _op(b_x * tl.exp2(-b_gc), LOWP),
                     input_precision=DOT) * tl.exp2(b_gc)
    else:
        b_r = tl.zeros(b_x.shape, dtype=tl.float32)
        b_seg = tl.zeros(b_x.shape, dtype=tl.float32)
        for jj in range(BT):
            j = BT - 1 - jj
            b_seg, b_d = segment_decay(b_seg, b_g2, j, BT)
            b_aj = tl.sum(tl.where(o_r[None, :] == j, b_a, 0.0), 1)       # [BT] column j of A
            b_xj = tl.sum(tl.where(o_r[:, None] == j, b_x, 0.0), 0)       # [BM] row j of X
            b_r += b_aj[:, None] * b_xj[None, :] * b_d
    return b_r


@triton.jit
def decay_apply_t(b_a, b_y, b_gc, b_g2, BT: tl.constexpr, SAFE2: tl.constexpr, LOWP: tl.constexpr, DOT: tl.constexpr,
                  PATH: tl.constexpr):
    """R[j,m] = sum_{t>=j} A[t,j] Y[t,m] D[t,j,m].   A [BT,BT], Y and Gc [BT,BM] -> [BT,BM]."""
    o_r = tl.arange(0, BT)
    m_c = o_r[:, None] >= o_r[None, :]
    if PATH == DECAY_ANY:
        factored = _is_safe(b_gc, SAFE2)
    else:
        factored = PATH == DECAY_FACTORED
    if factored:
        b_r = tl.dot(_op(tl.trans(tl.where(m_c, b_a, 0.0)), LOWP), _op(b_y * tl.exp2(b_gc), LOWP),
                     input_precision=DOT) * tl.exp2(-b_gc)
    else:
        b_r = tl.zeros(b_y.shape, dtype=tl.float32)
        b_seg = tl.zeros(b_y.shape, dtype=tl.float32)
        for jj in range(BT):
            j = BT - 1 - jj
            b_seg, b_d = segment_decay(b_seg, b_g2, j, BT)
            b_aj = tl.sum(tl.where(o_r[None, :] == j, b_a, 0.0), 1)       # [BT] column j of A
            b_rj = tl.sum(b_aj[:, None] * b_y * b_d, 0)                   # [BM]
            b_r += tl.where(o_r[:, None] == j, b_rj[None, :], 0.0)
    return b_r


@triton.jit
def decay_weights(b_y, b_x, b_gc, b_g2, BT: tl.constexpr, SAFE2: tl.constexpr, LOWP: tl.constexpr, DOT: tl.constexpr,
                  PATH: tl.constexpr):
    """P[t,j] = sum_m Y[t,m] X[j,m] D[t,j,m] for j <= t.   Y, X, Gc [BT,BM] -> [BT,BT]."""
    o_r = tl.arange(0, BT)
    m_c = o_r[:, None] >= o_r[None, :]
    if PATH == DECAY_ANY:
        factored = _is_safe(b_gc, SAFE2)
    else:
        factored = PATH == DECAY_FACTORED
    if factored:
        b_w = tl.dot(_op(b_y * tl.exp2(b_gc), LOWP), tl.trans(_op(b_x * tl.exp2(-b_gc), LOWP)),
                     input_precision=DOT)
        b_w = tl.where(m_c, b_w, 0.0)
    else:
        b_w = tl.zeros([BT, BT], dtype=tl.float32)
        b_seg = tl.zeros(b_x.shape, dtype=tl.float32)
        for jj in range(BT):
            j = BT - 1 - jj
            b_seg, b_d = segment_decay(b_seg, b_g2, j, BT)
            b_xj = tl.sum(tl.where(o_r[:, None] == j, b_x, 0.0), 0)       # [BM]
            b_wj = tl.sum(b_y * b_xj[None, :] * b_d, 1)                   # [BT]
            b_w += tl.where(o_r[None, :] == j, b_wj[:, None], 0.0)
    return b_w


# ----------------------------------------------------------------------------------------------
# Chunk states
# ----------------------------------------------------------------------------------------------
@triton.jit
def fwd_chunk_update(ks, v, g, s, bos, T_n, i_c, i_h, W, o_m, H: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, M: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     HAS_S: tl.constexpr, G_FLOOR: tl.constexpr, SAFE2: tl.constexpr, LOWP: tl.constexpr,
                     DOT: tl.constexpr):
    """What chunk i_c does to the slots o_m: state_end = a * state_start + (Lk, Lv) with
    a = 2^Gc_last [BM] (<= 1), Lk = Ks^T W [BK, BM], Lv = W^T Vs [BM, BV], W = S 2^(Gc_last - Gc)."""
    b_gc, b_glast, b_s, b_g2 = load_gates(g, s, bos, T_n, i_c, i_h, W, o_m, H, M, BT, HAS_S, G_FLOOR)
    b_ks, b_vs = load_slot_rows(ks, v, bos, T_n, i_c, i_h, W, H, K, V, BT, BK, BV)
    # 2^(Gc_last - Gc[j]) <= 1: the decay from token j to the chunk end
    b_w = _op(b_s * tl.exp2(decay_to_end(b_gc, b_glast, g, bos, T_n, i_c, i_h, W, o_m, H, M, BT, G_FLOOR, SAFE2,
                                         DECAY_ANY)), LOWP)                                  # [BT, BM]
    b_lk = tl.dot(tl.trans(_op(b_ks, LOWP)), b_w, input_precision=DOT)                          # [BK, BM]
    b_lv = tl.dot(tl.trans(b_w), _op(b_vs, LOWP), input_precision=DOT)                          # [BM, BV]
    return tl.exp2(b_glast), b_lk, b_lv


@triton.jit
def nha_fwd_state_kernel(
    ks, v, g, s, hk0, hv0, hk_c, hv_c, hk_t, hv_t, cu, chunk_off,
    W, H: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    HAS_S: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, G_FLOOR: tl.constexpr, SAFE2: tl.constexpr,
    LOWP: tl.constexpr, DOT: tl.constexpr, PAIRS: tl.constexpr,
):
    """State walk (configs.STATE_PASS "walk"): slots i_m*BM .. of one (sequence, head), chunk
    after chunk: Hk_c [R,H,K,M], Hv_c [R,H,M,V] at every chunk start and after the last chunk
    (row chunk_off + NT); hk_t, hv_t [N,H,..] after the last chunk (fp32). H: the heads of
    this launch (grid, Hk_c, Hv_c); HS: the heads of ks, v, g, s, hk0, hv0, hk_t, hv_t (their head
    stride; views starting at the launch's first head, see backward.py). PAIRS
    (configs.STATE_WALK_PAIRS): two chunks per loop step, whose own updates do not depend on each
    other or on the state, so the compiler may interleave their two chains."""
    i_n, i_h, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, T_n = sequence_span(cu, i_n)
    c0 = tl.load(chunk_off + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_m = i_m * BM + tl.arange(0, BM)
    m_k, m_v, m_m = o_k < K, o_v < V, o_m < M
    m_km = m_k[:, None] & m_m[None, :]
    m_mv = m_m[:, None] & m_v[None, :]
    o_km = o_k[:, None] * M + o_m[None, :]
    o_mv = o_m[:, None] * V + o_v[None, :]

    b_hk = tl.zeros([BK, BM], dtype=tl.float32)
    b_hv = tl.zeros([BM, BV], dtype=tl.float32)
    if HAS_H0:
        b_hk += tl.load(hk0 + (i_n * HS + i_h) * K * M + o_km, mask=m_km, other=0.0).to(tl.float32)   # [BK, BM]
        b_hv += tl.load(hv0 + (i_n * HS + i_h) * M * V + o_mv, mask=m_mv, other=0.0).to(tl.float32)   # [BM, BV]
    NT = tl.cdiv(T_n, BT)
    for i_c in range(0, NT, 2 if PAIRS else 1):
        i_state = (c0 + i_c) * H + i_h
        tl.store(hk_c + i_state * K * M + o_km, b_hk.to(hk_c.dtype.element_ty), mask=m_km)
        tl.store(hv_c + i_state * M * V + o_mv, b_hv.to(hv_c.dtype.element_ty), mask=m_mv)
        b_a, b_lk, b_lv = fwd_chunk_update(ks, v, g, s, bos, T_n, i_c, i_h, W, o_m, HS, K, V, M, BT, BK, BV,
                                           HAS_S, G_FLOOR, SAFE2, LOWP, DOT)
        if PAIRS:
            # chunk i_c + 1: past the sequence's end it is the identity (a = 1, L = 0: no rows)
            b_a1, b_lk1, b_lv1 = fwd_chunk_update(ks, v, g, s, bos, T_n, i_c + 1, i_h, W, o_m, HS, K, V, M, BT, BK,
                                                  BV, HAS_S, G_FLOOR, SAFE2, LOWP, DOT)
            b_hk = b_hk * b_a[None, :] + b_lk
            b_hv = b_hv * b_a[:, None] + b_lv
            if i_c + 1 < NT:
                tl.store(hk_c + (i_state + H) * K * M + o_km, b_hk.to(hk_c.dtype.element_ty), mask=m_km)
                tl.store(hv_c + (i_state + H) * M * V + o_mv, b_hv.to(hv_c.dtype.element_ty), mask=m_mv)
            b_a, b_lk, b_lv = b_a1, b_lk1, b_lv1
        b_hk = b_hk * b_a[None, :] + b_lk
        b_hv = b_hv * b_a[:, None] + b_lv
    i_state = (c0 + NT) * H + i_h
    tl.store(hk_c + i_state * K * M + o_km, b_hk.to(hk_c.dtype.element_ty), mask=m_km)
    tl.store(hv_c + i_state * M * V + o_mv, b_hv.to(hv_c.dtype.element_ty), mask=m_mv)
    if STORE_FINAL:
        tl.store(hk_t + (i_n * HS + i_h) * K * M + o_km, b_hk, mask=m_km)
        tl.store(hv_t + (i_n * HS + i_h) * M * V + o_mv, b_hv, mask=m_mv)


@triton.jit
def nha_fwd_state_local_kernel(
    ks, v, g, s, hk_c, hv_c, a_c, cu, chunk_off, block_map,
    W, H: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    HAS_S: tl.constexpr, G_FLOOR: tl.constexpr, SAFE2: tl.constexpr, LOWP: tl.constexpr, DOT: tl.constexpr,
):
    """State scan, step 1 (configs.STATE_PASS "scan"): every chunk at once, its own (a, Lk, Lv)
    into row chunk_off + i_c + 1 of a_c [R,H,M], Hk_c, Hv_c; nha_state_scan_kernel then turns
    the rows into states in place."""
    i_b, i_h, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_c, bos, T_n = block_span(block_map, cu, i_b)
    c0 = tl.load(chunk_off + i_n).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    b_a, b_lk, b_lv = fwd_chunk_update(ks, v, g, s, bos, T_n, i_c, i_h, W, o_m, HS, K, V, M, BT, BK, BV,
                                       HAS_S, G_FLOOR, SAFE2, LOWP, DOT)
    store_chunk_row(hk_c, hv_c, a_c, (c0 + i_c + 1) * H + i_h, b_a, b_lk, b_lv, o_m, K, V, M, BK, BV)


@triton.jit
def store_chunk_row(buf_k, buf_v, a_c, i_row, b_a, b_lk, b_lv, o_m, K: tl.constexpr, V: tl.constexpr,
                    M: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """One chunk's own update (a [BM], Lk [BK, BM], Lv [BM, BV]) into row i_row of a_c [R*H,M],
    buf_k [R*H,K,M], buf_v [R*H,M,V] (slots o_m), for nha_state_scan_kernel."""
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k, m_v, m_m = o_k < K, o_v < V, o_m < M
    tl.store(buf_k + i_row * K * M + o_k[:, None] * M + o_m[None, :], b_lk.to(buf_k.dtype.element_ty),
             mask=m_k[:, None] & m_m[None, :])
    tl.store(buf_v + i_row * M * V + o_m[:, None] * V + o_v[None, :], b_lv.to(buf_v.dtype.element_ty),
             mask=m_m[:, None] & m_v[None, :])
    tl.store(a_c + i_row * M + o_m, b_a, mask=m_m)


@triton.jit
def _affine(a1, b1, a2, b2):
    """x -> a1 x + b1, then x -> a2 x + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def scan_rows(buf, a_c, h0, h_t, r0, NT, i_n, i_h, o_e, E: tl.constexpr, DIV: tl.constexpr,
              H: tl.constexpr, HS: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
              HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr):
    """Rows r0 .. r0+NT of one (sequence, head) of buf [R,H,E] (elements o_e; element e decays
    with slot (e // DIV) % M): forward, row 0 := h0 and row r := a_r row_{r-1} + L_r for
    r = 1..NT; REVERSE, row NT := h0 and row r := a_r row_{r+1} + L_r for r = NT-1..0 (h0 is 0
    without HAS_H0). D rows per
    step in the order of the recurrence (descending rows when REVERSE), combined by an associative
    scan; the carry after the last step goes to h_t in fp32. h0, h_t [N,HS,E] (HS: see
    nha_fwd_state_kernel)."""
    m_e = o_e < E
    o_me = (o_e // DIV) % M
    o_d = tl.arange(0, D)
    b_h = tl.zeros([o_e.shape[0]], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + (i_n * HS + i_h) * E + o_e, mask=m_e, other=0.0).to(tl.float32)
    if REVERSE:
        r_first = NT
    else:
        r_first = 0
    tl.store(buf + ((r0 + r_first) * H + i_h) * E + o_e, b_h.to(buf.dtype.element_ty), mask=m_e)
    for i in range(0, NT, D):
        if REVERSE:
            o_r = NT - 1 - i - o_d
        else:
            o_r = 1 + i + o_d
        m_re = ((o_r >= 0) & (o_r <= NT))[:, None] & m_e[None, :]
        o_row = (r0 + o_r) * H + i_h
        # rows outside the sequence are the identity (a = 1, L = 0): the end row holds the carry
        b_l = tl.load(buf + o_row[:, None] * E + o_e[None, :], mask=m_re, other=0.0).to(tl.float32)  # [D, BE]
        b_a = tl.load(a_c + o_row[:, None] * M + o_me[None, :], mask=m_re, other=1.0)               # [D, BE]
        b_a, b_l = tl.associative_scan((b_a, b_l), 0, _affine)
        b_rows = b_a * b_h[None, :] + b_l
        tl.store(buf + o_row[:, None] * E + o_e[None, :], b_rows.to(buf.dtype.element_ty), mask=m_re)
        b_h = tl.sum(tl.where(o_d[:, None] == D - 1, b_rows, 0.0), 0)
    if STORE_FINAL:
        tl.store(h_t + (i_n * HS + i_h) * E + o_e, b_h, mask=m_e)


@triton.jit
def nha_state_scan_kernel(
    hk_c, hv_c, a_c, hk0, hv0, hk_t, hv_t, cu, chunk_off,
    H: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BT: tl.constexpr,
    BE: tl.constexpr, D: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """State scan, step 2, grid (N, H, cdiv(K*M, BE) + cdiv(M*V, BE)): per (sequence, head) and
    BE elements of Hk (the first programs) or Hv, the chunk rows of step 1 become states in place
    (scan_rows). Forward: states at chunk starts from h0; REVERSE (backward): state gradients
    from 0 after the last chunk."""
    i_n, i_h, i_e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, T_n = sequence_span(cu, i_n)
    r0 = tl.load(chunk_off + i_n).to(tl.int64)
    NT = tl.cdiv(T_n, BT)
    NBK: tl.constexpr = (K * M + BE - 1) // BE
    if i_e < NBK:
        scan_rows(hk_c, a_c, hk0, hk_t, r0, NT, i_n, i_h, i_e * BE + tl.arange(0, BE), K * M, 1,
                  H, HS, M, D, HAS_H0, STORE_FINAL, REVERSE)
    else:
        scan_rows(hv_c, a_c, hv0, hv_t, r0, NT, i_n, i_h, (i_e - NBK) * BE + tl.arange(0, BE), M * V, V,
                  H, HS, M, D, HAS_H0, STORE_FINAL, REVERSE)


# ----------------------------------------------------------------------------------------------
# Slot operands of one chunk (shared with the backward)
# ----------------------------------------------------------------------------------------------
@triton.jit
def load_shifted(x, bos, T_n, i_c, i_h, W, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Rows of x [*, H, D] at the shifted positions of chunk i_c (token p - W): [BT, BD] in x's
    dtype, 0 where no token."""
    o_p = i_c * BT + tl.arange(0, BT)
    o_j = o_p - W
    m_j = (o_p < T_n) & (o_j >= 0)
    o_d = tl.arange(0, BD)
    return tl.load(x + ((bos + o_j)[:, None] * H + i_h) * D + o_d[None, :],
                   mask=m_j[:, None] & (o_d < D)[None, :], other=0.0)


@triton.jit
def load_slot_rows(ks, v, bos, T_n, i_c, i_h, W, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Shifted rows of chunk i_c: Ks [BT,BK], Vs [BT,BV] in the input dtype (0 where no token)."""
    return (load_shifted(ks, bos, T_n, i_c, i_h, W, H, K, BT, BK),
            load_shifted(v, bos, T_n, i_c, i_h, W, H, V, BT, BV))


@triton.jit
def load_matrix(x, R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """x [R, C] row-major as a [BR, BC] tile (0 outside), in x's dtype."""
    o_r = tl.arange(0, BR)
    o_c = tl.arange(0, BC)
    return tl.load(x + o_r[:, None] * C + o_c[None, :], mask=(o_r < R)[:, None] & (o_c < C)[None, :], other=0.0)


@triton.jit
def load_states(hk_c, hv_c, i_state, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr):
    """Hk [BK,BM], Hv [BM,BV] of chunk state i_state (their stored dtype)."""
    return (load_matrix(hk_c + i_state * K * M, K, M, BK, BM),
            load_matrix(hv_c + i_state * M * V, M, V, BM, BV))


# ----------------------------------------------------------------------------------------------
# One window key block of the online softmax
# ----------------------------------------------------------------------------------------------
@triton.jit
def window_block(b_q, p_k, p_v, i_s, t0, T_n, W, b_mi, b_li, b_acc, qk2,
                 HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MASK: tl.constexpr,
                 DOT: tl.constexpr):
    """Keys i_s .. i_s+BS (row strides HK = H*K, HV = H*V) of the query rows t0 .. t0+BT into
    (m, l, acc) [BT],[BT],[BT,BV], log2 units. MASK=False: every key of the block is in every
    row's band (no masking). Masks compare int32 offsets from t0, the band in one unsigned
    compare: nha_fwd_kernel 0.485 -> 0.453 ms at gpu-a against int64 positions and three compares
    (H200, 2026-12-04; asv_bench/triton_tuning_notes.md)."""
    o_s = i_s + tl.arange(0, BS)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    p_ks = p_k + o_s[:, None] * HK + o_k[None, :]
    p_vs = p_v + o_s[:, None] * HV + o_v[None, :]
    if MASK:
        k_rel = (i_s - t0).to(tl.int32) + tl.arange(0, BS)      # keys relative to the first query row
        m_s = k_rel < (T_n - t0).to(tl.int32)
        b_k = tl.load(p_ks, mask=m_s[:, None] & (o_k < K)[None, :], other=0.0)           # [BS, BK]
        b_v = tl.load(p_vs, mask=m_s[:, None] & (o_v < V)[None, :], other=0.0)           # [BS, BV]
    else:
        if BK == K:
            b_k = tl.load(p_ks)
        else:
            b_k = tl.load(p_ks, mask=(o_k < K)[None, :], other=0.0)
        if BV == V:
            b_v = tl.load(p_vs)
        else:
            b_v = tl.load(p_vs, mask=(o_v < V)[None, :], other=0.0)
    b_sc = tl.dot(b_q, tl.trans(b_k), input_precision=DOT) * qk2                            # [BT, BS]
    if MASK:
        # 0 <= row - key < W in one unsigned compare; a key past the sequence end comes after
        # every row of it (negative lag), and min(W, T_n) keeps the bound inside uint32
        lag = (tl.arange(0, BT)[:, None] - k_rel[None, :]).to(tl.uint32, bitcast=True)
        m_band = lag < tl.minimum(W, T_n).to(tl.uint32)
        b_sc = tl.where(m_band, b_sc, float("-inf"))
    b_mn = tl.maximum(b_mi, tl.max(b_sc, 1))
    if MASK:
        b_mn = tl.where(b_mn == float("-inf"), 0.0, b_mn)   # rows with nothing seen yet
    b_alpha = tl.exp2(b_mi - b_mn)
    b_pw = tl.exp2(b_sc - b_mn[:, None])
    b_li = b_li * b_alpha + tl.sum(b_pw, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_pw.to(b_v.dtype), b_v, input_precision=DOT)
    return b_mn, b_li, b_acc


@triton.jit
def window_ranges(t0, T_n, W, BT: tl.constexpr, BS: tl.constexpr):
    """Key blocks of BS rows for the query rows t0 .. t0+BT (bands (t-W, t]):
    [lo, a) masked, [a, b) full (no mask), [c, hi) masked; all starts multiples of BS."""
    hi = tl.minimum(t0 + BT, T_n)
    lo = tl.maximum(t0 - W + 1, 0) // BS * BS
    # full: s0 >= t0 + BT - W (inside every row's lower bound), s0 + BS - 1 <= t0 (causal)
    full_lo = (tl.maximum(t0 + BT - W, 0) + BS - 1) // BS * BS
    full_hi = (t0 + 1) // BS * BS
    return lo, tl.minimum(full_lo, hi), full_lo, full_hi, tl.maximum(full_lo, full_hi), hi


@triton.jit
def slot_softmax(qs, ks, v, hk_c, hv_c, b_gc, b_g2, b_sx, r_t, m_t, bos, T_n, i_c, i_h, i_hq, i_state, W, qk2,
                 HQ: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
                 SAFE2: tl.constexpr, LOWP: tl.constexpr, DOT: tl.constexpr, PATH: tl.constexpr):
    """Online-softmax state (m [BT], l [BT], acc [BT,BV], log2 units) after the M slots of the
    query rows r_t: inter-chunk ``2^Gc (Qs @ Hk_c)`` plus the intra-chunk decayed causal part.

    PATH = DECAY_FACTORED factors the decays (the chunk's Gc lies in [-SAFE2, SAFE2]): both
    intra-chunk dots share S * 2^-Gc and both readouts P * 2^Gc. Operands are loaded right before
    their dots, and S * 2^-Gc is formed before the first one so that Gc and S die early: 190
    registers at gpu-a against 201 with it formed after (ptxas, sm_90). DECAY_PAIRWISE applies
    the decays pair by pair."""
    o_r = tl.arange(0, BT)
    m_c = o_r[:, None] >= o_r[None, :]
    o_k = tl.arange(0, BK)
    o_m = tl.arange(0, BM)
    b_eg = tl.exp2(b_gc)                                                                      # [BT, BM]
    if PATH == DECAY_FACTORED:
        b_sw = _op(b_sx * tl.exp2(-b_gc), LOWP)                                              # [BT, BM]
    b_qs = _op(tl.load(qs + (r_t[:, None] * HQ + i_hq) * K + o_k[None, :],
                       mask=m_t[:, None] & (o_k < K)[None, :], other=0.0), LOWP)            # [BT, BK]
    b_a = tl.dot(b_qs, tl.trans(_op(load_shifted(ks, bos, T_n, i_c, i_h, W, H, K, BT, BK), LOWP)),
                 input_precision=DOT)                                                          # [BT, BT]
    b_ls = tl.dot(b_qs, _op(load_matrix(hk_c + i_state * K * M, K, M, BK, BM), LOWP), input_precision=DOT)
    if PATH == DECAY_PAIRWISE:
        b_ls = (b_ls * b_eg + decay_apply(b_a, b_sx, b_gc, b_g2, BT, SAFE2, LOWP, DOT, PATH)) * qk2
    else:
        b_ls = tl.dot(_op(tl.where(m_c, b_a, 0.0), LOWP), b_sw, acc=b_ls, input_precision=DOT) * b_eg * qk2
    if M < BM:
        b_ls = tl.where((o_m < M)[None, :], b_ls, float("-inf"))
    b_mi = tl.max(b_ls, 1)
    b_p = tl.exp2(b_ls - b_mi[:, None])
    b_li = tl.sum(b_p, 1)
    b_pe = _op(b_p * b_eg, LOWP)                                                             # [BT, BM]
    if PATH == DECAY_PAIRWISE:
        b_pw = decay_weights(b_p, b_sx, b_gc, b_g2, BT, SAFE2, LOWP, DOT, PATH)
    else:
        b_pw = tl.where(m_c, tl.dot(b_pe, tl.trans(b_sw), input_precision=DOT), 0.0)         # [BT, BT]
    b_acc = tl.dot(b_pe, _op(load_matrix(hv_c + i_state * M * V, M, V, BM, BV), LOWP), input_precision=DOT)
    b_acc = tl.dot(_op(b_pw, LOWP), _op(load_shifted(v, bos, T_n, i_c, i_h, W, H, V, BT, BV), LOWP), acc=b_acc,
                   input_precision=DOT)                                                        # [BT, BV]
    return b_mi, b_li, b_acc


@triton.jit
def window_and_store(q, k, v, o, lse, b_mi, b_li, b_acc, r_t, o_t, m_t, bos, T_n, t0, i_n, i_h, i_hq, W, T_lse,
                     qk2, HQ: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     IS_VARLEN: tl.constexpr, DOT: tl.constexpr, SPLIT: tl.constexpr):
    """Walks the window key blocks of the query rows t0 .. t0+BT from the online-softmax state
    (m, l, acc), then writes o and lse once."""
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    if W > 0:
        b_q = tl.load(q + (r_t[:, None] * HQ + i_hq) * K + o_k[None, :],
                      mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)                     # [BT, BK]
        p_k = k + (bos * H + i_h) * K
        p_v = v + (bos * H + i_h) * V
        lo, a, b0, b1, c, hi = window_ranges(t0, T_n, W, BT, BS)
        if SPLIT:
            for i_s in range(lo, a, BS):
                b_mi, b_li, b_acc = window_block(b_q, p_k, p_v, i_s, t0, T_n, W, b_mi, b_li, b_acc, qk2,
                                                 H * K, H * V, K, V, BT, BS, BK, BV, True, DOT)
            for i_s in range(b0, b1, BS):
                b_mi, b_li, b_acc = window_block(b_q, p_k, p_v, i_s, t0, T_n, W, b_mi, b_li, b_acc, qk2,
                                                 H * K, H * V, K, V, BT, BS, BK, BV, False, DOT)
            for i_s in range(c, hi, BS):
                b_mi, b_li, b_acc = window_block(b_q, p_k, p_v, i_s, t0, T_n, W, b_mi, b_li, b_acc, qk2,
                                                 H * K, H * V, K, V, BT, BS, BK, BV, True, DOT)
        else:
            for i_s in range(lo, hi, BS):
                b_mi, b_li, b_acc = window_block(b_q, p_k, p_v, i_s, t0, T_n, W, b_mi, b_li, b_acc, qk2,
                                                 H * K, H * V, K, V, BT, BS, BK, BV, True, DOT)
    b_ok = b_li > 0
    b_o = b_acc / tl.where(b_ok, b_li, 1.0)[:, None]
    b_lse = tl.where(b_ok, (b_mi + tl.log2(tl.where(b_ok, b_li, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(o + (r_t[:, None] * HQ + i_hq) * V + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_t[:, None] & (o_v < V)[None, :])
    if IS_VARLEN:
        p_lse = lse + i_hq * T_lse + bos + o_t
    else:
        p_lse = lse + (i_n * HQ + i_hq) * T_lse + o_t
    tl.store(p_lse, b_lse, mask=m_t)


@triton.jit
def nha_fwd_kernel(
    q, k, v, qs, ks, g, s, hk_c, hv_c, o, lse, unsafe, cu, chunk_off, block_map,
    scale, W, T_lse, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    HAS_SLOTS: tl.constexpr, HAS_S: tl.constexpr, IS_VARLEN: tl.constexpr, G_FLOOR: tl.constexpr,
    SAFE2: tl.constexpr, LOWP: tl.constexpr, DOT: tl.constexpr, SPLIT: tl.constexpr, PATH: tl.constexpr,
):
    """o [B*T,HQ,V], lse [B,HQ,T] (varlen: [1,HQ,T]) for BT query rows of one query head; with
    slots, launched twice (TWO_LAUNCHES, unsafe [blocks, HQ])."""
    i_b, i_hq = tl.program_id(0), tl.program_id(1)
    run = True
    if PATH == DECAY_PAIRWISE:
        run = tl.load(unsafe + i_b * HQ + i_hq) != 0
    if run:
        i_h = i_hq // G
        i_n, i_c, bos, T_n = block_span(block_map, cu, i_b)
        t0 = i_c * BT
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < T_n
        r_t = bos + o_t
        qk2 = scale * 1.4426950408889634        # logits in log2 units: exp2 instead of exp
        if HAS_SLOTS:
            i_state = (tl.load(chunk_off + i_n).to(tl.int64) + i_c) * H + i_h
            b_gc, b_glast, b_sx, b_g2 = load_gates(g, s, bos, T_n, i_c, i_h, W, tl.arange(0, BM), H, M, BT, HAS_S,
                                                   G_FLOOR)
            go = True
            if PATH == DECAY_FACTORED:
                go = flag_unsafe(unsafe, i_b * HQ + i_hq, b_gc, SAFE2)
            if go:
                b_mi, b_li, b_acc = slot_softmax(qs, ks, v, hk_c, hv_c, b_gc, b_g2, b_sx, r_t, m_t, bos, T_n, i_c, i_h,
                                                 i_hq, i_state, W, qk2, HQ, H, K, V, M, BT, BK, BV, BM,
                                                 SAFE2, LOWP, DOT, PATH)
                window_and_store(q, k, v, o, lse, b_mi, b_li, b_acc, r_t, o_t, m_t, bos, T_n, t0, i_n, i_h, i_hq,
                                 W, T_lse, qk2, HQ, H, K, V, BT, BS, BK, BV, IS_VARLEN, DOT, SPLIT)
        else:
            b_mi = tl.full([BT], float("-inf"), dtype=tl.float32)
            b_li = tl.zeros([BT], dtype=tl.float32)
            b_acc = tl.zeros([BT, BV], dtype=tl.float32)
            window_and_store(q, k, v, o, lse, b_mi, b_li, b_acc, r_t, o_t, m_t, bos, T_n, t0, i_n, i_h, i_hq,
                             W, T_lse, qk2, HQ, H, K, V, BT, BS, BK, BV, IS_VARLEN, DOT, SPLIT)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def plan(p, cu_seqlens, device, backward=False):
    """Sequence and chunk bookkeeping shared by forward and backward (``backward``: the chunk
    length of the backward, configs.chunk_rows).

    Returns (cu [N+1] int32, chunk_off [N] int32, block_map [NB,2] int32 of (sequence, chunk),
    NB blocks, R state rows, BT, the longest sequence's chunk count). Sequence n has
    NT_n = cdiv(T_n, BT) chunks and NT_n + 1 state rows from chunk_off[n] (row c: the state at
    the start of chunk c; row NT_n: after the last chunk), so every chunk has the state before
    and after it. Without cu_seqlens the B rows are N = B sequences of length T in the flattened
    [B*T] time axis, so one code path serves both layouts. The device tables are cached per
    (lengths, BT, device): building them means host-to-device copies, and torch synchronises the
    stream after each such copy, which left the GPU idle for the rest of the host's work on every
    call. Without cu_seqlens a call therefore never waits for the device.
    """
    BT = configs.chunk_rows(p.K, p.V, p.M, backward)
    if cu_seqlens is None:
        lens = (p.T,) * p.B
    else:
        lens = tuple(cu_seqlens.detach().to("cpu", torch.int64).diff().tolist())
    return _plan_tables(lens, BT, str(device)) + (BT, -(-max(lens, default=0) // BT))


@functools.lru_cache(maxsize=64)
def _plan_tables(lens: tuple, BT: int, device: str):
    starts, offs, blocks, rows = [0], [], [], 0
    for n, length in enumerate(lens):
        starts.append(starts[-1] + length)
        offs.append(rows)
        chunks = -(-length // BT)
        blocks.extend((n, c) for c in range(chunks))
        rows += chunks + 1
    cu = torch.tensor(starts, dtype=torch.int32, device=device)
    chunk_off = torch.tensor(offs, dtype=torch.int32, device=device)
    block_map = torch.tensor(blocks if blocks else [(0, 0)], dtype=torch.int32, device=device)
    return cu, chunk_off, block_map, len(blocks), rows


def narrow(p) -> bool:
    """Heads padded below configs.NARROW_HEAD_TILE: fp32 slot operands on IEEE dots."""
    return min(configs.pad(p.K), configs.pad(p.V)) < configs.NARROW_HEAD_TILE


def lowp(p) -> bool:
    """bf16 operands for the slot-branch dots of bfloat16 inputs. float16 inputs keep fp32
    operands (TF32 dots): fp16's range cannot hold the factored decays (up to 2^58, SAFE_LIMIT),
    and rounding them to bf16 instead cost fp16 three mantissa bits, 3-80x the error of the same
    computation done naively in float16 (SPEC section 5 allows 2x). Narrow heads (``narrow``)
    keep fp32 operands too."""
    return p.dtype == "bfloat16" and configs.BF16_SLOT_DOTS and not narrow(p)


def operand_mode(p, bf16: bool | None = None) -> int:
    """The kernels' LOWP: OP_BF16 where bf16 operands are chosen (``bf16``, default lowp(p)),
    else OP_FP32 for fp32 inputs and narrow heads (IEEE dots) and for float16 inputs on
    split-TF32 dots (configs.FP16_SLOT_DOTS "tf32x3"), OP_TF32 for the other 16-bit cases."""
    use_bf16 = lowp(p) if bf16 is None else bf16
    if use_bf16:
        return OP_BF16
    if p.dtype == "float32" or narrow(p) or (p.dtype == "float16" and configs.FP16_SLOT_DOTS == "tf32x3"):
        return OP_FP32
    return OP_TF32


def dot_precision(p) -> str:
    """fp32 inputs and narrow heads take IEEE fp32 dots (SPEC section 5: 1e-3 on GPU); float16
    inputs configs.FP16_SLOT_DOTS for their fp32 slot operands; bfloat16 inputs TF32 where a
    slot dot has fp32 operands. Dots of 16-bit operands (the window's) ignore it."""
    if p.dtype == "float32" or narrow(p):
        return "ieee"
    return configs.FP16_SLOT_DOTS if p.dtype == "float16" else "tf32"


def safe2() -> float:
    return configs.SAFE_LIMIT * LOG2E


def scan_grid(p, heads, backward=False) -> tuple:
    """(grid, BE) of nha_state_scan_kernel over ``heads`` heads: grid (N, heads, blocks of Hk +
    blocks of Hv) for BE = configs.scan_width elements per program."""
    BE = configs.scan_width(p.K, p.V, p.M, p.N * heads, backward)
    return (p.N, heads, triton.cdiv(p.K * p.M, BE) + triton.cdiv(p.M * p.V, BE)), BE


def state_pass(p, NB, longest, heads) -> str:
    """configs.STATE_PASS, or the pass configs.state_pass picks for this problem ("auto"), launched
    over ``heads`` heads."""
    if configs.STATE_PASS != "auto":
        return configs.STATE_PASS
    return configs.state_pass(p.N, heads, p.K, p.V, p.M, longest, NB)


def chunk_states(p, ks, v, g, s, hk0, hv0, cu, chunk_off, block_map, NB, R, BT, longest, store_final, low,
                 heads=None, backward=False):
    """Chunk states by the pass state_pass picks. Returns (hk_c [R,H,K,M], hv_c [R,H,M,V], hk, hv): the
    states at every chunk start and after each sequence's last chunk (rows as in plan), bfloat16
    when ``low`` (bf16 dots read them), fp32 otherwise; hk, hv (final) fp32 or None. ``heads``:
    only the first ``heads`` of the p.H heads of ks, v, g, s, hk0, hv0 (views that start at the
    wanted head; the backward's head groups), so H = heads in the shapes above. ``backward``:
    called by the backward (its scan tile, configs.scan_width)."""
    mode = operand_mode(p, low)
    dev = v.device
    K, V, M, N = p.K, p.V, p.M, p.N
    H = p.H if heads is None else heads
    if store_final and H != p.H:
        raise ValueError("chunk_states: final states are stored for all heads at once (heads=None)")
    sdt = torch.bfloat16 if low else torch.float32
    hk_c = torch.empty(R, H, K, M, dtype=sdt, device=dev)
    hv_c = torch.empty(R, H, M, V, dtype=sdt, device=dev)
    hk = torch.zeros(N, H, K, M, dtype=torch.float32, device=dev) if store_final else None
    hv = torch.zeros(N, H, M, V, dtype=torch.float32, device=dev) if store_final else None
    if M == 0 or N == 0:
        return hk_c, hv_c, hk, hv
    BMS = configs.state_slot_tile(M)
    common = dict(W=p.W, H=H, HS=p.H, K=K, V=V, M=M, BT=BT, BK=configs.pad(K), BV=configs.pad(V), BM=BMS,
                  HAS_S=s is not None, G_FLOOR=configs.G_FLOOR, SAFE2=safe2(), LOWP=mode, DOT=dot_precision(p))
    s_arg = s if s is not None else g
    h0k, h0v = (hk0, hv0) if hk0 is not None else (hk_c, hv_c)
    htk, htv = (hk, hv) if store_final else (hk_c, hv_c)
    if state_pass(p, NB, longest, H) == "walk":
        nha_fwd_state_kernel[(N, H, triton.cdiv(M, BMS))](
            ks, v, g, s_arg, h0k, h0v, hk_c, hv_c, htk, htv, cu, chunk_off,
            HAS_H0=hk0 is not None, STORE_FINAL=store_final, **common,
            PAIRS=configs.STATE_WALK_PAIRS is True or (configs.STATE_WALK_PAIRS == "bf16" and mode == OP_BF16),
            num_warps=configs.state_num_warps(K, V), num_stages=configs.state_num_stages(K, V),
        )
        return hk_c, hv_c, hk, hv
    a_c = torch.empty(R, H, M, dtype=torch.float32, device=dev)
    if NB > 0 and p.T > 0:
        BML = configs.state_local_slot_tile(M, backward)
        nha_fwd_state_local_kernel[(NB, H, triton.cdiv(M, BML))](
            ks, v, g, s_arg, hk_c, hv_c, a_c, cu, chunk_off, block_map, **{**common, "BM": BML},
            num_warps=configs.state_num_warps(K, V),
        )
    grid, BE = scan_grid(p, H, backward)
    nha_state_scan_kernel[grid](
        hk_c, hv_c, a_c, h0k, h0v, htk, htv, cu, chunk_off, H, p.H, K, V, M, BT, BE, configs.scan_rows(),
        hk0 is not None, store_final, False,
        num_warps=configs.scan_num_warps(),
    )
    return hk_c, hv_c, hk, hv


def flat(x, heads):
    """[B,T,heads,D] -> contiguous [B*T,heads,D] (a view when already contiguous)."""
    return x.contiguous().reshape(x.shape[0] * x.shape[1], heads, x.shape[-1])


def forward(p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu_seqlens):
    """o [B,T,HQ,V] (input dtype), lse [B,HQ,T] fp32, hk [N,H,K,M], hv [N,H,M,V] or None.
    ``s`` None means s = 1 - exp(g), computed inside the kernels."""
    B, T, HQ, H, K, V, M = p.B, p.T, p.HQ, p.H, p.K, p.V, p.M
    dev = q.device
    o = torch.empty(B, T, HQ, V, dtype=q.dtype, device=dev)
    lse = torch.empty(B, HQ, T, dtype=torch.float32, device=dev)
    cu, chunk_off, block_map, NB, R, BT, longest = plan(p, cu_seqlens, dev)
    qf, kf, vf, gf = flat(q, HQ), flat(k, H), flat(v, H), flat(g, H)
    sf = flat(s, H) if s is not None else None
    qsf = flat(q_slot, HQ) if q_slot is not None else qf
    ksf = flat(k_slot, H) if k_slot is not None else kf
    if hk0 is not None:
        hk0, hv0 = hk0.contiguous().float(), hv0.contiguous().float()
    low = lowp(p)
    hk_c, hv_c, hk, hv = chunk_states(p, ksf, vf, gf, sf, hk0, hv0, cu, chunk_off, block_map, NB, R, BT,
                                      longest, p.output_final_state, low)
    if NB > 0 and T > 0:
        unsafe = torch.empty(NB, HQ, dtype=torch.int8, device=dev) if M > 0 else lse
        # the arguments of both launches, worked out once (host time is GPU idle time in short calls)
        args = (qf, kf, vf, qsf, ksf, gf, sf if sf is not None else gf, hk_c, hv_c, o, lse, unsafe, cu, chunk_off,
                block_map, p.scale, p.W, T, HQ, H, p.G, K, V, M,
                BT, configs.window_rows(K, V), configs.pad(K), configs.pad(V), configs.slot_tile(M, low),
                M > 0, sf is not None, cu_seqlens is not None, configs.G_FLOOR, safe2(), operand_mode(p, low),
                dot_precision(p), configs.WINDOW_SPLIT)
        warps, stages = configs.num_warps(K, V, M), configs.num_stages(K, V, M, low)
        cap = configs.max_registers(K, V, M, low)
        for path in TWO_LAUNCHES if M > 0 else TWO_LAUNCHES[:1]:
            nha_fwd_kernel[(NB, HQ)](*args, path, num_warps=warps, num_stages=stages,
                                     maxnreg=cap if path == DECAY_FACTORED else None)
    return o, lse, hk, hv
