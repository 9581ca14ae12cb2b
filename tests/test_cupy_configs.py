"""The CuPy backend's per-call choices (backends/cupy/configs.py), on the CPU: no CuPy needed."""
from nha_core.backends.cupy import configs


def test_state_pass_choice(monkeypatch):
    """"auto" walks the chunks when the sequences are many and short (gpu-a: 8 x 64 chunks) and
    scans few long ones (gpu-b: 1 x 512 chunks; gpu-c: 1 x 256 chunks of K = V = 128), the
    choices the H200 timings behind the cost model made; a set pass is kept as it is."""
    monkeypatch.setattr(configs, "MMA_STATE_PASS", "auto")
    assert configs.state_pass(8, 16, 64, 64, 64, 64, 8 * 64, 132) == "walk"
    assert configs.state_pass(1, 16, 64, 64, 64, 512, 512, 132) == "scan"
    assert configs.state_pass(1, 16, 128, 128, 64, 256, 256, 132) == "scan"
    assert configs.state_pass(1, 1, 64, 64, 64, 1, 1, 132) == "walk"  # one chunk: nothing to chain
    monkeypatch.setattr(configs, "MMA_STATE_PASS", "walk")
    assert configs.state_pass(1, 16, 64, 64, 64, 512, 512, 132) == "walk"
