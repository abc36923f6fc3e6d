"""One external-data file for both graphs of an export.

prefill.onnx and decode.onnx carry the same weights. `onnx.save_model(save_as_external_data=True)`
writes one data file per graph, so an export used to hold every weight twice. SharedWeights writes
each distinct tensor once (keyed by its bytes and dtype, so two shapes of one table share it; offsets aligned to 4 KiB so ONNX
Runtime can memory-map them) and points every graph at it through ONNX's standard external-data
fields (location, offset, length), which ONNX Runtime, `onnx.load` and TensorRT's ONNX parser read.
onnx has no writer that shares one file between models, hence this small one.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import AttributeProto, TensorProto
from onnx.external_data_helper import set_external_data

DATA_FILE = "weights.onnx.data"
THRESHOLD = 1024  # bytes; smaller tensors stay inside the graph file
ALIGN = 4096


def graph_tensors(graph: onnx.GraphProto):
    """Every initializer of `graph` and of its subgraphs (If branches), recursively."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from graph_tensors(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from graph_tensors(g)


class SharedWeights:
    """Append-only, content-addressed external data file shared by the graphs saved through it."""

    def __init__(self, folder: str | Path, name: str = DATA_FILE):
        self.name = name
        self.path = Path(folder) / name
        self._file = open(self.path, "wb")
        self._index: dict[tuple, tuple[int, int]] = {}
        self.size = 0
        self.tensors = 0
        self.shared = 0

    def _put(self, data: bytes, key: tuple) -> tuple[int, int]:
        if key in self._index:
            self.shared += 1
            return self._index[key]
        pad = (-self.size) % ALIGN
        self._file.write(b"\0" * pad)
        offset = self.size + pad
        self._file.write(data)
        self.size = offset + len(data)
        self._index[key] = (offset, len(data))
        return offset, len(data)

    def save(self, model: onnx.ModelProto, path: str | Path) -> None:
        """Move `model`'s large tensors into the shared file and write the graph to `path`."""
        for t in graph_tensors(model.graph):
            if t.data_location == TensorProto.EXTERNAL or not t.HasField("raw_data") or len(t.raw_data) < THRESHOLD:
                continue
            data = t.raw_data
            # bytes and dtype, not dims: the tied embedding table and the LM head read one copy
            key = (t.data_type, hashlib.sha256(data).digest())
            offset, length = self._put(data, key)
            set_external_data(t, self.name, offset, length)
            t.ClearField("raw_data")
            self.tensors += 1
        onnx.save_model(model, str(path))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SharedWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
