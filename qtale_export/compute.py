"""Where and in what precision the base model's matmuls run: one rule for every model-running command.

bfloat16 is the fast path on CPUs with AMX/AVX512-BF16 and on GPUs; float32 stays the reference the
tests compare against. Routers always run in float32 (they are tiny and their theta decision is
what calibration tunes), and quantized checkpoints are folded (weights replaced by their dequantized
values) before the cast, so bfloat16 never re-quantizes on a different grid.
"""
from __future__ import annotations

import os

from .errors import QtaleError

DTYPES = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


def resolve_dtype(name: str | None):
    import torch

    name = name or "float32"
    if name not in DTYPES:
        raise QtaleError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return getattr(torch, name)


def resolve_device(name: str | None):
    """auto: this process's GPU (LOCAL_RANK under torchrun) when CUDA is available, else the CPU."""
    import torch

    name = name or "auto"
    if name not in DEVICES:
        raise QtaleError(f"unknown device '{name}' (choose from {', '.join(DEVICES)})")
    if name == "cuda" and not torch.cuda.is_available():
        raise QtaleError("--device cuda: no CUDA device is available (use --device auto or cpu)")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def place(model, dtype: str | None = None, device: str | None = None):
    """Cast the base weights to `dtype` (folding fake-quantized weights first) and move to `device`."""
    import torch

    dt = resolve_dtype(dtype)
    if dt != torch.float32 and getattr(model, "quantization_info", None):
        from .quantize import fold

        fold(model)
    model.base.to(dt)
    model.routers.float()
    model.to(resolve_device(device))
    return model
