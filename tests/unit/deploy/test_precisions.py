"""The precision registry (deploy/precisions.py): its records agree with each other and with the
lowerings that implement them, and its TensorRT rules decide what `qtale build` accepts."""
from __future__ import annotations

import pytest

from qtale_export.deploy import precisions as P
from qtale_export.errors import QtaleError


def test_every_format_lowers_to_a_registered_precision():
    for f in P.FORMATS.values():
        p = P.PRECISIONS[f.precision]
        assert p.quantized and f.bits <= p.bits, f
        assert (f.granularity == "group") == (f.bits <= 4), f  # the group rule applies to the 3/4-bit grids
    assert {f.precision for f in P.FORMATS.values()} == {p.name for p in P.PRECISIONS.values() if p.quantized}


def test_records_are_consistent():
    for p in P.PRECISIONS.values():
        assert p.targets and set(p.targets) <= set(P.TARGETS), p
        assert p.min_opset >= 18 and p.tolerance.min_top1 <= 1.0, p
        assert p.quantized or not (p.trt_table or p.ort_table or p.trt_min_sm), p
        assert p.weights_op("ort-cpu") == ("float" if not p.quantized else p.ort_weights)
    assert P.precision("fp8").targets == ("tensorrt",)  # ONNX Runtime on CPU has no FP8 matmul
    with pytest.raises(QtaleError, match="unknown precision 'nvfp4' \\(choose from fp32, fp16, int4, int8, fp8\\)"):
        P.precision("nvfp4")
    with pytest.raises(QtaleError, match="unknown quantization format"):
        P.quant_format("int2")


def test_every_table_rule_has_its_lowering():
    from qtale_export.export.precision import DQ_TABLES, TABLES

    assert set(DQ_TABLES) == {p.name for p in P.PRECISIONS.values() if p.trt_table}
    assert set(TABLES) == {p.name for p in P.PRECISIONS.values() if p.ort_table}


def test_tensorrt_rules():
    P.check_tensorrt("fp8", False, "8.9")
    P.check_tensorrt("fp8", False, None)  # unknown GPU: the build decides
    P.check_tensorrt("int4", True, "8.7")
    with pytest.raises(QtaleError, match=r"FP8 needs SM >= 8\.9 but this GPU is SM 8\.6: use --precision int4 or int8"):
        P.check_tensorrt("fp8", False, "8.6")
    with pytest.raises(QtaleError, match="FP8 is not supported on Jetson Orin"):
        P.check_tensorrt("fp8", True, None)
    assert P.capable("fp8", ("8.6", "8.9", "12.0")) == ("8.9", "12.0")
    assert P.capable("int4", ("8.6", "8.9")) == ("8.6", "8.9")
    assert P.parse_sm(" 8.9 ") == (8, 9) and P.parse_sm("8.9.1") is None and P.parse_sm(None) is None
