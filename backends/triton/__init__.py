"""Triton backend: fused chunked NHA kernels for CUDA GPUs (float16, bfloat16, float32).

Native arrays are torch tensors. Under ``TRITON_INTERPRET=1`` the same kernels also run on CPU
tensors through Triton's interpreter (slow; used by CI, which has no GPU). Torch and Triton are
imported only when a method needs them, so ``import nha_core`` stays NumPy-only.
"""
import importlib.util
import os

from nha_core.registry import Backend

from . import configs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend, configs=configs):
    kernel_package = __name__  # forward.py, backward.py, decode.py beside this file
    array_kind = "torch"
    auto_devices = ("cuda",)  # on the CPU only when named: the interpreter is for testing
    derives_s = True  # s = None: the kernels compute s = 1 - exp(g) from the gates they load anyway

    @property
    def chains_derived_s(self):
        """dg -= ds * exp(g) inside the slot kernel (configs.BWD_CHAIN_DERIVED_S, read per call)."""
        return configs.BWD_CHAIN_DERIVED_S

    def devices_here(self):
        # No torch import here: the registry reads this to refuse CPU calls cheaply.
        return ("cuda", "cpu") if _interpreting() else ("cuda",)

    def availability(self):
        for module in ("torch", "triton"):
            if importlib.util.find_spec(module) is None:
                return f"{self.name}: {module} is not installed"
        if _interpreting():
            return None
        import torch

        if not torch.cuda.is_available():
            return f"{self.name}: no CUDA device (torch.cuda.is_available() is False) and TRITON_INTERPRET is not 1"
        return None



BACKEND = TritonBackend()
