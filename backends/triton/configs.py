"""Capability table and tile sizes of the Triton backend.

Tuning is data with reasons: every number below names the limit it respects. Tile names are the
ones the kernels use (``BT`` query rows = slot chunk, ``BS`` window key rows, ``BK``/``BV``/``BM``
the padded key, value and slot dims, ``BD``/``BMS`` the state tiles of the sequential kernels).
The functions are looked up at call time, so a tuning script can replace them (monkeypatch).
"""
import functools

from nha_core.registry import ALL_FEATURES

NAME = "triton"
PRIORITY = 10  # the fastest path on CUDA: `auto` tries it first for GPU arrays
DEVICES = ("cuda", "cpu")  # "cpu" only under TRITON_INTERPRET=1 (see devices_here)
DTYPES = ("float16", "bfloat16", "float32")
# K, V <= 256: the main kernel keeps a [BT, BK] query tile, a [BK, BM] slot-key state and a
# [BT, BV] accumulator in registers; past 256 they spill even with BT = 16.
MAX_HEAD_DIM = 256
# M <= 256: the chunk-state kernels tile M; the main kernels hold [BT, BM] slot logits and a
# [BK, BM] state tile, which past 256 no longer fits registers.
MAX_SLOTS = 256
FEATURES = ALL_FEATURES

# Gates are clamped from below at G_FLOOR before any cumsum: exp(-200) is exactly 0 in float32
# (it underflows below the smallest subnormal, ~exp(-103)), so the clamp changes no result, but it
# keeps every cumsum finite (never -inf - -inf in Gc_last - Gc or in the factored exponents).
# Segment sums across large gates are summed in order, not taken as differences of cumsums
# (forward.segment_decay, decay_to_end): -288 per clamped gate leaves float32 cumsums of thousands.
G_FLOOR = -200.0
# The intra-chunk slot terms use the factored decay exp(Gc[t]) * exp(-Gc[j]) (two dots on tensor
# cores) when every chunk cumsum lies in [-SAFE_LIMIT, SAFE_LIMIT] (natural-log units):
# exp(40) ~ 2e17 leaves 1e21 of float32/bfloat16 headroom (max ~3e38) for sums of products of
# logits and weights. Otherwise the kernel takes the explicit per-pair path (slower, always finite).
SAFE_LIMIT = 40.0

