"""qtale build (qtale_export/deploy/tensorrt.py) without TensorRT: planning, errors, dry run, manifest updates."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from qtale_export import cli
from qtale_export.contract import seal
from qtale_export.deploy import tensorrt as qtrt
from qtale_export.deploy.precisions import check_tensorrt
from qtale_export.cli import build as cli_build
from qtale_export.errors import QtaleError
from trt_fake_export import make_export


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_build.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def parse(*argv: str) -> qtrt.BuildOptions:
    return cli_build.options(args(*argv))


def main(argv: list[str]) -> int:
    """`qtale build ...` in this process (the SIGTERM handler cli installs is restored)."""
    old = signal.getsignal(signal.SIGTERM)
    try:
        return cli.main(argv)
    finally:
        signal.signal(signal.SIGTERM, old)


@pytest.fixture
def plugin_lib(tmp_path: Path) -> Path:
    lib = tmp_path / "libqtale_trt_plugins.so"
    lib.write_bytes(b"\x7fELF not really")
    return lib


def test_dry_run_prints_trtexec_command(tmp_path, plugin_lib, capsys):
    exp = make_export(tmp_path / "exp")
    result = cli_build.run(args(exp, "--plugin-lib", plugin_lib, "--min-tokens", 4, "--opt-tokens", 64,
                                  "--max-tokens", 512, "--batch", "1:2:4", "--timing-cache", tmp_path / "tc",
                                  "--dry-run"))
    line = capsys.readouterr().out.strip()
    assert result["dry_run"] and line.startswith("trtexec ")
    for flag in (f"--onnx={exp}/prefill.onnx", f"--saveEngine={exp}/prefill.int4.engine",
                 "--minShapes=input_ids:1x4,attention_mask:1x4,theta:1",
                 "--optShapes=input_ids:2x64,attention_mask:2x64,theta:2",
                 "--maxShapes=input_ids:4x512,attention_mask:4x512,theta:4",
                 "--stronglyTyped", f"--dynamicPlugins={plugin_lib}", f"--timingCacheFile={tmp_path}/tc",
                 "--memPoolSize=workspace:4096M"):
        assert flag in line.split(), flag
    assert not (exp / "prefill.int4.engine").exists()


def test_dry_run_jetson_defaults_and_weak_fp16(tmp_path, capsys):
    exp = make_export(tmp_path / "exp", ops="standard", precision="fp32")
    cli_build.run(args(exp, "--precision", "fp16", "--jetson", "--dry-run"))
    words = capsys.readouterr().out.split()
    assert "--fp16" in words and "--stronglyTyped" not in words
    assert "--memPoolSize=workspace:2048M" in words
    assert not any(w.startswith("--dynamicPlugins") for w in words)


def test_plugin_export_requires_plugin_lib(tmp_path):
    exp = make_export(tmp_path / "exp")
    with pytest.raises(QtaleError, match="--plugin-lib"):
        qtrt.plan_build(parse(exp))
    with pytest.raises(QtaleError, match="not found"):
        qtrt.plan_build(parse(exp, "--plugin-lib", tmp_path / "missing.so"))


def test_plugin_ops_detected_from_onnx_even_if_manifest_says_standard(tmp_path, plugin_lib):
    exp = make_export(tmp_path / "exp")
    manifest = json.loads((exp / "manifest.json").read_text())
    manifest["ops"] = "standard"
    (exp / "manifest.json").write_text(json.dumps(seal(manifest)))  # resealed, as an editor would
    with pytest.raises(QtaleError, match="plugin ops"):
        qtrt.plan_build(parse(exp))


def test_plugin_lib_for_standard_export_is_ignored_with_warning(tmp_path, plugin_lib, capsys):
    exp = make_export(tmp_path / "exp", ops="standard", precision="fp16")
    plan = qtrt.plan_build(parse(exp, "--plugin-lib", plugin_lib))
    assert plan.plugin_lib is None and not plan.uses_plugins
    assert "ignoring --plugin-lib" in capsys.readouterr().err


def test_missing_manifest_and_graph_errors(tmp_path):
    exp = make_export(tmp_path / "exp", manifest=False)
    with pytest.raises(QtaleError, match="no manifest.json"):
        qtrt.plan_build(parse(exp, "--dry-run"))
    exp = make_export(tmp_path / "exp2", ops="standard", precision="fp16")
    (exp / "prefill.onnx").unlink()
    with pytest.raises(QtaleError, match="missing"):
        qtrt.plan_build(parse(exp))
    with pytest.raises(QtaleError, match="no 'decode' graph"):
        qtrt.plan_build(parse(make_export(tmp_path / "exp3", ops="standard"), "--graph", "decode"))


def test_precision_mismatch_and_bad_profiles(tmp_path):
    exp = make_export(tmp_path / "exp", ops="standard", precision="int4")
    with pytest.raises(QtaleError, match="re-export"):
        qtrt.plan_build(parse(exp, "--precision", "fp8"))
    with pytest.raises(QtaleError, match="min-tokens"):
        qtrt.plan_build(parse(exp, "--min-tokens", 64, "--opt-tokens", 8))
    with pytest.raises(QtaleError, match="batch"):
        qtrt.plan_build(parse(exp, "--batch", "4:2:8"))


def test_fp8_refused_on_jetson_and_sm87(tmp_path, monkeypatch):
    exp = make_export(tmp_path / "exp", ops="standard", precision="fp8")
    with pytest.raises(QtaleError, match="Jetson Orin"):
        qtrt.plan_build(parse(exp, "--jetson"))
    monkeypatch.setattr(qtrt, "gpu_sm", lambda: "8.7")
    with pytest.raises(QtaleError, match=r"SM >= 8\.9.*SM 8\.7"):
        cli_build.run(args(exp))
    check_tensorrt("fp8", False, "8.9")
    check_tensorrt("fp8", False, "9.0")
    check_tensorrt("int4", True, "8.7")


def test_missing_tensorrt_is_one_line_error(tmp_path, monkeypatch):
    exp = make_export(tmp_path / "exp", ops="standard", precision="fp16")
    for name in ("tensorrt", "tensorrt_rtx"):  # makes `import ...` raise ImportError
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(qtrt, "gpu_sm", lambda: "8.9")
    with pytest.raises(QtaleError) as info:
        cli_build.run(args(exp))
    assert "TensorRT is not installed" in str(info.value) and "[tensorrt-rtx]" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(QtaleError, match="^tensorrt is not installed: pip install tensorrt on a GPU host"):
        cli_build.run(args(exp, "--builder", "tensorrt"))
    assert main(["build", str(exp)]) == 2


def test_record_engine_updates_manifest(tmp_path, plugin_lib):
    exp = make_export(tmp_path / "exp")
    engine = exp / "prefill.int4.engine"
    engine.write_bytes(b"engine-v1")
    kwargs = dict(graph="prefill", precision="int4", tensorrt_version="10.3.0", sm="8.7", plugin_lib=plugin_lib,
                  batch=(1, 1, 1), tokens=(1, 256, 2048), jetson=True, strongly_typed=True, built_with="trtexec")
    qtrt.record_engine(exp, engine, **kwargs)
    engine.write_bytes(b"engine-v2")
    entry = qtrt.record_engine(exp, engine, **kwargs)
    manifest = json.loads((exp / "manifest.json").read_text())
    assert manifest["files"]["prefill.int4.engine"] == hashlib.sha256(b"engine-v2").hexdigest()
    assert "prefill.onnx" in manifest["files"]
    assert manifest["engines"] == [entry]  # re-recording replaces, never duplicates
    assert entry["gpu_sm"] == "8.7" and entry["tensorrt_version"] == "10.3.0"
    assert entry["plugin_library"]["sha256"] == hashlib.sha256(plugin_lib.read_bytes()).hexdigest()
    # the library travels with the engine: copied into the export, listed, loadable by the manifest rule
    assert entry["plugin_library"]["path"] == f"plugins/{plugin_lib.name}"
    assert (exp / entry["plugin_library"]["path"]).read_bytes() == plugin_lib.read_bytes()
    assert manifest["files"][entry["plugin_library"]["path"]] == entry["plugin_library"]["sha256"]
    from qtale_export.deploy.manifest import plugin_library, read_manifest
    assert plugin_library(exp, read_manifest(exp), entry) == exp / entry["plugin_library"]["path"]
    assert [p.name for p in exp.iterdir() if p.name.endswith(".tmp")] == []


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    exp = make_export(tmp_path / "exp", ops="standard", precision="fp16")
    engine = exp / "prefill.fp16.engine"
    engine.write_bytes(b"x")
    before = (exp / "manifest.json").read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        qtrt.record_engine(exp, engine, graph="prefill", precision="fp16", tensorrt_version=None, sm=None,
                           plugin_lib=None, batch=(1, 1, 1), tokens=(1, 2, 3), jetson=False, strongly_typed=True,
                           built_with="trtexec")
    assert (exp / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in exp.iterdir()) == ["manifest.json", "prefill.fp16.engine", "prefill.onnx"]


def test_record_subcommand_reads_trtexec_log(tmp_path, monkeypatch):
    exp = make_export(tmp_path / "exp", ops="standard", precision="fp16")
    (exp / "prefill.fp16.engine").write_bytes(b"e")
    log = exp / "build.log"
    log.write_text("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --onnx=...\n")
    monkeypatch.setattr(qtrt, "gpu_sm", lambda: "8.9")
    assert main(["build", str(exp), "--record", str(exp / "prefill.fp16.engine"),
                 "--trtexec-log", str(log)]) == 0
    entry = json.loads((exp / "manifest.json").read_text())["engines"][0]
    assert entry["tensorrt_version"] == "10.3.0" and entry["built_with"] == "trtexec"


def test_build_with_python_api_writes_engine_and_manifest(tmp_path, monkeypatch, capsys):
    """auto picks TensorRT-RTX where TensorRT is not installed; a real build writes the engine, its
    layer report, and records them."""
    pytest.importorskip("tensorrt_rtx")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    exp = make_export(tmp_path / "exp", ops="standard", precision="fp16")
    entry = cli_build.run(args(exp, "--timing-cache", tmp_path / "tc", "--max-tokens", 1024))
    assert entry["builder"] == "tensorrt-rtx" and entry["built_with"] == "tensorrt-python"
    assert (exp / "prefill.fp16.engine").stat().st_size > 0
    assert not (tmp_path / "tc").exists()  # TensorRT-RTX has no timing cache: said, not written
    assert "--timing-cache ignored" in capsys.readouterr().err
    assert entry["profile"]["shapes"]["input_ids"] == [[1, 1], [1, 256], [1, 1024]]
    assert entry["sha256"] == hashlib.sha256((exp / "prefill.fp16.engine").read_bytes()).hexdigest()
    assert (exp / entry["layers"]["file"]).is_file()
