"""Capability table and block sizes of the NumPy backend."""
from nha_core.registry import ALL_FEATURES

NAME = "numpy"
PRIORITY = 50  # after the GPU backends: `auto` takes it only for CPU arrays
DEVICES = ("cpu",)
DTYPES = ("float32", "float64")
MAX_HEAD_DIM = 1024  # no hardware limit; large dims only cost BLAS time
MAX_SLOTS = 1024
FEATURES = ALL_FEATURES

# Magnitude of the chunk-local gate cumsum up to which the slot branch uses the factored form
# exp(Gc[t]) * exp(-Gc[j]) (MATH §2 NUMERICS). exp(60) ~ 1e26 leaves fp32 headroom (max ~3e38)
# for products with large logits and values; fp64 reaches 1e308, exp(500) ~ 1e217.
SAFE_LOG = {"float32": 60.0, "float64": 500.0}

# Query chunk length (rows of one logit block). Longer chunks mean fewer Python steps and larger
# GEMMs but more masked window work ((BT + W - 1) / W: 1.12 at W = 512) and O(BT^2) intra-chunk
# slot work; at cpu-a (2 cores) 32 and 64 measured alike and 128+ slower (those measurements
# were taken on a shared, loaded machine: re-measure when tuning).
BLOCK_T = 64


def block_t(p, T):
    """Chunk length for a sequence of T tokens (one rule for now; kept a function to tune by shape)."""
    return BLOCK_T

# Head parallelism: the KV heads are split into contiguous groups run in worker threads (NumPy
# releases the GIL inside matmul and ufuncs) with BLAS held to one thread each, so the
# elementwise passes (exp, max, masks) run on every core too, not only the GEMMs. Small calls stay
# on one thread: below ~2k (token, head) pairs the thread hand-off costs more than it saves.
MIN_PARALLEL_WORK = 2048


def num_workers(p) -> int:
    """Worker threads for ``p``: NHA_CORE_NUM_THREADS, else the cores this process may use."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    wanted = int(os.environ.get("NHA_CORE_NUM_THREADS", "0")) or cores
    if p.T * p.H < MIN_PARALLEL_WORK:
        return 1
    return max(1, min(wanted, p.H))

# Chunks whose slot algebra (gate cumsums, decays) is computed in one vectorised pass: amortises
# the per-call NumPy overhead over several chunks while the float64 temporaries of a group
# (8 * 64 * M per head) stay in L2.
SLOT_GROUP = 8

# The forward skips the softmax max-subtraction pass for a (batch, head) whose row maxima all lie
# in [-SHIFT_FREE, SHIFT_FREE]: probabilities then stay within exp(+-8) ~ 3e3 of the shifted ones,
# far from fp32 overflow/underflow even through the slot branch's exp(+-SAFE_LOG) factors.
SHIFT_FREE = 8.0
