"""Every --target tensorrt form parsed and built by a real TensorRT builder (TensorRT-RTX, CPU-only
ahead-of-time builds), and what the built engines hold, read from the builder's layer report."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qtale_export.deploy import engine_info, graph_io, trt_builder
from qtale_export.deploy.onnx_graphs import initializers
from qtale_export.deploy import tensorrt as qtrt
from qtale_export.errors import QtaleError

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is part of the test set-up (pip install '.[tensorrt-rtx]')")

PRECISIONS = ("fp32", "fp16", "int8", "int4", "fp8")
# engine constants of each weight-only precision: TensorRT's DataType name and bits per weight
QUANT = {"int4": ("Int4", 4), "int8": ("Int8", 8), "fp8": ("FP8", 8)}


def _build(export, graph, **kw):
    options = qtrt.BuildOptions(export_dir=export, graph=graph, min_tokens=1, opt_tokens=8, max_tokens=32,
                                builder="tensorrt-rtx", **kw)
    return qtrt.build(options)


def _quantized_weight_bytes(onnx_path, bits) -> int:
    model = onnx.load(str(onnx_path), load_external_data=False)
    return sum(int(np.prod(t.dims)) * bits // 8 for t in initializers(model.graph) if t.name.endswith(".weight_q"))


@pytest.mark.parametrize("graph", ["prefill", "decode"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_standard_form_builds(trt_exports, precision, graph):
    get, model, _ = trt_exports
    export = get(precision, "standard")
    entry = _build(export, graph)
    engine = export / entry["file"]
    assert engine.stat().st_size > 0 and entry["builder"] == "tensorrt-rtx"
    assert entry["tensorrt_version"] == trt_builder.load("tensorrt-rtx").version
    # FP8 engines target only the GPUs with FP8 (SM >= 8.9)
    assert entry["compute_capabilities"] == (["8.9", "12.0"] if precision == "fp8" else list(trt_builder.RTX_DEFAULT_SM))
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["files"][entry["file"]] == entry["sha256"]
    assert manifest["files"][entry["layers"]["file"]]  # the layer report is listed like the engine
    summary = entry["layers"]["summary"]
    assert summary["layers"] > 10 and summary["engine_bytes"] == engine.stat().st_size
    if precision in QUANT:  # weight-only quantized weights are kept as such in the engine
        dtype, bits = QUANT[precision]
        assert summary["constant_bytes"][dtype] == _quantized_weight_bytes(export / f"{graph}.onnx", bits) > 0
    # the plan is the weights plus text: TensorRT-RTX's kernel sources for its on-device JIT and the
    # compiler's descriptions; what is neither is small
    text = summary["plan_text"]
    assert text["kernels"] >= text["kernel_sources"] > 0
    assert text["source_unique_line_bytes"] < text["kernel_source_bytes"] / 4  # one prelude, many copies
    rest = summary["engine_bytes"] - summary["weights_bytes"] - text["kernel_source_bytes"] - text["other_text_bytes"]
    assert 0 <= rest < 0.1 * summary["engine_bytes"], (rest, summary["engine_bytes"])
    manifest_decode = manifest["graphs"]["decode"]["form"]
    assert manifest_decode == ("compact" if precision == "int8" else "if")
    if graph == "decode" and manifest_decode == "if":  # one lazy conditional per routed layer, jumped over
        assert summary["conditional_jumps"] == len(model.routers)
        assert summary["branch_gemms"] >= summary["conditional_jumps"]  # fused GEMMs differ by precision
    else:
        assert summary["conditional_jumps"] == 0


def test_compact_decode_has_no_conditional(trt_exports):
    export = trt_exports[0]("int4", "standard", "compact")
    summary = _build(export, "decode")["layers"]["summary"]
    assert summary["conditional_jumps"] == 0 and summary["branch_gemms"] == 0


def test_int8_if_decode_builds_for_batches(trt_exports):
    """int8 exports default to the compact decode (default_trt_decode); their If form builds for a
    batch range (TensorRT-RTX 1.7.1 fails it for a batch-1 profile only)."""
    summary = _build(trt_exports[0]("int8", "standard", "if"), "decode", batch="1:1:2")["layers"]["summary"]
    assert summary["conditional_jumps"] > 0


def test_profile_comes_from_the_graph_contract(trt_exports):
    entry = _build(trt_exports[0]("int4", "standard"), "decode")
    shapes = entry["profile"]["shapes"]
    for k in range(3):  # total = past + 1 at min, opt and max, or the builder refuses the profile
        assert shapes["attention_mask"][k][1] == shapes["past.0.key"][k][2] + 1 == shapes["past_exec"][k][2] + 1
        assert shapes["input_ids"][k] == [1, 1]
    assert [s[1] for s in shapes["attention_mask"]] == [2, 8, 32]


def test_plugin_exports_are_refused_by_tensorrt_rtx(trt_exports, tmp_path):
    lib = tmp_path / "libqtale_trt_plugins.so"
    lib.write_bytes(b"not loaded: refused before")
    with pytest.raises(QtaleError, match="networks take no plugin layers") as e:
        _build(trt_exports[0]("fp16", "plugin"), "prefill", plugin_lib=lib)
    assert "\n" not in str(e.value)


def test_fp8_refuses_targets_without_fp8(trt_exports):
    with pytest.raises(QtaleError, match="FP8 needs SM >= 8.9 but --compute-capability asks for 8.6"):
        _build(trt_exports[0]("fp8", "standard"), "prefill", compute_capabilities=("8.6", "8.9"))


def test_unknown_compute_capability(trt_exports):
    with pytest.raises(QtaleError, match="cannot target SM 9.0"):
        _build(trt_exports[0]("fp16", "standard"), "prefill", compute_capabilities=("9.0",))


def test_one_compute_capability_makes_a_smaller_engine(trt_exports):
    export = trt_exports[0]("int8", "standard")
    all_sms = _build(export, "prefill")["layers"]["summary"]["engine_bytes"]
    one = _build(export, "prefill", compute_capabilities=("8.9",))
    assert one["compute_capabilities"] == ["8.9"] and one["layers"]["summary"]["engine_bytes"] < all_sms


def test_plan_text_counts_kernel_sources_and_other_text():
    prelude = b"".join(b"template<> __device__ int cast%d(int x) {return x;}\n" % i for i in range(40))
    kernel = prelude + b"__global__ void k(float* x) {}\n"
    desc = b"tensor={ name=\"t\" dims={ 1 } }\n" * 60
    plan = b"\x00\x01" + kernel + b"\xff" * 9 + kernel + b"\x00" + desc + b"\x80" + b"short text\x00"
    text = engine_info.plan_text(plan)
    assert text == {"kernel_source_bytes": 2 * len(kernel), "kernel_sources": 2, "kernels": 2,
                    "source_unique_line_bytes": len(kernel), "other_text_bytes": len(desc)}
    assert engine_info.plan_text(b"\x00" * 4096)["kernel_sources"] == 0


def test_dim_ranges_tie_decode_total_to_past():
    ranges = graph_io.dim_ranges("decode", (1, 2, 4), (1, 16, 64))
    assert ranges["total"] == (2, 16, 64) and ranges["past"] == (1, 15, 63) and ranges["one"] == (1, 1, 1)
    assert graph_io.dim_ranges("prefill", (1, 1, 1), (1, 16, 64)) == {"batch": (1, 1, 1), "seq": (1, 16, 64)}
    with pytest.raises(ValueError, match="dimension 'weird'"):
        graph_io.profile_shapes("prefill", {"x": {"shape": ["batch", "weird"]}}, (1, 1, 1), (1, 2, 3))


def test_layer_report_parsing():
    report = ("Layers:\n"
              "Name: w_deq, LayerType: kgen, Inputs: [], Constants: [ { Name: w4, Dimensions: [1,64,32], "
              "Strides: [2048,32,1], StrideOrder: [2,1,0], Datatype: Int4, Format: (Linear) Row major linear format }, "
              "{ Name: s, Dimensions: [1,1,32], Strides: [32,32,1], StrideOrder: [2,1,0], Datatype: Float, Format: x }], "
              "Outputs: [ { Name: o, Dimensions: [1,64,32], Datatype: Float }], TacticName: k\n"
              "Name: c0, LayerType: cjmp, Inputs: [ { Name: cond, Dimensions: [1], Datatype: Bool }], Outputs: []\n"
              "Name: $$myelin$$(Unnamed IfConditional* 0)^$$myelin$$then^mm, LayerType: gemm, Inputs: [], "
              "Constants: [ { Name: w4, Dimensions: [1,64,32], Strides: [1], StrideOrder: [0], Datatype: Int4, Format: x }], "
              "Outputs: []\n")
    s = engine_info.summary(engine_info.parse(report))
    assert s["constant_bytes"] == {"Float": 128, "Int4": 1024}  # w4 counted once
    assert s["conditional_jumps"] == 1 and s["branch_gemms"] == 1 and s["layer_types"]["kgen"] == 1
    js = json.dumps({"Layers": [{"Name": "g", "LayerType": "gemm",
                                 "Constants": [{"Name": "w", "Dimensions": [8, 8], "Datatype": "Half"}]}]})
    assert engine_info.summary(engine_info.parse(js))["constant_bytes"] == {"Half": 128}


def _builds(model: onnx.ModelProto) -> bool:
    """Whether TensorRT-RTX parses and builds `model` (every dynamic dim 1/8/16)."""
    trt = trt_builder.load("tensorrt-rtx").trt
    logger = trt_builder._logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        return False
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = [[1 if d < 0 else d for d in t.shape], [8 if d < 0 else d for d in t.shape], [16 if d < 0 else d for d in t.shape]]
        profile.set_shape(t.name, *dims)
    config.add_optimization_profile(profile)
    return builder.build_serialized_network(network, config) is not None


def _graph(nodes, inputs, outputs, inits=()):
    from onnx import helper
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def test_conformance_check_against_the_builder():
    """The static check is a fast pre-check; the builder is the truth. Where they disagree (an INT64
    CumSum) the check stays strict on purpose: it also guards TensorRT 10.x on Jetson, whose
    operator document lists float CumSum only (docs/tensorrt.md)."""
    from onnx import TensorProto as P, helper, numpy_helper

    from qtale_export.export.trt_conformance import problems

    vi = helper.make_tensor_value_info
    one = numpy_helper.from_array(np.array(1, np.int64), "one")
    w = numpy_helper.from_array(np.ones((2, 2), np.int8), "w")
    s = numpy_helper.from_array(np.ones(2, np.float32), "s")
    then = helper.make_graph([helper.make_node("DequantizeLinear", ["w", "s"], ["y1"], axis=1),
                              helper.make_node("Add", ["y1", "z"], ["y1z"])], "then", [], [vi("y1z", P.FLOAT, None)], [w, s])
    other = helper.make_graph([helper.make_node("Identity", ["z"], ["y2"])], "else", [], [vi("y2", P.FLOAT, None)])
    cases = {  # name: (graph, the check accepts, TensorRT-RTX builds)
        "NonZero": (_graph([helper.make_node("NonZero", ["x"], ["y"])], [vi("x", P.BOOL, [1, "t"])],
                           [vi("y", P.INT64, [2, "n"])]), False, False),
        "Squeeze with runtime axes": (_graph([helper.make_node("Squeeze", ["x", "a"], ["y"])],
                                             [vi("x", P.FLOAT, [1, "t"]), vi("a", P.INT64, [1])], [vi("y", P.FLOAT, ["t"])]),
                                      False, False),
        "DequantizeLinear inside If": (_graph([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                                              [vi("c", P.BOOL, []), vi("z", P.FLOAT, [2, 2])], [vi("y", P.FLOAT, [2, 2])]),
                                       True, True),
        "INT64 CumSum": (_graph([helper.make_node("CumSum", ["x", "one"], ["y"])], [vi("x", P.INT64, [1, "t"])],
                                [vi("y", P.INT64, [1, "t"])], [one]), False, True),
        "FP32 CumSum": (_graph([helper.make_node("CumSum", ["x", "one"], ["y"])], [vi("x", P.FLOAT, [1, "t"])],
                               [vi("y", P.FLOAT, [1, "t"])], [one]), True, True),
    }
    for name, (model, accepted, builds) in cases.items():
        assert (problems(model) == []) == accepted, name
        assert _builds(model) == builds, name


def test_verify_trt_goes_as_far_as_a_machine_without_gpu_allows(trt_exports):
    """`qtale verify --trt` on TensorRT-RTX engines: the engines are read through the manifest (listed,
    sha256, plugin rule), TensorRT-RTX and Polygraphy's runner are set up; running them needs a GPU."""
    from qtale_export.export.verify import verify_with_polygraphy

    if trt_builder.has_gpu():
        pytest.skip("a GPU is here: tests/gpu/deploy runs the engines")
    export = trt_exports[0]("fp16", "standard")
    for graph in ("prefill", "decode"):
        _build(export, graph)
    with pytest.raises(QtaleError, match="engines of .* needs an NVIDIA GPU .* checked .* but not run"):
        verify_with_polygraphy(export, backend="tensorrt")


