"""Every CUDA file of the CuPy backend compiles with nvcc for sm_90 (no GPU needed).

The kernels are built by NVRTC at run time; this catches syntax and type errors on machines
without a GPU. Each file is compiled several ways: to a cubin with its defaults (float, RMAX = 32: the
largest register arrays, so ptxas runs too), to PTX only as bfloat16 variants with other tiles (the
__nv_bfloat16 load/store overloads; skipping ptxas keeps it fast), and to a cubin as the bfloat16 build
with forward.cu's register-tile kernels (NHA_MMA; with FAST_GATES off to PTX). All nvcc processes run at
once: about 20 s on 2 cores.
"""
import os
import pathlib
import shutil
import subprocess

import pytest

CUDA_DIR = pathlib.Path(__file__).resolve().parents[1] / "backends" / "cupy"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
VARIANTS = {
    "float-RMAX32": ["-c"],
    "bf16-BT32-RMAX4-BG8-DC2-ptx": ["-ptx", "-DIN_T=__nv_bfloat16", "-DBT=32", "-DRMAX=4", "-DBG=8", "-DDC=2"],
    "bf16-cache-STG3-ptx": ["-ptx", "-DIN_T=__nv_bfloat16", "-DCACHE_T=__nv_bfloat16", "-DSTG=3"],  # decode's cp.async ring
    # forward.cu's register-tile kernel (mma.sync, ldmatrix, cp.async) at the gpu-a tile, through ptxas
    "bf16-mma-RMAX8": ["-c", "-DIN_T=__nv_bfloat16", "-DNHA_MMA", "-DRMAX=8", "-DKD=64", "-DVD=64", "-DMD=64"],
    "bf16-mma-exact-gates-ptx": ["-ptx", "-DIN_T=__nv_bfloat16", "-DNHA_MMA", "-DFAST_GATES=0"],  # MMA_FAST_GATES off
}


def find_nvcc():
    for candidate in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = find_nvcc()


@pytest.fixture(scope="module")
def compiled():
    """Start every compile in parallel, then collect {(file, variant): (returncode, output)}."""
    if NVCC is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    procs = {}
    for src in SOURCES:
        for name, flags in VARIANTS.items():
            cmd = [NVCC, "-arch=sm_90", "-o", os.devnull, "-Werror", "all-warnings", *flags, str(src)]
            procs[(src.name, name)] = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=CUDA_DIR)
    return {key: (p.wait(), p.stdout.read()) for key, p in procs.items()}


def test_sources_exist():
    assert {p.name for p in SOURCES} >= {"forward.cu", "backward.cu", "decode.cu"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("source", [p.name for p in SOURCES])
def test_compiles(compiled, source, variant):
    code, output = compiled[(source, variant)]
    assert code == 0, f"nvcc failed on {source} ({variant}):\n{output}"
