"""An ONNX graph with its subgraphs (If / Loop / Scan bodies, at any depth): the one walk that the
manifest's external-data check, the ORT custom-op session, router surgery and the TensorRT
conformance check share. onnx only, no torch."""
from __future__ import annotations

from collections.abc import Iterator

import onnx


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph`, then every subgraph in it, depth first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs):
                yield from graphs(sub)


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """Every graph inside `node`'s attributes, at any depth."""
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs):
            yield from graphs(sub)


def nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The nodes of `graph` and of every subgraph in it."""
    for g in graphs(graph):
        yield from g.node


def initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The initializers of `graph` and of every subgraph in it (If branches hold their own)."""
    for g in graphs(graph):
        yield from g.initializer
