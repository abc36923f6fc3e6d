"""Every model family on a tiny random config: the routed model at ratio 1 is the HF model, and its
exports (the standard lowering, the ONNX Runtime form, the TensorRT forms) match it."""
from __future__ import annotations

import pytest
import torch

import qtale_export
from qtale_export.errors import QtaleError
from qtale_export.export import main as export_main
from qtale_export.families import family
from qtale_export.models import FAMILIES

from qtale_testing import make_tiny, spread_routed_model

# model type -> config overrides of its tiny model (Mistral with a window shorter than the inputs)
TINY = {"llama": {}, "mistral": {"sliding_window": 8}, "qwen2": {}, "qwen3": {}, "gemma3_text": {}}


def test_every_family_has_a_tiny_config():
    assert set(TINY) == set(FAMILIES)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(model_type):
        if model_type not in cache:
            cache[model_type] = make_tiny(tmp_path_factory.mktemp(model_type), layers=4, model_type=model_type,
                                          **TINY[model_type])
        return cache[model_type]
    return get


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_ratio_one_is_the_hf_model(tiny, model_type):
    """Left-padded batch of 24 tokens (past every tiny window), all layers executed, compacted and dense."""
    m = qtale_export.load(tiny(model_type))
    assert type(m.family) is type(family(model_type))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, m.hf_config.vocab_size, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    valid = mask.bool()
    with torch.no_grad():
        ref = m.causal_lm(ids, attention_mask=mask).logits
        for dense in (False, True):
            out = m(ids, attention_mask=mask, theta=0.0, dense=dense).logits
            assert (out - ref)[valid].abs().max().item() < 1e-4


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
@pytest.mark.parametrize("model_type", sorted(TINY))
def test_family_exports_match_pytorch(tiny, tmp_path, model_type, target):
    """fp32 on ONNX Runtime (the ORT form) and for TensorRT (the standard lowering, If decode),
    verified against PyTorch with decode steps past the window."""
    folder = tiny(model_type)
    model = spread_routed_model(folder)
    data = export_main.export(model, tmp_path / "out", checkpoint=str(folder), ratio=0.6, precision="fp32",
                              target=target, decode_steps=10)
    report = data["verification"]
    assert report["ok"] and report["top1_agreement"] == 1.0, report


def test_unsupported_block_is_refused(tiny, tmp_path):
    """What a family's hooks do not express is refused when the model is loaded."""
    import json

    folder = tiny("gemma3_text")
    bad = tmp_path / "softcap"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["final_logit_softcapping"] = 30.0
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QtaleError, match="final_logit_softcapping"):
        qtale_export.load(bad)
