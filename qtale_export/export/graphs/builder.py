"""The ONNX graph builder: nodes, initializers (main graph or If branch), constants, the model."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QTALE_DOMAIN = "qtale"
MS_DOMAIN = "com.microsoft"  # MatMulNBits (quantized checkpoints, --target ort-cpu)
PLUGIN_ATTRS = {"plugin_version": "1", "plugin_namespace": "qtale"}
NP2ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
           np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL}
MIN_OPSET = 18


class Builder:
    def __init__(self, opset: int, act: np.dtype, weight_fn):
        self.opset = opset
        self.act = np.dtype(act)
        self.nodes: list = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.inputs: list = []
        self.outputs: list = []
        self.value_info: list = []
        self._n = 0
        self._consts: dict = {}
        self.weight_fn = weight_fn  # (builder, x, name, W [out,in] fp32) -> y, the precision policy
        self.custom = False
        self.ms = False
        self.local: dict | None = None  # initializers of the If branch being built
        self._local_q: set = set()

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def op(self, op_type, inputs, n_out=1, name=None, domain="", outputs=None, **attrs):
        name = name or self.fresh(op_type)
        outs = outputs or [f"{name}/out{j}" if n_out > 1 else f"{name}/out" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None,
                                           **attrs))
        if domain == QTALE_DOMAIN:
            self.custom = True
        if domain == MS_DOMAIN:
            self.ms = True
        return outs[0] if n_out == 1 else outs

    def init(self, name: str, arr: np.ndarray) -> str:
        """An initializer of the main graph; inside an If branch only DequantizeLinear weights and
        their scales are the branch's own (see `subgraph`)."""
        arr = np.asarray(arr)  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        dest = self.inits
        if self.local is not None:
            if name.endswith(".weight_q"):
                self._local_q.add(name[:-len("weight_q")])
                dest = self.local
            elif name.endswith(".weight_scale") and name[:-len("weight_scale")] in self._local_q:
                dest = self.local
        dest[name] = numpy_helper.from_array(arr if arr.flags.c_contiguous else arr.copy(), name)
        return name

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", arr)
        return self._consts[key]

    def actc(self, value) -> str:
        return self.const(value, self.act)

    @contextmanager
    def subgraph(self):
        """Collect the nodes made inside the `with` block (an If branch) separately. Weights and
        constants stay initializers of the main graph (outer scope): ONNX Runtime runs the ONNX
        checker on branch initializers, which refuses external data files with several hard links
        (`qtale triton-repo` hard-links the export). Exception: DequantizeLinear weights and scales
        (int4/int8/fp8) are the branch's own, because ORT's DequantizeLinear -> MatMulNBits fusion
        does not look up outer-scope initializers (ORT 1.32: "Missing required weight")."""
        saved = (self.nodes, self.local)
        sub = {"nodes": [], "inits": {}}
        self.nodes, self.local = sub["nodes"], sub["inits"]
        try:
            yield sub
        finally:
            self.nodes, self.local = saved

    def branch(self, sub, name, outputs, elems):
        outs = [helper.make_tensor_value_info(o, e, None) for o, e in zip(outputs, elems)]
        return helper.make_graph(sub["nodes"], name, [], outs, list(sub["inits"].values()))

    def add_input(self, name, elem, shape):
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def add_output(self, name, elem, shape):
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def cast(self, x, to):
        return self.op("Cast", [x], to=to)

    def to_act(self, x):
        return x if self.act == np.float32 else self.cast(x, NP2ONNX[self.act])

    def to_f32(self, x):
        return x if self.act == np.float32 else self.cast(x, TensorProto.FLOAT)

    def reduce(self, op_type, x, axes, keepdims=1):
        return self.op(op_type, [x, self.const(axes)], keepdims=keepdims)

    def unsq(self, x, axes):
        return self.op("Unsqueeze", [x, self.const(axes)])

    def model(self, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, list(self.inits.values()),
                                  value_info=self.value_info)
        opsets = [helper.make_opsetid("", self.opset)]
        if self.custom:
            opsets.append(helper.make_opsetid(QTALE_DOMAIN, 1))
        if self.ms:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        m = helper.make_model(graph, opset_imports=opsets, producer_name="qtale-export")
        m.ir_version = min(m.ir_version, 10)
        return m
