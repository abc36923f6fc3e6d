"""Build the kernels-only CMake target with nvcc (no GPU needed) and check the exported C ABI.

The TensorRT glue (plugins/trt) is compiled only where TensorRT headers + libnvinfer exist; on a
host without them CMake must say so and still build the kernels.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from qtale_testing import REPO

ROOT = REPO
C_ABI = ("qtale_dtype_size", "qtale_token_compact_workspace_size", "qtale_token_compact", "qtale_token_scatter",
         "qtale_compute_n_host", "qtale_compute_n_device")


def find_nvcc() -> str | None:
    return shutil.which("nvcc") or next(
        (str(p) for p in (Path("/usr/local/cuda/bin/nvcc"), Path("/usr/local/bin/nvcc")) if p.exists()), None)


NVCC = find_nvcc()
pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit to build plugins/)"),
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found"),
]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("plugins-build")
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT / "plugins"), "-B", str(out), "-DCMAKE_CUDA_ARCHITECTURES=89",
         f"-DCMAKE_CUDA_COMPILER={NVCC}", "-DCMAKE_BUILD_TYPE=Release"],
        capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    made = subprocess.run(["cmake", "--build", str(out), "-j", "2", "--target", "qtale_kernels", "qtale_kernel_test"],
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stdout[-4000:] + made.stderr[-4000:]
    return out, configure.stdout


def test_kernels_library_exports_c_abi(build):
    out, _ = build
    lib = out / "libqtale_kernels.so"
    assert lib.is_file()
    if shutil.which("nm") is None:
        pytest.skip("nm not available")
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                             check=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    assert set(C_ABI) <= exported
    # Only the C ABI is visible: no mangled C++ symbols of ours leak out.
    assert not [s for s in exported if s.startswith("_ZN5qtale")]


def test_kernel_test_executable_is_built(build):
    out, _ = build
    assert (out / "qtale_kernel_test").is_file()


def test_cmake_reports_tensorrt_status(build):
    _, log = build
    assert "TensorRT not found: building kernels only; set TensorRT_ROOT=" in log or "TensorRT found:" in log


def test_header_is_valid_c(tmp_path):
    """qtale_kernels.h is a C ABI: it must compile as plain C (not only as C++/CUDA)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    cuda_include = Path(NVCC).resolve().parent.parent / "include"
    if not (cuda_include / "cuda_runtime_api.h").exists():
        cuda_include = Path("/usr/local/cuda/include")
    src = tmp_path / "abi.c"
    src.write_text('#include "qtale_kernels.h"\nint main(void) { return (int)qtale_dtype_size(QTALE_FLOAT16) - 2; }\n')
    proc = subprocess.run([cc, "-std=c99", "-Wall", "-Werror", "-fsyntax-only", f"-I{ROOT / 'plugins' / 'kernels'}",
                           f"-I{cuda_include}", str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
