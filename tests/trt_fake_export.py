"""A tiny but real qtale export folder (manifest.json + ONNX) for the TensorRT build tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from qtale_export.checkpoint import seal
from qtale_export.deploy.manifest import BYPRODUCTS


def make_export(root: Path, *, ops: str = "plugin", precision: str = "int4", manifest: bool = True) -> Path:
    """Write EXPORT_DIR with prefill.onnx; with ops="plugin" the graph holds a qtale TokenCompact node."""
    root.mkdir(parents=True, exist_ok=True)
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("theta", TensorProto.FLOAT, ["batch"]),
    ]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["ids_f", "axis"], ["hidden"]),
             helper.make_node("Cast", ["attention_mask"], ["gate"], to=TensorProto.INT32)]
    opsets = [helper.make_opsetid("", 17)]
    if ops == "plugin":
        nodes.append(helper.make_node("TokenCompact", ["hidden", "gate"], ["compact", "index", "count", "n"],
                                      domain="qtale", plugin_version="1", plugin_namespace="qtale"))
        opsets.append(helper.make_opsetid("qtale", 1))
        out = helper.make_tensor_value_info("compact", TensorProto.FLOAT, ["batch", "n", 1])
    else:
        out = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", 1])
    axis = helper.make_tensor("axis", TensorProto.INT64, [1], [2])
    graph = helper.make_graph(nodes, "prefill", inputs, [out], initializer=[axis])
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.save(model, str(root / "prefill.onnx"))
    if manifest:
        data = (root / "prefill.onnx").read_bytes()
        doc = {
            "format": "qtale-export",
            "format_version": 1,
            "precision": precision,
            "ops": ops,
            "graphs": {"prefill": {
                "file": "prefill.onnx",
                "inputs": {"input_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
                           "attention_mask": {"dtype": "int64", "shape": ["batch", "seq"]},
                           "theta": {"dtype": "float32", "shape": ["batch"]}},
                "outputs": {}}},
            "model": {"num_layers": 1, "hidden": 1, "kv_heads": 1, "head_dim": 1, "vocab": 1},
            "files": {"prefill.onnx": hashlib.sha256(data).hexdigest()},
            "engines": [],
            "unchecked": BYPRODUCTS,
        }
        (root / "manifest.json").write_text(json.dumps(seal(doc), indent=2))  # with its listing's checksum
    return root
