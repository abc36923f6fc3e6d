"""build_engine.sh: trtexec command composition (--dry-run) and its one-line refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from trt_fake_export import make_export
from qtale_testing import REPO

ROOT = REPO
SCRIPT = ROOT / "build_engine.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash not available")


def run(*args, path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([BASH, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_dry_run_composes_trtexec_and_record(tmp_path):
    exp = make_export(tmp_path / "exp")
    lib = tmp_path / "libqtale_trt_plugins.so"
    proc = run(exp, "--plugin-lib", lib, "--min-tokens", 8, "--opt-tokens", 128, "--max-tokens", 1024,
               "--batch", 2, "--timing-cache", tmp_path / "tc.bin", "--workspace-mb", 3000, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    trtexec, move, record = proc.stdout.strip().splitlines()
    words = trtexec.split()
    assert words[0] == "trtexec"
    for flag in (f"--onnx={exp}/prefill.onnx", "--minShapes=input_ids:2x8,attention_mask:2x8,theta:2",
                 "--optShapes=input_ids:2x128,attention_mask:2x128,theta:2",
                 "--maxShapes=input_ids:2x1024,attention_mask:2x1024,theta:2", "--stronglyTyped",
                 f"--dynamicPlugins={lib}", f"--timingCacheFile={tmp_path}/tc.bin",
                 "--memPoolSize=workspace:3000M"):
        assert flag in words, flag
    assert any(w.startswith("--saveEngine=") for w in words)
    assert move.endswith(f"{exp}/prefill.int4.engine")
    assert "qtale_export.cli build" in record and "--record" in record and "--precision int4" in record


def test_static_plugins_and_jetson_workspace(tmp_path):
    exp = make_export(tmp_path / "exp")
    proc = run(exp, "--plugin-lib", tmp_path / "libqtale_trt_plugins_static.so", "--static-plugins", "--jetson",
               "--dry-run")
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.splitlines()[0].split()
    assert f"--staticPlugins={tmp_path}/libqtale_trt_plugins_static.so" in words
    assert "--memPoolSize=workspace:2048M" in words
    assert not any(w.startswith("--dynamicPlugins") for w in words)


def test_jetson_fp8_is_refused(tmp_path):
    exp = make_export(tmp_path / "exp", ops="standard", precision="fp8")
    proc = run(exp, "--jetson", "--precision", "fp8", "--dry-run")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "FP8" in proc.stderr


def test_missing_trtexec_is_one_line_error(tmp_path):
    exp = make_export(tmp_path / "exp", ops="standard", precision="fp16")
    bin_dir = tmp_path / "bin"  # a PATH with the few tools the script needs, but no trtexec
    bin_dir.mkdir()
    for tool in ("dirname",):
        os.symlink(shutil.which(tool), bin_dir / tool)
    proc = run(exp, path=str(bin_dir))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "trtexec not found" in lines[0]


def test_plugin_export_without_plugin_lib_is_refused(tmp_path):
    proc = run(make_export(tmp_path / "exp"), "--dry-run")
    assert proc.returncode == 2
    assert "--plugin-lib" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
