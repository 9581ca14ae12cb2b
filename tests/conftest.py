"""Test configuration: Hypothesis profiles and NaN-poisoned fresh buffers.

Profiles (choose with HYPOTHESIS_PROFILE): ``ci`` (default: derandomized, no deadline, no
example database, so CI is reproducible), ``dev`` (random, few examples), ``nightly``
(many examples).

``NHA_TEST_TRITON_CONFIG="NAME=VALUE;NAME=VALUE"`` runs the tests with those settings of
backends/triton/configs.py (values are Python literals), so a candidate setting is judged by the
same tests as the defaults before it becomes one (asv_bench/gpu_session.sh, step variant-tests).
"""
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


def pytest_configure(config):
    text = os.environ.get("NHA_TEST_TRITON_CONFIG", "").strip()
    if not text:
        return
    from nha_core.backends.triton import configs

    try:
        configs.override(text)
    except ValueError as error:
        raise pytest.UsageError(f"NHA_TEST_TRITON_CONFIG: {error}") from None
    config.stash[_OVERRIDES] = text


_OVERRIDES = pytest.StashKey[str]()


def pytest_report_header(config):
    text = config.stash.get(_OVERRIDES, None)
    return [f"triton configs overridden: {text}"] if text else []


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
