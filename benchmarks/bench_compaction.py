"""Bandwidth of the TokenCompact / TokenScatter kernels against the device's copy bandwidth.

    python benchmarks/bench_compaction.py [--tokens 4096,8192] [--hidden 4096] [--batch 1]
        [--ratios 0.25,0.5,0.75,1.0] [--dtype fp16] [--iters 50] [--build-dir DIR] [--json OUT]

Needs a CUDA device, nvcc and cmake: it builds plugins/ (kernels only) for the local GPU, or uses
--build-dir with libqtale_kernels.so, and calls the C ABI (plugins/kernels/qtale_kernels.h) through
ctypes, timed with CUDA events. Without a CUDA device it prints "SKIPPED: ..." and exits 0.

Bytes counted per call (row payload only; the int32 gate/index/count are < 0.1% at H = 4096):
compact reads and writes N rows per batch row (2*B*N*H*e); scatter copies the residual (2*B*T*H*e,
out != residual) and writes N rows (2*B*N*H*e, reading update); the in-place scatter (the KV-cache
form) only the 2*B*N*H*e. The reference is cudaMemcpyAsync device-to-device of B*T*H*e bytes
(2*B*T*H*e moved). Reported: GB/s and the fraction of the copy bandwidth.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qtale_export.deploy.kernels import load_kernels  # noqa: E402
DTYPES = {"fp32": (0, 4), "fp16": (1, 2), "bf16": (2, 2)}  # qtale_dtype, bytes
D2D, H2D = 3, 1  # cudaMemcpyKind


def skip(reason: str) -> int:
    print(f"SKIPPED: {reason}; this benchmark needs a CUDA device (run it on a GPU host or Jetson)")
    return 0


def cuda_device() -> str | None:
    """The GPU's compute capability ("90"), or None when nvidia-smi lists no GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    cap = out.stdout.split()
    return cap[0].replace(".", "") if out.returncode == 0 and cap else None


def build(arch: str, out: Path) -> Path:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if shutil.which("cmake") is None or not Path(nvcc).exists():
        raise SystemExit("error: cmake and nvcc are needed to build plugins/ (or pass --build-dir)")
    subprocess.run(["cmake", "-S", str(ROOT / "plugins"), "-B", str(out), f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
                    f"-DCMAKE_CUDA_COMPILER={nvcc}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(out), "-j", "4", "--target", "qtale_kernels"], check=True,
                   capture_output=True)
    return out


class Cuda:
    """The cudart that libqtale_kernels.so links, through ctypes."""

    def __init__(self, kernels: Path):
        deps = subprocess.run(["ldd", str(kernels)], capture_output=True, text=True, check=True).stdout
        match = re.search(r"(\S*libcudart\.so\S*) => (\S+)", deps)
        if not match:
            raise SystemExit(f"error: {kernels} is not linked against a shared cudart")
        self.rt = ctypes.CDLL(match.group(2))
        self.rt.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.rt.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                            ctypes.c_void_p]
        self.rt.cudaEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p]
        self.rt.cudaEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.rt.cudaEventSynchronize.argtypes = [ctypes.c_void_p]
        self.rt.cudaFree.argtypes = [ctypes.c_void_p]
        self.ptrs: list[int] = []

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise SystemExit(f"error: {what} failed with CUDA error {status}")

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.rt.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc")
        self.ptrs.append(ptr.value)
        return ptr.value

    def free(self) -> None:
        for ptr in self.ptrs:
            self.rt.cudaFree(ptr)
        self.ptrs.clear()

    def upload(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        ptr = self.alloc(array.nbytes)
        self.check(self.rt.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, H2D), "cudaMemcpy")
        return ptr

    def time_ms(self, fn, iters: int) -> float:
        """Mean milliseconds of fn() over iters calls (after 3 warm-up calls), by CUDA events."""
        start, stop = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.rt.cudaEventCreate(ctypes.byref(start)), "cudaEventCreate")
        self.check(self.rt.cudaEventCreate(ctypes.byref(stop)), "cudaEventCreate")
        for _ in range(3):
            self.check(fn(), "warm-up")
        self.check(self.rt.cudaEventRecord(start, None), "cudaEventRecord")
        for _ in range(iters):
            self.check(fn(), "kernel")
        self.check(self.rt.cudaEventRecord(stop, None), "cudaEventRecord")
        self.check(self.rt.cudaEventSynchronize(stop), "cudaEventSynchronize")
        ms = ctypes.c_float()
        self.check(self.rt.cudaEventElapsedTime(ctypes.byref(ms), start, stop), "cudaEventElapsedTime")
        return ms.value / iters


