"""Quantized checkpoints (`qtale quantize`) export on the checkpoint's own grid: ONNX Runtime
reproduces the PyTorch quantized model (fake quant), and verification compares against it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qtale_export
from qtale_export import checkpoint
from qtale_export.deploy import theta as theta_policy
from qtale_export.errors import QtaleError
from qtale_export.export import main as export_main
from qtale_export.deploy import ort_ops
from qtale_export.export.graphs import extract
from qtale_export.export.precision import checkpoint_grid
from qtale_export.export.verify import reference_model, verify_export
from qtale_export.quantize import quantize, quantizer_tensors

from qtale_testing import TEXT, random_batch, spread_routed_model


def grid_dequant(grid: dict) -> np.ndarray:
    """codes * scale [N, K] fp32 (what the exported graphs compute)."""
    c = grid["codes"].astype(np.float32)
    n, k = c.shape
    return (c.reshape(n, -1, grid["block"]) * grid["scale"][..., None]).reshape(n, k)


ATOL = 1e-3


@pytest.fixture(scope="module")
def quantized_ckpt(tiny_dir, tmp_path_factory):
    cache = {}

    def get(fmt):
        if fmt not in cache:
            model = spread_routed_model(tiny_dir)
            calib = [TEXT] * 4 if fmt == "int4-awq" else []  # AWQ searches its scales on activations
            info = quantize(model, fmt, calib, model.tokenizer, max_length=64)
            cache[fmt] = checkpoint.save(model, tmp_path_factory.mktemp("qckpt") / fmt, quantization=info,
                                         extra_tensors=quantizer_tensors(model))
            # the table stands for one calibrated on the quantized weights (a stale one is refused)
            checkpoint.update_meta(cache[fmt], lambda m: m.update(
                calibration=theta_policy.calibration_record(m, {"data": "fixture"})))
        return cache[fmt]
    return get


@pytest.mark.parametrize("fmt", ["int4", "int3", "int8"])
def test_grid_reproduces_fake_quant(quantized_ckpt, fmt):
    model = qtale_export.load(quantized_ckpt(fmt))
    w = extract(model)
    layer = model.causal_lm.model.layers[1]
    for proj, mod in (("q_proj", layer.self_attn.q_proj), ("down_proj", layer.mlp.down_proj)):
        grid = checkpoint_grid(w.tensors[f"layers.1.{proj}.weight"], w.quantized[f"layers.1.{proj}"])
        qmax = 2 ** (grid["bits"] - 1) - 1
        assert np.abs(grid["codes"]).max() <= qmax
        with torch.no_grad():
            fq = mod.weight_quantizer(mod.weight) if hasattr(mod, "weight_quantizer") else mod.weight
        np.testing.assert_allclose(grid_dequant(grid), fq.detach().float().numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt,target", [("int4", "ort-cpu"), ("int4", "tensorrt"), ("int3", "ort-cpu"),
                                        ("int4-awq", "ort-cpu"), ("int4-awq", "tensorrt"), ("int8", "ort-cpu"),
                                        ("fp8", "tensorrt")])
def test_quantized_export_matches_pytorch(quantized_ckpt, tmp_path, fmt, target):
    ckpt = quantized_ckpt(fmt)
    model = qtale_export.load(ckpt)
    out = tmp_path / f"{fmt}-{target}"
    manifest = export_main.export(model, out, checkpoint=str(ckpt), ratio=0.6, target=target)
    precision = {"int4": "int4", "int3": "int4", "int4-awq": "int4", "int8": "int8", "fp8": "fp8"}[fmt]
    assert manifest["precision"] == precision and manifest["verification"]["ok"]
    assert "quantized checkpoint" in manifest["verification"]["reference"]
    import onnx

    types = {n.op_type for n in onnx.load(str(out / "prefill.onnx"), load_external_data=False).graph.node}
    assert ("MatMulNBits" if precision == "int4" and target == "ort-cpu" else "DequantizeLinear") in types
    sess = ort_ops.session(out / "prefill.onnx", exact=True)
    ids, mask = random_batch(model, left_pad=(4,))
    # the checkpoint itself, with the export's int4 embedding / LM head table where it has one (ort-cpu)
    ref_model = reference_model(manifest, out, model)
    diffs = []
    for th in (0.0, 0.5):
        theta = torch.full((ids.shape[0],), th)
        with torch.no_grad():
            ref = ref_model(ids, mask, theta=theta).logits.numpy()
        got = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                    "theta": theta.numpy()})[0]
        valid = mask.bool().numpy()
        diffs.append(float(np.abs(got - ref)[valid].max()))
    print(f"{fmt} {target}: max |ORT - PyTorch quantized| at theta 0 / 0.5: {diffs}")
    assert max(diffs) <= ATOL, diffs
    # the export folder verifies on its own (reference: the checkpoint, reloaded from disk)
    report = verify_export(out, thetas=[0.0, 0.5], decode_steps=2)
    assert report["ok"], report


def test_precision_mismatch_refused(quantized_ckpt, tmp_path):
    ckpt = quantized_ckpt("int4")
    model = qtale_export.load(ckpt)
    with pytest.raises(QtaleError, match="int4"):
        export_main.export(model, tmp_path / "x", checkpoint=str(ckpt), precision="int8")
    assert not (tmp_path / "x").exists()


def test_stale_theta_table_is_refused(quantized_ckpt, tmp_path):
    """A quantized checkpoint whose table was calibrated before quantization does not export
    silently; `qtale calibrate` (a record naming the quantized weights) or the flag lets it."""
    import shutil

    stale = tmp_path / "stale"
    shutil.copytree(quantized_ckpt("int4"), stale)
    def drop(meta: dict) -> None:
        del meta["calibration"]

    checkpoint.update_meta(stale, drop)
    model = qtale_export.load(stale)
    assert "calibrated before quantization to int4" in model.theta_stale
    out = tmp_path / "out"
    with pytest.raises(QtaleError, match=r"calibrated before quantization.*qtale calibrate") as e:
        export_main.export(model, out, checkpoint=str(stale), ratio=0.6)
    assert "\n" not in str(e.value) and not out.exists() and not list(tmp_path.glob(".out*"))
    # a record from before quantization (quantization null) is stale the same way
    checkpoint.update_meta(stale, lambda m: m.update(calibration=theta_policy.calibration_record(
        {**m, "quantization": None}, {"data": "before"})))
    assert "other quantization format (None vs int4)" in qtale_export.load(stale).theta_stale
    assert qtale_export.load(quantized_ckpt("int4")).theta_stale is None
