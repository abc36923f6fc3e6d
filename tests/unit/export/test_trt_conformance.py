"""The static TensorRT conformance check: real --target tensorrt exports pass, unsupported graphs fail."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtale_export.errors import QtaleError
from qtale_export.export import graphs
from qtale_export.export import main as export_main
from qtale_export.export.trt_conformance import check, problems



@pytest.mark.parametrize("ops", ["standard", "plugin"])
@pytest.mark.parametrize("precision", ["fp16", "int4", "fp8"])
def test_tensorrt_exports_conform(trt_exports, precision, ops):
    out = trt_exports[0](precision, ops)
    for kind in ("prefill", "decode"):
        summary = check(out / f"{kind}.onnx")
        assert summary["ok"] and summary["nodes"] > 100
        # prefill compacts; decode skips a routed layer through an If (the conditional TensorRT builds)
        assert ("If" in summary["ops"]) == (kind == "decode" and precision != "int8")
        assert ("TokenCompact" in summary["ops"]) == (ops == "plugin" and kind == "prefill")  # decode: If
        if precision != "fp16":
            assert "DequantizeLinear" in summary["ops"]
    if ops == "plugin":  # the plugins see INT32 gate/index/count tensors, never BOOL or INT64
        m = onnx.shape_inference.infer_shapes(onnx.load(str(out / "prefill.onnx"), load_external_data=False))
        types = {vi.name: vi.type.tensor_type.elem_type for vi in list(m.graph.value_info) + list(m.graph.input)}
        for n in m.graph.node:
            if n.op_type == "TokenCompact":
                assert types[n.input[1]] == TensorProto.INT32
                assert [types[o] for o in n.output[1:]] == [TensorProto.INT32] * 3
            if n.op_type == "TokenScatter":
                assert [types[i] for i in n.input[2:]] == [TensorProto.INT32] * 2


def test_ort_cpu_export_is_not_tensorrt_conformant(trt_exports, tmp_path):
    """The ort-cpu forms (int64 CumSum, DequantizeLinear inside If branches) are what the check exists for."""
    _, model, ckpt = trt_exports
    out = tmp_path / "ort"
    export_main.export(model, out, checkpoint=str(ckpt), ratio=0.6, precision="int8", target="ort-cpu",
                       decode_steps=1)
    found = problems(onnx.load(str(out / "decode.onnx"), load_external_data=False))
    assert any("CumSum" in p and "INT64" in p for p in found)


def _model(nodes, inputs, outputs, inits=(), opset=21, domains=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(g, opset_imports=ops)


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def test_bad_graphs_fail_naming_the_node():
    i64 = [_vi("x", TensorProto.INT64, ["b", "t"])]
    one = numpy_helper.from_array(np.array(1, np.int64), "one")
    cumsum = _model([helper.make_node("CumSum", ["x", "one"], ["y"], name="bad_cumsum")], i64,
                    [_vi("y", TensorProto.INT64, ["b", "t"])], [one])
    with pytest.raises(QtaleError, match=r"node bad_cumsum \(CumSum\): input 0 \(x\) is INT64"):
        check(cumsum)
    # the same op in fp32 conforms
    f32 = _model([helper.make_node("CumSum", ["x", "one"], ["y"], name="ok_cumsum")],
                 [_vi("x", TensorProto.FLOAT, ["b", "t"])], [_vi("y", TensorProto.FLOAT, ["b", "t"])], [one])
    assert check(f32)["ok"]
    # axes from a graph input instead of an initializer
    sq = _model([helper.make_node("Squeeze", ["x", "axes"], ["y"], name="dyn_axes")],
                [_vi("x", TensorProto.FLOAT, [1, 3]), _vi("axes", TensorProto.INT64, [1])],
                [_vi("y", TensorProto.FLOAT, None)])
    with pytest.raises(QtaleError, match="dyn_axes.*must be an initializer"):
        check(sq)
    # an op TensorRT's table does not have, and a non-ONNX domain
    nz = _model([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [_vi("x", TensorProto.FLOAT, [3])],
                [_vi("y", TensorProto.INT64, None)])
    with pytest.raises(QtaleError, match="nz.*not in the TensorRT table"):
        check(nz)


def test_old_bool_gate_plugin_form_fails():
    """TokenCompact with a BOOL gate (the form before issue 15) is outside TensorRT's plugin types."""
    node = helper.make_node("TokenCompact", ["h", "gate"], ["c", "i", "n_", "k"], name="compact0",
                            domain="qtale", **graphs.PLUGIN_ATTRS)
    vis = [_vi("c", TensorProto.FLOAT, None), _vi("i", TensorProto.INT64, None),
           _vi("n_", TensorProto.INT64, None), _vi("k", TensorProto.INT64, None)]
    m = _model([node], [_vi("h", TensorProto.FLOAT, [1, 4, 2]), _vi("gate", TensorProto.BOOL, [1, 4])],
               [_vi("c", TensorProto.FLOAT, None)], domains=["qtale"])
    m.graph.value_info.extend(vis)
    with pytest.raises(QtaleError, match=r"compact0 \(TokenCompact\): input 1 \(gate\) is BOOL, not INT32"):
        check(m)


def test_dequantize_inside_if_passes():
    """TensorRT-RTX 1.7 parses and builds DequantizeLinear weights inside If branches (the default
    tensorrt decode, tests/unit/deploy/test_trt_build.py), so the check no longer refuses them."""
    w = numpy_helper.from_array(np.ones((2, 2), np.int8), "w")
    s = numpy_helper.from_array(np.ones(2, np.float32), "s")
    then = helper.make_graph([helper.make_node("DequantizeLinear", ["w", "s"], ["y1"], name="dq_in_branch", axis=1)],
                             "then", [], [_vi("y1", TensorProto.FLOAT, None)], [w, s])
    other = helper.make_graph([helper.make_node("Identity", ["z"], ["y2"], name="pass")], "else", [],
                              [_vi("y2", TensorProto.FLOAT, None)])
    m = _model([helper.make_node("If", ["c"], ["y"], name="cond", then_branch=then, else_branch=other)],
               [_vi("c", TensorProto.BOOL, []), _vi("z", TensorProto.FLOAT, [2, 2])],
               [_vi("y", TensorProto.FLOAT, None)])
    assert problems(m) == []


def test_export_refuses_a_nonconformant_tensorrt_graph(trt_exports, tmp_path, monkeypatch):
    """A tensorrt export whose graph leaves the documents fails with one line and writes nothing."""
    _, model, ckpt = trt_exports

    def int64_cumsum(self, x):  # the ort-cpu form, which TensorRT does not document
        return self.b.op("CumSum", [x, self.b.const(1)])

    monkeypatch.setattr(graphs.Lowering, "cumsum", int64_cumsum)
    out = tmp_path / "bad"
    with pytest.raises(QtaleError, match=r"prefill.onnx: not TensorRT-conformant: node CumSum_\d+ \(CumSum\)") as e:
        export_main.export(model, out, checkpoint=str(ckpt), ratio=0.6, precision="fp16", target="tensorrt")
    assert "\n" not in str(e.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
