"""QTALE: quantization-robust token-adaptive layer execution, from training to deployment.

Names are imported lazily so the deployment side (runtime, Triton, TensorRT builds) can import
`qtale_export.<module>` without PyTorch installed.
"""
from .errors import QtaleError

__all__ = ["load", "new_routed", "RoutedModel", "RouterConfig", "QtaleError"]
__version__ = "0.1.0"

_LAZY = {"load": "api", "new_routed": "api", "RoutedModel": "routing", "RouterConfig": "routing"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'qtale_export' has no attribute {name!r}")
