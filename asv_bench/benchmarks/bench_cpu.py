"""CPU suite: the numpy backend against torch SDPA full causal and a NumPy per-token loop.

Shapes: cpu-xs (smoke tests), cpu-a and cpu-b (SPEC section 6), float32. Every benchmark runs in
its own process; one call at cpu-b takes seconds on 2 cores, so repeats are few.
"""
from . import calls, common

class _Case:
    """Shared setup: ``self.call`` runs ``impl`` once; NotImplementedError skips.

    One call per sample and one round: a cpu-b call takes seconds on 2 cores, and the first
    (warm-up) call already happened in setup.
    """

    mode = "forward"
    number = 1
    repeat = (1, 5, 10.0)
    rounds = 1
    warmup_time = 0.0
    timeout = 600

    def setup(self, shape, impl, dtype):
        self.call = calls.make_call(common.SHAPES[shape], impl, self.mode, dtype=dtype)


class Forward(_Case):
    """Forward pass, seconds per call."""

    params = (list(common.CPU_SHAPES), ["nha_numpy", *calls.CPU_PEERS], list(common.CPU_DTYPES))
    param_names = ["shape", "impl", "dtype"]
    mode = "forward"

    def time_forward(self, shape, impl, dtype):
        self.call.run()

    def peakmem_forward(self, shape, impl, dtype):
        self.call.run()


class ForwardBackward(_Case):
    """Forward then backward (numpy: attention + attention_backward; torch: autograd)."""

    params = (list(common.CPU_SHAPES), ["nha_numpy", "sdpa_causal"], list(common.CPU_DTYPES))
    param_names = ["shape", "impl", "dtype"]
    mode = "forward_backward"

    def time_forward_backward(self, shape, impl, dtype):
        self.call.run()


class Decode(_Case):
    """One decode step per sequence after a prefill that filled the window (N=4 sequences)."""

    params = (list(common.CPU_DECODE_SHAPES), ["nha_numpy", "sdpa_kvcache"], list(common.CPU_DTYPES))
    param_names = ["shape", "impl", "dtype"]
    mode = "decode"
    number = 0  # let asv batch these short calls
    repeat = (3, 10, 10.0)
    rounds = 1
    timeout = 300

    def time_decode_step(self, shape, impl, dtype):
        self.call.run()


class Ratios:
    """numpy backend time / peer time, both measured in this process (SPEC targets: <= 1.0 at
    cpu-a and <= 0.4 at cpu-b against SDPA full causal)."""

    params = (list(common.CPU_SHAPES), list(calls.CPU_PEERS), list(common.CPU_DTYPES))
    param_names = ["shape", "peer", "dtype"]
    unit = "ratio"
    number = 1
    repeat = 1
    rounds = 1
    timeout = 900

    def setup(self, shape, peer, dtype):
        s = common.SHAPES[shape]
        self.nha = calls.make_call(s, "nha_numpy", "forward", dtype=dtype)
        self.peer = calls.make_call(s, peer, "forward", dtype=dtype)

    def track_forward_ratio(self, shape, peer, dtype):
        repeat = 1 if shape == "cpu-b" else 3
        t_nha = common.cpu_time_s(self.nha.run, repeat=repeat, warmup=0)
        t_peer = common.cpu_time_s(self.peer.run, repeat=repeat, warmup=0)
        return common.ratio(t_nha, t_peer)