def bench(lib, cuda: Cuda, batch: int, tokens: int, hidden: int, dtype: str, ratio: float, iters: int) -> dict:
    code, elem = DTYPES[dtype]
    rng = np.random.default_rng(0)
    gate = np.zeros((batch, tokens), np.int32)
    n_exec = max(1, int(round(ratio * tokens)))
    for b in range(batch):
        gate[b, rng.choice(tokens, n_exec, replace=False)] = 1
    payload = batch * tokens * hidden * elem
    hid, res, out = cuda.alloc(payload), cuda.alloc(payload), cuda.alloc(payload)
    compact, index = cuda.alloc(payload), cuda.alloc(batch * tokens * 4)
    count, n = cuda.alloc(batch * 4), cuda.alloc(4)
    dgate = cuda.upload(gate)
    work = cuda.alloc(lib.qtale_token_compact_workspace_size(batch, tokens))
    dindex = cuda.upload(np.argsort(~gate.astype(bool), axis=1, kind="stable")[:, :n_exec].astype(np.int32))
    dcount = cuda.upload(np.full(batch, n_exec, np.int32))
    row = n_exec * hidden * elem * batch
    ms = {
        "copy": cuda.time_ms(lambda: cuda.rt.cudaMemcpyAsync(out, hid, payload, D2D, None), iters),
        "compact": cuda.time_ms(lambda: lib.qtale_token_compact(hid, dgate, batch, tokens, hidden, code, compact,
                                                                 index, count, n, work, None), iters),
        "scatter": cuda.time_ms(lambda: lib.qtale_token_scatter(res, compact, dindex, dcount, batch, tokens, n_exec,
                                                                 hidden, code, out, None), iters),
        "scatter_in_place": cuda.time_ms(lambda: lib.qtale_token_scatter(res, compact, dindex, dcount, batch, tokens,
                                                                          n_exec, hidden, code, res, None), iters),
    }
    cuda.free()
    moved = {"copy": 2 * payload, "compact": 2 * row, "scatter": 2 * payload + 2 * row, "scatter_in_place": 2 * row}
    gbs = {k: moved[k] / (ms[k] * 1e-3) / 1e9 for k in ms}
    return {"batch": batch, "tokens": tokens, "hidden": hidden, "dtype": dtype, "ratio": ratio, "executed": n_exec,
            "ms": {k: round(v, 4) for k, v in ms.items()}, "GB/s": {k: round(v, 1) for k, v in gbs.items()},
            "of_copy": {k: round(gbs[k] / gbs["copy"], 3) for k in ms if k != "copy"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="4096,8192", help="comma-separated T values (>= 4096 for the issue's check)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ratios", default="0.25,0.5,0.75,1.0", help="fractions of tokens that execute")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--build-dir", type=Path, default=None, help="folder with libqtale_kernels.so (default: build)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    arch = cuda_device()
    if arch is None:
        return skip("no CUDA device (nvidia-smi lists no GPU)")
    build_dir = args.build_dir or build(arch, ROOT / "build" / "bench-plugins")
    lib, cuda = load_kernels(build_dir), Cuda(build_dir / "libqtale_kernels.so")
    results = []
    print(f"{'T':>6} {'H':>5} {'ratio':>5} | {'copy GB/s':>9} | {'compact':>15} | {'scatter':>15} | {'in place':>15}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        for ratio in (float(r) for r in args.ratios.split(",")):
            r = bench(lib, cuda, args.batch, tokens, args.hidden, args.dtype, ratio, args.iters)
            results.append(r)
            cells = [f"{r['GB/s'][k]:7.1f} ({r['of_copy'][k]:4.0%})" for k in ("compact", "scatter", "scatter_in_place")]
            print(f"{tokens:>6} {args.hidden:>5} {ratio:>5} | {r['GB/s']['copy']:9.1f} | " + " | ".join(cells))
    if args.json:
        args.json.write_text(json.dumps({"device_sm": arch, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
