"""A tiny calibrated fp32 export (standard ops), built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from qtale_testing import spread_routers

THETAS = {"1.0": 0.0, "0.8": 0.02, "0.6": 0.31, "0.5": 0.59}


def build_tiny_model(tiny_dir: Path):
    import qtale_export

    model = qtale_export.load(str(tiny_dir))
    spread_routers(model)
    # a fixed theta table (calibration on this random model takes a minute on a busy CPU)
    model.theta_table = {k: {"theta": t, "realized": None} for k, t in THETAS.items()}
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return build_tiny_model(tiny_dir)


@pytest.fixture(scope="session")
def tiny_export(tiny_model, tiny_dir, tmp_path_factory) -> Path:
    from qtale_export.export.main import export

    out = tmp_path_factory.mktemp("rt") / "tiny-fp32"
    export(tiny_model, out, checkpoint=str(tiny_dir), ratio=0.6, precision="fp32", ops="standard",
           decode_steps=1, verify_thetas=[0.0, 0.31])
    return out