# Backward, bfloat16 inputs (forward.lowp): which slot-branch data are bfloat16 (float16 and float32
# inputs keep fp32 throughout; the measurements below emulated bf16 rounding on fp16 inputs).
# The gate gradient dg is a reverse cumsum of X1 - S dS whose terms nearly cancel, so every
# rounding on one side of that difference and not the other shows up in dg magnified; SPEC's
# limit is 2e-2. History: everything bf16 at once (the old BWD_BF16_SLOTS=True) gave dg 2.3e-2 on
# a small fp16 case (fp32 operands 5e-3) but ran the backward in 4.32 ms instead of 5.44 at
# gpu-a on an H200.
# Measured offline (interpreter, fp16 inputs, bf16 emulated; dg rel. error vs the fp64 oracle at
# T=24 K=16 M=4 / T=96 K=32 M=16 / the same with explicit s; all fp32 = 5.0e-3 / 5.8e-3 / 1.30e-2),
# one knob at a time:
#   bf16 operands in bwd_q 3.2e-2, in bwd_slot 2.8e-2 (over the limit: both sides of X1 - S dS),
#   in bwd_state no change; bf16 Ps/dLs 3.8e-3 / - / 1.13e-2 (better: X1 is built from the rounded
#   values); bf16 dH no change; bf16 X1 8.3e-3 / 9.5e-3 / -; bf16 chunk states - / - / 1.58e-2.
# Kernels whose slot dots take bf16 operands ("q": nha_bwd_q, "q_probs": nha_bwd_q's except the two
# that build dq, "state": nha_bwd_state, "slot": nha_bwd_slot, "slot_kv": only those of
# nha_bwd_slot's dots that build dks and dvs, none of which reaches dg); the others take fp32
# operands on TF32 tensor cores (half the bf16 rate, twice the registers). On an H200 at gpu-a
# (2026-12-02, asv_bench/triton_tuning_notes.md): "q" + "slot" took the backward from 5.11 to
# 4.04 ms but put dq at 2.4x the naive bf16 error on a pure-slot case (SPEC allows 2x);
# "slot_kv" saved 1.5% of its kernel; "q_probs" + "slot" 4.15 ms, the same dq case failing.
# "slot" alone: 5.04 -> 4.42 ms (same run) and the Triton GPU accuracy tests all pass under it.
# The Hypothesis backward property then hit an illegal memory access, isolated on 2026-12-02 to
# bf16 dots on 16-wide heads (NARROW_HEAD_TILE); with narrow heads on IEEE dots, the bf16 and
# fp32 backward properties (6 examples) and the accuracy tests passed under "slot" on an H200
# (2026-12-03, asv_bench/tune_results/2026-12-03-h200/), so "slot" is on.
# bwd_state's dots only build dH, which is stored in bf16 anyway: 252 -> 134 registers per
# thread (asv_bench/triton_resources.py).
BWD_BF16_DOTS = ("state", "slot")
# Chunk states Hk_c, Hv_c recomputed in bf16 (half the bytes: 2 x 134 MB fp32 at gpu-a, read by
# bwd_q and bwd_slot). Off: dg 1.30e-2 -> 1.58e-2 on the explicit-s case, too close to 2e-2.
BWD_BF16_STATES = False
# Ps and dLs side buffers [B*T,HQ,M] in bf16 (134 MB each in fp32 at gpu-a, written once by
# bwd_q, read by bwd_state and bwd_slot): 4 x 67 MB less traffic. bwd_q derives X1 from the
# rounded values, so X1 - S dS still cancels (dg is more accurate than with fp32 buffers).
BWD_BF16_PS_DLS = True
# X1 side buffer [B*T,HQ,M] in bf16 (134 MB in fp32 at gpu-a, written once, read once). Off: X1
# is one side of the cancelling difference and its own rounding does not cancel (dg x1.6).
BWD_BF16_X1 = False
# State gradients dH_k, dH_v per chunk [NC,H,K,M] + [NC,H,M,V] in bf16 (2 x 134 MB in fp32 at
# gpu-a, written by bwd_state, read by bwd_slot); no measurable effect on any gradient.
BWD_BF16_DH = True

# s = None (derived s = 1 - exp(g)): nha_bwd_slot subtracts ds * exp(g) from dg before it stores it
# and ds is never written (the caller did not ask for it). Off, the API does it in three
# elementwise passes over [B,T,H,M] (exp, multiply, subtract: ~7 x 67 MB of bf16 traffic at
# gpu-a, plus the 67 MB ds store), rounding to the input dtype after each.
BWD_CHAIN_DERIVED_S = True

# Forward window loop in three parts (masked, full blocks without masks, masked) instead of one
# masked loop over every block of the band.
WINDOW_SPLIT = True

# Register cap of nha_fwd_kernel for heads up to 64 wide (Triton's ``maxnreg``; None: ptxas
# decides). Uncapped, the kernel holds 185 registers at gpu-a, so only two 4-warp programs share
# an SM: ncu (H200, 2026-12-03) measured 12.5% occupancy, register-limited, and 1.67 instructions
# issued per cycle. The kernel is one dependent chain of dots per program, so more programs per SM
# hide more of its latency. Capped at 128 (224 B of spills, four programs per SM with 2
# pipeline stages, forward_stages) it ran 0.477 ms against 0.576 at gpu-a; 168 (three programs)
# ran 0.500. gpu-b at 168: 0.937 against 1.075 ms.
FWD_MAX_REGISTERS = 128

