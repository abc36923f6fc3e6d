"""Prefill and decode ONNX graphs of a RoutedModel, built node by node from its weights.

The graphs reproduce `qtale_export.routing.RoutedModel` at inference (see docs/export.md):
routers on the fp32 hidden state, gate = P(execute) >= theta (per sequence), the first
`keep_initial` real tokens forced on, padding forced off; prefill runs every routed layer on its
executed tokens only (compact -> layer -> scatter), with either standard ONNX ops or the qtale
TokenCompact/TokenScatter ops; decode wraps every routed layer in an ONNX `If` on "some row of the
batch executes this layer" (a 0-D bool): the then-branch runs the layer for every row and keeps its
output only where the gate is on, the else-branch passes the hidden state through; both append zero
K/V rows with exec=false where the gate is off. At batch 1 a skipped token skips the whole layer.

The package: `builder` (the ONNX builder), `extraction` (weights and structure of the model),
`lowering` (the standard decoder math), `ort` (the ONNX Runtime CPU form), `assemble` (the two
graphs), `routers` (gate naming, router surgery). Its names are re-exported here, so callers use
`graphs.X`.
"""
from __future__ import annotations

from .assemble import (TRT_DECODE_FORMS, build_decode, build_decode_compacted, build_prefill, default_trt_decode,
                       graph_builders, io_description)
from .builder import MIN_OPSET, MS_DOMAIN, NP2ONNX, PLUGIN_ATTRS, QTALE_DOMAIN, Builder
from .extraction import Spec, Weights, extract, quantizable
from .lowering import Lowering
from .ort import FUSED, NEG, PARTS, OrtLowering, TableFn, build_decode_ort, build_prefill_ort
from ...deploy.routers import GATE_OP, cut_routers, gate_name, is_gate

__all__ = ["Builder", "FUSED", "GATE_OP", "MIN_OPSET", "MS_DOMAIN", "NEG", "NP2ONNX", "OrtLowering", "PARTS",
           "PLUGIN_ATTRS", "QTALE_DOMAIN", "Spec", "TRT_DECODE_FORMS", "TableFn", "Lowering", "Weights",
           "build_decode", "build_decode_compacted", "build_decode_ort", "build_prefill", "build_prefill_ort",
           "cut_routers", "default_trt_decode", "extract", "gate_name", "graph_builders", "io_description",
           "is_gate", "quantizable"]
