"""tests/gpu needs a CUDA device: every test in this folder is skipped without one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def cuda_device_available() -> bool:
    if shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
            if listing.returncode == 0 and "GPU" in listing.stdout:
                return True
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # torch missing or broken: no evidence of a GPU
        return False


def pytest_collection_modifyitems(config, items):
    if cuda_device_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device (nvidia-smi -L lists no GPU and torch.cuda is unavailable)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