# nha_bwd_slot_kernel in two launches, factored decays then the pairwise fallback (forward.py,
# TWO_LAUNCHES): "bf16" for bf16 slot operands only, "always", "never" (one launch branching per
# chunk). Split, the bf16 build's factored launch ran 1.02 ms at gpu-a on an H200 against 1.23
# for one launch (2026-12-03). The fp32-operand builds (float16 and float32 inputs, narrow heads)
# stay whole: split, the factored float16 build needed 320 KiB of shared memory under Triton 3.6
# (OutOfResources on the GPU; 224 KiB whole). "always" is for the interpreter tests, which cannot
# run bf16 inputs.
BWD_SLOT_SPLIT = "bf16"

# Backward scratch limit, as a fraction of the bytes of the inputs (q, k, v, g, do), the output o
# and the gradients: the backward runs over groups of KV heads, the fewest that keep one group's
# scratch (recomputed chunk states, state gradients, the Ps/dLs/X1 side buffers, the slot parts
# of dk and dv: backward.scratch_per_head) within it, each group's scratch freed before the next
# group's is allocated. None: all heads at once. With every head at once the scratch is about
# the io bytes (K = V = M = 64, bf16), so SPEC's forward+backward memory target (peak <= 1.3x
# inputs + outputs + gradients) needs groups; 0.28 leaves room for the small buffers (lse, D,
# the carries) under 0.3 and gives four groups of four heads at gpu-a and gpu-b. Measured on an
# H200 (2026-12-04, asv_bench/triton_tuning_notes.md): forward+backward peak 1.25x at gpu-b (1.81x
# with all heads at once); the backward alone 8.23 ms instead of 7.68 at gpu-b (with the scan
# tile scan_width narrows for the groups) and 5.01 instead of 4.31 at gpu-a, mostly in the
# chunk-state passes, which run once per group (at gpu-a the walk's short chains give way to
# the scan). None trades the memory back for that time.
BWD_SCRATCH_LIMIT = 0.28
# Scratch below this many bytes (all heads at once) is never split: memory does not limit such
# problems, and every group adds its launches.
BWD_SCRATCH_SPLIT_BYTES = 256 << 20

