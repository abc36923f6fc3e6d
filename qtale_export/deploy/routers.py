"""Router gates in the graphs: their naming (part of the graph contract: the exporter names each
gate so, `qtale bench` finds them), and router surgery (`cut_routers`, the benchmark's graph
without routers). onnx only, no torch: the exporter (export/graphs/) imports it from here."""
from __future__ import annotations

import onnx

from .onnx_graphs import subgraphs

GATE_OP = "GreaterOrEqual"  # a router's gate, margin >= logit(theta), named gate_name(i)


def gate_name(i: int) -> str:
    """The node name of router i's gate (`is_gate` recognizes it)."""
    return f"router.{i}/gate"


def is_gate(node: onnx.NodeProto) -> bool:
    """Whether `node` is a router's gate named by `gate_name` (the graphs have other GATE_OP nodes)."""
    index = node.name.removeprefix("router.").removesuffix("/gate")
    return node.op_type == GATE_OP and index.isdigit() and node.name == gate_name(int(index))


def _branch_inputs(node: onnx.NodeProto) -> set[str]:
    """Every value the subgraphs of `node` (If branches, recursively) read: an over-approximation
    of their outer-scope references, which is what dead-node elimination must keep."""
    return {i for g in subgraphs(node) for n in g.node for i in n.input if i}


def cut_routers(m: onnx.ModelProto) -> int:
    """Replace every router's gate of graph `m` by "execute" and drop the nodes no output needs
    (the router subgraphs), in place; returns the number of gates cut. `qtale bench` measures
    the router overhead against this graph. The token compaction ops stay."""
    nodes = list(m.graph.node)
    cut = 0
    for node in nodes:
        if is_gate(node):
            node.input[0] = node.input[1]  # logit(theta) >= itself: always true ([B, 1, 1], broadcast by And)
            cut += 1
    needed = {o.name for o in m.graph.output}
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_branch_inputs(node))
    del m.graph.node[:]
    m.graph.node.extend(reversed(keep))
    inits = [i for i in m.graph.initializer if i.name in needed]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    return cut
