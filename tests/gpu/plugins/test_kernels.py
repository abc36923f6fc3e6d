"""Run the CUDA kernels on a GPU: the C++ kernel test, and the C ABI (ctypes) on the golden vectors."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from qtale_export.deploy.kernels import load_kernels
from qtale_testing import REPO

ROOT = REPO
DATA = ROOT / "tests" / "data" / "ops_vectors.npz"
DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}  # qtale_dtype
H2D, D2H = 1, 2  # cudaMemcpyKind


def gpu_arch() -> str:
    """SM of GPU 0 as a CMake architecture ("90"), falling back to CMake's "native"."""
    try:
        cap = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()[0]
        return cap.replace(".", "")
    except (OSError, IndexError, subprocess.SubprocessError):
        return "native"


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if shutil.which("cmake") is None or not Path(nvcc).exists():
        pytest.skip("cmake and nvcc are needed to build the kernels")
    out = tmp_path_factory.mktemp("plugins-gpu")
    subprocess.run(["cmake", "-S", str(ROOT / "plugins"), "-B", str(out), f"-DCMAKE_CUDA_ARCHITECTURES={gpu_arch()}",
                    f"-DCMAKE_CUDA_COMPILER={nvcc}"], check=True, capture_output=True, timeout=300)
    subprocess.run(["cmake", "--build", str(out), "-j", "4", "--target", "qtale_kernels", "qtale_kernel_test"],
                   check=True, capture_output=True, timeout=900)
    return out


def test_kernel_test_executable_passes(build_dir):
    proc = subprocess.run([str(build_dir / "qtale_kernel_test")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL PASSED" in proc.stdout


class Cuda:
    """Minimal cudart via ctypes: the same runtime libqtale_kernels.so is linked against."""

    def __init__(self, kernels: Path):
        deps = subprocess.run(["ldd", str(kernels)], capture_output=True, text=True, check=True).stdout
        match = re.search(r"(\S*libcudart\.so\S*) => (\S+)", deps)
        assert match, f"libqtale_kernels.so is not linked against a shared cudart:\n{deps}"
        self.rt = ctypes.CDLL(match.group(2))
        self.rt.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.rt.cudaFree.argtypes = [ctypes.c_void_p]
        self.ptrs: list[ctypes.c_void_p] = []

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        assert self.rt.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))) == 0
        self.ptrs.append(ptr)
        return ptr.value

    def upload(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        ptr = self.alloc(array.nbytes)
        assert self.rt.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, H2D) == 0
        return ptr

    def download(self, ptr: int, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        assert self.rt.cudaDeviceSynchronize() == 0
        assert self.rt.cudaMemcpy(out.ctypes.data, ptr, out.nbytes, D2H) == 0
        return out

    def free(self) -> None:
        for ptr in self.ptrs:
            self.rt.cudaFree(ptr)
        self.ptrs.clear()


def test_c_abi_matches_golden_vectors(build_dir):
    lib = load_kernels(build_dir)
    cuda = Cuda(build_dir / "libqtale_kernels.so")
    data = np.load(DATA)
    try:
        for name in data["cases"]:
            c = {k.split("__", 1)[1]: data[k] for k in data.files if k.startswith(f"{name}__")}
            hidden = c["hidden"]
            batch, tokens, width = hidden.shape
            dtype = DTYPES[hidden.dtype]
            # Outputs sized for the upper bound N = T, packed with the actual N by the kernel.
            compact = cuda.alloc(hidden.nbytes)
            # gate, index, count and n are int32 (docs/ops.md)
            index, count, n32 = cuda.alloc(batch * tokens * 4), cuda.alloc(batch * 4), cuda.alloc(4)
            work = cuda.alloc(lib.qtale_token_compact_workspace_size(batch, tokens))
            status = lib.qtale_token_compact(cuda.upload(hidden), cuda.upload(c["gate"].astype(np.int32)), batch,
                                             tokens, width, dtype, compact, index, count, n32, work, None)
            assert status == 0, name
            n = int(cuda.download(n32, (), np.int32))
            assert n == int(c["n"]), name
            np.testing.assert_array_equal(cuda.download(count, (batch,), np.int32), c["count"], err_msg=name)
            np.testing.assert_array_equal(cuda.download(index, (batch, n), np.int32), c["index"], err_msg=name)
            np.testing.assert_array_equal(cuda.download(compact, (batch, n, width), hidden.dtype), c["compact"],
                                          err_msg=name)

            out = cuda.alloc(hidden.nbytes)
            status = lib.qtale_token_scatter(cuda.upload(c["residual"]), cuda.upload(c["update"]),
                                             cuda.upload(c["index"].astype(np.int32)),
                                             cuda.upload(c["count"].astype(np.int32)), batch, tokens, n,
                                             width, dtype, out, None)
            assert status == 0, name
            np.testing.assert_array_equal(cuda.download(out, hidden.shape, hidden.dtype), c["out"], err_msg=name)
            cuda.free()
    finally:
        cuda.free()