# bfloat16 operands for the slot-branch dots of bfloat16 inputs (forward.lowp); False: fp32
# operands on TF32 tensor cores, as for float16 inputs. History: with BM = 32 (M = 16) bf16 slot
# dots made nha_fwd_kernel (Triton 3.6, H200, 2026-12-02) access shared memory out of range
# (compute-sanitizer, a slot readout dot with K = BM = 32) on the varlen bf16 case
# B1-T260-HQ4-H1-K64-M16-W33 in 12 of 12 runs; with BM >= 64 (BF16_MIN_SLOT_TILE) 0 of 12, the
# fp64 checks of asv_bench/tune_gpu.py passing, and at gpu-a forward 0.808 ms / backward 5.106
# against 1.153 / 5.324 with TF32 slot dots (same run, H200, 2026-12-02).
BF16_SLOT_DOTS = True
# Smallest BM with bf16 slot dots (see slot_tile): 32 faulted as above, 64 did not.
BF16_MIN_SLOT_TILE = 64
# Heads whose padded K or V is below this take fp32 slot operands on IEEE dots, whatever the
# input dtype (forward.narrow); speed does not matter there, and the tensor-core paths of small
# tiles broke in three ways on an H200 (Triton 3.6): bf16 slot dots in nha_bwd_slot's dks dot
# ([64, 64]^T x [64, BK = 16]) read shared memory out of range (compute-sanitizer, property case
# B1-T1-HQ2-H2-K7-V1-M2-W0, BWD_BF16_DOTS ("state", "slot"), 2026-12-02); float16's split-TF32
# dots faulted on B1-T1-HQ2-H2-K7-V8-M2-W0 (tests/test_triton_gpu.py::test_tiny_dims_run_clean,
# 2026-12-03); and TF32 operands on bfloat16's big-logit property case
# B1-T1-HQ2-H2-K7-V8-M5-W0 (logits ~1e3) gave ds 1.2 against the bound 0.55 (interpreter,
# TF32 rounding emulated). See triton_tuning_notes.md.
NARROW_HEAD_TILE = 64
# Dots of the fp32 slot operands of float16 inputs: "tf32x3" (Triton's split TF32: three TF32
# products, about fp32 accuracy, 3x the tensor-core work of those dots) or "tf32" (one product,
# operands rounded to TF32 in the kernel). With "tf32", dq came out at 2.44x the error of the
# naive float16 computation on an H200 (2.0e-3 vs 8.2e-4, B1-T200-HQ2-H1-K64-V64-M32-W0,
# tests/test_triton_gpu.py, 2026-12-02; SPEC section 5 allows 2x); under the interpreter the
# same case gave 2.5x with TF32 rounding and 1.8x with exact fp32 dots. "tf32x3" is unmeasured
# on a GPU (compiled offline for sm_90 with Triton 3.6 and 3.9); float16 is not a benchmark dtype.
FP16_SLOT_DOTS = "tf32x3"
# Smallest BM otherwise (see slot_tile).
MIN_SLOT_TILE = 32
# BT (chunk_rows) of the forward and of the backward, and the forward kernel's warps, when the
# widest of K, V, M is 65..128 (gpu-c: K = V = 128). Before they were timed, gpu-c's
# first peer run (H200, 2026-12-02) ran the forward in 2.06 ms against FlexAttention's 0.29
# and SDPA full causal's 1.97, five times gpu-a's time per token and head. ptxas (Triton 3.6,
# sm_90, bf16 gpu-c): BT = 32 gives mma.sync only in every kernel; BT = 64 gives wgmma, the
# forward kernel 254 registers without spills (8 warps; 88 B of spills at 4), the backward's
# bwd_q 864 B and bwd_slot 1520 B of spills (424 / 1448 at BT = 32). Candidates timed by
# `gpu_session.sh wide`.
# Timed at gpu-c (H200, 2026-12-02, `gpu_session.sh wide`, same run, fp64 checks passing):
# forward 2.056 ms (BT 32, 8 warps), 1.531 (BT 32, 4 warps), 0.865 (BT 64, 4 warps; the
# forward kernel 1.319 -> 0.440 ms, the chunk-state scan 0.547 -> 0.274); the backward at
# BT = 64 needs 295 KB of shared memory in nha_bwd_slot (the limit is 227 KB), so it keeps 32.
CHUNK_ROWS_128 = 64
BWD_CHUNK_ROWS_128 = 32
FWD_WARPS_128 = 4


def override(text: str) -> dict:
    """Set settings of this module from ``"NAME=VALUE;..."`` (nha_core.settings.override)."""
    from nha_core.settings import override as apply

    return apply(globals(), text, "backends/triton/configs.py")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def pad(n: int) -> int:
    """Block size for a dim of length n: a power of two, >= 16 (tl.dot's minimum tile side)."""
    return max(16, next_pow2(n))


def chunk_rows(K: int, V: int, M: int, backward: bool = False) -> int:
    """BT: query rows per program = slot-chunk length (the kernels of one pass share the chunk
    boundaries; the backward recomputes its chunk states, so it may chunk differently).

    64 rows feed the H100 tensor cores well (one 64-row wgmma) while the slot tiles
    [BT, BM] x 4 (logits, cumsum, weights, decays) plus [BK, BM] + [BM, BV] states stay
    within 255 registers per thread for K, V, M <= 64. Larger dims halve BT to keep the same
    register budget (CHUNK_ROWS_128, BWD_CHUNK_ROWS_128), at the price of the wgmma: Triton 3.6
    lowers the [32, *] dots to mma.sync (ptxas, sm_90, gpu-c: 0 wgmma / 188 mma.sync in
    nha_fwd_kernel at BT = 32, 132 / 0 at BT = 64 with 254 registers and no spills).
    """
    big = max(pad(K), pad(V), pad(M))
    if big <= 64:
        return 64
    if big <= 128:
        return BWD_CHUNK_ROWS_128 if backward else CHUNK_ROWS_128
    return 16