def test_engine_io_is_recorded(trt_exports):
    entry = _build(trt_exports[0]("int4", "standard"), "decode")
    names = [t["name"] for t in entry["io"]["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "theta"] and names[-1] == "past_exec"
    by_name = {t["name"]: t for t in entry["io"]["inputs"] + entry["io"]["outputs"]}
    assert by_name["input_ids"]["dtype"] == "INT64" and by_name["input_ids"]["shape"] == [-1, -1]
    assert by_name["logits"]["dtype"] == "FLOAT" and by_name["exec_mask"]["dtype"] == "BOOL"


def test_triton_repo_tensorrt_config_from_the_engine(trt_exports, tmp_path):
    """`qtale triton-repo --backend tensorrt` writes each model's config.pbtxt from the built
    engine's own I/O (names, dtypes, shapes), parsed with Triton's model-config protobuf."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from qtale_export.deploy.triton import build_repository

    export = trt_exports[0]("fp16", "standard")
    entries = {g: _build(export, g) for g in ("prefill", "decode")}
    build_repository([export], tmp_path / "repo", backend="tensorrt")
    for graph, entry in entries.items():
        folder = tmp_path / "repo" / f"qtale_fp16_{graph}"
        cfg = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert cfg.platform == "tensorrt_plan" and (folder / "1" / entry["file"]).is_file()
        assert [i.name for i in cfg.input] == [t["name"] for t in entry["io"]["inputs"]]
        assert [o.name for o in cfg.output] == [t["name"] for t in entry["io"]["outputs"]]
        types = {i.name: model_config_pb2.DataType.Name(i.data_type) for i in list(cfg.input) + list(cfg.output)}
        assert types["input_ids"] == "TYPE_INT64" and types["logits"] == "TYPE_FP32"
        if graph == "decode":
            assert types["past.0.key"] == "TYPE_FP16" and types["past_exec"] == "TYPE_BOOL"
        assert all(len(i.dims) == len(t["shape"]) for i, t in zip(cfg.input, entry["io"]["inputs"]))
