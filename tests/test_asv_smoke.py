"""The asv suite imports and its CPU benchmarks run once at the small shapes (functional test only).

CI machines are too noisy for timing history; this only proves that ``asv check`` passes and that
``asv run --quick --dry-run`` of the CPU benchmarks at cpu-xs / decode-cpu succeeds (about 30 s on
2 cores). Skipped when asv is not installed.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("asv")

ASV_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "asv_bench")
SMALL_CPU = r"bench_cpu\..*('cpu-xs'|'decode-cpu')"


def _asv(*args, home, timeout):
    env = dict(os.environ, HOME=home, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("NHA_CORE_BACKEND", None)
    conf = os.path.join(home, "asv.conf.json")
    return subprocess.run([sys.executable, "-m", "asv", *args, "--config", conf], cwd=ASV_DIR, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def home():
    """A private $HOME (asv's machine file) and a copy of asv.conf.json whose results, html and
    env folders live there, so the smoke run leaves nothing in the repository."""
    path = tempfile.mkdtemp(prefix="asv-home-")
    with open(os.path.join(ASV_DIR, "asv.conf.json")) as f:
        text = "\n".join(line for line in f if not line.lstrip().startswith("//"))
    conf = json.loads(text)
    conf.update(repo=os.path.dirname(ASV_DIR), benchmark_dir=os.path.join(ASV_DIR, "benchmarks"),
                results_dir=os.path.join(path, "results"), html_dir=os.path.join(path, "html"),
                env_dir=os.path.join(path, "env"))
    with open(os.path.join(path, "asv.conf.json"), "w") as f:
        json.dump(conf, f)
    done = _asv("machine", "--yes", "--machine", "ci-smoke", home=path, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_asv_check(home):
    done = _asv("check", "--python=same", home=home, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No problems found" in done.stdout


def test_asv_quick_cpu_run(home):
    done = _asv("run", "--python=same", "--quick", "--dry-run", "--show-stderr", "--machine", "ci-smoke",
                "--bench", SMALL_CPU, home=home, timeout=170)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "failed" not in out.lower(), out
    assert "bench_cpu.Forward.time_forward" in out
    assert "bench_cpu.Decode.time_decode_step" in out


def _has_cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


@pytest.mark.skipif(_has_cuda(), reason="with CUDA, bench_gpu.Summary measures for minutes")
def test_asv_gpu_summary_skips_without_cuda(home):
    """On a machine without CUDA every bench_gpu.Summary number is skipped with its reason, not failed
    (the GPU session's asv step runs exactly this selection)."""
    done = _asv("run", "--python=same", "--quick", "--dry-run", "--show-stderr", "--machine", "ci-smoke",
                "--bench", "bench_gpu.Summary", home=home, timeout=170)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "failed" not in out.lower(), out
    assert "asv: skipped: NotImplementedError('no CUDA device')" in out, out
    assert "Summary.track_forward_backward_peak_over_io" in out  # asv shortens long names