def window_rows(K: int, V: int) -> int:
    """BS: window key rows per inner step: 64 matches FlexAttention's block (the peer we are
    timed against) and keeps the [BS, BK] + [BS, BV] bf16 tiles at 32 KiB of shared memory for
    K = V = 128; 32 rows past that (K, V = 256) to stay inside 228 KiB with 2 pipeline stages."""
    return 64 if max(pad(K), pad(V)) <= 128 else 32


def num_warps(K: int, V: int, M: int) -> int:
    """Forward main kernel and decode: 4 warps. At gpu-a on an H200 the forward kernel ran 0.60 ms
    with 4 warps against 1.14 with 8, although 4 warps spill some of the slot-branch tiles
    (255 registers, 512 B of stack): 8 warps keep one 240-register program per SM, too little
    to hide the window loop's latency. Wider tiles (65..128) take FWD_WARPS_128."""
    return 4 if max(pad(K), pad(V), pad(M)) <= 64 else FWD_WARPS_128


def decode_num_warps(K: int, V: int) -> int:
    """Decode: 4 warps with 32-row ring blocks were the fastest of the four tried at the decode
    shape (K = V = 128) on an H200; 8 for 256-wide heads."""
    return 4 if max(pad(K), pad(V)) <= 128 else 8


def max_registers(K: int, V: int, M: int, bf16: bool) -> int | None:
    """nha_fwd_kernel's register cap (factored launch): FWD_MAX_REGISTERS for bf16 slot operands
    (``bf16``, forward.lowp) where the widest of K, V, M pads to 64 or less. Uncapped otherwise:
    wider tiles were not timed capped, and the fp32 operands of float16 inputs spill 1.5 KiB under
    the cap (ptxas, sm_90)."""
    return FWD_MAX_REGISTERS if bf16 and max(pad(K), pad(V), pad(M)) <= 64 else None


def num_stages(K: int, V: int, M: int, bf16: bool) -> int:
    """Software-pipelining depth of the forward's window loop: 2 where the register cap of 128
    lets four programs share an SM (4 x 49 KiB of shared memory; 3 stages would need 4 x 65), else
    3 up to K = V = 64 (3% faster than 2 at gpu-a before the cap) and 2 past it (shared memory)."""
    if max_registers(K, V, M, bf16) == 128:
        return 2
    return bwd_num_stages(K, V, M)


def bwd_num_stages(K: int, V: int, M: int) -> int:
    """Software-pipelining depth of the backward's band loops: 3 stages up to K = V = 64, 2 past
    it (shared memory)."""
    return 3 if max(pad(K), pad(V)) <= 64 else 2


def bwd_num_warps(K: int, V: int, M: int) -> int:
    """bwd_q and bwd_slot hold about twice the forward's live [BT, *] tiles (probabilities, their
    gradients, decays, the state gradients) and spill kilobytes at 4 warps (3.4 KiB of stack for
    the slot kernel); 8 warps cut that to ~1 KiB."""
    return 8


def kv_num_warps(K: int, V: int) -> int:
    """The key-side window kernel is FlashAttention-2's dk/dv loop: 4 warps (it ran 0.91 ms at
    gpu-a with 4, 1.15 with 8 on an H200)."""
    return 4


def state_slot_tile(M: int) -> int:
    """BMS for the sequential chunk-state kernels: slots are independent columns of Hk and rows
    of Hv, so the grid splits M into tiles (more programs in flight: B*H alone is 128 at gpu-a,
    below the 132 SMs, each program a 64-step sequential chain). 32 ran 0.216 ms at gpu-a on an
    H200 (16: 0.248, 64: 0.249; the previous unsplit BM = 64 kernel 0.66). A split of Hk and Hv
    into separate [32, 32] tiles (1024 programs) ran 1.08 ms: every tile re-derived the gates and
    its strides were run-time values, so its loads and stores were not vectorised.
    Never below 32 (M <= 16 is padded and masked): see slot_tile."""
    return 32


