"""Graph assembly: the prefill and decode graphs of the contract (deploy/graph_io.py) from a lowering,
the TensorRT decode forms, and the graphs' I/O description."""
from __future__ import annotations

from functools import partial

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...deploy import graph_io
from .builder import NP2ONNX, Builder
from .extraction import Spec, Weights
from .lowering import Lowering


def _declare_inputs(b: Builder, s: Spec, graph: str, optional: bool = False) -> None:
    """The graph inputs of the contract (deploy/graph_io.py); with `optional`, also those with a
    default (an input and an initializer of the same name: ONNX Runtime feeds it or keeps it)."""
    for name, (dtype, shape) in graph_io.inputs(graph, s.num_layers, s.kv_heads, s.head_dim, b.act.name).items():
        b.add_input(name, NP2ONNX[np.dtype(dtype)], shape)
    for name, (dtype, shape, default) in (graph_io.optional_inputs(graph) if optional else {}).items():
        b.add_input(name, NP2ONNX[np.dtype(dtype)], shape)
        b.init(name, np.asarray(default, dtype).reshape(shape))


def _logits_and_cache_outputs(b: Builder, s: Spec, logits: str, graph: str) -> None:
    """The graph outputs of the contract (deploy/graph_io.py): logits of the new positions,
    present.{i}.key/value and exec_mask over every position so far."""
    b.op("Identity", [logits], outputs=[graph_io.LOGITS])
    for name, (dtype, shape) in graph_io.outputs(graph, s.num_layers, s.kv_heads, s.head_dim, s.vocab,
                                                 b.act.name).items():
        b.add_output(name, NP2ONNX[np.dtype(dtype)], shape)


def _present_after_past(b: Builder, i: int, k: str, v: str) -> None:
    """present.{i}.key/value of a decode graph: layer i's past cache with this step's k, v appended."""
    for name, new in (("key", k), ("value", v)):
        b.op("Concat", [graph_io.past(i, name), new], outputs=[graph_io.present(i, name)], axis=2)


def build_prefill(w: Weights, ops: str, opset: int, act, weight_fn, target: str = "ort-cpu",
                  lowering=None) -> onnx.ModelProto:
    """The prompt graph; `lowering` makes the Lowering (default: the plain one for `target`,
    OrtLowering for the ort-cpu contrib-op form)."""
    s = w.spec
    b = Builder(opset, act, weight_fn)
    L = lowering(b, w, ops) if lowering else Lowering(b, w, ops, target)
    optional = target != "tensorrt"
    _declare_inputs(b, s, "prefill", optional)
    valid, pos = L.positions(graph_io.ATTENTION_MASK)
    keep = L.keep_mask(valid, pos)
    x = L.embed(graph_io.INPUT_IDS)
    zeros = None
    execs = []
    for i in range(s.num_layers):
        gate = L.router_gate(i, x, graph_io.THETA, valid, keep) if i in s.routed else valid
        if i in s.routed or L.compact_unrouted:
            x, k, v, zeros = L.compacted_layer(i, x, gate, pos, zeros)
        else:
            x, k, v = L.layer(i, x, pos, pos, valid)
        b.op("Identity", [k], outputs=[graph_io.present(i, "key")])
        b.op("Identity", [v], outputs=[graph_io.present(i, "value")])
        execs.append(b.unsq(gate, [0]))
    b.op("Concat", execs, outputs=[graph_io.EXEC_MASK], axis=0)
    if optional:  # logits of the last logits_to_keep positions (start -0 = 0: every position)
        start = b.op("Neg", [b.op("Reshape", [graph_io.LOGITS_TO_KEEP, b.const([1])])])
        x = b.op("Slice", [x, start, b.const([np.iinfo(np.int64).max]), b.const([1])])
    _logits_and_cache_outputs(b, s, L.head(x), "prefill")
    return b.model("qtale_prefill")


def build_decode(w: Weights, ops: str, opset: int, act, weight_fn, target: str = "ort-cpu") -> onnx.ModelProto:
    """One new token per sequence against a full-length cache (plain ops: nothing to compact)."""
    s = w.spec
    b = Builder(opset, act, weight_fn)
    L = Lowering(b, w, ops, target)
    elem = NP2ONNX[b.act]
    _declare_inputs(b, s, "decode")
    full_valid, full_pos, valid, pos, past_valid, _ = L.decode_positions()
    keep = L.keep_mask(valid, pos)
    x = L.embed(graph_io.INPUT_IDS)
    zkv = None
    execs = []
    for i in range(s.num_layers):
        pe = b.op("Gather", [graph_io.PAST_EXEC, b.const(i)], axis=0)  # [B, past]
        gate = L.router_gate(i, x, graph_io.THETA, valid, keep) if i in s.routed else valid
        k_ok = b.op("Concat", [b.op("And", [pe, past_valid]), gate], axis=1)
        past = (graph_io.past(i, "key"), graph_io.past(i, "value"))
        if i in s.routed:
            if zkv is None:  # zero K/V of the new token [B, kv, 1, hd]
                shape = b.op("Concat", [b.op("Shape", [x], end=1), b.const([s.kv_heads, 1, s.head_dim])], axis=0)
                zkv = b.op("ConstantOfShape", [shape], value=numpy_helper.from_array(np.zeros(1, b.act)))
            # cond: a 0-D bool, true when some row of the batch executes layer i
            cond = b.cast(b.reduce("ReduceMax", b.cast(gate, TensorProto.INT64), [0, 1], keepdims=0),
                          TensorProto.BOOL)
            with b.subgraph() as run_nodes:
                y, k, v = L.layer(i, x, pos, full_pos, k_ok, past=past)
                g4 = b.unsq(gate, [1, 3])
                run_out = [b.op("Where", [b.unsq(gate, [2]), y, x]), b.op("Where", [g4, k, b.actc(0.0)]),
                           b.op("Where", [g4, v, b.actc(0.0)])]
            with b.subgraph() as skip_nodes:
                skip_out = [b.op("Identity", [t]) for t in (x, zkv, zkv)]
            x, k, v = b.op("If", [cond], n_out=3, name=f"layers.{i}/If",
                           then_branch=b.branch(run_nodes, f"layers.{i}.run", run_out, [elem] * 3),
                           else_branch=b.branch(skip_nodes, f"layers.{i}.skip", skip_out, [elem] * 3))
        else:
            x, k, v = L.layer(i, x, pos, full_pos, k_ok, past=past)
        _present_after_past(b, i, k, v)
        execs.append(b.unsq(gate, [0]))  # [1, B, 1]
    b.op("Concat", [graph_io.PAST_EXEC, b.op("Concat", execs, axis=0)], outputs=[graph_io.EXEC_MASK], axis=2)
    _logits_and_cache_outputs(b, s, L.head(x), "decode")
    return b.model("qtale_decode")


