"""Lazy package attributes: a package names what it exports, the heavy module loads on first use
(PEP 562). In the lowest floor, so every package (sim and fleet alike) uses the one helper."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` resolving ``exports`` (attribute -> module) on first access."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
