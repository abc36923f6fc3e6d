"""The runtime's view of ratio -> theta; the one policy is `qtale_export.deploy.theta`, re-exported here.

Torch-free and dependency-free (stdlib only).
"""
from __future__ import annotations

from ..theta import MODES, calibrated_points, check_ratio, ratio_key
from ..theta import select as select_theta

__all__ = ["MODES", "calibrated_points", "check_ratio", "ratio_key", "select_theta"]
