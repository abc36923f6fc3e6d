"""Theta selection for a ratio (exact / interpolated / nearest) and for budgets."""
from __future__ import annotations

import pytest

from qtale_export.errors import QtaleError
from qtale_export.deploy.runtime.select import budget_points, select_budget, select_theta

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


MANIFESTS = [
    ("fp32", {"precision": "fp32",
              "benchmarks": [{"ratio": 1.0, "ms_per_token": 20.0}, {"ratio": 0.6, "ms_per_token": 14.0},
                             {"ratio": 0.5, "ms_per_token": 12.0}],
              "eval": [{"ratio": 1.0, "accuracy": 0.60}, {"ratio": 0.6, "accuracy": 0.58},
                       {"ratio": 0.5, "accuracy": 0.50}, {"ratio": 0.5, "accuracy": 0.54, "task": "b"}]}),
    ("int4", {"precision": "int4", "benchmarks": [{"ratio": 0.6, "ms_per_token": 8.0}],
              "eval": [{"ratio": 0.6, "accuracy": 0.56}]}),
]


def test_budget_latency_and_accuracy():
    pts = budget_points(MANIFESTS)
    assert len(pts) == 4
    assert next(p for p in pts if p["export"] == "fp32" and p["ratio"] == 0.5)["accuracy"] == pytest.approx(0.52)
    best = select_budget(pts, max_ms_per_token=15)
    assert (best["export"], best["ratio"]) == ("fp32", 0.6)  # highest ratio within the latency
    best = select_budget(pts, min_accuracy=0.55)
    assert (best["export"], best["ratio"]) == ("int4", 0.6)  # fastest that is accurate enough
    best = select_budget(pts, max_ms_per_token=13, min_accuracy=0.5)
    assert (best["export"], best["ratio"]) == ("int4", 0.6)


def test_budget_errors():
    pts = budget_points(MANIFESTS)
    with pytest.raises(QtaleError, match="closest: int4 ratio 0.6"):
        select_budget(pts, max_ms_per_token=5)
    with pytest.raises(QtaleError, match="closest: fp32 ratio 1.0"):
        select_budget(pts, min_accuracy=0.9)
    with pytest.raises(QtaleError, match="no benchmark"):
        select_budget(budget_points([("x", {"eval": [{"ratio": 1.0, "accuracy": 0.5}]})]), max_ms_per_token=5)
    with pytest.raises(QtaleError, match="needs"):
        select_budget(pts)
