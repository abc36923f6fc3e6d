"""The one theta policy: ratio keys, validation, the calibrated table and ratio -> theta selection.

Every consumer goes through this module: the routed model (`RoutedModel.set_ratio`), the runtime
(`qtale run`, `qtale bench`), the export, the eval of an export, the experiment, the Triton
repository builder and the Triton router model (which gets a copy of this file, so it is
stdlib-only and imports nothing from the package at module level).

A layer runs for a token iff P(execute) >= theta. A theta table maps ratio keys (`ratio_key`) to
{"theta", "realized"}; its calibration record (`calibration_record`) says what it was calibrated
on: the weights (base, routers, adapter sha256), the quantization format and the data.

Selection (`select`), for a ratio in (0, 1]:
  * ratio 1.0 -> theta 0.0 (P(execute) >= 0 for every token: the dense model, exactly);
  * a calibrated key -> its theta ("exact"), in every mode;
  * mode "exact": any other ratio is refused;
  * mode "interpolate": between two calibrated ratios (1.0 -> theta 0 counts as one), theta is
    linearly interpolated between the neighbours' thetas ("interpolated");
  * mode "nearest": the nearest calibrated ratio (a tie goes to the higher ratio, the safer one);
  * below the lowest calibrated ratio every mode refuses: theta outside the calibrated range has
    no guarantee at all.
"""
from __future__ import annotations

try:
    from ..errors import QtaleError
except ImportError:  # the copy inside a Triton model folder: no package around it
    class QtaleError(ValueError):
        """A user-facing error (one line)."""

MODES = ("exact", "interpolate", "nearest")


# ---- values -----------------------------------------------------------------------------------
def check_ratio(value) -> float:
    """A target execution ratio in (0, 1], or a one-line QtaleError."""
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise QtaleError(f"invalid ratio '{value}': must be a number in (0, 1]") from None
    if not 0.0 < r <= 1.0 or r != r:
        raise QtaleError(f"invalid ratio '{value}': must be in (0, 1]")
    return r


def check_theta(value) -> float:
    """A theta in [0, 1], or a one-line QtaleError."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise QtaleError(f"theta must be a number in [0, 1], got {value}") from None
    if not 0.0 <= t <= 1.0 or t != t:
        raise QtaleError(f"theta must be in [0, 1], got {value}")
    return t


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise QtaleError(f"unknown ratio selection mode '{mode}' (choose from {', '.join(MODES)})")
    return mode


def ratio_key(ratio: float) -> str:
    """Canonical theta-table key of an execution ratio, e.g. 0.6 -> '0.6', 0.55 -> '0.55', 1 -> '1.0'."""
    return f"{float(ratio):.4f}".rstrip("0").rstrip(".") if float(ratio) < 1 else "1.0"


def check_table(table, where: str = "theta table") -> dict:
    """A theta table as a contract may carry it: None or {} (none), else a mapping whose keys are
    ratios in (0, 1] and whose entries are a theta in [0, 1] or {"theta", "realized"} with both in
    [0, 1]; returns it (an empty dict for None), or a one-line QtaleError naming `where`."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise QtaleError(f"{where} must be a mapping of ratio -> theta, got {type(table).__name__}")
    for key, entry in table.items():
        try:
            check_ratio(key if not isinstance(key, bool) else None)
        except QtaleError:
            raise QtaleError(f"{where}: key {key!r} is not a ratio in (0, 1]") from None
        values = entry if isinstance(entry, dict) else {"theta": entry}
        if "theta" not in values:
            raise QtaleError(f"{where}: the entry of ratio {key} has no theta")
        for name in ("theta", "realized"):
            value = values.get(name)
            if name == "realized" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise QtaleError(f"{where}: {name} of ratio {key} must be a number in [0, 1], got {value!r}")
            try:
                check_theta(value)
            except QtaleError:
                raise QtaleError(f"{where}: {name} of ratio {key} must be in [0, 1], got {value}") from None
    return table


def entry_theta(entry) -> float:
    """theta of a table entry ({"theta", "realized"} or a bare number)."""
    return float(entry["theta"] if isinstance(entry, dict) else entry)


def lookup(table: dict | None, ratio: float):
    """The table's entry for `ratio` (keys compared canonically: '0.60' and 0.60001 are '0.6'), or None."""
    want = ratio_key(ratio)
    for k, v in (table or {}).items():
        try:
            if ratio_key(float(k)) == want:
                return v
        except ValueError:
            continue
    return None


