"""Overrides of a backend's tuning settings (its ``configs`` module) from text.

``"NAME=VALUE;NAME=VALUE"`` with Python literals as values: how a candidate setting is judged by
the tests (tests/conftest.py: NHA_TEST_TRITON_CONFIG, NHA_TEST_CUPY_CONFIG) and timed by the
benchmarks (asv_bench/compare.py --triton-config) before it becomes a default.
"""
from __future__ import annotations

import ast


def override(namespace: dict, text: str, where: str) -> dict:
    """Set the upper-case settings named in ``text`` in ``namespace`` (a module's globals) and
    return them; an unknown name or a value that is not a literal raises ValueError naming ``where``."""
    settings = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not name.isupper() or name not in namespace:
            raise ValueError(f"config override {item!r}: {where} has no setting {name!r}")
        try:
            settings[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"config override {item!r}: the value is not a Python literal ({error})") from None
    namespace.update(settings)
    return settings
