"""The deployment install, for real: a second virtual environment with the base dependencies
only (no PyTorch; the package itself installed with --no-deps) runs `qtale --help`, `qtale run`,
`qtale verify`, `qtale triton-repo`, `qtale bench` and `build_engine.sh --dry-run` on an export
made in this (training) environment.

The venv's dependencies are installed from PyPI (or pip's cache) once, under
~/.cache/qtale/deploy-venv-<hash of the dependency list> (QTALE_DEPLOY_VENV overrides); the
package is reinstalled from this tree on every run, so the test sees the current code. Skips with
the reason when the dependencies cannot be installed; QTALE_DEPLOY_TEST=0 skips.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qtale_testing import REPO

ROOT = REPO
DEPLOY_COMMANDS = ["verify", "build", "run", "triton-repo", "bench"]

pytestmark = pytest.mark.skipif(os.environ.get("QTALE_DEPLOY_TEST") == "0", reason="QTALE_DEPLOY_TEST=0")


def _base_dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


@pytest.fixture(scope="module")
def deploy_venv(tmp_path_factory) -> Path:
    deps = _base_dependencies()
    assert not [d for d in deps if d.split(">")[0].split("=")[0].split("[")[0] in ("torch", "transformers", "peft")]
    tag = hashlib.sha256(json.dumps(deps).encode()).hexdigest()[:12]
    venv = Path(os.environ.get("QTALE_DEPLOY_VENV", Path.home() / ".cache" / "qtale" / f"deploy-venv-{tag}"))
    py = venv / "bin" / "python"
    if not py.is_file():
        tmp = venv.with_name(venv.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.time()
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(tmp)], check=True, capture_output=True, timeout=300)
        p = subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "setuptools>=68", "wheel",
                            *deps], capture_output=True, text=True, timeout=1200)
        if p.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.skip(f"cannot install the base dependencies: {p.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, venv)
        print(f"created {venv} in {time.time() - t0:.0f} s")
    # this tree, not an older copy: a plain (non-editable) install, nothing else pulled in
    work = tmp_path_factory.mktemp("pkg")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".ci", ".venv", "runs", "build", "*.egg-info",
                                                              "__pycache__", "tests", "docs", "benchmarks"))
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--force-reinstall", str(src)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    probe = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    return venv


def _qtale(venv: Path, *args, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    return subprocess.run([str(venv / "bin" / "qtale"), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or venv, timeout=600)


def test_deployment_commands_run_without_torch(deploy_venv, tiny_export, tmp_path):
    from qtale_export.deploy.runtime import Runtime

    venv = deploy_venv
    helped = _qtale(venv, "--help")
    assert helped.returncode == 0, helped.stderr
    listed = helped.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert listed == DEPLOY_COMMANDS
    for cmd in ("train", "export", "calibrate"):
        refused = _qtale(venv, cmd, "--help")
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert refused.stderr.strip().count("\n") == 0 and "pip install 'qtale-export[train]'" in refused.stderr
    # qtale run equals the runtime of the training environment, at two ratios
    for ratio in (0.6, 0.7):
        ran = _qtale(venv, "run", tiny_export, "--ratio", ratio, "--prompt", "Hello there", "--max-new-tokens", 6,
                     "--json")
        assert ran.returncode == 0, ran.stderr
        got = json.loads(ran.stdout)
        want = Runtime.open(tiny_export).generate("Hello there", ratio=ratio, max_new_tokens=6)
        assert got["text"] == want.text and got["theta"] == pytest.approx(want.theta)
        assert got["realized_ratio"] == pytest.approx(want.realized_ratio, abs=1e-6)
    bad = _qtale(venv, "run", tiny_export, "--ratio", 0.2, "--prompt", "x")
    assert bad.returncode == 2 and "below the lowest calibrated ratio" in bad.stderr and "Traceback" not in bad.stderr
    verified = _qtale(venv, "verify", tiny_export, "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"], verified.stderr[-2000:]
    repo = tmp_path / "repo"
    built = _qtale(venv, "triton-repo", tiny_export, "--out", repo, "--backend", "python", "--json")
    assert built.returncode == 0, built.stderr
    # the models, beside the repository marker (a dot-file) that lets --force replace it later
    assert sorted(p.name for p in repo.iterdir() if not p.name.startswith(".")) == [
        "qtale_fp32", "qtale_llm_fp32", "qtale_router"]
    bench = _qtale(venv, "bench", tiny_export, "--seq", "16", "--ratios", "1.0,0.6", "--repeats", 1,
                   "--decode-tokens", 2, "--out", tmp_path / "bench", "--json")
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert (tmp_path / "bench" / "bench.json").is_file()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    dry = subprocess.run(["bash", str(ROOT / "build_engine.sh"), tiny_export, "--dry-run"], capture_output=True,
                         text=True, env={**env, "PYTHON": str(venv / "bin" / "python")}, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.split()[0] == "trtexec" and f"--onnx={tiny_export}/prefill.onnx" in dry.stdout
