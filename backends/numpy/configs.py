"""Capability table and block sizes of the NumPy backend."""
from nha_core.registry import ALL_FEATURES

NAME = "numpy"
PRIORITY = 50  # after the GPU backends: `auto` takes it only for CPU arrays
DEVICES = ("cpu",)
DTYPES = ("float32", "float64")
MAX_HEAD_DIM = 1024  # no hardware limit; large dims only cost BLAS time
MAX_SLOTS = 1024
FEATURES = ALL_FEATURES
