"""The runtime against PyTorch on a GPU: the same checks as tests/unit/deploy/runtime (runtime_equivalence.py),
through ONNX Runtime's CUDA and TensorRT execution providers (skipped where onnxruntime-gpu or
TensorRT is missing; tests/gpu/conftest.py skips the folder without a CUDA device)."""
from __future__ import annotations

import pytest

from qtale_export.errors import QtaleError
from qtale_export.deploy.runtime import Runtime
from runtime_equivalence import check_greedy_matches_pytorch, check_realized_ratio_matches_pytorch, check_score_matches_pytorch


@pytest.fixture(scope="module", params=["cuda", "tensorrt"])
def rt(request, tiny_export):
    try:
        return Runtime.open(tiny_export, device=request.param)
    except QtaleError as exc:  # e.g. "ONNX Runtime has no CUDAExecutionProvider here"
        pytest.skip(str(exc))


@pytest.mark.parametrize("ratio", [1.0, 0.6, 0.5])
def test_greedy_matches_pytorch(rt, tiny_model, ratio):
    check_greedy_matches_pytorch(rt, tiny_model, ratio, engine_prefix="onnxruntime:")


def test_realized_ratio_matches_pytorch_exec_masks(rt, tiny_model):
    check_realized_ratio_matches_pytorch(rt, tiny_model)


def test_score_matches_pytorch(rt, tiny_model):
    check_score_matches_pytorch(rt, tiny_model, atol=1e-3)  # GPU kernels reduce in another order
