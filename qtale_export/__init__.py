"""QTALE: quantization-robust token-adaptive layer execution, from training to deployment."""
from .api import load, new_routed
from .errors import QtaleError
from .routing import RoutedModel, RouterConfig

__all__ = ["load", "new_routed", "RoutedModel", "RouterConfig", "QtaleError"]
__version__ = "0.1.0"
