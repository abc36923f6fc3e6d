"""Theta selection for a ratio (exact / interpolated / nearest)."""
from __future__ import annotations

import pytest

from qtale_export.errors import QtaleError
from qtale_export.deploy.runtime.select import select_theta

TABLE = {"0.5": {"theta": 0.6, "realized": 0.5}, "0.6": {"theta": 0.4, "realized": 0.6},
         "0.8": {"theta": 0.1, "realized": 0.8}}


def test_exact_and_dense():
    assert select_theta(TABLE, 0.6) == {"ratio": 0.6, "theta": 0.4, "mode": "exact", "calibrated_ratio": 0.6}
    assert select_theta(TABLE, 0.60001)["mode"] == "exact"  # same canonical key
    assert select_theta(TABLE, 1.0)["theta"] == 0.0
    assert select_theta({}, 1)["theta"] == 0.0


def test_interpolated_and_nearest():
    s = select_theta(TABLE, 0.7)
    assert s["mode"] == "interpolated" and s["theta"] == pytest.approx(0.25)
    s = select_theta(TABLE, 0.9)  # between 0.8 and the implicit (1.0, theta 0)
    assert s["theta"] == pytest.approx(0.05)
    n = select_theta(TABLE, 0.68, mode="nearest")
    assert n["mode"] == "nearest" and n["theta"] == 0.4 and n["calibrated_ratio"] == 0.6
    assert select_theta(TABLE, 0.7, mode="nearest")["calibrated_ratio"] == 0.8  # a tie goes up


@pytest.mark.parametrize("ratio, msg", [(0.0, r"\(0, 1\]"), (-1, r"\(0, 1\]"), (1.01, r"\(0, 1\]"),
                                        ("abc", "invalid ratio"), (float("nan"), "invalid"),
                                        (0.4, "below the lowest calibrated ratio 0.5")])
def test_bad_ratios(ratio, msg):
    with pytest.raises(QtaleError, match=msg):
        select_theta(TABLE, ratio)
    with pytest.raises(QtaleError, match="unknown"):
        select_theta(TABLE, 0.6, mode="cubic")

