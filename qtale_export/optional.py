"""The one helper for optional dependencies: import lazily, or fail with one line saying what to install."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import QtaleError


def require(module: str, hint: str, name: str | None = None) -> ModuleType:
    """`import module`, or QtaleError("<name> is not installed: <hint>")."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise QtaleError(f"{name or module.split('.')[0]} is not installed: {hint}") from None
