"""Pick theta (and the export / engine variant) for a requested execution ratio or budget.

Torch-free and dependency-free (stdlib only): the Triton router model copies this file.

Ratio rule (`select_theta`):
  * ratio >= 1.0 -> theta 0.0 (P(execute) >= 0 for every token: the dense model, exactly);
  * a calibrated key (`ratio_key(ratio)` in the theta table) -> its theta ("exact");
  * mode "interpolate" (default): between two calibrated ratios (1.0 -> theta 0 counts as one),
    theta is linearly interpolated between the neighbours' thetas ("interpolated"); the realized
    ratio is only approximately the requested one, which the runtime reports from the exec masks;
  * mode "nearest": the nearest calibrated ratio (a tie goes to the higher ratio, the safer one);
  * below the lowest calibrated ratio both modes refuse (QtaleError naming the lowest): theta
    outside the calibrated range has no guarantee at all.

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

from ..errors import QtaleError
from ..ratios import check_ratio, ratio_key

__all__ = ["check_ratio", "ratio_key", "select_theta"]

MODES = ("interpolate", "nearest")
PRECISION_RANK = {"fp32": 4, "fp16": 3, "bf16": 3, "int8": 2, "fp8": 2, "int4": 1}


def calibrated_points(theta_table: dict | None) -> list[tuple[float, float]]:
    """[(ratio, theta)] sorted by ratio, always with (1.0, 0.0)."""
    pts = {1.0: 0.0}
    for k, v in (theta_table or {}).items():
        try:
            r = float(k)
            t = float(v["theta"] if isinstance(v, dict) else v)
        except (TypeError, ValueError, KeyError):
            continue
        if 0.0 < r < 1.0:
            pts[r] = t
    return sorted(pts.items())


def select_theta(theta_table: dict | None, ratio, mode: str = "interpolate") -> dict:
    """{"ratio": requested, "theta", "mode": exact|interpolated|nearest, "calibrated_ratio"(s)}."""
    r = check_ratio(ratio)
    if mode not in MODES:
        raise QtaleError(f"unknown ratio selection mode '{mode}' (choose from {', '.join(MODES)})")
    if r >= 1.0:
        return {"ratio": 1.0, "theta": 0.0, "mode": "exact", "calibrated_ratio": 1.0}
    table = theta_table or {}
    key = ratio_key(r)
    if key in table:
        v = table[key]
        return {"ratio": r, "theta": float(v["theta"] if isinstance(v, dict) else v), "mode": "exact",
                "calibrated_ratio": float(key)}
    pts = calibrated_points(table)
    lo_r = pts[0][0]
    if r < lo_r:
        have = ", ".join(ratio_key(p) for p, _ in pts)
        raise QtaleError(f"ratio {key} is below the lowest calibrated ratio {ratio_key(lo_r)} "
                         f"(calibrated: {have}); use ratio >= {ratio_key(lo_r)} or recalibrate")
    if mode == "nearest":
        rr, th = min(pts, key=lambda p: (round(abs(p[0] - r), 9), -p[0]))
        return {"ratio": r, "theta": th, "mode": "nearest", "calibrated_ratio": rr}
    for (r0, t0), (r1, t1) in zip(pts, pts[1:]):
        if r0 <= r <= r1:
            w = (r - r0) / (r1 - r0)
            return {"ratio": r, "theta": t0 + w * (t1 - t0), "mode": "interpolated",
                    "calibrated_ratios": [r0, r1]}
    raise QtaleError(f"ratio {key} cannot be placed in the theta table")  # unreachable


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
