"""Static TensorRT conformance check of an exported graph: no TensorRT, no torch.

Every node (If branches included) is checked against what TensorRT documents: its op type must be
in TABLE (transcribed from onnx-tensorrt's docs/operators.md) or PLUGINS (the qtale plugin
schemas, within the plugin I/O types of TensorRT 10's IPluginV3 documentation), the dtypes ONNX
shape inference gives its inputs and outputs must fit the row's signature, and inputs the row
requires to be initializers must be. Graph inputs/outputs must have network I/O types.
A failure raises QtaleError with one line naming the node. docs/tensorrt.md lists every row with
the document it comes from.

Signatures: "inputs->outputs", one letter per tensor: T = a type of the row, all T of a node equal;
t = a type of the row, independent; F = FP32/FP16/BF16, all F equal; I = INT32/INT64 (indices);
S = INT64 (shapes, axes); B = BOOL; J = INT32. A trailing "..." repeats the last letter.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto as P

from ..deploy import onnx_graphs
from ..errors import QtaleError

# The documents, by key (docs/tensorrt.md, "TensorRT conformance check", has the full citations).
DOCS = {
    "ops-10.1": "https://github.com/onnx/onnx-tensorrt/blob/release/10.1-GA/docs/operators.md",
    "ops-10.15": "https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md (revision for TensorRT 10.15)",
    "plugin-10.7": "https://github.com/NVIDIA/TensorRT/blob/release/10.7/include/NvInferRuntime.h "
                   "(IPluginV3OneBuild::getOutputDataTypes) and NvInferRuntimePlugin.h (PluginTensorDesc)",
}
OPS_DOC = "onnx-tensorrt operators.md 10.1-GA and 10.15"

NAMES = {P.FLOAT: "FP32", P.FLOAT16: "FP16", P.BFLOAT16: "BF16", P.INT32: "INT32", P.INT64: "INT64",
         P.INT8: "INT8", P.INT4: "INT4", P.UINT8: "UINT8", P.BOOL: "BOOL", P.FLOAT8E4M3FN: "FP8",
         P.DOUBLE: "DOUBLE"}
FLOATS = frozenset({"FP32", "FP16", "BF16"})
NUMERIC = FLOATS | {"INT32", "INT64"}
ALL = NUMERIC | {"BOOL"}
LETTERS = {"F": FLOATS, "I": frozenset({"INT32", "INT64"}), "S": frozenset({"INT64"}), "B": frozenset({"BOOL"}),
           "J": frozenset({"INT32"})}
# "TensorRT supports the following ONNX data types: ..." minus the quantized types, which are "available
# only through quantization from a floating-point type" (both pages' header notes); UINT8 only as I/O.
NETWORK_IO = ALL | {"UINT8"}
OPSET_RANGE = (9, 24)  # 10.15 page; the 10.1 page says 9..20 (see docs/tensorrt.md)


@dataclass(frozen=True)
class Row:
    types: frozenset
    sig: str
    const: tuple = ()  # input positions that must be initializers
    note: str = ""


# Types: the intersection of the 10.1-GA and 10.15 pages (equal for every op here except where noted);
# restrictions: the union of both pages'.
TABLE: dict[str, Row] = {
    **{op: Row(NUMERIC, "T,T->T") for op in ("Add", "Sub", "Mul")},
    "Max": Row(NUMERIC, "T,T...->T"),
    "Neg": Row(NUMERIC, "T->T"),
    **{op: Row(frozenset({"BOOL"}), "T,T->T") for op in ("And", "Or")},
    **{op: Row(NUMERIC, "T,T->B") for op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")},
    "Cast": Row(ALL | {"UINT8"}, "t->t"),
    "Concat": Row(ALL, "T...->T"),
    "ConstantOfShape": Row(ALL, "S->T", note="10.1 lists 'INF64' (a typo for INT64); 10.15 adds FP8, FP4, INT4"),
    **{op: Row(FLOATS, "T->T") for op in ("Cos", "Sin", "Sqrt", "Reciprocal", "Sigmoid", "Softmax")},
    "Log": Row(FLOATS, "T->T", note="onnx-tensorrt docs/operators.md (10.x): FP32, FP16, BF16 (+ quantized types)"),
    "CumSum": Row(FLOATS, "T,I->T", const=(1,), note="`axis` must be an initializer (10.15: a build-time constant)"),
    "DequantizeLinear": Row(frozenset({"INT8", "FP8", "INT4"}), "t,F->F",
                            note="`x_zero_point` must be zero (QTALE writes none); 10.15 adds FP4"),
    "Expand": Row(ALL, "T,S->T"),
    **{op: Row(ALL, "T,I->T") for op in ("Gather", "GatherElements", "GatherND")},
    "Identity": Row(ALL, "T->T"),
    "If": Row(ALL, "B->t...", note="branch outputs: same rank, different names; branch nodes are checked too"),
    "MatMul": Row(FLOATS, "T,T->T"),
    "Range": Row(NUMERIC, "T,T,T->T"),
    **{op: Row(NUMERIC, "T,S->T", const=(1,), note="`axes` must be an initializer")
       for op in ("ReduceMax", "ReduceMean", "ReduceSum")},
    "Reshape": Row(ALL, "T,S->T"),
    "ScatterElements": Row(NUMERIC, "T,I,T->T"),
    "Shape": Row(ALL, "t->S"),
    "Slice": Row(ALL, "T,I,I,I,I->T", const=(3,), note="10.1: `axes` must be an initializer"),
    "Split": Row(ALL, "T,S->T..."),
    "Squeeze": Row(ALL, "T,S->T", const=(1,), note="`axes` must be an initializer (10.15: resolvable to a constant)"),
    "Unsqueeze": Row(ALL, "T,S->T", const=(1,), note="`axes` must be a constant tensor (10.15: resolvable to a "
                     "constant); checked as: an initializer"),
    "Transpose": Row(ALL, "T->T"),
    "Where": Row(ALL, "B,T,T->T"),
}

# qtale plugins (docs/ops.md): float tensors FP32/FP16/BF16, everything else INT32, LINEAR format.
PLUGIN_DOMAIN = "qtale"
PLUGIN_ATTRS = {"plugin_version": "1", "plugin_namespace": "qtale"}
PLUGINS: dict[str, Row] = {
    "TokenCompact": Row(FLOATS, "F,J->F,J,J,J", note="hidden, gate -> compact, index, count, n (0-D size tensor)"),
    "TokenScatter": Row(FLOATS, "F,F,J,J->F", note="residual, update, index, count -> out"),
}


def _parse(sig: str) -> tuple[list[str], list[str]]:
    ins, outs = sig.split("->")
    return ins.split(","), outs.split(",")


def _expand(letters: list[str], n: int) -> list[str]:
    if letters and letters[-1].endswith("..."):
        last = letters[-1][:-3]
        return letters[:-1] + [last] * max(n - len(letters) + 1, 0)
    return letters


def _types(graph: onnx.GraphProto) -> dict[str, int]:
    """elem type of every named value in a graph and its subgraphs (names are unique in exports)."""
    out: dict[str, int] = {}
    for g in onnx_graphs.graphs(graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type:
                out[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            out[t.name] = t.data_type
    return out


def _node_problem(node, types: dict, inits: set) -> str | None:
    """Why `node` is outside the documents, or None."""
    if node.domain == PLUGIN_DOMAIN:
        row = PLUGINS.get(node.op_type)
        if row is None:
            return f"qtale op {node.op_type} has no TensorRT plugin"
        attrs = {a.name: a.s.decode() for a in node.attribute if a.type == onnx.AttributeProto.STRING}
        if any(attrs.get(k) != v for k, v in PLUGIN_ATTRS.items()):
            return f"plugin attributes {attrs} are not {PLUGIN_ATTRS}"
        source = "the qtale plugin schema (docs/ops.md)"
    elif node.domain in ("", "ai.onnx"):
        row = TABLE.get(node.op_type)
        if row is None:
            return f"op {node.op_type} is not in the TensorRT table ({OPS_DOC})"
        source = OPS_DOC
    else:
        return f"op {node.domain}::{node.op_type} is not an ONNX op TensorRT parses"
    want_in, want_out = _parse(row.sig)
    ins = [x for x in node.input]
    want_in, want_out = _expand(want_in, len(ins)), _expand(want_out, len(node.output))
    if len(ins) > len(want_in) or len(node.output) > len(want_out):
        return f"{len(ins)} inputs / {len(node.output)} outputs do not fit {row.sig} ({source})"
    tied: dict[str, str] = {}
    for kind, names, letters in (("input", ins, want_in), ("output", list(node.output), want_out)):
        for j, (name, letter) in enumerate(zip(names, letters)):
            if not name:
                continue  # an omitted optional input
            if name not in types:
                return f"{kind} {j} ({name}) has no known dtype"
            dt = NAMES.get(types[name], onnx.helper.tensor_dtype_to_string(types[name]))
            allowed = row.types if letter in ("T", "t") else LETTERS[letter]
            if dt not in allowed:
                return f"{kind} {j} ({name}) is {dt}, not {'/'.join(sorted(allowed))} ({source})"
            if letter in ("T", "F"):
                if tied.setdefault(letter, dt) != dt:
                    return f"{kind} {j} ({name}) is {dt} but the other {letter} tensors are {tied[letter]} ({source})"
    for j in row.const:
        if j < len(ins) and ins[j] and ins[j] not in inits:
            return f"input {j} ({ins[j]}) must be an initializer ({source})"
    if node.op_type == "DequantizeLinear" and len(ins) > 2 and ins[2]:
        return f"x_zero_point given ({ins[2]}); TensorRT needs it zero and QTALE writes none ({source})"
    return None


def problems(model: onnx.ModelProto) -> list[str]:
    """Every way `model` (loaded with or without its external data) leaves the documents."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    found = []
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        found.append(f"opset {opset} is outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]} ({OPS_DOC})")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = _types(inferred.graph)
    inits = {t.name for t in onnx_graphs.initializers(inferred.graph)}
    for vi in list(inferred.graph.input) + list(inferred.graph.output):
        dt = NAMES.get(vi.type.tensor_type.elem_type, str(vi.type.tensor_type.elem_type))
        if dt not in NETWORK_IO:
            found.append(f"network {'input' if vi in inferred.graph.input else 'output'} {vi.name} is {dt}, "
                         f"not a TensorRT network I/O type ({OPS_DOC})")
    for node in onnx_graphs.nodes(inferred.graph):
        why = _node_problem(node, types, inits)
        if why:
            found.append(f"node {node.name or '(unnamed)'} ({node.op_type}): {why}")
    return found


def check(graph: str | os.PathLike | onnx.ModelProto) -> dict:
    """Raise QtaleError (one line, the first problem) unless the graph conforms; returns a summary."""
    model = graph if isinstance(graph, onnx.ModelProto) else onnx.load(str(graph), load_external_data=False)
    where = "" if isinstance(graph, onnx.ModelProto) else f"{Path(graph).name}: "
    found = problems(model)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise QtaleError(f"{where}not TensorRT-conformant: {found[0]}{more}; see docs/tensorrt.md")
    all_nodes = list(onnx_graphs.nodes(model.graph))
    return {"ok": True, "nodes": len(all_nodes), "ops": sorted({n.op_type for n in all_nodes}), "documents": OPS_DOC}