# How the chunk states are built: "scan" (every chunk's own update at once, then a scan over
# chunks, D per step), "walk" (one program per (sequence, head, slot tile) walks the chunks in
# order) or "auto" (state_pass below picks one per call).
STATE_PASS = "auto"
# The forward's chunk-state walk (nha_fwd_state_kernel) two chunks per loop step: False, "bf16"
# (for bf16 slot operands only) or True. The walk is a latency-bound chain (~3.4 us per chunk at
# gpu-a on an H200, with about two 4-warp programs per SM); the two chunks' own updates are
# independent, so interleaved they can take less than twice one. ptxas (Triton 3.9, sm_90,
# gpu-a): bf16 operands 254 registers, no spills (185 one chunk at a time); fp32 operands spill
# 7.3 KiB (float32, 448 B one at a time) and 1.1 KiB (float16, 96 B), hence "bf16". H200
# (2026-12-04, bf16, gpu-a, one process): walk 0.214 ms against 0.234, forward 0.703 ms against
# 0.720 / 0.719, outputs bit-identical. Again in the tenth session (same card, 2026-12-04,
# `gpu_session.sh walk-pairs`): the walk's GPU tests passed under "bf16" (4, odd chunk counts and
# varlen included), walk 0.214 ms against 0.232 / 0.231, forward 0.705 / 0.699 ms against
# 0.720 / 0.713 and 0.715 / 0.716 before and after it, bit-identical; hence the default.
STATE_WALK_PAIRS = "bf16"