# ---- selection --------------------------------------------------------------------------------
def calibrated_points(table: dict | None) -> list[tuple[float, float]]:
    """[(ratio, theta)] sorted by ratio, always with (1.0, 0.0)."""
    pts = {1.0: 0.0}
    for k, v in (table or {}).items():
        try:
            r, t = float(k), entry_theta(v)
        except (TypeError, ValueError, KeyError):
            continue
        if 0.0 < r < 1.0:
            pts[r] = t
    return sorted(pts.items())


def select(table: dict | None, ratio, mode: str = "interpolate", where: str = "") -> dict:
    """{"ratio": requested, "theta", "mode": exact|interpolated|nearest, "calibrated_ratio"(s)};
    `where` names the table in errors (" in the export's theta table")."""
    r = check_ratio(ratio)
    check_mode(mode)
    if r >= 1.0:
        return {"ratio": 1.0, "theta": 0.0, "mode": "exact", "calibrated_ratio": 1.0}
    key = ratio_key(r)
    entry = lookup(table, r)
    if entry is not None:
        return {"ratio": r, "theta": check_theta(entry_theta(entry)), "mode": "exact", "calibrated_ratio": float(key)}
    pts = calibrated_points(table)
    if len(pts) == 1:
        raise QtaleError(f"ratio {key} is not calibrated: there is no theta table{where} (only ratio 1.0 "
                         "works); run qtale calibrate (and re-export)")
    have = ", ".join(ratio_key(p) for p, _ in pts)
    if mode == "exact":
        raise QtaleError(f"ratio {key} is not calibrated{where} (calibrated: {have}); run qtale calibrate "
                         "with it, or choose an interpolated/nearest ratio")
    if r < pts[0][0]:
        raise QtaleError(f"ratio {key} is below the lowest calibrated ratio {ratio_key(pts[0][0])} "
                         f"(calibrated: {have}); use ratio >= {ratio_key(pts[0][0])} or recalibrate")
    if mode == "nearest":
        rr, th = min(pts, key=lambda p: (round(abs(p[0] - r), 9), -p[0]))
        return {"ratio": r, "theta": th, "mode": "nearest", "calibrated_ratio": rr}
    (r0, t0), (r1, t1) = next((a, b) for a, b in zip(pts, pts[1:]) if a[0] <= r <= b[0])
    w = (r - r0) / (r1 - r0)
    return {"ratio": r, "theta": t0 + w * (t1 - t0), "mode": "interpolated", "calibrated_ratios": [r0, r1]}


def theta_for(table: dict | None, ratio, mode: str = "interpolate", where: str = "") -> float:
    """Just the theta of `select`."""
    return float(select(table, ratio, mode, where)["theta"])


# ---- what a table was calibrated on -----------------------------------------------------------
def weights_of(meta: dict) -> dict:
    """What a checkpoint's thetas depend on: base, routers and adapter sha256, quantization format."""
    files = meta.get("files") or {}
    adapter = sorted(v for k, v in files.items() if k.startswith("adapter/") and k.endswith(".safetensors"))
    return {"base_sha256": (meta.get("base_model") or {}).get("sha256"),
            "routers_sha256": files.get("routers.safetensors"),
            "adapter_sha256": adapter[0] if adapter else None,
            "quantization": (meta.get("quantization") or {}).get("format")}


def calibration_record(meta: dict, data: dict) -> dict:
    """The record stored next to a table calibrated now on the checkpoint `meta` describes."""
    return {**data, "weights": weights_of(meta)}


def stale_reason(meta: dict) -> str | None:
    """Why a checkpoint's theta table does not belong to its weights, or None when it does.

    A record without "weights" predates this check; tables used to be calibrated before
    quantization (the experiment marks its re-calibrations "after_quantization"), so such a
    record is stale exactly when the checkpoint is quantized and not marked.
    """
    if not meta.get("theta_table"):
        return None
    rec = meta.get("calibration") or {}
    now = weights_of(meta)
    if "weights" not in rec:
        if now["quantization"] and not rec.get("after_quantization"):
            return f"its theta table was calibrated before quantization to {now['quantization']}"
        return None
    was = rec["weights"]
    for k, what in (("quantization", "quantization format"), ("base_sha256", "base weights"),
                    ("routers_sha256", "routers"), ("adapter_sha256", "LoRA adapter")):
        if was.get(k) != now[k]:
            return f"its theta table was calibrated on other {what} ({was.get(k)} vs {now[k]})"
    return None
