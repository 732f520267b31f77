"""Lazy public names: a package lists what it exports and where each lives; each loads on first use.

So ``import stillroom`` (and ``stillroom --version``) stays cheap, while ``from stillroom import train`` or
``from stillroom.tokenization import align`` work as the public face. Used by every package ``__init__``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``exports`` map each name to its module."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
