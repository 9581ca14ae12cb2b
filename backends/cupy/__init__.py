"""CuPy backend: NHA as raw CUDA C++ kernels (forward.cu, backward.cu, decode.cu) built by NVRTC
through ``cupy.RawModule``. Native arrays are CuPy arrays; bfloat16 data comes as a uint16 array.

Kernel files are plain CUDA C++ (``extern "C" __global__``, no host headers), so ``nvcc -arch=sm_90
-c forward.cu`` compiles them too (tests/test_cuda_compile.py does). Compile-time knobs (element
type, BT, RMAX) are passed as ``-D`` options; each variant is built once per process.
"""
from __future__ import annotations

import functools
import os

from nha_core.registry import Backend

from . import configs

_HERE = os.path.dirname(os.path.abspath(__file__))


class CupyBackend(Backend, configs=configs):
    kernel_package = __name__  # forward.py, backward.py, decode.py beside this file
    array_kind = "cupy"
    derives_s = True  # s = None: the tensor-core forward and the decode compute s = 1 - exp(g) in
                      # their kernels; the other paths materialise it once (forward.derived_s)

    def availability(self):
        try:
            import cupy
        except Exception:
            return "cupy: not installed"
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                return "cupy: no CUDA device"
        except Exception:
            return "cupy: no CUDA device"
        return None



@functools.lru_cache(maxsize=None)
def kernels(filename: str, in_type: str, cache_type: str, **tiles: int):
    """The ``cupy.RawModule`` of ``filename`` built for one variant (cached per process); each
    tile (``BT=64``, ``RMAX=4``, decode's ``BG``, ``DC``) becomes a ``-D`` macro of the same name."""
    import cupy

    with open(os.path.join(_HERE, filename)) as f:
        code = f.read()
    options = ["-std=c++17", f"-I{_HERE}", f"-DIN_T={in_type}", f"-DCACHE_T={cache_type}",
               *(f"-D{name}={value}" for name, value in sorted(tiles.items()))]
    cuda_path = cupy.cuda.get_cuda_path()  # cuda_bf16.h / cuda_fp16.h for NVRTC, when a toolkit is there
    if cuda_path and os.path.isdir(os.path.join(cuda_path, "include")):
        options.append(f"-I{os.path.join(cuda_path, 'include')}")
    mma = mma_include()
    if mma is None:
        options.append("-DNHA_NO_TC")
    elif not cuda_path or os.path.join(cuda_path, "include") != mma:
        options.append(f"-I{mma}")  # after the first: only crt/mma.h* is looked up here
    return cupy.RawModule(code=code, options=tuple(options))


@functools.lru_cache(maxsize=None)
def mma_include():
    """An include folder holding crt/mma.h (WMMA for the tensor-core kernels), or None. Wheels of
    the CUDA runtime (nvidia-*-cu13) ship mma.h without its crt/ part; a full toolkit has both."""
    import cupy

    roots = [cupy.cuda.get_cuda_path(), os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             "/usr/local/cuda"]
    for root in roots:
        if root and os.path.isfile(os.path.join(root, "include", "crt", "mma.h")):
            return os.path.join(root, "include")
    return None


@functools.lru_cache(maxsize=None)
def sm_count(device_id: int) -> int:
    """Streaming multiprocessors of a device (132 on an H200)."""
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


_FUNCTIONS = {}  # (device, module id, name) -> [cupy Function, the dynamic shared memory it may use]


def launch(module, name: str, grid, args, smem_bytes: int = 0, threads: int = configs.NT) -> None:
    """Launch ``name`` with ``threads`` threads (NT unless the kernel says otherwise); grids with a
    zero dimension are skipped (nothing to do). Functions are looked up once per device and module
    (modules live as long as the process: ``kernels`` caches them), and raise their shared-memory
    limit once: both are driver calls a launch need not repeat."""
    import cupy

    if min(grid) <= 0:
        return
    key = (cupy.cuda.runtime.getDevice(), id(module), name)
    entry = _FUNCTIONS.get(key)
    if entry is None:
        entry = _FUNCTIONS[key] = [module.get_function(name), 48 * 1024]
    fn = entry[0]
    if smem_bytes > entry[1]:  # above the default limit the kernel must opt in
        fn.max_dynamic_shared_size_bytes = smem_bytes
        entry[1] = smem_bytes
    fn(tuple(grid), (threads,), tuple(args), shared_mem=smem_bytes)


BACKEND = CupyBackend()
