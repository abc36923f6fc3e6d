"""Execution ratios as users give them and as theta tables key them (torch-free: the runtime uses it)."""
from __future__ import annotations

from .errors import QtaleError


def check_ratio(value) -> float:
    """A target execution ratio in (0, 1], or a one-line QtaleError."""
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise QtaleError(f"invalid ratio '{value}': must be a number in (0, 1]") from None
    if not 0.0 < r <= 1.0 or r != r:
        raise QtaleError(f"invalid ratio '{value}': must be in (0, 1]")
    return r


def ratio_key(ratio: float) -> str:
    """Canonical theta-table key of an execution ratio, e.g. 0.6 -> '0.6', 0.55 -> '0.55', 1 -> '1.0'."""
    return f"{float(ratio):.4f}".rstrip("0").rstrip(".") if float(ratio) < 1 else "1.0"
