"""Capability table and tile sizes of the CuPy backend (raw CUDA C++ kernels via cupy.RawModule).

Tile names match the Triton backend: ``BT`` tokens per chunk (= queries per block; the slot
recurrence is chunked on the same grid), ``BS`` keys per window tile, ``BK`` / ``BV`` / ``BM``
key rows / value columns / slot columns handled per pass of the slot recurrence. In the kernels
``BM = BK = BV = NT / LANES`` (32): ``LANES`` lanes of a warp share one state column, so the
reduction along it is three warp shuffles and needs no barrier.
"""
from nha_core.registry import ALL_FEATURES

NAME = "cupy"
PRIORITY = 20  # after triton (its tensor-core kernels are faster), before numpy (CPU only)
DEVICES = ("cuda",)
# bfloat16 arrives as a uint16 CuPy array (CuPy has no bf16 dtype); the kernels read __nv_bfloat16.
DTYPES = ("float16", "bfloat16", "float32")
MAX_HEAD_DIM = 256  # one state row / column lives in RMAX = 256 / LANES = 32 registers per thread;
                    # decode keeps one value column per thread (V <= NT)
MAX_SLOTS = 256     # same register bound for a row of Hk / a column of Hv; decode's L_s[256]
FEATURES = ALL_FEATURES

NT = 256     # threads per block (kernels: #define NT 256)
LANES = 8    # lanes sharing one state column (kernels: #define LANES 8)
BM = BK = BV = NT // LANES

# H100 / H200 allow up to 227 KiB of dynamic shared memory per block (opt-in above 48 KiB).
SMEM_LIMIT = 227 * 1024
BT_CHOICES = (64, 32, 16)  # largest first: fewer chunk states and fewer window-tile reloads

# IN_T of the kernels for each problem dtype, and the CuPy dtype that carries it.
CUDA_TYPE = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
ARRAY_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}


