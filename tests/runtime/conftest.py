"""A tiny calibrated fp32 export (standard ops), built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import TEXT, spread_routers

RATIOS = [0.5, 0.6, 0.8, 1.0]


def build_tiny_model(tiny_dir: Path):
    import torch

    import qtale_export
    from qtale_export.calibrate import calibrate

    model = qtale_export.load(str(tiny_dir))
    spread_routers(model)
    tok = model.tokenizer
    enc = tok([TEXT[i:i + 300] for i in range(0, 1200, 300)], return_tensors="pt", padding=True)
    batches = [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"].long()}]
    with torch.no_grad():
        calibrate(model, batches, RATIOS, tol=0.01, progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return build_tiny_model(tiny_dir)


@pytest.fixture(scope="session")
def tiny_export(tiny_model, tiny_dir, tmp_path_factory) -> Path:
    from qtale_export.export.main import export

    out = tmp_path_factory.mktemp("rt") / "tiny-fp32"
    export(tiny_model, out, checkpoint=str(tiny_dir), ratio=0.6, precision="fp32", ops="standard",
           decode_steps=2)
    return out
