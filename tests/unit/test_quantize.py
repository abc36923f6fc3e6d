"""Weight-only quantization: value sets, error bounds, save/restore, routing after quantization."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from qtale_testing import spread_routers

import qtale_export
from qtale_export import checkpoint
from qtale_export.errors import QtaleError

pytest.importorskip("modelopt")
from qtale_export import quantize as Q  # noqa: E402
from qtale_export.cli import quantize as cli_quantize  # noqa: E402

CALIB = ["The quick brown fox jumps over the lazy dog.", "Water boils at one hundred degrees Celsius."]


def _args(ckpt, fmt, out, *extra):
    p = argparse.ArgumentParser()
    cli_quantize.add_arguments(p)
    return p.parse_args([str(ckpt), "--format", fmt, "--out", str(out), "--json", *extra])


def _groups(w: torch.Tensor, g: int) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1] // g, g)


def _effective(lin) -> torch.Tensor:
    with torch.no_grad():
        return lin.weight_quantizer(lin.weight)


@pytest.mark.parametrize("fmt,bits", [("int4", 4), ("int3", 3)])
def test_group_values_and_error(tiny_dir, fmt, bits):
    model = qtale_export.load(tiny_dir)
    before = {n: lin.weight.detach().clone() for n, lin in Q.decoder_linears(model).items()}
    info = Q.quantize(model, fmt, None, model.tokenizer)
    qmax = 2 ** (bits - 1) - 1
    for name, lin in Q.decoder_linears(model).items():
        g = info["group_size"][Q.layer_type(name)]
        assert g == (128 if lin.in_features % 128 == 0 else 64)
        w = _effective(lin) if fmt != "int3" else lin.weight.detach()
        wg, og = _groups(w, g), _groups(before[name], g)
        for row in range(wg.shape[0]):
            for k in range(wg.shape[1]):
                assert wg[row, k].unique().numel() <= 2 ** bits
        bound = og.abs().amax(-1, keepdim=True) / qmax / 2 + 1e-6
        assert ((wg - og).abs() <= bound).all()
    assert info["weight_bytes"]["quantized"] < info["weight_bytes"]["fp16"] * (bits + 1) / 16


def test_group_size_choice_and_override(tiny_dir):
    model = qtale_export.load(tiny_dir)
    lin = Q.decoder_linears(model)
    g = Q.group_sizes(lin, "int4", None)
    assert g["mlp.down_proj"] == 128 and g["self_attn.q_proj"] == 64  # in=128 -> 128, in=64 -> 64
    assert set(Q.group_sizes(lin, "int4", 32).values()) == {32}
    with pytest.raises(QtaleError, match="does not divide"):
        Q.group_sizes(lin, "int4", 128)
    with pytest.raises(QtaleError, match="power of two"):
        Q.group_sizes(lin, "int4", 48)
    with pytest.raises(QtaleError, match="per-channel"):
        Q.group_sizes(lin, "int8", 64)
    with pytest.raises(QtaleError, match="unknown quantization format"):
        Q.quantize(model, "int2", None)


@pytest.mark.parametrize("fmt", ["int4-awq", "int4", "int3", "int8", "fp8"])
def test_save_restore_identical_logits(tiny_dir, tmp_path, fmt):
    out = tmp_path / fmt
    res = cli_quantize.run(_args(tiny_dir, fmt, out, "--calib-samples", "2", "--calib-length", "64"))
    assert res["verified_identical_logits"]
    json.dumps(res)  # the result and the stored description are plain JSON
    meta = json.loads((out / "qtale.json").read_text())
    info = meta["quantization"]
    assert info["format"] == fmt and "quantizer.safetensors" in meta["files"]
    assert info["quantizer"] == ("qtale-rtn" if fmt == "int3" else f"nvidia-modelopt {__import__('modelopt').__version__}")
    # no base weights stored: only scales
    from safetensors.torch import load_file
    stored = load_file(out / "quantizer.safetensors")
    n_weights = sum(m.weight.numel() for m in Q.decoder_linears(qtale_export.load(tiny_dir)).values())
    assert sum(t.numel() for t in stored.values()) < n_weights / 8
    ids = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 8]])
    a = qtale_export.load(out)
    b = qtale_export.load(out)
    with torch.no_grad():
        assert torch.equal(a(ids, execute_all=True).logits, b(ids, execute_all=True).logits)
    fp = qtale_export.load(tiny_dir)
    with torch.no_grad():
        assert not torch.equal(a(ids, execute_all=True).logits, fp(ids, execute_all=True).logits)
    with pytest.raises(QtaleError, match="already quantized"):
        cli_quantize.run(_args(out, "int4", tmp_path / "again"))


def test_int3_restore_refuses_other_weights(tiny_dir, tmp_path):
    from qtale_testing import make_tiny

    out = tmp_path / "q3"
    cli_quantize.run(_args(tiny_dir, "int3", out))
    other = make_tiny(tmp_path / "other", seed=1)
    meta = json.loads((out / "qtale.json").read_text())
    meta["base_model"] = {"id": str(other), "sha256": None}  # the sha check cannot be bypassed (issue 24)
    (out / "qtale.json").write_text(json.dumps(checkpoint.seal(meta)))
    with pytest.raises(QtaleError, match="'base_model' has no 'sha256'"):
        qtale_export.load(out)
    from qtale_export.api import new_routed
    from qtale_export.quantize import restore

    model = new_routed(other)  # restore itself still notices other weights
    with pytest.raises(QtaleError, match="do not match the base weights"):
        restore(model, out, meta["quantization"])
    meta["base_model"] = {"id": str(other), "sha256": "0" * 64}
    (out / "qtale.json").write_text(json.dumps(checkpoint.seal(meta)))
    with pytest.raises(QtaleError, match="sha256 differs"):
        qtale_export.load(out)


def test_quantized_model_routes_and_calibrates(tiny_dir):
    from qtale_export.calibrate import calibrate, realized_ratio

    model = qtale_export.load(tiny_dir)
    spread_routers(model, 1.0)
    Q.quantize(model, "int4", None, model.tokenizer)  # AWQ is covered by the round-trip test
    enc = model.tokenizer(CALIB, return_tensors="pt", padding=True)
    batches = [{"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}]
    with torch.no_grad():
        g_lo = torch.stack(model(enc.input_ids, attention_mask=enc.attention_mask, theta=0.2).gates)
        g_hi = torch.stack(model(enc.input_ids, attention_mask=enc.attention_mask, theta=0.8).gates)
    assert not torch.equal(g_lo, g_hi) and g_lo.sum() > g_hi.sum()
    assert realized_ratio(model, batches, 0.1) > realized_ratio(model, batches, 0.9)
    table = calibrate(model, batches, [0.5], tol=0.05, progress=False)
    assert abs(table["0.5"]["realized"] - 0.5) <= 0.1


@pytest.mark.slow
def test_default_model_group_sizes(tmp_path):
    model = qtale_export.load("smollm2-135m", fresh=True)
    info = Q.quantize(model, "int4", None)
    assert info["group_size"]["mlp.down_proj"] == 128 and info["group_size"]["self_attn.q_proj"] == 64
    assert info["num_layers"] == 30 * 7
    assert 0.26 < info["weight_bytes"]["ratio"] < 0.3
