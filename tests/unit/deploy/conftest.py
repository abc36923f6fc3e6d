"""A real Triton server for the deploy tests: the tritonserver binary bundled in nvidia-pytriton
(Python backend, CPU), started on 127.0.0.1 with free ports on a repository a test builds.

The server needs its own interpreter environment (pytriton wants numpy < 2): a venv under
~/.cache/qtale/triton-venv (QTALE_TRITON_VENV overrides), created once (about 2 minutes) and
reused. Tests skip with the reason when it cannot be installed or started; QTALE_TRITON_TEST=0 skips.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

VENV = Path(os.environ.get("QTALE_TRITON_VENV", Path.home() / ".cache" / "qtale" / "triton-venv"))
PACKAGES = ["nvidia-pytriton", "numpy<2", "onnxruntime", "tokenizers"]


def _venv_python(v: Path) -> Path:
    return v / "bin" / "python"


@pytest.fixture(scope="session")
def triton_venv() -> Path:
    if os.environ.get("QTALE_TRITON_TEST") == "0":
        pytest.skip("QTALE_TRITON_TEST=0")
    py = _venv_python(VENV)
    if py.is_file() and subprocess.run([str(py), "-c", "import pytriton, onnxruntime, numpy"],
                                       capture_output=True).returncode == 0:
        return VENV
    tmp = VENV.with_name(VENV.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    try:
        subprocess.run([sys.executable if not hasattr(sys, "_base_executable") else sys._base_executable,
                        "-m", "venv", str(tmp)], check=True, capture_output=True, timeout=300)
        p = subprocess.run([str(_venv_python(tmp)), "-m", "pip", "install", "-q", *PACKAGES],
                           capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            pytest.skip(f"cannot install {' '.join(PACKAGES)}: {p.stderr.strip().splitlines()[-1:]}")
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"cannot create the Triton venv: {exc}")
    shutil.rmtree(VENV, ignore_errors=True)
    os.replace(tmp, VENV)  # the venv's python still runs after the move (pip's scripts would not)
    print(f"created {VENV} in {time.time() - t0:.0f} s")
    return VENV


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@contextlib.contextmanager
def run_tritonserver(venv: Path, repo: Path, work: Path, metrics: bool = False, ports: dict | None = None):
    """Start tritonserver on `repo`; yields (grpc client, "127.0.0.1:port"); skips when it cannot start.
    metrics: serve Prometheus metrics; `ports` (a dict) gets the "http", "grpc" and "metrics" ports."""
    py = _venv_python(venv)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    tdir = Path(site) / "pytriton" / "tritonserver"
    binary = tdir / "bin" / "tritonserver"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = tdir / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not binary.is_file() or not stub.is_file():
        pytest.skip(f"pytriton has no tritonserver binary / Python {ver} stub in {tdir}")
    backends = work / "backends" / "python"
    backends.mkdir(parents=True)
    for f in (tdir / "backends" / "python").iterdir():
        if f.is_file():
            os.symlink(f, backends / f.name)
    shutil.copy2(stub, backends / stub.name)
    http, grpc, metrics_port = _free_ports(3)
    if ports is not None:
        ports.update(http=http, grpc=grpc, metrics=metrics_port)
    libdir = sysconfig.get_config_var("LIBDIR")
    # the stub copy loses its $ORIGIN rpath to the wheel's bundled libraries (libcudart etc.)
    libs = Path(site) / "nvidia_pytriton.libs"
    env = dict(os.environ, LD_LIBRARY_PATH=f"{libdir}:{libs}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               PYTHONPATH=site, OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1", VIRTUAL_ENV=str(venv),
               PATH=f"{venv / 'bin'}:{os.environ.get('PATH', '')}")
    # the stub's embedded Python takes its prefix from the first `python3` on PATH: it must be the
    # Triton venv's (numpy < 2, which the stub is built against), not this test's venv
    env.pop("PYTHONHOME", None)
    log_path = work / "server.log"
    log = open(log_path, "w")
    cmd = [str(binary), f"--model-repository={repo}", f"--backend-directory={work / 'backends'}",
           "--http-address=127.0.0.1", f"--http-port={http}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
           f"--metrics-port={metrics_port}", f"--allow-metrics={str(metrics).lower()}", "--allow-gpu-metrics=false",
           "--exit-on-error=true", "--strict-readiness=true", "--log-verbose=0"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
    deadline = time.time() + 150
    ready = False
    fatal = ("error while loading shared libraries", "failed to load", "UNAVAILABLE")
    while time.time() < deadline and proc.poll() is None:
        if any(f in log_path.read_text() for f in fatal):
            break
        try:
            if client.is_server_ready(client_timeout=2):
                ready = True
                break
        except Exception:
            pass
        time.sleep(1)
    if not ready:
        proc.kill()
        proc.wait(10)
        log.close()
        pytest.skip(f"tritonserver did not become ready: {log_path.read_text()[-1500:]}")
    try:
        yield client, f"127.0.0.1:{grpc}"
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture(scope="session")
def int4_export(tmp_path_factory) -> Path:
    """An int4 ort-cpu export wide enough (hidden 576, 12 layers) that ONNX Runtime's int4 kernels
    give a row other numbers inside a batch than alone (docs/triton.md)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtale_export.export.main import export
    from qtale_testing import build_tiny_model, make_tiny

    root = tmp_path_factory.mktemp("batchy")
    folder = make_tiny(root / "model", layers=12)
    cfg = AutoConfig.from_pretrained(folder)
    cfg.hidden_size, cfg.intermediate_size = 576, 1536
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    out = root / "int4"
    export(build_tiny_model(folder), out, checkpoint=str(folder), ratio=0.6, precision="int4", ops="standard",
           decode_steps=1, verify_thetas=[0.31])
    return out


@pytest.fixture(scope="module")
def runtime(int4_export):
    """`qtale run`'s runtime on int4_export: the answers the Triton models must equal."""
    from qtale_export.deploy.runtime import Runtime

    return Runtime.open(int4_export, threads=1)


@pytest.fixture(scope="session")
def tritonserver(triton_venv):
    """run_tritonserver(repo, work) on the Triton venv: `with tritonserver(repo, work) as (client, addr)`."""
    return functools.partial(run_tritonserver, triton_venv)
