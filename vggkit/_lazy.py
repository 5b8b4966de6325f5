"""Subpackages that import their modules on first attribute access (PEP 562).

``import vggkit`` and ``vggkit --help`` stay free of PyTorch, yet ``vggkit.data.folders``
or ``vggkit.data.load_image`` work without importing the module first.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable


def lazy_package(package: str, names: dict[str, str] | None = None) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``names`` maps a re-exported name to its submodule;
    any other attribute that is a submodule is imported."""
    names = names or {}

    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        if not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
