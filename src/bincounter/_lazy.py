"""Lazy public names for the wings' __init__ modules (PEP 562).

Each wing names its public functions in its __init__ (timm's habit) without importing them: `bincounter
fetch` should not pay for torch, and `bincounter --help` should not pay for anything.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable


def lazy_names(package: str, names: dict[str, str], modules: tuple[str, ...] = ()) -> Callable[[str], Any]:
    """A module-level __getattr__ that imports `package.<module>` when `name` (or a listed module) is first
    used."""

    def __getattr__(name: str) -> Any:
        if name in modules:
            return import_module(f"{package}.{name}")
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{names[name]}"), name)

    return __getattr__