def rmax(p) -> int:
    """Registers per thread for one state row/column: ceil(max(K, V, M) / LANES), rounded up to a
    power of two so only six kernel variants exist; 32 at the 256 limit (ptxas: no spills at 8)."""
    need = max(1, -(-max(p.K, p.V, p.M) // LANES))
    r = 1
    while r < need:
        r *= 2
    return r


def smem_floats(kernel: str, BT: int, K: int, V: int, M: int) -> int:
    """Dynamic shared memory (in floats) of each kernel; layouts are listed in the .cu files."""
    BS = BT
    if kernel == "fwd_main":
        return 3 * BT * M + BT * K + BS * (K + V) + BT * BS + BT * V + 3 * BT
    if kernel == "fwd_main_tc":  # padded rows (PADF = 8 floats), see forward.cu
        P = 8
        return (2 * BT * (K + P) + 2 * BT * (V + P) + 3 * BT * (M + P)
                + max(K * (M + P), M * (V + P)) + BT * (BT + P) + 2 * BT)
    if kernel == "fwd_state_tc":
        D = max(K, V)
        return BMC * (D + 8) + BT * (D + 8) + BT * (BMC + 8) + BMC + BT * BMC
    if kernel == "bwd_q":
        return 4 * BT * M + 2 * BT * K + BS * (K + V) + BT * V + BT * BS + 2 * BT
    if kernel == "bwd_slot_kv":
        return 4 * BT * M + BT * (K + V)
    if kernel == "bwd_window_kv":
        return 3 * BT * (K + V) + 2 * BT * BT + 2 * BT
    raise ValueError(kernel)


# Register-tile forward (forward.cu nha_fwd_state_mma + nha_fwd_main_mma): bfloat16 inputs, K, V, M
# multiples of 16 up to MMA_MAX_DIM, chunks of MMA_BT = 4 warps x 16 query rows, MMA_THREADS threads;
# the state walk takes MMA_STATE_COLUMNS slot columns of both Hk and Hv per block. Off: the WMMA kernels
# (nha_fwd_state_tc + nha_fwd_main_tc) for every chunk.
FWD_MMA = True
MMA_BT = 64
MMA_THREADS = 128
MMA_STATE_COLUMNS = 16  # forward.cu SC
# forward.cu SST: chunks in the state walk's cp.async ring (SST - 1 ahead). H200, gpu-a (2026-12-04):
# walk 0.252 ms with 2 stages (45 KB of shared memory, all 512 blocks resident) against 0.407 with 3.
MMA_STATE_STAGES = 2
# How the register-tile path computes the chunk states: "walk" (nha_fwd_state_mma: one block per
# (sequence, head, slot tile of both Hk and Hv) walks the chunks in order), "scan" (nha_fwd_state_local_mma:
# every chunk's own update at once, then nha_fwd_state_scan chains them per state element) or
# "auto" (state_pass below picks one per call).
MMA_STATE_PASS = "auto"
MMA_FAST_EXP = True     # forward.cu FAST_EXP: softmax weights by ex2.approx (Triton's tl.exp2), else exp2f
# forward.cu FAST_GATES: the gate math of the register-tile kernels off expm1f / exp2f (s derived as the
# Triton backend does, decay factors that are rounded to bf16 by ex2.approx). H200 (2026-12-04,
# `gpu_session.sh cupy-gates`, the CuPy forward GPU tests passing under it): gpu-a forward 1.369 ->
# 1.294 ms (walk 0.400 -> 0.374, main 0.965 -> 0.914), gpu-c 1.384 -> 1.326; outputs within 2e-5
# of the exact gate math's.
MMA_FAST_GATES = True
MMA_MAX_DIM = 128  # ptxas (sm_90, nvcc 13.0): no spills up to K = V = M = 128 (255 registers; 159 at 64)


def use_mma(p) -> bool:
    """The register-tile kernels for this problem: bfloat16, K, V, M multiples of 16 up to MMA_MAX_DIM,
    and nha_fwd_main at MMA_BT (for the chunks whose decays do not factor) fits shared memory."""
    return (FWD_MMA and use_tc(p) and p.dtype == "bfloat16"
            and all(d % 16 == 0 and d <= MMA_MAX_DIM for d in (p.K, p.V, p.M))
            and max(mma_smem_bytes(p.K, p.V, p.M), state_mma_smem_bytes(p.K, p.V)) <= SMEM_LIMIT
            and 4 * smem_floats("fwd_main", MMA_BT, p.K, p.V, p.M) <= SMEM_LIMIT)


def state_pass(N: int, H: int, K: int, V: int, M: int, longest: int, chunks: int, sms: int) -> str:
    """MMA_STATE_PASS, or under "auto" the faster pass by a cost model fitted on an H200 (132 SMs;
    2026-12-04, bf16, M = 64, per-kernel times of asv_bench/tune_results/2026-12-04-h200-eleventh,
    call 4):

    * walk: a chain of ``longest`` dependent chunk steps of ~0.89 + 0.0125 max(K, V) us (gpu-b:
      512 steps in 0.867 ms, gpu-c at K = V = 128: 256 in 0.638) while its N H M / 16 blocks fit
      ~1.66 per SM, longer past that (gpu-a: 512 blocks, 64 steps, 0.252 ms);
    * scan: bandwidth-bound, ~0.45 ms per 2^26 state elements over all chunks (gpu-a, gpu-b, gpu-c
      each hold 2^26: 0.444, 0.470, 0.426 ms for both kernels), plus ~5 us for its second launch.
    """
    if MMA_STATE_PASS != "auto":
        return MMA_STATE_PASS
    blocks = N * H * -(-M // MMA_STATE_COLUMNS)
    walk_ms = longest * 1e-3 * (0.89 + 0.0125 * max(K, V)) * max(1.0, blocks / (1.66 * sms))
    scan_ms = 0.005 + 0.447 * chunks * H * (K + V) * M / 2**26
    return "walk" if walk_ms <= scan_ms else "scan"


def state_mma_smem_bytes(K: int, V: int, stages: int | None = None) -> int:
    """Dynamic shared memory of nha_fwd_state_mma (MMA_STATE_STAGES stages) or nha_fwd_state_local_mma
    (stages=1). A stage: the shifted k_slot and v rows [BT, K + 8] and [BT, V + 8], and the block's
    gates and write weights [BT, MMA_STATE_COLUMNS], 2 bytes each."""
    stages = MMA_STATE_STAGES if stages is None else stages
    return stages * 2 * MMA_BT * (K + 8 + V + 8 + 2 * MMA_STATE_COLUMNS)


def mma_smem_bytes(K: int, V: int, M: int) -> int:
    """Dynamic shared memory of nha_fwd_main_mma (layout in forward.cu): the q tile, then the larger of
    the slot operands (bfloat16 tiles, Gc in float) and the two window buffers. The kernel's static
    s_tot (at most MMA_THREADS floats: 512 bytes) comes on top."""
    BT, LK, LV, LM = MMA_BT, K + 8, V + 8, M + 8
    slots = 2 * (BT * LK + BT * LV + K * LM + M * LV + BT * LM) + 4 * BT * (M + 4)
    window = 2 * 2 * BT * (LK + LV)
    return 2 * BT * LK + max(slots, window)


BMC = 16  # slot columns per block of the tensor-core chunk-state kernel (forward.cu nha_fwd_state_tc):
          # one m16n16 fragment row; 2 * M / BMC blocks per (sequence, head) fill the chip better
          # than whole-state blocks on the serial chunk walk


def use_tc(p) -> bool:
    """Tensor-core forward (forward.cu ``*_tc`` kernels): 16-bit inputs (fp32 keeps exact CUDA-core
    math, tf32 products would cost ~3e-4 of its 1e-3 budget), K, V, M multiples of 16 (WMMA tiles),
    M > 0 and a chunk that fits shared memory."""
    from . import mma_include

    return (mma_include() is not None and p.dtype in ("float16", "bfloat16") and p.M > 0 and p.K % 16 == 0 and p.V % 16 == 0
            and p.M % 16 == 0 and pick_bt_tc(p) is not None)


def pick_bt_tc(p):
    """Largest chunk whose tensor-core kernels fit shared memory (NHA_CUPY_BT_TC forces one, for tuning)."""
    import os

    forced = os.environ.get("NHA_CUPY_BT_TC")
    for BT in (int(forced),) if forced else BT_CHOICES:
        if all(4 * smem_floats(name, BT, p.K, p.V, p.M) <= SMEM_LIMIT for name in ("fwd_main_tc", "fwd_state_tc")):
            return BT
    return None


def pick_bt(p) -> int:
    """Largest chunk that fits shared memory for every block kernel of ``p.mode``: the forward keeps
    alpha, s and logits of BT rows ([BT, M] each) plus the q, key, value and output tiles."""
    kernels = ("fwd_main",) if p.mode == "forward" else ("bwd_q", "bwd_slot_kv", "bwd_window_kv")
    for BT in BT_CHOICES:
        if all(4 * smem_floats(name, BT, p.K, p.V, p.M) <= SMEM_LIMIT for name in kernels):
            return BT
    raise NotImplementedError(f"cupy: no chunk size fits shared memory for K={p.K} V={p.V} M={p.M}")


# Decode (decode.cu). DECODE_VARIANT picks the kernel set, read at every call so a timing script can
# flip it between calls:
#   "split"     flash-decoding: window blocks per (sequence, KV head, window split) serve the whole GQA
#               group, one slot block per (sequence, KV head) evicts and reads the slots, a merge kernel
#               combines the partials by their log-sum-exps (default)
#   "per_head"  the first version: one block per query head re-reads its KV head's window (3.54 ms at
#               the spec decode shape on an H200, see PERF_NOTES.md)
DECODE_VARIANT = "split"
DECODE_SPLITS = None  # None: decode_splits() picks; an int forces the window splits (for timing sweeps)
DECODE_LANES = 16  # lanes per key / value row (decode.cu LR): 16 x 16-byte loads cover a bf16 row of 128
DECODE_TR = 2  # rows per lane group per step (decode.cu TR)
DECODE_BR = (NT // DECODE_LANES) * DECODE_TR  # ring rows per window-block step (decode.cu BR = NS * TR)
# Steps of window rows in flight through a cp.async ring in shared memory (decode.cu STG; 0: the next
# step is prefetched in registers, one step in flight). At the spec decode shape nha_decode_window moved
# 2.3 TB/s (0.230 ms, H200, 2026-12-02) with the register prefetch: 64 B in flight per thread, 32 KiB
# per SM, and the 128-register cap (2 blocks of 256 threads) leaves no room for more (TR = 4 spilled
# 420 B, ptxas). The ring holds STG - 1 steps in flight without registers (3: 48 KiB per block):
# nha_decode_window 0.2042 ms against 0.2285 / 0.2279 with the register prefetch before and after
# it (same run, H200, 2026-12-03, asv_bench/tune_results/2026-12-03-h200/decode-stages.log), the
# GPU suite's decode tests passing under it (test_decode[split-stages3]).
DECODE_STAGES = 3
DECODE_BG_MAX = 4  # query heads per window block at most (decode.cu BG); larger groups take several blocks
DECODE_REG_BUDGET = 80  # registers for 2 * BG * EL (queries, accumulator) + 16 * DC (rows in flight):
                        # ptxas keeps nha_decode_window at <= 128 registers without spills (2 blocks of
                        # NT threads per SM under __launch_bounds__(NT, 2)); measured with -Xptxas -v
DECODE_BLOCKS_PER_SM = 8  # window blocks wanted per SM: 2 resident x 4 waves, so the last wave's tail
                          # and the shorter slot blocks leave little of the chip idle
DECODE_MIN_SPLIT_ROWS = 256  # fewer ring rows per split and the per-block fixed work (query loads,
                             # stream merge, partial writes) outweighs the rows streamed
DECODE_MAX_SPLITS = 64  # partials the merge kernel reads per query head


def decode_tiles(G: int, K: int, V: int, cache_itemsize: int):
    """(BG, DC) of nha_decode_window: DC 16-byte chunks per lane cover a key / value row with
    DECODE_LANES lanes (rounded to a power of two: few variants); BG query heads per block, a power of
    two >= G where registers allow (DECODE_REG_BUDGET), else fewer and the group takes several blocks."""
    vec = 16 // cache_itemsize
    chunks = -(-(-(-max(K, V) // vec)) // DECODE_LANES)
    DC = 1
    while DC < chunks:
        DC *= 2
    EL = DC * vec
    BG = 1
    while BG < min(G, DECODE_BG_MAX) and 2 * (2 * BG) * EL + 16 * DC <= DECODE_REG_BUDGET:
        BG *= 2
    return BG, DC


def override(text: str) -> dict:
    """Set settings of this module from ``"NAME=VALUE;..."`` (nha_core.settings.override)."""
    from nha_core.settings import override as apply

    return apply(globals(), text, "backends/cupy/configs.py")


def decode_stages(DC: int) -> int:
    """decode.cu STG: DECODE_STAGES, fewer where the ring [STG, TR, DC, 2, NT] of 16-byte chunks would
    pass the 48 KiB of static shared memory, 0 (register prefetch) below 2."""
    st = DECODE_STAGES
    while st >= 2 and st * DECODE_TR * DC * 2 * NT * 16 > 48 * 1024:
        st -= 1
    return st if st >= 2 else 0


def decode_splits(N: int, H: int, QB: int, W: int, sm_count: int):
    """(S, RS): window splits per (sequence, KV head, query chunk) and ring rows per split (a multiple
    of DECODE_BR; split j reads rows j*RS .. j*RS+RS-1). Enough window blocks to give every SM
    DECODE_BLOCKS_PER_SM of them (sm_count is read from the device: 132 on an H200), but splits of at
    least DECODE_MIN_SPLIT_ROWS rows. S = 0 when W <= 1: the window then holds only the new token,
    which the merge kernel reads from the inputs."""
    if W <= 1:
        return 0, 0
    if DECODE_SPLITS is not None:
        S = int(DECODE_SPLITS)
    else:
        S = -(-DECODE_BLOCKS_PER_SM * sm_count // max(1, N * H * QB))
        S = min(S, -(-W // DECODE_MIN_SPLIT_ROWS))
    S = max(1, min(S, DECODE_MAX_SPLITS, -(-W // DECODE_BR)))
    RS = -(-(-(-W // S)) // DECODE_BR) * DECODE_BR
    return -(-W // RS), RS