def state_pass(N: int, H: int, K: int, V: int, M: int, longest: int, chunks: int) -> str:
    """The faster chunk-state pass by a two-constant cost model fitted on an H200 (2026-12-02,
    bf16 inputs, fp32 states, K = V = M = 64; asv_bench/triton_tuning_notes.md):

    * walk: a chain of ``longest`` dependent chunk steps, ~4.5 us each while the
      N * H * cdiv(M, BMS) programs fit two per SM (gpu-b: 512 steps, 2.08 ms; gpu-a: 64 steps,
      0.345 ms), one more chain per further two programs per SM;
    * scan: bandwidth-bound work over all ``chunks`` * H states (0.485 ms for 8192 chunk-heads of
      8192 state elements: gpu-a and gpu-b alike).
    """
    programs = N * H * -(-M // state_slot_tile(M))
    walk_ms = longest * 0.0045 * max(1.0, programs / 264)
    scan_ms = 0.485 * chunks * H * (K * M + M * V) / (512 * 16 * 8192)
    return "walk" if walk_ms <= scan_ms else "scan"


# nha_state_scan_kernel's tile [SCAN_ROWS, SCAN_WIDTH]: state elements per program (BE) and
# chunks per step (D); scan_width and scan_rows below say what each does. The backward's scans
# start from BWD_SCAN_WIDTH. Forward at gpu-c (H200, 2026-12-04, one process, tune_gpu.py):
# SCAN_WIDTH 512 ran the scan in 0.223 ms against 0.275 with 256 and the forward in 0.781 ms
# against 0.833 (128: 0.286 / 0.846); gpu-b's forward (16 pairs) narrows back to 256 either way.
# 512 is untimed in the backward, which keeps 256.
SCAN_WIDTH = 512
BWD_SCAN_WIDTH = 256
SCAN_ROWS = 16
# Fewest programs of nha_state_scan_kernel before scan_width narrows its tile (about four per SM
# of an H100/H200; 512 keeps the 256-wide tile of the all-heads passes at gpu-a and gpu-b, the
# ones timed with it).
SCAN_MIN_PROGRAMS = 512


def scan_width(K: int, V: int, M: int, pairs: int, backward: bool = False) -> int:
    """BE: state elements per program of nha_state_scan_kernel for ``pairs`` (sequence, head)
    pairs: SCAN_WIDTH (BWD_SCAN_WIDTH for the backward's scans), halved down to 64 while the
    grid would hold fewer than SCAN_MIN_PROGRAMS programs. Each program is a chain of
    cdiv(chunks, D) dependent steps, so few programs leave the card idle. On an H200
    (2026-12-04) the backward's four-head groups at gpu-b (4 pairs) ran the scan in 0.656 ms
    with BE = 64 against 0.855 with 256 (backward 8.23 ms against 8.45), while at gpu-a (32 pairs
    per group) 256 stayed the fastest (4.985 ms against 5.02)."""
    be = BWD_SCAN_WIDTH if backward else SCAN_WIDTH
    while be > 64 and pairs * (-(-K * M // be) - (-M * V // be)) < SCAN_MIN_PROGRAMS:
        be //= 2
    return be


def scan_rows() -> int:
    """D: chunks per step of the state scan (SCAN_ROWS). Each step loads D rows of BE elements
    at once (16 x 256 fp32 = 16 KiB per program in flight) and combines them in registers, so
    the dependent chain is cdiv(chunks, D) steps long."""
    return SCAN_ROWS


def scan_num_warps() -> int:
    """nha_state_scan_kernel: 4 warps hold its [D, BE] = [16, 256] fp32 tiles in 32 registers
    each per thread (untimed choice)."""
    return 4


def state_local_slot_tile(M: int, backward: bool = False) -> int:
    """BM of the scan's local kernels (one program per chunk, head and slot tile). Each program
    reads its chunk's ks and v rows, so cdiv(M, BM) tiles read them that many times. The
    forward's takes up to 64 slots per tile ([BK, 64] + [64, BV] fp32 accumulators): on an H200
    (2026-12-04, tune_gpu.py, one process) 64 against 32 ran gpu-c's forward in 0.757 / 0.755 ms
    against 0.783 / 0.779 (local kernel 0.127 against 0.154 ms) and gpu-b's in 1.370 against 1.379
    (0.195 against 0.201). The backward's (``backward``) stays at the walk's 32, untimed wider."""
    if backward:
        return state_slot_tile(M)
    return max(state_slot_tile(M), min(pad(M), 64))


def state_num_warps(K: int, V: int) -> int:
    """Forward chunk-state kernel: 4 warps hold its [BK, BMS] + [BMS, BV] fp32 states and the
    [BT, BK] / [BT, BV] / [BT, BMS] chunk tiles without spilling (0.216 ms at gpu-a, H200)."""
    return 4


def state_num_stages(K: int, V: int) -> int:
    """Chunk loads in flight in the chunk-state kernel's sequential walk (Triton's default 3)."""
    return 3


def slot_tile(M: int, low: bool) -> int:
    """BM of the main forward and backward kernels: at least MIN_SLOT_TILE (BF16_MIN_SLOT_TILE
    with bfloat16 slot dots). A BM = 16 tile at BT = 64 gave wrong, sometimes non-finite outputs
    on an H200 (Triton 3.6) twice: with bf16 slot dots (M = 16, GQA 4, varlen; 2026-11) and with
    the TF32-rounded operands of float16/bfloat16 inputs (2026-12-02, asv_bench/debug notes in
    triton_tuning_notes.md: o rel. error 0.48 and inf on the M = 16 cases, 4e-4 with BM = 32;
    unrounded fp32 operands at BM = 16 were right). Padded slots are masked (logit -inf, write 0)."""
    return max(BF16_MIN_SLOT_TILE if low else MIN_SLOT_TILE, pad(M))


def decode_window_rows(K: int, V: int) -> int:
    """Ring-buffer rows per decode step: 32 rows (16 KiB of K = V = 128 bf16 per step, 3 steps in
    flight) ran 172 us at the decode shape on an H200 (3.5 TB/s), against 187 us for 64 rows;
    16 past 128-wide heads (registers)."""
    return 32 if max(pad(K), pad(V)) <= 128 else 16


def decode_num_stages(K: int, V: int) -> int:
    """Ring blocks in flight per decode program: the loop is a pure stream over the cache."""
    return 3
