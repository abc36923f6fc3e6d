"""The one theta policy (qtale_export/deploy/theta.py): keys, validation, selection modes, staleness."""
from __future__ import annotations

import pytest

from qtale_export.deploy import theta as policy
from qtale_export.errors import QtaleError

TABLE = {"0.5": {"theta": 0.6, "realized": 0.5}, "0.8": {"theta": 0.1, "realized": 0.8}}


def test_modes_agree_on_calibrated_ratios_and_differ_between():
    for mode in policy.MODES:
        assert policy.theta_for(TABLE, 0.5, mode) == 0.6
        assert policy.theta_for(TABLE, "0.80", mode) == 0.1
        assert policy.theta_for(TABLE, 1.0, mode) == 0.0
    assert policy.theta_for(TABLE, 0.65, "interpolate") == pytest.approx(0.35)
    assert policy.theta_for(TABLE, 0.6, "nearest") == 0.6
    assert policy.theta_for(TABLE, 0.9, "interpolate") == pytest.approx(0.05)  # toward theta 0 at 1.0
    with pytest.raises(QtaleError, match=r"ratio 0.65 is not calibrated \(calibrated: 0.5, 0.8, 1.0\)"):
        policy.select(TABLE, 0.65, "exact")


@pytest.mark.parametrize("ratio,mode,match", [
    (0.0, "interpolate", r"must be in \(0, 1\]"), (1.5, "nearest", r"must be in \(0, 1\]"),
    (float("nan"), "exact", r"must be in \(0, 1\]"), ("x", "exact", "must be a number"),
    (0.4, "interpolate", "below the lowest calibrated ratio 0.5"), (0.6, "cubic", "unknown ratio selection mode"),
])
def test_bad_ratio_is_one_line(ratio, mode, match):
    with pytest.raises(QtaleError, match=match) as e:
        policy.select(TABLE, ratio, mode)
    assert "\n" not in str(e.value)


def test_no_table_and_bad_theta():
    with pytest.raises(QtaleError, match="ratio 0.6 is not calibrated: there is no theta table"):
        policy.select({}, 0.6)
    assert policy.select(None, 1.0)["theta"] == 0.0
    with pytest.raises(QtaleError, match=r"theta must be in \[0, 1\], got 1.5"):
        policy.check_theta(1.5)
    with pytest.raises(QtaleError, match="theta must be in"):
        policy.select({"0.6": {"theta": 2.0}}, 0.6)  # a corrupt table entry


def test_stale_reason_follows_the_weights():
    meta = {"base_model": {"sha256": "b"}, "files": {"routers.safetensors": "r", "adapter/adapter_model.safetensors": "a"},
            "quantization": None, "theta_table": TABLE}
    meta["calibration"] = policy.calibration_record(meta, {"data": "calibration.txt"})
    assert meta["calibration"]["weights"] == {"base_sha256": "b", "routers_sha256": "r", "adapter_sha256": "a",
                                              "quantization": None}
    assert policy.stale_reason(meta) is None
    quantized = {**meta, "quantization": {"format": "int4-awq"}}
    assert "quantization format (None vs int4-awq)" in policy.stale_reason(quantized)
    retrained = {**meta, "files": {**meta["files"], "routers.safetensors": "r2"}}
    assert "other routers" in policy.stale_reason(retrained)
    # a record from before the check: stale only on a quantized checkpoint not marked re-calibrated
    legacy = {**quantized, "calibration": {"data": "calibration.txt"}}
    assert "before quantization to int4-awq" in policy.stale_reason(legacy)
    assert policy.stale_reason({**legacy, "calibration": {"after_quantization": True}}) is None
    assert policy.stale_reason({**quantized, "theta_table": {}}) is None  # nothing to be stale


def test_the_triton_copy_runs_without_the_package(tmp_path):
    """The router model imports a copy of theta.py with no package around it."""
    import shutil
    import subprocess
    import sys

    shutil.copy2(policy.__file__, tmp_path / "theta_policy.py")
    code = ("import theta_policy as p; print(p.theta_for({'0.5': {'theta': 0.6}}, 0.75));"
            "\ntry: p.select({}, 2)\nexcept ValueError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(tmp_path)}).stdout.split("\n")
    assert float(out[0]) == pytest.approx(0.3) and "must be in (0, 1]" in out[1]
