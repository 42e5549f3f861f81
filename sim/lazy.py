"""Lazy package attributes: a package names what it exports, the heavy module loads on first use
(PEP 562). In the lowest floor, so every package (sim and fleet alike) uses the one helper."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` resolving ``exports`` (attribute -> module) on first access."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            module = importlib.import_module(exports[name])
        except ModuleNotFoundError as exc:
            if exc.name != exports[name]:
                raise
            raise ModuleNotFoundError(  # the light robot package ships the robot modules only (robot/pyproject.toml)
                f"{package}.{name} lives in {exports[name]}, which this installation does not have: flywheel-robot-agent "
                "holds the robot side only; install robot-flywheel (the whole pipeline) for it",
                name=exports[name],
            ) from None
        return getattr(module, name)

    return __getattr__
