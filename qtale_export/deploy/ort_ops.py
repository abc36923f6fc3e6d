"""ONNX Runtime (CPU) kernels for the qtale ops, and `session()` that runs any exported graph.

The kernels are onnxruntime-extensions Python ops wrapping `qtale_export.ops_reference` (the
numpy ground truth). onnxruntime-extensions registers Python ops in its own domain
("ai.onnx.contrib") with one fixed signature per op name, so `session()` loads the graph,
renames the qtale-domain nodes to the registered ops in memory (fp16 graphs get exact
fp16 <-> fp32 casts around them: Python ops have no float16), and points ONNX Runtime at the graph's folder for its external data. The file on
disk keeps the contract form (domain "qtale", version 1) that TensorRT's plugins read.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from ..errors import QtaleError
from . import onnx_graphs

QTALE_DOMAIN = "qtale"
EXT_DOMAIN = "ai.onnx.contrib"
_REGISTERED = False


def register() -> None:
    """Register the Python kernels with onnxruntime-extensions (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from onnxruntime_extensions import PyCustomOpDef as D
    from onnxruntime_extensions import onnx_op

    from ..ops_reference import token_compact, token_scatter

    attrs = {"plugin_version": D.dt_string, "plugin_namespace": D.dt_string}
    for suffix, dt in (("", D.dt_float),):
        def compact(hidden, gate, **_):
            return token_compact(hidden, gate)

        def scatter(residual, update, index, count, **_):
            return token_scatter(residual, update, index, count)

        onnx_op(op_type=f"TokenCompact{suffix}", inputs=[dt, D.dt_int32],
                outputs=[dt, D.dt_int32, D.dt_int32, D.dt_int32], attrs=attrs)(compact)
        onnx_op(op_type=f"TokenScatter{suffix}", inputs=[dt, dt, D.dt_int32, D.dt_int32],
                outputs=[dt], attrs=attrs)(scatter)
    _REGISTERED = True


def uses_qtale_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain == QTALE_DOMAIN for n in model.graph.node)


def to_runnable(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with qtale nodes renamed to the registered onnxruntime-extensions ops."""
    f16 = model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 or any(
        i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in model.graph.output[1:2])
    # Python ops have no float16: an fp16 graph gets exact fp16 <-> fp32 casts around them.
    nodes = []
    for n in model.graph.node:
        if n.domain != QTALE_DOMAIN:
            nodes.append(n)
            continue
        n.domain = EXT_DOMAIN
        if f16:
            n_float = 1 if n.op_type == "TokenCompact" else 2
            for j in range(n_float):
                cast = f"{n.name}/in{j}_f32"
                nodes.append(onnx.helper.make_node("Cast", [n.input[j]], [cast], to=onnx.TensorProto.FLOAT))
                n.input[j] = cast
            orig = n.output[0]
            n.output[0] = f"{orig}_f32"
            nodes.append(n)
            nodes.append(onnx.helper.make_node("Cast", [n.output[0]], [orig], to=onnx.TensorProto.FLOAT16))
        else:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    keep_vi = [vi for vi in model.graph.value_info if not vi.name.startswith(("TokenCompact", "TokenScatter"))]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep_vi)
    keep = [o for o in model.opset_import if o.domain != QTALE_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep + [onnx.helper.make_opsetid(EXT_DOMAIN, 1)])
    return model


def session(path: str | os.PathLike, providers=None, threads: int | None = None, exact: bool = False,
            spin: bool = True, model: onnx.ModelProto | None = None):
    """An onnxruntime.InferenceSession for an exported graph, with the qtale ops when it uses them.

    exact: compute quantized matmuls in fp32 (MatMulNBits accuracy_level 0, no int8-activation
    fusion of DequantizeLinear -> MatMul), as verification does; the default keeps ORT's fast path.
    spin: False stops idle intra-op threads from busy-waiting (ORT's allow_spinning), which wins
    on a CPU shared with other work (docs/benchmarks.md).
    model: an edited copy of the graph at `path` (loaded without external data) to run instead;
    its weights are still read from beside `path`.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise QtaleError(f"ONNX graph not found: {path}")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = providers or ["CPUExecutionProvider"]
    rewrite = model is not None
    model = model if model is not None else onnx.load(str(path), load_external_data=False)
    rewrite = rewrite or uses_qtale_ops(model)
    if exact:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        for n in onnx_graphs.nodes(model.graph):  # decode.onnx has its layers inside If branches
            for a in n.attribute:
                if n.op_type == "MatMulNBits" and a.name == "accuracy_level" and a.i != 0:
                    a.i = 0
                    rewrite = True
    if not rewrite:
        return ort.InferenceSession(str(path), so, providers=providers)
    if uses_qtale_ops(model):
        from onnxruntime_extensions import get_library_path

        register()
        so.register_custom_ops_library(get_library_path())
        model = to_runnable(model)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent.resolve()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
