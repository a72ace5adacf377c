"""Lazy exports for package ``__init__`` files.

A capability's Lightning layer (and its optional dependencies: transformers, diffusers, gymnasium)
loads only when one of its names is first used, so that the plain-PyTorch numerics import alone.
Each ``__init__`` also imports the same names under ``TYPE_CHECKING`` so that editors, type checkers
and the API docs resolve them; ``tests/test_layout.py`` checks that the two lists agree.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], eager: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``.

    Args:
        package: the package's ``__name__``.
        exports: public name -> the module that defines it, loaded on first access.
        eager: the package's ``globals()``, where a loaded name is cached.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        eager[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(eager) | set(exports))

    return __getattr__, __dir__
