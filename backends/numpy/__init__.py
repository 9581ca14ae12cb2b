"""NumPy backend: chunk-parallel NHA on the CPU with BLAS matrix products (float32, float64)."""
from nha_core.registry import Backend

from . import configs


class NumpyBackend(Backend):
    name = configs.NAME
    priority = configs.PRIORITY
    devices = configs.DEVICES
    dtypes = configs.DTYPES
    max_head_dim = configs.MAX_HEAD_DIM
    max_slots = configs.MAX_SLOTS
    features = configs.FEATURES
    array_kind = "numpy"

    def forward(self, p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu_seqlens):
        from .forward import forward

        return forward(p, q, k, v, g, s, q_slot, k_slot, hk0, hv0, cu_seqlens)

    def backward(self, p, do, q, k, v, g, s, q_slot, k_slot, o, lse, hk0, hv0, cu_seqlens):
        from .backward import backward

        return backward(p, do, q, k, v, g, s, q_slot, k_slot, o, lse, hk0, hv0, cu_seqlens)

    def decode(self, p, q, k, v, g, s, q_slot, k_slot, state):
        from .decode import decode

        return decode(p, q, k, v, g, s, q_slot, k_slot, state)


BACKEND = NumpyBackend()
