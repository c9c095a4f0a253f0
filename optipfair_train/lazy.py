"""Package attributes imported on first use: importing a package, the command line's ``--help`` and its
argument checks then need no torch, while ``from package import name`` works as before.

Example:
    >>> getattr_, dir_ = lazy_attributes("optipfair_train", {"count_parameters": ".analysis"})
    >>> getattr_("count_parameters").__name__, "count_parameters" in dir_()
    ('count_parameters', True)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    package: str, names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` whose ``names`` (name -> relative module) load lazily.

    Example:
        >>> __getattr__, __dir__ = lazy_attributes(__name__, {"prune_model": ".pruning"})  # doctest: +SKIP
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name], package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *names})

    return __getattr__, __dir__
