"""The QTALE routers that ship inside the package for the embedded default model: small, no base
weights or optimizer state, traceable to docs/results.json and the README's results block."""
from __future__ import annotations

import json
import re

import pytest

import qtale_export
from qtale_export import checkpoint
from qtale_export import experiment as X
from qtale_export.api import PRETRAINED, shipped_checkpoint
from qtale_testing import REPO

SHIPPED = PRETRAINED / "smollm2-135m"


def test_default_model_ships_routers_only():
    assert shipped_checkpoint("smollm2-135m") == SHIPPED
    meta = checkpoint.read_meta(SHIPPED)
    lora = bool(meta["training"]["config"].get("lora_rank"))
    assert sorted(p.name for p in SHIPPED.iterdir()) == sorted(
        ["provenance.json", "qtale.json", "routers.safetensors"] + (["adapter"] if lora else []))
    checkpoint.verify_files(SHIPPED, meta)
    assert meta["base_model"]["id"] == "smollm2-135m" and meta["quantization"] is None
    adapter = sorted(k for k in meta["files"] if k.startswith(checkpoint.ADAPTER + "/"))
    assert sorted(meta["files"]) == sorted([checkpoint.ROUTERS] + adapter) and bool(adapter) == lora
    for name in adapter:  # LoRA factors only: safetensors + config, small
        assert name.endswith((".safetensors", ".json")) and (SHIPPED / name).stat().st_size < 32 << 20
    assert (SHIPPED / checkpoint.ROUTERS).stat().st_size < 8 << 20
    from safetensors import safe_open

    with safe_open(str(SHIPPED / checkpoint.ROUTERS), "pt") as f:  # router tensors only, no decoder weights
        keys = list(f.keys())
    assert keys and all(re.fullmatch(r"\d+\.(down|norm|out)\.(weight|bias)", k) for k in keys), keys[:5]
    assert {int(k.split(".")[0]) for k in keys} == set(range(meta["router"]["first_routed_layer"], 30))
    # the theta table was calibrated: realized ratios near their keys, theta 0 for ratio 1.0
    table = meta["theta_table"]
    assert {"0.5", "0.6", "1.0"} <= set(table) and table["1.0"]["theta"] == 0.0
    for k, v in table.items():
        assert abs(v["realized"] - float(k)) <= 0.02, (k, v)
    assert meta["training"]["steps_done"] == meta["training"]["config"]["steps"]
    assert meta["training"]["config"]["method"] == "qtale" and meta["training"]["config"]["lambda2"] > 0


def test_provenance_traces_to_results_and_readme():
    prov = json.loads((SHIPPED / "provenance.json").read_text())
    results = REPO / "docs" / "results.json"
    assert prov["results"]["sha256"] == checkpoint.file_sha256(results)
    assert prov["recipe"]["sha256"] == checkpoint.file_sha256(REPO / prov["recipe"]["file"])
    meta = checkpoint.read_meta(SHIPPED)
    assert prov["theta_table_fp"] == meta["theta_table"] and prov["base_model"] == meta["base_model"]
    res = json.loads(results.read_text())
    assert res["training"]["qtale"]["final_losses"] == meta["training"]["final_losses"]
    readme = (REPO / "README.md").read_text()
    block = X.render_readme_block(res, prov["results"]["sha256"])
    assert block in readme, "README's results block is not the rendering of docs/results.json"


@pytest.mark.slow
def test_load_default_gives_the_shipped_qtale_model():
    model = qtale_export.load("smollm2-135m")
    assert model.checkpoint_dir == SHIPPED and model.training_info["config"]["method"] == "qtale"
    theta = model.set_ratio(0.5)
    assert theta == checkpoint.read_meta(SHIPPED)["theta_table"]["0.5"]["theta"]
    fresh = qtale_export.load("smollm2-135m", fresh=True)
    assert getattr(fresh, "checkpoint_dir", None) is None and not fresh.theta_table
