"""Deployment runtime: generation and scoring on an export folder without PyTorch.

`Runtime.open(export_dir, backend="ort"|"tensorrt")` verifies the manifest checksums, picks theta
for a requested execution ratio (`select.py`) and runs prefill + decode with a KV cache
(`generate.py`). See docs/runtime.md.
"""
from ...errors import QtaleError
from .generate import GenerationResult, Runtime, Sampler
from .select import select_theta

__all__ = ["Runtime", "GenerationResult", "Sampler", "select_theta", "QtaleError", "open"]


def open(export_dir, **kwargs) -> Runtime:  # noqa: A001 - mirrors Runtime.open
    return Runtime.open(export_dir, **kwargs)