# ---------------------------------------------------------------------------------------------
# --target tensorrt --trt-decode compact: decode without If
# ---------------------------------------------------------------------------------------------
def build_decode_compacted(w: Weights, ops: str, opset: int, act, weight_fn) -> onnx.ModelProto:
    """decode.onnx for TensorRT without `If`: every routed layer goes through the same compaction
    as prefill (TokenCompact/TokenScatter or their standard-op form). With one new token per row N
    is 1, so this is a gate-select: the layer runs on every row and TokenScatter keeps its output
    only where the gate is on (skipped rows: hidden state passed through, zero K/V). The `If` form
    (the default, `build_decode`) skips a layer no row executes; this one never skips compute and
    is kept for TensorRT versions whose conditionals do not build (docs/tensorrt.md). Inputs,
    outputs and results are those of `build_decode`."""
    s = w.spec
    b = Builder(opset, act, weight_fn)
    L = Lowering(b, w, ops, "tensorrt")
    _declare_inputs(b, s, "decode")
    full_valid, full_pos, valid, pos, past_valid, past_pos = L.decode_positions(past_positions=True)
    keep = L.keep_mask(valid, pos)
    x = L.embed(graph_io.INPUT_IDS)
    zeros = None
    execs = []
    for i in range(s.num_layers):
        pe = b.op("Gather", [graph_io.PAST_EXEC, b.const(i)], axis=0)  # [B, past]
        past_ok = b.op("And", [pe, past_valid])
        past = (graph_io.past(i, "key"), graph_io.past(i, "value"))
        if i in s.routed:
            gate = L.router_gate(i, x, graph_io.THETA, valid, keep)
            x, k, v, zeros = L.compacted_layer(i, x, gate, pos, zeros, past=(past, past_pos, past_ok))
        else:
            gate = valid
            x, k, v = L.layer(i, x, pos, full_pos, b.op("Concat", [past_ok, gate], axis=1), past=past)
        _present_after_past(b, i, k, v)
        execs.append(b.unsq(b.op("Concat", [pe, gate], axis=1), [0]))
    b.op("Concat", execs, outputs=[graph_io.EXEC_MASK], axis=0)
    _logits_and_cache_outputs(b, s, L.head(x), "decode")
    return b.model("qtale_decode")


TRT_DECODE_FORMS = ("if", "compact")


def default_trt_decode(precision: str) -> str:
    """The TensorRT decode form an export gets unless asked: "if", except int8, whose If decode
    TensorRT-RTX 1.7.1 fails to build for a batch-1 profile (Myelin internal error
    `bb.cpp:137: CHECK(op->parent() == this ...)`; batch 1:1:2 builds), so int8 keeps "compact"."""
    return "compact" if precision == "int8" else "if"


def graph_builders(target: str, trt_decode: str = "if") -> list:
    """[(kind, build(w, ops, opset, act, weight_fn))] of the two graphs of an export for `target`.
    TensorRT decode: "if" (default) wraps each routed layer in an `If`, which TensorRT builds as a
    conditional jump, so a batch in which no row executes the layer skips its compute (batch 1:
    every skipped layer); "compact" is the gate-select form (every row runs every layer)."""
    if target == "tensorrt":
        decode = partial(build_decode, target=target) if trt_decode == "if" else build_decode_compacted
        return [("prefill", partial(build_prefill, target=target)), ("decode", decode)]
    return [("prefill", build_prefill), ("decode", build_decode)]


def io_description(m: onnx.ModelProto) -> dict:
    def desc(vis):
        out = {}
        for vi in vis:
            tt = vi.type.tensor_type
            out[vi.name] = {"dtype": helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                            "shape": [d.dim_param or d.dim_value for d in tt.shape.dim]}
        return out
    defaults = {t.name for t in m.graph.initializer}
    return {"inputs": desc(vi for vi in m.graph.input if vi.name not in defaults),
            "optional_inputs": desc(vi for vi in m.graph.input if vi.name in defaults),
            "outputs": desc(m.graph.output)}
