"""Triton forward of NHA: a chunk-state pass, then one fused attention kernel.

Shift trick (notes/MATH.md §1): the slot branch is gated slot attention over tokens shifted right
by ``W``; shifted position ``p`` carries token ``p - W`` (an identity token, gate 0 and no write,
for ``p < W``). The query at ``t`` reads the slot state after shifted tokens ``0..t`` and the
window ``(t-W, t]``::

    time  ->   0 1 2 ... t-W | t-W+1 ... t-1 t
               `-- slots ---' `----- window ---'   (one softmax over both)

Kernels (one sequence of the packed batch is ``bos .. eos``; chunks of ``BT`` shifted tokens):

* ``nha_fwd_state_kernel`` grid ``(N, H, cdiv(M, BM))``: sequential over chunks, writes the slot
  states at every chunk start, Hk_c [K,M] and Hv_c [M,V] (fp32), the chunk-local cumsum of the
  clamped shifted gates Gc [B*T,H,M] (fp32; every later kernel reads Gc, never g) and the final
  state.
* ``nha_fwd_kernel`` grid ``(blocks, HQ)``: one program per ``BT`` query rows (= one chunk) and
  query head. Slot logits = inter-chunk ``exp(Gc) * (Qs @ Hk_c)`` + intra-chunk decayed causal
  part; they seed an online softmax that then walks only the window key blocks that intersect
  ``(t-W, t]``. Nothing of size T*W or T*(M+W) ever exists; o and lse are written once.

The intra-chunk decay ``D[t,j,m] = exp(Gc[t,m] - Gc[j,m])`` (j <= t) is applied either factored,
``exp(Gc[t]) * exp(-Gc[j])`` inside two dots, when every Gc of the chunk lies in
``[-SAFE_LIMIT, SAFE_LIMIT]`` (no overflow possible), or explicitly pair by pair otherwise
(resets ``g = -inf`` and very strong decays; slower, never NaN). ``decay_apply``,
``decay_apply_t`` and ``decay_weights`` below are the three contractions both paths provide; the
backward reuses them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs


# ----------------------------------------------------------------------------------------------
# Intra-chunk decayed contractions, D[t,j,m] = exp(Gc[t,m] - Gc[j,m]) for j <= t, else 0.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _is_safe(b_gc, SAFE_LIMIT: tl.constexpr):
    return (tl.min(tl.min(b_gc, 1), 0) >= -SAFE_LIMIT) & (tl.max(tl.max(b_gc, 1), 0) <= SAFE_LIMIT)


@triton.jit
def decay_apply(b_a, b_x, b_gc, BT: tl.constexpr, SAFE_LIMIT: tl.constexpr, DOT: tl.constexpr):
    """R[t,m] = sum_{j<=t} A[t,j] X[j,m] D[t,j,m].   A [BT,BT], X and Gc [BT,BM] -> [BT,BM]."""
    o_r = tl.arange(0, BT)
    m_c = o_r[:, None] >= o_r[None, :]
    if _is_safe(b_gc, SAFE_LIMIT):
        b_r = tl.dot(tl.where(m_c, b_a, 0.0), b_x * tl.exp(-b_gc), input_precision=DOT) * tl.exp(b_gc)
    else:
        b_r = tl.zeros_like(b_x)
        for j in range(BT):
            b_aj = tl.sum(tl.where(o_r[None, :] == j, b_a, 0.0), 1)       # [BT] column j of A
            b_xj = tl.sum(tl.where(o_r[:, None] == j, b_x, 0.0), 0)       # [BM] row j of X
            b_gj = tl.sum(tl.where(o_r[:, None] == j, b_gc, 0.0), 0)      # [BM]
            b_d = tl.exp(tl.where(o_r[:, None] >= j, b_gc - b_gj[None, :], float("-inf")))
            b_r += b_aj[:, None] * b_xj[None, :] * b_d
    return b_r


@triton.jit
def decay_apply_t(b_a, b_y, b_gc, BT: tl.constexpr, SAFE_LIMIT: tl.constexpr, DOT: tl.constexpr):
    """R[j,m] = sum_{t>=j} A[t,j] Y[t,m] D[t,j,m].   A [BT,BT], Y and Gc [BT,BM] -> [BT,BM]."""
    o_r = tl.arange(0, BT)
    m_c = o_r[:, None] >= o_r[None, :]
    if _is_safe(b_gc, SAFE_LIMIT):
        b_r = tl.dot(tl.trans(tl.where(m_c, b_a, 0.0)), b_y * tl.exp(b_gc), input_precision=DOT) * tl.exp(-b_gc)
    else:
        b_r = tl.zeros_like(b_y)
        for j in range(BT):
            b_aj = tl.sum(tl.where(o_r[None, :] == j, b_a, 0.0), 1)       # [BT] column j of A
            b_gj = tl.sum(tl.where(o_r[:, None] == j, b_gc, 0.0), 0)      # [BM]
            b_d = tl.exp(tl.where(o_r[:, None] >= j, b_gc - b_gj[None, :], float("-inf")))
            b_rj = tl.sum(b_aj[:, None] * b_y * b_d, 0)                   # [BM]
            b_r += tl.where(o_r[:, None] == j, b_rj[None, :], 0.0)
    return b_r


@triton.jit
def decay_weights(b_y, b_x, b_gc, BT: tl.constexpr, SAFE_LIMIT: tl.constexpr, DOT: tl.constexpr):
    """P[t,j] = sum_m Y[t,m] X[j,m] D[t,j,m] for j <= t.   Y, X, Gc [BT,BM] -> [BT,BT]."""
    o_r = tl.arange(0, BT)
    m_c = o_r[:, None] >= o_r[None, :]
    if _is_safe(b_gc, SAFE_LIMIT):
        b_w = tl.dot(b_y * tl.exp(b_gc), tl.trans(b_x * tl.exp(-b_gc)), input_precision=DOT)
        b_w = tl.where(m_c, b_w, 0.0)
    else:
        b_w = tl.zeros([BT, BT], dtype=tl.float32)
        for j in range(BT):
            b_xj = tl.sum(tl.where(o_r[:, None] == j, b_x, 0.0), 0)       # [BM]
            b_gj = tl.sum(tl.where(o_r[:, None] == j, b_gc, 0.0), 0)      # [BM]
            b_d = tl.exp(tl.where(o_r[:, None] >= j, b_gc - b_gj[None, :], float("-inf")))
            b_wj = tl.sum(b_y * b_xj[None, :] * b_d, 1)                   # [BT]
            b_w += tl.where(o_r[None, :] == j, b_wj[:, None], 0.0)
    return b_w


# ----------------------------------------------------------------------------------------------
# Chunk states
# ----------------------------------------------------------------------------------------------
@triton.jit
def nha_fwd_state_kernel(
    ks, v, g, s, hk0, hv0, hk_c, hv_c, hk_t, hv_t, gc, cu, chunk_off,
    W, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, G_FLOOR: tl.constexpr, DOT: tl.constexpr,
):
    """Hk_c [NC,H,K,M], Hv_c [NC,H,M,V] at every chunk start; Gc [B*T,H,M]; hk_t, hv_t [N,H,..]."""
    i_n, i_h, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu + i_n).to(tl.int64)
    T_n = tl.load(cu + i_n + 1).to(tl.int64) - bos
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
        b_hk += tl.load(hk0 + (i_n * H + i_h) * K * M + o_km, mask=m_km, other=0.0).to(tl.float32)   # [BK, BM]
        b_hv += tl.load(hv0 + (i_n * H + i_h) * M * V + o_mv, mask=m_mv, other=0.0).to(tl.float32)   # [BM, BV]

    for i_c in range(0, tl.cdiv(T_n, BT)):
        i_state = (c0 + i_c) * H + i_h
        tl.store(hk_c + i_state * K * M + o_km, b_hk, mask=m_km)
        tl.store(hv_c + i_state * M * V + o_mv, b_hv, mask=m_mv)

        o_p = i_c * BT + tl.arange(0, BT)          # shifted positions of this chunk
        o_j = o_p - W                              # the tokens they carry
        m_j = (o_p < T_n) & (o_j >= 0)
        r_j = bos + o_j
        b_ks = tl.load(ks + (r_j[:, None] * H + i_h) * K + o_k[None, :],
                       mask=m_j[:, None] & m_k[None, :], other=0.0).to(tl.float32)         # [BT, BK]
        b_vs = tl.load(v + (r_j[:, None] * H + i_h) * V + o_v[None, :],
                       mask=m_j[:, None] & m_v[None, :], other=0.0).to(tl.float32)         # [BT, BV]
        m_jm = m_j[:, None] & m_m[None, :]
        b_g = tl.load(g + (r_j[:, None] * H + i_h) * M + o_m[None, :], mask=m_jm, other=0.0).to(tl.float32)
        b_g = tl.maximum(b_g, G_FLOOR)                                                       # [BT, BM]
        b_s = tl.load(s + (r_j[:, None] * H + i_h) * M + o_m[None, :], mask=m_jm, other=0.0).to(tl.float32)
        b_gc = tl.cumsum(b_g, 0)
        tl.store(gc + ((bos + o_p)[:, None] * H + i_h) * M + o_m[None, :], b_gc,
                 mask=(o_p < T_n)[:, None] & m_m[None, :])
        b_glast = tl.sum(b_g, 0)                                                             # [BM]
        # exp(Gc[last] - Gc[j]) <= 1: the decay from token j to the chunk end
        b_w = b_s * tl.exp(b_glast[None, :] - b_gc)
        b_hk = b_hk * tl.exp(b_glast)[None, :] + tl.dot(tl.trans(b_ks), b_w, input_precision=DOT)
        b_hv = b_hv * tl.exp(b_glast)[:, None] + tl.dot(tl.trans(b_w), b_vs, input_precision=DOT)

    if STORE_FINAL:
        tl.store(hk_t + (i_n * H + i_h) * K * M + o_km, b_hk, mask=m_km)
        tl.store(hv_t + (i_n * H + i_h) * M * V + o_mv, b_hv, mask=m_mv)


# ----------------------------------------------------------------------------------------------
# Slot logits of one chunk (shared with the backward)
# ----------------------------------------------------------------------------------------------
@triton.jit
def load_slot_chunk(ks, v, s, gc, hk_c, hv_c, bos, T_n, i_c, c0, i_h, W,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr):
    """Per-chunk slot operands: Ks [BT,BK], Vs [BT,BV], S [BT,BM] (shifted, fp32), Gc [BT,BM],
    Hk_c [BK,BM], Hv_c [BM,BV]."""
    o_p = i_c * BT + tl.arange(0, BT)
    o_j = o_p - W
    m_p = o_p < T_n
    m_j = m_p & (o_j >= 0)
    r_j = bos + o_j
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_m = tl.arange(0, BM)
    m_k, m_v, m_m = o_k < K, o_v < V, o_m < M
    b_ks = tl.load(ks + (r_j[:, None] * H + i_h) * K + o_k[None, :],
                   mask=m_j[:, None] & m_k[None, :], other=0.0).to(tl.float32)            # [BT, BK]
    b_vs = tl.load(v + (r_j[:, None] * H + i_h) * V + o_v[None, :],
                   mask=m_j[:, None] & m_v[None, :], other=0.0).to(tl.float32)            # [BT, BV]
    b_sx = tl.load(s + (r_j[:, None] * H + i_h) * M + o_m[None, :],
                   mask=m_j[:, None] & m_m[None, :], other=0.0).to(tl.float32)            # [BT, BM]
    b_gc = tl.load(gc + ((bos + o_p)[:, None] * H + i_h) * M + o_m[None, :],
                   mask=m_p[:, None] & m_m[None, :], other=0.0)                           # [BT, BM]
    # rows past the sequence end repeat the lowest cumsum, so no decay from a real token to them
    # exceeds 1 (their products are discarded, but inf * 0 would make NaN inside the tile)
    b_gc = tl.where(m_p[:, None], b_gc, tl.min(b_gc, 0)[None, :])
    i_state = (c0 + i_c) * H + i_h
    b_hk = tl.load(hk_c + i_state * K * M + o_k[:, None] * M + o_m[None, :],
                   mask=m_k[:, None] & m_m[None, :], other=0.0)                           # [BK, BM]
    b_hv = tl.load(hv_c + i_state * M * V + o_m[:, None] * V + o_v[None, :],
                   mask=m_m[:, None] & m_v[None, :], other=0.0)                           # [BM, BV]
    return b_ks, b_vs, b_sx, b_gc, b_hk, b_hv


@triton.jit
def nha_fwd_kernel(
    q, k, v, qs, ks, s, gc, hk_c, hv_c, o, lse, cu, chunk_off, block_map,
    scale, W, T_lse, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    HAS_SLOTS: tl.constexpr, IS_VARLEN: tl.constexpr, SAFE_LIMIT: tl.constexpr, DOT: tl.constexpr,
):
    """o [B*T,HQ,V], lse [B,HQ,T] (varlen: [1,HQ,T]) for BT query rows of one query head."""
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
    b_q = tl.load(q + (r_t[:, None] * HQ + i_hq) * K + o_k[None, :],
                  mask=m_t[:, None] & m_k[None, :], other=0.0)                             # [BT, BK]

    if HAS_SLOTS:
        c0 = tl.load(chunk_off + i_n).to(tl.int64)
        b_ks, b_vs, b_sx, b_gc, b_hk, b_hv = load_slot_chunk(
            ks, v, s, gc, hk_c, hv_c, bos, T_n, i_c, c0, i_h, W, H, K, V, M, BT, BK, BV, BM)
        b_qs = tl.load(qs + (r_t[:, None] * HQ + i_hq) * K + o_k[None, :],
                       mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)         # [BT, BK]
        b_a = tl.dot(b_qs, tl.trans(b_ks), input_precision=DOT)                            # [BT, BT]
        b_ls = tl.dot(b_qs, b_hk, input_precision=DOT) * tl.exp(b_gc)
        b_ls = (b_ls + decay_apply(b_a, b_sx, b_gc, BT, SAFE_LIMIT, DOT)) * scale            # [BT, BM]
        b_ls = tl.where(m_m[None, :], b_ls, float("-inf"))
        b_mi = tl.max(b_ls, 1)
        b_p = tl.exp(b_ls - b_mi[:, None])
        b_li = tl.sum(b_p, 1)
        b_acc = tl.dot(b_p * tl.exp(b_gc), b_hv, input_precision=DOT)
        b_acc += tl.dot(decay_weights(b_p, b_sx, b_gc, BT, SAFE_LIMIT, DOT), b_vs, input_precision=DOT)
    else:
        b_mi = tl.full([BT], float("-inf"), dtype=tl.float32)
        b_li = tl.zeros([BT], dtype=tl.float32)
        b_acc = tl.zeros([BT, BV], dtype=tl.float32)

    if W > 0:
        # only key blocks that meet the band (t-W, t] of some row of this block
        lo = tl.maximum(i_c * BT - W + 1, 0)
        hi = tl.minimum(i_c * BT + BT, T_n)
        for i_s in range((lo // BS) * BS, hi, BS):
            o_s = i_s + tl.arange(0, BS)
            m_s = o_s < T_n
            r_s = bos + o_s
            b_k = tl.load(k + (r_s[:, None] * H + i_h) * K + o_k[None, :],
                          mask=m_s[:, None] & m_k[None, :], other=0.0)                     # [BS, BK]
            b_v = tl.load(v + (r_s[:, None] * H + i_h) * V + o_v[None, :],
                          mask=m_s[:, None] & m_v[None, :], other=0.0)                     # [BS, BV]
            b_sc = tl.dot(b_q, tl.trans(b_k), input_precision=DOT) * scale                 # [BT, BS]
            m_band = (o_s[None, :] <= o_t[:, None]) & (o_s[None, :] > o_t[:, None] - W) & m_s[None, :]
            b_sc = tl.where(m_band, b_sc, float("-inf"))
            b_mn = tl.maximum(b_mi, tl.max(b_sc, 1))
            b_mn = tl.where(b_mn == float("-inf"), 0.0, b_mn)   # rows with nothing seen yet
            b_alpha = tl.exp(b_mi - b_mn)
            b_pw = tl.exp(b_sc - b_mn[:, None])
            b_li = b_li * b_alpha + tl.sum(b_pw, 1)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_pw.to(b_v.dtype), b_v, input_precision=DOT)
            b_mi = b_mn

    b_ok = b_li > 0
    b_o = b_acc / tl.where(b_ok, b_li, 1.0)[:, None]
    b_lse = tl.where(b_ok, b_mi + tl.log(tl.where(b_ok, b_li, 1.0)), float("-inf"))
    tl.store(o + (r_t[:, None] * HQ + i_hq) * V + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])
    if IS_VARLEN:
        p_lse = lse + i_hq * T_lse + bos + o_t
    else:
        p_lse = lse + (i_n * HQ + i_hq) * T_lse + o_t
    tl.store(p_lse, b_lse, mask=m_t)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def plan(p, cu_seqlens, device):
    """Sequence and chunk bookkeeping shared by forward and backward.

    Returns (cu [N+1] int32, chunk_off [N] int32, block_map [NB,2] int32 of (sequence, chunk),
    NC total chunks, BT). Without cu_seqlens the B rows are N = B sequences of length T in the
    flattened [B*T] time axis, so one code path serves both layouts.
    """
    BT = configs.chunk_rows(p.K, p.V, p.M)
    if cu_seqlens is None:
        lens = [p.T] * p.B
    else:
        host = cu_seqlens.detach().to("cpu", torch.int64).tolist()
        lens = [b - a for a, b in zip(host[:-1], host[1:])]
    starts, offs, blocks, nc = [0], [], [], 0
    for n, length in enumerate(lens):
        starts.append(starts[-1] + length)
        offs.append(nc)
        chunks = -(-length // BT)
        blocks.extend((n, c) for c in range(chunks))
        nc += chunks
    cu = torch.tensor(starts, dtype=torch.int32, device=device)
    chunk_off = torch.tensor(offs, dtype=torch.int32, device=device)
    block_map = torch.tensor(blocks if blocks else [(0, 0)], dtype=torch.int32, device=device)
    return cu, chunk_off, block_map, len(blocks), nc, BT


def dot_precision(p) -> str:
    """fp32 inputs need IEEE fp32 dots (SPEC §5: 1e-3 on GPU); 16-bit inputs use TF32 for the fp32
    slot dots, well inside their 2e-2 (and the default for 16-bit operands anyway)."""
    return "ieee" if p.dtype == "float32" else "tf32"


def chunk_states(p, ks, v, g, s, hk0, hv0, cu, chunk_off, NC, BT, store_final):
    """Run the chunk-state kernel. Returns (hk_c [NC,H,K,M], hv_c [NC,H,M,V], gc [B*T,H,M], hk, hv)."""
    dev = v.device
    K, V, M, H, N = p.K, p.V, p.M, p.H, p.N
    hk_c = torch.empty(NC, H, K, M, dtype=torch.float32, device=dev)
    hv_c = torch.empty(NC, H, M, V, dtype=torch.float32, device=dev)
    gc = torch.empty(p.B * p.T, H, M, dtype=torch.float32, device=dev)
    hk = torch.zeros(N, H, K, M, dtype=torch.float32, device=dev) if store_final else hk_c
    hv = torch.zeros(N, H, M, V, dtype=torch.float32, device=dev) if store_final else hv_c
    if M > 0 and p.T > 0:
        BM = configs.state_slot_tile(M)
        grid = (N, H, triton.cdiv(M, BM))
        nha_fwd_state_kernel[grid](
            ks, v, g, s, hk0 if hk0 is not None else hk_c, hv0 if hv0 is not None else hv_c,
            hk_c, hv_c, hk, hv, gc, cu, chunk_off,
            p.W, H, K, V, M, BT, configs.pad(K), configs.pad(V), BM,
            hk0 is not None, store_final, configs.G_FLOOR, dot_precision(p),
            num_warps=configs.num_warps(K, V, BM),
        )
    elif store_final and hk0 is not None:
        hk.copy_(hk0)
        hv.copy_(hv0)
    return hk_c, hv_c, gc, (hk if store_final else None), (hv if store_final else None)


def flat(x, heads):
    """[B,T,heads,D] -> contiguous [B*T,heads,D] (a view when already contiguous)."""
    return x.contiguous().reshape(x.shape[0] * x.shape[1], heads, x.shape[-1])


def forward(p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu_seqlens):
    """o [B,T,HQ,V] (input dtype), lse [B,HQ,T] fp32, hk [N,H,K,M], hv [N,H,M,V] or None."""
    B, T, HQ, H, K, V, M = p.B, p.T, p.HQ, p.H, p.K, p.V, p.M
    dev = q.device
    o = torch.empty(B, T, HQ, V, dtype=q.dtype, device=dev)
    lse = torch.empty(B, HQ, T, dtype=torch.float32, device=dev)
    cu, chunk_off, block_map, NB, NC, BT = plan(p, cu_seqlens, dev)
    qf, kf, vf, gf, sf = flat(q, HQ), flat(k, H), flat(v, H), flat(g, H), flat(s, H)
    qsf = flat(q_slot, HQ) if q_slot is not None else qf
    ksf = flat(k_slot, H) if k_slot is not None else kf
    if hk0 is not None:
        hk0, hv0 = hk0.contiguous().float(), hv0.contiguous().float()
    hk_c, hv_c, gc, hk, hv = chunk_states(p, ksf, vf, gf, sf, hk0, hv0, cu, chunk_off, NC, BT,
                                          p.output_final_state)
    if NB > 0 and T > 0:
        nha_fwd_kernel[(NB, HQ)](
            qf, kf, vf, qsf, ksf, sf, gc, hk_c, hv_c, o, lse, cu, chunk_off, block_map,
            p.scale, p.W, T, HQ, H, p.G, K, V, M,
            BT, configs.window_rows(K, V), configs.pad(K), configs.pad(V), configs.pad(M),
            M > 0, cu_seqlens is not None, configs.SAFE_LIMIT, dot_precision(p),
            num_warps=configs.num_warps(K, V, M),
        )
    return o, lse, hk, hv
