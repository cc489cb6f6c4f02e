"""Lazy package exports (PEP 562): a name is imported from its module on first use.

``import infinite_id`` and light commands (``download``, the start-up check) then do not pay for the torch,
diffusers and transformers imports they do not need. Every package's ``__init__`` declares its public names
(``__all__``) with this one helper.
"""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__all__, __getattr__, __dir__)`` for ``package`` whose public ``name`` lives in ``exports[name]``
    (a module path relative to the package)."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    names = sorted(exports)
    return names, __getattr__, lambda: names
