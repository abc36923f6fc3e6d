"""Pick the export / engine variant for a budget; ratio -> theta is the one policy, `qtale_export.deploy.theta`.

Torch-free and dependency-free (stdlib only).

Budget rule (`select_budget`), over measured points {export, ratio, ms_per_token, accuracy}:
  * max_ms_per_token only: of the points that meet it, the highest ratio, then the wider
    precision (fp32 > fp16 > int8/fp8 > int4), then the lower latency (no accuracy was asked for,
    so the most compute per token that fits is taken as the most accurate);
  * min_accuracy only: of the points that meet it, the lowest latency (or lowest ratio if no
    latency was recorded);
  * both: of the points that meet both, the lowest latency;
  * nothing meets it -> QtaleError naming the closest point (smallest relative violation).
"""
from __future__ import annotations

from ...errors import QtaleError
from ..theta import MODES, calibrated_points, check_ratio, ratio_key
from ..theta import select as select_theta

__all__ = ["MODES", "calibrated_points", "check_ratio", "ratio_key", "select_theta", "budget_points",
           "select_budget"]

PRECISION_RANK = {"fp32": 4, "fp16": 3, "bf16": 3, "int8": 2, "fp8": 2, "int4": 1}


def budget_points(manifests: list[tuple[str, dict]]) -> list[dict]:
    """Measured points from manifests' "benchmarks" and "eval" entries (see docs/runtime.md).

    benchmarks: [{"backend", "ratio", "ms_per_token" (decode), ...}]; eval: [{"ratio",
    "accuracy", "task"?}] (several tasks per ratio are averaged).
    """
    points: dict[tuple[str, str], dict] = {}
    for name, m in manifests:
        for b in m.get("benchmarks") or []:
            if not isinstance(b, dict) or "ratio" not in b or b.get("ms_per_token") is None:
                continue
            p = points.setdefault((name, ratio_key(b["ratio"])), {"export": name, "ratio": float(b["ratio"]),
                                                                  "precision": m.get("precision")})
            p["ms_per_token"] = min(float(b["ms_per_token"]), p.get("ms_per_token", float("inf")))
        acc: dict[str, list] = {}
        for e in m.get("eval") or []:
            if isinstance(e, dict) and "ratio" in e and e.get("accuracy") is not None:
                acc.setdefault(ratio_key(e["ratio"]), []).append(float(e["accuracy"]))
        for k, vals in acc.items():
            p = points.setdefault((name, k), {"export": name, "ratio": float(k), "precision": m.get("precision")})
            p["accuracy"] = sum(vals) / len(vals)
    return list(points.values())


def select_budget(points: list[dict], max_ms_per_token: float | None = None,
                  min_accuracy: float | None = None) -> dict:
    """The point chosen by the budget rule of the module doc; QtaleError if none meets it."""
    if max_ms_per_token is None and min_accuracy is None:
        raise QtaleError("a budget needs max_ms_per_token and/or min_accuracy")
    need = []
    if max_ms_per_token is not None:
        need.append("ms_per_token")
    if min_accuracy is not None:
        need.append("accuracy")
    usable = [p for p in points if all(p.get(k) is not None for k in need)]
    if not usable:
        what = " and ".join({"ms_per_token": "benchmark (qtale bench --record)",
                             "accuracy": "eval"}[k] for k in need)
        raise QtaleError(f"no {what} results recorded in the manifest(s): cannot apply the budget")

    def violation(p):
        v = 0.0
        if max_ms_per_token is not None:
            v += max(0.0, p["ms_per_token"] / max_ms_per_token - 1.0)
        if min_accuracy is not None:
            v += max(0.0, 1.0 - p["accuracy"] / min_accuracy) if min_accuracy > 0 else 0.0
        return v

    ok = [p for p in usable if violation(p) == 0.0]
    if not ok:
        c = min(usable, key=violation)
        got = ", ".join(f"{k} {c[k]:.4g}" for k in need)
        want = ", ".join(s for s in (f"max {max_ms_per_token} ms/token" if max_ms_per_token is not None else "",
                                     f"min accuracy {min_accuracy}" if min_accuracy is not None else "") if s)
        raise QtaleError(f"no variant meets the budget ({want}); closest: {c['export']} ratio "
                         f"{ratio_key(c['ratio'])} ({got})")
    if min_accuracy is None:
        return max(ok, key=lambda p: (p["ratio"], PRECISION_RANK.get(p.get("precision"), 0), -p["ms_per_token"]))
    if max_ms_per_token is None and not all(p.get("ms_per_token") is not None for p in ok):
        return min(ok, key=lambda p: (p["ratio"], -p["accuracy"]))
    return min(ok, key=lambda p: (p.get("ms_per_token", float("inf")), -p["accuracy"]))
