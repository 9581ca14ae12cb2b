"""Capability table and tile sizes of the Triton backend.

Tuning is data with reasons: every number below names the limit it respects. Tile names are the
ones the kernels use (``BT`` query rows = slot chunk, ``BS`` window key rows, ``BK``/``BV``/``BM``
the padded key, value and slot dims).
"""
from nha_core.registry import ALL_FEATURES

NAME = "triton"
PRIORITY = 10  # the fastest path on CUDA: `auto` tries it first for GPU arrays
DEVICES = ("cuda", "cpu")  # "cpu" only under TRITON_INTERPRET=1 (see devices_here)
DTYPES = ("float16", "bfloat16", "float32")
# K, V <= 256: the main kernel keeps a [BT, BK] query tile, a [BK, BM] slot-key state and a
# [BT, BV] accumulator in registers; past 256 they spill even with BT = 16.
MAX_HEAD_DIM = 256
# M <= 256: the chunk-state kernel tiles M (BM_STATE below); the main kernels hold [BT, BM] slot
# logits and a [BK, BM] state tile, which past 256 no longer fits registers.
MAX_SLOTS = 256
FEATURES = ALL_FEATURES

# Gates are clamped from below at G_FLOOR before any cumsum: exp(-200) is exactly 0 in float32
# (it underflows below the smallest subnormal, ~exp(-103)), so the clamp changes no result, but it
# keeps every cumsum finite, so segment sums are differences of finite numbers (never -inf - -inf).
G_FLOOR = -200.0
# The intra-chunk slot terms use the factored decay exp(Gc[t]) * exp(-Gc[j]) (two dots on tensor
# cores) when every chunk cumsum lies in [-SAFE_LIMIT, SAFE_LIMIT]: exp(40) ~ 2e17 leaves 1e21 of
# float32 headroom (max ~3e38) for sums of products of logits and weights. Otherwise the kernel
# takes the explicit per-pair path (slower, always finite).
SAFE_LIMIT = 40.0


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pad(n: int) -> int:
    """Block size for a dim of length n: a power of two, >= 16 (tl.dot's minimum tile side)."""
    return max(16, next_pow2(n))


def chunk_rows(K: int, V: int, M: int) -> int:
    """BT: query rows per program = slot-chunk length (both kernels share the chunk boundaries).

    64 rows feed the H100 tensor cores well (one 64-row wgmma) while the slot tiles
    [BT, BM] x 4 (logits, cumsum, weights, decays) plus [BK, BM] + [BM, BV] fp32 states stay
    within 255 registers per thread at 4 warps for K, V, M <= 64. Larger dims halve BT to keep
    the same register budget.
    """
    big = max(pad(K), pad(V), pad(M))
    if big <= 64:
        return 64
    if big <= 128:
        return 32
    return 16


def window_rows(K: int, V: int) -> int:
    """BS: window key rows per inner step: 64 matches FlexAttention's block (the peer we are
    timed against) and keeps the [BS, BK] + [BS, BV] bf16 tiles at 32 KiB of shared memory for
    K = V = 128; 32 rows past that (K, V = 256) to stay inside 228 KiB with 2 pipeline stages."""
    return 64 if max(pad(K), pad(V)) <= 128 else 32


def num_warps(K: int, V: int, M: int) -> int:
    """4 warps while the register tiles above fit; 8 for wide heads so nothing spills."""
    return 4 if max(pad(K), pad(V), pad(M)) <= 64 else 8


def state_slot_tile(M: int) -> int:
    """BM for the sequential chunk-state kernels: slots are independent columns of Hk and rows of
    Hv, so the grid splits M into tiles of <= 64 (more programs in flight: B*H alone is ~128 at
    the benchmark shapes, below the 132 SMs of an H100) and the [BK, BM] + [BM, BV] fp32 states
    stay <= 32K floats at K = V = 256."""
    return min(pad(M), 64)


def decode_window_rows(K: int, V: int) -> int:
    """Ring-buffer rows per decode step: 64 rows of K = V = 128 bf16 are 32 KiB per load, enough
    bytes in flight per SM to approach HBM bandwidth; halved for 256-wide heads (registers)."""
    return 64 if max(pad(K), pad(V)) <= 128 else 32
