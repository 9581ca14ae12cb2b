"""Test configuration: Hypothesis profiles and NaN-poisoned fresh buffers.

Profiles (choose with HYPOTHESIS_PROFILE): ``ci`` (default: derandomized, no deadline, no
example database, so CI is reproducible), ``dev`` (random, few examples), ``nightly``
(many examples).

``NHA_TEST_TRITON_CONFIG="NAME=VALUE;NAME=VALUE"`` runs the tests with those settings of
backends/triton/configs.py (values are Python literals), ``NHA_TEST_CUPY_CONFIG`` likewise for
backends/cupy/configs.py, so a candidate setting is judged by the same tests as the defaults
before it becomes one (asv_bench/gpu_session.sh, step variant-tests; nha_core.settings).
"""
import importlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=10)
settings.register_profile("nightly", deadline=None, max_examples=1000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_OVERRIDES = pytest.StashKey[list]()


def pytest_configure(config):
    applied = []
    for env, backend in (("NHA_TEST_TRITON_CONFIG", "triton"), ("NHA_TEST_CUPY_CONFIG", "cupy")):
        text = os.environ.get(env, "").strip()
        if not text:
            continue
        configs = importlib.import_module(f"nha_core.backends.{backend}.configs")
        try:
            configs.override(text)
        except ValueError as error:
            raise pytest.UsageError(f"{env}: {error}") from None
        applied.append(f"{backend} configs overridden: {text}")
    config.stash[_OVERRIDES] = applied


def pytest_report_header(config):
    return config.stash.get(_OVERRIDES, [])


def _poisoned(make):
    """Wrap an allocator so fresh floating buffers start as NaN: unwritten outputs fail loudly."""
    def alloc(*args, **kwargs):
        out = make(*args, **kwargs)
        if out.dtype.kind == "f":
            out.fill(np.nan)
        return out
    return alloc


@pytest.fixture(autouse=True)
def poison_fresh_buffers(monkeypatch):
    monkeypatch.setattr(np, "empty", _poisoned(np.empty))
    monkeypatch.setattr(np, "empty_like", _poisoned(np.empty_like))
    torch = __import__("sys").modules.get("torch")
    if torch is not None:
        def poison_torch(make):
            def alloc(*args, **kwargs):
                out = make(*args, **kwargs)
                if out.is_floating_point():
                    out.fill_(float("nan"))
                return out
            return alloc
        monkeypatch.setattr(torch, "empty", poison_torch(torch.empty))
        monkeypatch.setattr(torch, "empty_like", poison_torch(torch.empty_like))
    yield
