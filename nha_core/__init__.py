"""nha_core: Native Hybrid Attention (SPEC §1-3). Importing it loads NumPy only."""
from . import backends  # callable: nha_core.backends() lists the registry
