"""Model families: one file of hooks per decoder block shape (see llama.py for the hooks).

`models.FAMILIES` maps a Hugging Face `model_type` to its family's module here; `family()` returns
that module's FAMILY. Nothing here imports torch (the ONNX lowerings are torch-free at import).
"""
from __future__ import annotations

import importlib

from .llama import BlockOps, Llama

__all__ = ["BlockOps", "Llama", "family"]


def family(model_type: str) -> Llama:
    """The hooks of `model_type` (a QtaleError names the supported types when it has none)."""
    from ..errors import QtaleError
    from ..models import FAMILIES

    if model_type not in FAMILIES:
        raise QtaleError(f"unsupported model type '{model_type}': QTALE routes {', '.join(FAMILIES)}")
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type]}").FAMILY
