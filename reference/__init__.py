"""fp64 oracle for NHA: a token loop, an independent dense form, an explicit backward, decode.

Every backend is tested against these functions (SPEC section 5). They are slow on purpose:
plain NumPy in float64, one token at a time, no tiling. The slot/window boundary at query t::

    tokens:  0 ........ t-W | t-W+1 ...... t
             `-- slots ----' `-- window ---'     one softmax over M slot + min(t+1, W) window logits
"""
from .backward import backward
from .classic import causal_softmax_attention, gsa_recurrence
from .dense import dense_forward
from .loop import decode_step, forward, state_from_prefill

__all__ = [
    "forward",
    "dense_forward",
    "backward",
    "decode_step",
    "state_from_prefill",
    "gsa_recurrence",
    "causal_softmax_attention",
]
