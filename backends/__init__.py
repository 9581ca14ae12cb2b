"""Built-in backends, installed as ``nha_core.backends``: ``numpy/``, ``triton/``, ``cupy/``.

Each folder holds the same files: ``forward.py``, ``backward.py``, ``decode.py`` (kernel entry
points, contract in :mod:`nha_core.registry`), ``configs.py`` (capability table and tile sizes)
and ``__init__.py`` (the ``Backend`` subclass, exported as ``BACKEND``). Backends never import
each other; shared math lives in ``nha_core``. Third-party backends register through the
``nha_core.backends`` entry-point group.

The package is also callable, so the SPEC's ``nha_core.backends()`` and the namespace
``nha_core.backends.<name>`` are one object: calling it lists the registered backends, whether
each is usable here and, if not, why.
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self) -> dict:
        """Registered backends: ``{name: {"usable": bool, "reason": str | None, ...}}``."""
        from nha_core.registry import summary

        return summary()


sys.modules[__name__].__class__ = _CallablePackage
