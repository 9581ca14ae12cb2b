"""nha_core: Native Hybrid Attention (SPEC §1-3). Importing it loads NumPy only.

    o = nha_core.attention(q, k, v, g, window_size=W)                  # forward
    grads = nha_core.attention_backward(do, q, k, v, g, o, lse, window_size=W)
    o_t, state = nha_core.decode_step(q_t, k_t, v_t, g_t, state)       # one token
    nha_core.backends()                                                # registry, with reasons

Torch autograd / ``torch.compile`` live in :mod:`nha_core.torch` (imported on demand).
"""
from . import backends  # callable: nha_core.backends() lists the registry
from .api import NHAGrads, attention, attention_backward, decode_step, init_state
from .problem import Problem
from .registry import Backend, register
from .state import NHAState

__all__ = [
    "attention", "attention_backward", "decode_step", "init_state", "backends",
    "NHAState", "NHAGrads", "Problem", "Backend", "register",
]
__version__ = "0.1.0"
