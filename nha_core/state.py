"""The recurrent state of NHA: fp32 slots plus a ring buffer of the last W tokens.

Per sequence ``n`` and KV head::

    hk [N,H,K,M]  hv [N,H,M,V]          slot memories (float32; float64 for float64 inputs)
    k_cache [N,W,H,K]  v_cache [N,W,H,V]  g_cache [N,W,H,M]
    s_cache [N,W,H,M]      only when slot write weights ``s`` were given explicitly
    k_slot_cache [N,W,H,K] only when ``k_slot`` was given explicitly
    seen [N] int64        tokens consumed so far

The window cache is a ring buffer: token number ``i`` (counting from the first token the state
ever saw) lives at row ``i % W``. The valid rows hold tokens ``seen-min(seen,W) ... seen-1``;
the next token evicts row ``seen % W`` into the slots once ``seen >= W``::

    time  ->   0 1 2 ... t-W | t-W+1 ... t-1 t
               `-- slots ---' `----- window ---'   (the query at t reads both, one softmax)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

_ARRAY_FIELDS = ("hk", "hv", "k_cache", "v_cache", "g_cache", "s_cache", "k_slot_cache", "seen")


@dataclasses.dataclass
class NHAState:
    """State after the last token of each sequence; see the module docstring for the layout."""

    hk: Any
    hv: Any
    k_cache: Any
    v_cache: Any
    g_cache: Any
    seen: Any
    window_size: int
    s_cache: Any = None
    k_slot_cache: Any = None

    @property
    def num_sequences(self) -> int:
        return int(self.hk.shape[0])

    def arrays(self) -> dict[str, Any]:
        """The array fields that are present, by name."""
        return {name: getattr(self, name) for name in _ARRAY_FIELDS if getattr(self, name) is not None}

    def replace(self, **changes) -> "NHAState":
        return dataclasses.replace(self, **changes)

    def nbytes(self) -> int:
        """Bytes held by the state (slots plus window cache)."""
        return sum(math.prod(a.shape) * a.dtype.itemsize for a in self.arrays().values())
