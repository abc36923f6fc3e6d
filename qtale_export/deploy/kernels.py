"""The C ABI of the CUDA compaction kernels (plugins/, libqtale_kernels.so) for ctypes callers:
the GPU tests and benchmarks/bench_compaction.py declare it through this one function."""
from __future__ import annotations

import ctypes
from pathlib import Path


def load_kernels(build_dir: Path) -> ctypes.CDLL:
    """libqtale_kernels.so from `build_dir`, with the argument types of its entry points set."""
    lib = ctypes.CDLL(str(Path(build_dir) / "libqtale_kernels.so"))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.qtale_token_compact.argtypes = [ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.qtale_token_scatter.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ptr, ptr]
    lib.qtale_token_compact_workspace_size.argtypes = [i64, i64]
    lib.qtale_token_compact_workspace_size.restype = ctypes.c_size_t
    return lib
