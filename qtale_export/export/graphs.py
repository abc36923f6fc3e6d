"""Prefill and decode ONNX graphs of a RoutedModel, built node by node from its weights.

The graphs reproduce `qtale_export.routing.RoutedModel` at inference (see docs/export.md):
routers on the fp32 hidden state, gate = P(execute) >= theta (per sequence), the first
`keep_initial` real tokens forced on, padding forced off; prefill runs every routed layer on its
executed tokens only (compact -> layer -> scatter), with either standard ONNX ops or the qtale
TokenCompact/TokenScatter ops; decode wraps every routed layer in an ONNX `If` on "some row of the
batch executes this layer" (a 0-D bool): the then-branch runs the layer for every row and keeps its
output only where the gate is on, the else-branch passes the hidden state through; both append zero
K/V rows with exec=false where the gate is off. At batch 1 a skipped token skips the whole layer.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..deploy import graph_io
from ..errors import QtaleError

QTALE_DOMAIN = "qtale"
MS_DOMAIN = "com.microsoft"  # MatMulNBits (quantized checkpoints, --target ort-cpu)
PLUGIN_ATTRS = {"plugin_version": "1", "plugin_namespace": "qtale"}
NP2ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
           np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL}
MIN_OPSET = 18
GATE_OP = "GreaterOrEqual"  # a router's gate, margin >= logit(theta), named gate_name(i)


def gate_name(i: int) -> str:
    """The node name of router i's gate (`is_gate` recognizes it)."""
    return f"router.{i}/gate"


def is_gate(node: onnx.NodeProto) -> bool:
    """Whether `node` is a router's gate named by `gate_name` (the graphs have other GATE_OP nodes)."""
    index = node.name.removeprefix("router.").removesuffix("/gate")
    return node.op_type == GATE_OP and index.isdigit() and node.name == gate_name(int(index))


# ---------------------------------------------------------------------------------------------
# model description
# ---------------------------------------------------------------------------------------------
@dataclass
class Spec:
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    inv_freq: np.ndarray
    rope_scale: float
    scaling: float
    window: int | None
    qk_norm: bool
    hidden_act: str
    routed: list[int]
    keep_initial: int
    eos_token_id: int | list | None
    tied: bool
    max_positions: int = 0  # max_position_embeddings (0: unknown)


@dataclass
class Weights:
    """numpy copies of every tensor the graphs need (fp32); linear weights in torch layout [out, in]."""
    spec: Spec
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    # projection -> quantizer state: {"amax"} of a modelopt weight quantizer; for a `qtale quantize`
    # checkpoint also "format", AWQ's "pre_quant_scale" and INT3's "rtn_scale" (precision.checkpoint_grid)
    quantized: dict[str, dict] = field(default_factory=dict)


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def extract(model) -> Weights:
    """Weights and structure of a RoutedModel; LoRA adapters are merged (on a copy)."""
    lm = model.causal_lm
    if hasattr(model.base, "peft_config"):
        lm = copy.deepcopy(model.base).merge_and_unload()
    cfg = lm.config
    dec = lm.model
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise QtaleError(f"unsupported MLP activation '{act}' for ONNX export (Llama-family SiLU only)")
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layer0 = dec.layers[0]
    rot = dec.rotary_emb
    window = model._window()
    spec = Spec(
        num_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads, head_dim=hd, vocab=cfg.vocab_size,
        eps=float(getattr(layer0.input_layernorm, "variance_epsilon", getattr(cfg, "rms_norm_eps", 1e-6))),
        inv_freq=_np(rot.inv_freq), rope_scale=float(getattr(rot, "attention_scaling", 1.0)),
        scaling=float(getattr(layer0.self_attn, "scaling", hd ** -0.5)), window=window,
        qk_norm=hasattr(layer0.self_attn, "q_norm"), hidden_act=act, routed=list(model.layer_ids),
        keep_initial=int(model.router_config.keep_initial), eos_token_id=cfg.eos_token_id,
        tied=lm.lm_head.weight.data_ptr() == dec.embed_tokens.weight.data_ptr(),
        max_positions=int(getattr(cfg, "max_position_embeddings", 0) or 0))
    w = Weights(spec)
    t = w.tensors
    info = getattr(model, "quantization_info", None) or {}
    fmt = info.get("format")

    def linear(name, mod):
        t[f"{name}.weight"] = _np(mod.weight)
        if getattr(mod, "bias", None) is not None:
            t[f"{name}.bias"] = _np(mod.bias)
        wq = getattr(mod, "weight_quantizer", None)
        amax = getattr(wq, "amax", None) if wq is not None else None
        if amax is not None and getattr(wq, "is_enabled", True):
            w.quantized[name] = {"amax": _np(amax)}
            if fmt:
                w.quantized[name]["format"] = fmt
                iq = getattr(mod, "input_quantizer", None)
                pqs = getattr(iq, "pre_quant_scale", None) if iq is not None else None
                if pqs is not None:
                    w.quantized[name]["pre_quant_scale"] = _np(pqs).reshape(-1)

    t["embed"] = _np(dec.embed_tokens.weight)
    t["norm.weight"] = _np(dec.norm.weight)
    if not spec.tied:
        t["lm_head.weight"] = _np(lm.lm_head.weight)
        if getattr(lm.lm_head, "bias", None) is not None:
            t["lm_head.bias"] = _np(lm.lm_head.bias)
    for i, layer in enumerate(dec.layers):
        p = f"layers.{i}"
        a = layer.self_attn
        t[f"{p}.ln1.weight"] = _np(layer.input_layernorm.weight)
        t[f"{p}.ln2.weight"] = _np(layer.post_attention_layernorm.weight)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear(f"{p}.{n}", getattr(a, n))
        if spec.qk_norm:
            t[f"{p}.q_norm.weight"] = _np(a.q_norm.weight)
            t[f"{p}.k_norm.weight"] = _np(a.k_norm.weight)
        for n in ("gate_proj", "up_proj", "down_proj"):
            linear(f"{p}.{n}", getattr(layer.mlp, n))
    if fmt == "int3":  # qtale-rtn: the stored per-group scales (the weights are codes * scale)
        import re

        from ..quantize import INT3_PREFIX

        for key, sc in (getattr(model, "quantizer_tensors", None) or {}).items():
            m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)(?:\.base_layer)?\.scale$", key)
            if key.startswith(INT3_PREFIX) and m:
                w.quantized[f"layers.{m.group(1)}.{m.group(2)}"] = {"format": fmt, "rtn_scale": _np(sc)}
    if fmt and fmt != "int3":
        missing = [n for n in w.quantized if "format" not in w.quantized[n]]
        if missing:
            raise QtaleError(f"quantized checkpoint: no quantizer state for {missing[0]}")
    for i in spec.routed:
        r = model.routers[str(i)]
        p = f"router.{i}"
        t[f"{p}.down.weight"], t[f"{p}.down.bias"] = _np(r.down.weight), _np(r.down.bias)
        t[f"{p}.norm.weight"] = _np(r.norm.weight)
        t[f"{p}.out.weight"], t[f"{p}.out.bias"] = _np(r.out.weight), _np(r.out.bias)
        w.tensors[f"{p}.eps"] = np.array(r.norm.eps if r.norm.eps is not None else 1e-6, np.float32)
    return w


def quantizable(name: str) -> bool:
    """Decoder projections are quantized; routers, embeddings, norms and lm_head stay float."""
    return name.startswith("layers.") and name.endswith("_proj")


# ---------------------------------------------------------------------------------------------
# graph builder
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# the decoder math
# ---------------------------------------------------------------------------------------------
class Lowering:
    # prefill: the unrouted layers also go through compaction (gate = valid), so that a `layer`
    # only ever sees right-padded token runs (OrtLowering's GroupQueryAttention needs them)
    compact_unrouted = False

    def __init__(self, b: Builder, w: Weights, ops: str, target: str = "ort-cpu"):
        self.b, self.w, self.s, self.ops, self.target = b, w, w.spec, ops, target
        self._w_inits: dict[str, str] = {}
        self._logit_theta: str | None = None
        self._embed_table: str | None = None

    # -- weights --
    def tensor(self, name, dtype=None) -> str:
        key = (name, dtype)
        if key not in self._w_inits:
            arr = self.w.tensors[name]
            dt = np.dtype(dtype or self.b.act)
            self._w_inits[key] = self.b.init(name if dt == self.b.act else f"{name}.{dt.name}", arr.astype(dt))
        return self._w_inits[key]

    def proj(self, h, p, n):
        """Projection `n` (q_proj, ..., down_proj) of layer prefix `p` on h."""
        return self.linear(h, f"{p}.{n}")

    def linear(self, x, name):
        y = self.b.weight_fn(self.b, x, name, self.w.tensors[f"{name}.weight"])
        if f"{name}.bias" in self.w.tensors:
            y = self.b.op("Add", [y, self.tensor(f"{name}.bias")])
        return y

    def rmsnorm(self, x, wname, eps):
        b = self.b
        xf = b.to_f32(x)
        var = b.reduce("ReduceMean", b.op("Mul", [xf, xf]), [-1])
        inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.const(eps, np.float32)])])])
        return b.op("Mul", [self.tensor(wname), b.to_act(b.op("Mul", [xf, inv]))])

    # -- positions and masks --
    def positions(self, mask):
        """attention_mask int64 [B, S] -> (valid bool, pos int64 = clamp(cumsum - 1, 0))."""
        b = self.b
        valid = b.cast(mask, TensorProto.BOOL)
        cs = self.cumsum(mask)
        pos = b.op("Max", [b.op("Sub", [cs, b.const(1)]), b.const(0)])
        return valid, pos

    def cumsum(self, x):
        """CumSum along axis 1 of an int64 0/1 tensor [B, T]. onnx-tensorrt documents CumSum for
        FP32/FP16/BF16 only (docs/tensorrt.md), so for TensorRT it runs in fp32: exact below 2**24."""
        b = self.b
        if self.target != "tensorrt":
            return b.op("CumSum", [x, b.const(1)])
        return b.cast(b.op("CumSum", [b.cast(x, TensorProto.FLOAT), b.const(1)]), TensorProto.INT64)

    def rope(self, pos):
        """cos, sin [B, 1, T, hd] (act dtype) for int64 positions [B, T]."""
        b, s = self.b, self.s
        if "rope.inv_freq" not in b.inits:
            b.init("rope.inv_freq", s.inv_freq.astype(np.float32))
        freqs = b.op("Mul", [b.unsq(b.cast(pos, TensorProto.FLOAT), [-1]), "rope.inv_freq"])
        emb = b.op("Concat", [freqs, freqs], axis=-1)
        out = []
        for f in ("Cos", "Sin"):
            t = b.op(f, [emb])
            if s.rope_scale != 1.0:
                t = b.op("Mul", [t, b.const(s.rope_scale, np.float32)])
            out.append(b.unsq(b.to_act(t), [1]))
        return out

    def rotate(self, x, cos, sin):
        b, h = self.b, self.s.head_dim // 2
        x1, x2 = b.op("Split", [x, b.const([h, h])], n_out=2, axis=-1)
        rot = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
        return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rot, sin])])

    def attn_mask(self, q_pos, k_pos, k_ok):
        """[B, 1, 1, Tq, Tk] bool, as routing.attention_mask_4d (rows with no key see every key)."""
        b = self.b
        kp = b.unsq(k_pos, [1])  # [B, 1, Tk]
        qp = b.unsq(q_pos, [2])  # [B, Tq, 1]
        allowed = b.op("And", [b.unsq(k_ok, [1]), b.op("LessOrEqual", [kp, qp])])
        if self.s.window:
            allowed = b.op("And", [allowed, b.op("Greater", [kp, b.op("Sub", [qp, b.const(self.s.window)])])])
        anyk = b.reduce("ReduceMax", b.cast(allowed, TensorProto.INT32), [-1])
        allowed = b.op("Or", [allowed, b.op("Equal", [anyk, b.const(0, np.int32)])])
        return b.unsq(allowed, [1, 2])

    # -- blocks --
    def layer(self, i, x, q_pos, k_pos, k_ok, past=None):
        """Pre-norm block on x [B, T, H]; returns (y, k, v) with k/v [B, kv, T, hd] of x only."""
        b, s = self.b, self.s
        p = f"layers.{i}"
        nh, kv, hd = s.heads, s.kv_heads, s.head_dim
        h = self.rmsnorm(x, f"{p}.ln1.weight", s.eps)
        q = b.op("Reshape", [self.proj(h, p, "q_proj"), b.const([0, 0, nh, hd])])
        k = b.op("Reshape", [self.proj(h, p, "k_proj"), b.const([0, 0, kv, hd])])
        v = b.op("Reshape", [self.proj(h, p, "v_proj"), b.const([0, 0, kv, hd])])
        if s.qk_norm:
            q = self.rmsnorm(q, f"{p}.q_norm.weight", s.eps)
            k = self.rmsnorm(k, f"{p}.k_norm.weight", s.eps)
        q, k, v = (b.op("Transpose", [t], perm=[0, 2, 1, 3]) for t in (q, k, v))
        cos, sin = self.rope(q_pos)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        kk, vv = k, v
        if past is not None:
            kk = b.op("Concat", [past[0], k], axis=2)
            vv = b.op("Concat", [past[1], v], axis=2)
        q5 = b.op("Reshape", [q, b.const([0, kv, nh // kv, -1, hd])])  # head h uses kv head h // rep
        kt = b.unsq(b.op("Transpose", [kk], perm=[0, 1, 3, 2]), [2])  # [B, kv, 1, hd, Tk]
        scores = b.op("Mul", [b.op("MatMul", [q5, kt]), b.actc(s.scaling)])
        mask = self.attn_mask(q_pos, k_pos, k_ok)
        scores = b.op("Where", [mask, b.to_f32(scores), b.const(-np.inf, np.float32)])
        probs = b.to_act(b.op("Softmax", [scores], axis=-1))
        o = b.op("MatMul", [probs, b.unsq(vv, [2])])  # [B, kv, rep, T, hd]
        o = b.op("Reshape", [o, b.const([0, nh, -1, hd])])
        o = b.op("Reshape", [b.op("Transpose", [o], perm=[0, 2, 1, 3]), b.const([0, 0, nh * hd])])
        x = b.op("Add", [x, self.proj(o, p, "o_proj")])
        h = self.rmsnorm(x, f"{p}.ln2.weight", s.eps)
        g = self.proj(h, p, "gate_proj")
        g = b.op("Mul", [g, b.op("Sigmoid", [g])])
        m = self.proj(b.op("Mul", [g, self.proj(h, p, "up_proj")]), p, "down_proj")
        return b.op("Add", [x, m]), k, v

    def router_gate(self, i, x, theta, valid, keep):
        """gate [B, T] bool = (P(execute) >= theta and valid) or keep; routers in fp32.

        P(execute) = softmax(l)[0] = sigmoid(l0 - l1), so the test is (w0 - w1) h + (b0 - b1) >=
        logit(theta): one [hidden, 1] MatMul instead of the [hidden, 2] one, Softmax and Slice, and
        logit(theta) made once per graph (theta 0 -> -inf: every token; 1 -> +inf: none)."""
        b = self.b
        on = b.op(GATE_OP, [self.router_margin(i, x), self.logit_theta(theta)], name=gate_name(i))
        return b.op("Or", [b.op("And", [b.op("Squeeze", [on, b.const([-1])]), valid]), keep])

    def router_margin(self, i, x):
        """(w0 - w1) h + (b0 - b1) of router i on x [B, T, H]: [B, T, 1], logit(P(execute))."""
        b = self.b
        p = f"router.{i}"
        xf = b.to_f32(x)
        down = b.op("MatMul", [xf, self.tensor_f32_t(f"{p}.down.weight")], name=f"{p}.down/MatMul")
        h = self.router_norm(b.op("Add", [down, self.tensor(f"{p}.down.bias", np.float32)]), p)
        h = b.op("Mul", [h, b.op("Sigmoid", [h])])
        t = self.w.tensors
        w_out, b_out = t[f"{p}.out.weight"].astype(np.float32), t[f"{p}.out.bias"].astype(np.float32)
        w_diff = b.init(f"{p}.out.exec_minus_skip.weight", np.ascontiguousarray((w_out[0] - w_out[1])[:, None]))
        b_diff = b.init(f"{p}.out.exec_minus_skip.bias", np.asarray([b_out[0] - b_out[1]], np.float32))
        return b.op("Add", [b.op("MatMul", [h, w_diff], name=f"{p}.out/MatMul"), b_diff])

    def gate_threshold(self, theta, valid, keep):
        """logit(theta) where a token is routed, -inf where it is kept (keep_initial), +inf where it
        is padding: margin >= this is the whole gate (decode, [B, 1, 1]), one node per router
        instead of three."""
        b = self.b
        inf = float("inf")
        routed = b.op("Where", [valid, self.logit_theta(theta), b.const(inf, np.float32)])
        return b.op("Where", [keep, b.const(-inf, np.float32), routed])

    def logit_theta(self, theta):
        """log(theta) - log(1 - theta) as [B, 1, 1], made once per graph for every router."""
        if self._logit_theta is None:
            b = self.b
            logit = b.op("Sub", [b.op("Log", [theta]), b.op("Log", [b.op("Sub", [b.const(1.0, np.float32), theta])])])
            self._logit_theta = b.unsq(logit, [1, 2])
        return self._logit_theta

    def router_norm(self, h, p):
        """The router's RMSNorm (fp32)."""
        b = self.b
        var = b.reduce("ReduceMean", b.op("Mul", [h, h]), [-1])
        eps = float(self.w.tensors[f"{p}.eps"])
        return b.op("Mul", [b.op("Mul", [h, b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.const(eps, np.float32)])])])]),
                            self.tensor(f"{p}.norm.weight", np.float32)])

    def tensor_f32_t(self, name):
        key = (name, "T")
        if key not in self._w_inits:
            self._w_inits[key] = self.b.init(name + ".T", np.ascontiguousarray(self.w.tensors[name].T.astype(np.float32)))
        return self._w_inits[key]

    def decode_positions(self, past_positions: bool = False):
        """A decode graph's masks from its attention mask: (valid, position) of every key [B, total],
        of the new token [B, 1], the past keys' valid [B, total - 1] and, when asked, their
        positions (else None: no node nobody reads)."""
        b = self.b
        full_valid, full_pos = self.positions(graph_io.ATTENTION_MASK)
        last, end, step = b.const([-1]), b.const([np.iinfo(np.int64).max]), b.const([1])
        valid, pos = (b.op("Slice", [t, last, end, step]) for t in (full_valid, full_pos))
        past_valid = b.op("Slice", [full_valid, b.const([0]), last, step])
        past_pos = b.op("Slice", [full_pos, b.const([0]), last, step]) if past_positions else None
        return full_valid, full_pos, valid, pos, past_valid, past_pos

    def keep_mask(self, valid, pos):
        b = self.b
        return b.op("And", [valid, b.op("Less", [pos, b.const(self.s.keep_initial)])])

    def embed_table(self, reuse: bool = True) -> str:
        """The embedding table, which a tied LM head shares: a float initializer, or the
        precision's quantized table behind a DequantizeLinear (`weight_fn.table`, set by the
        precision policy: int4 / fp8 for TensorRT, whose engine keeps it quantized). reuse False:
        a DequantizeLinear of its own over the same initializers, so that a consumer in another
        TensorRT subgraph (the LM head after token compaction) dequantizes in place instead of
        receiving the float table, which TensorRT would store as a float constant."""
        fn = getattr(self.b.weight_fn, "table", None)
        if fn is None:
            return self.tensor("embed")
        if self._embed_table is None or not reuse:
            table = fn(self.b, "embed", self.w.tensors["embed"])
            if self._embed_table is None:
                self._embed_table = table
            return table
        return self._embed_table

    def embed(self, ids):
        return self.b.op("Gather", [self.embed_table(), ids], axis=0)

    def head(self, x):
        b = self.b
        h = self.rmsnorm(x, "norm.weight", self.s.eps)
        if self.s.tied:
            wt = b.op("Transpose", [self.embed_table(reuse=False)], perm=[1, 0])
            y = b.op("MatMul", [h, wt], name="lm_head/MatMul")
        else:
            y = b.weight_fn(b, h, "lm_head", self.w.tensors["lm_head.weight"])
            if "lm_head.bias" in self.w.tensors:
                y = b.op("Add", [y, self.tensor("lm_head.bias")])
        return b.to_f32(y)

    # -- compaction --
    def compact(self, x, gate):
        """-> (xc [B,N,H], index [B,N], count [B], ok [B,N] bool)."""
        b = self.b
        if self.ops == "plugin":
            # gate, index, count and n are int32: TensorRT 10 plugins take no BOOL tensors, and size
            # tensors must be INT32 (docs/ops.md)
            i32 = TensorProto.INT32
            xc, index, count, n = b.op("TokenCompact", [x, b.cast(gate, i32)], n_out=4, domain=QTALE_DOMAIN,
                                       **PLUGIN_ATTRS)
            nm = self.b.nodes[-1].name
            b.value_info += [helper.make_tensor_value_info(xc, NP2ONNX[b.act], None),
                             helper.make_tensor_value_info(index, i32, ["batch", f"{nm}_n"]),
                             helper.make_tensor_value_info(count, i32, ["batch"]),
                             helper.make_tensor_value_info(n, i32, [])]
            rows = b.op("Range", [b.const(0, np.int32), n, b.const(1, np.int32)])
            return xc, index, count, b.op("Less", [b.unsq(rows, [0]), b.unsq(count, [1])])
        else:
            g = b.cast(gate, TensorProto.INT64)
            count = b.reduce("ReduceSum", g, [1], keepdims=0)
            first = b.op("Sub", [self.cumsum(g), b.const(1)])  # rank among executed
            later = b.op("Add", [self.cumsum(b.op("Sub", [b.const(1), g])),
                                 b.op("Sub", [b.unsq(count, [1]), b.const(1)])])  # count + rank among skipped
            dest = b.op("Where", [gate, first, later])  # destination slot of every position
            ar = b.op("Range", [b.const(0), b.op("Squeeze", [b.op("Slice", [b.op("Shape", [g]), b.const([1]),
                                                                             b.const([2])]), b.const([0])]),
                                b.const(1)])
            src = b.op("Expand", [b.unsq(ar, [0]), b.op("Shape", [g])])
            perm = b.op("ScatterElements", [dest, dest, src], axis=1)  # the stable partition
            n = b.op("Max", [b.reduce("ReduceMax", count, [0], keepdims=1), b.const([1])])
            index = b.op("Slice", [perm, b.const([0]), n, b.const([1])])
            xc = b.op("GatherND", [x, b.unsq(index, [2])], batch_dims=1)
            n = b.op("Squeeze", [n, b.const([0])])
        ok = b.op("Less", [b.unsq(b.op("Range", [b.const(0), n, b.const(1)]), [0]), b.unsq(count, [1])])
        return xc, index, count, ok

    def scatter(self, residual, update, index, count, ok, fallback):
        """out = residual with rows index[b, i] = update[b, i] for i < count[b] (3-D tensors)."""
        b = self.b
        if self.ops == "plugin":
            out = b.op("TokenScatter", [residual, update, index, count], domain=QTALE_DOMAIN, **PLUGIN_ATTRS)
            b.value_info.append(helper.make_tensor_value_info(out, NP2ONNX[b.act], None))
            return out
        upd = b.op("Where", [b.unsq(ok, [2]), update, fallback])
        idx = b.op("Expand", [b.unsq(index, [2]), b.op("Shape", [upd])])
        return b.op("ScatterElements", [residual, idx, upd], axis=1)

    def compacted_layer(self, i, x, gate, pos, zeros, past=None):
        """Layer i on the tokens whose gate is on only: compact -> layer -> scatter, with its k/v
        put back at full length (zero rows where skipped). `zeros` [B, T, kv * hd] is made on the
        first call and returned for the next; past = ((key, value), positions, ok) of the cache
        (decode). Returns (x, k, v, zeros)."""
        b, s = self.b, self.s
        xc, index, count, ok = self.compact(x, gate)
        pc = b.op("GatherElements", [pos, index], axis=1)
        if past is None:
            y, k, v = self.layer(i, xc, pc, pc, ok)
        else:
            cache, past_pos, past_ok = past
            k_pos = b.op("Concat", [past_pos, pc], axis=1)
            y, k, v = self.layer(i, xc, pc, k_pos, b.op("Concat", [past_ok, ok], axis=1), past=cache)
        x = self.scatter(x, y, index, count, ok, xc)
        if zeros is None:
            shape = b.op("Concat", [b.op("Shape", [x], end=2), b.const([s.kv_heads * s.head_dim])], axis=0)
            zeros = b.op("ConstantOfShape", [shape], value=numpy_helper.from_array(np.zeros(1, b.act)))
        return x, self.kv_full(k, index, count, ok, zeros), self.kv_full(v, index, count, ok, zeros), zeros

    def kv_full(self, t, index, count, ok, zeros):
        """Compacted k/v [B, kv, N, hd] -> full-length [B, kv, T, hd], zeros on skipped rows."""
        b, s = self.b, self.s
        t3 = b.op("Reshape", [b.op("Transpose", [t], perm=[0, 2, 1, 3]), b.const([0, 0, s.kv_heads * s.head_dim])])
        full = self.scatter(zeros, t3, index, count, ok, b.actc(0.0))
        return b.op("Transpose", [b.op("Reshape", [full, b.const([0, 0, s.kv_heads, s.head_dim])])], perm=[0, 2, 1, 3])


# ---------------------------------------------------------------------------------------------
# the two graphs
# ---------------------------------------------------------------------------------------------
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
        b.op("Concat", [graph_io.past(i, "key"), k], outputs=[graph_io.present(i, "key")], axis=2)
        b.op("Concat", [graph_io.past(i, "value"), v], outputs=[graph_io.present(i, "value")], axis=2)
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
        b.op("Concat", [graph_io.past(i, "key"), k], outputs=[graph_io.present(i, "key")], axis=2)
        b.op("Concat", [graph_io.past(i, "value"), v], outputs=[graph_io.present(i, "value")], axis=2)
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


def _branch_inputs(node: onnx.NodeProto) -> set[str]:
    """Every value the subgraphs of `node` (If branches, recursively) read: an over-approximation
    of their outer-scope references, which is what dead-node elimination must keep."""
    names: set[str] = set()
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            for n in a.g.node:
                names.update(i for i in n.input if i)
                names |= _branch_inputs(n)
    return names


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


# ---------------------------------------------------------------------------------------------
# the ONNX Runtime CPU form (--target ort-cpu, fp32 activations)
# ---------------------------------------------------------------------------------------------
# q/k/v and gate/up are one matmul each (blocks run along K, so a fused MatMulNBits holds the same
# codes as the separate ones); RMSNorm is written in the exact pattern ORT's SimplifiedLayerNormFusion
# and SkipSimplifiedLayerNormFusion turn into the fused kernels (standard ops on disk, so the ONNX
# checker and other runtimes still read the graph); decode attention is com.microsoft
# GroupQueryAttention (rotary inside, KV cache in place), written by hand because the
# onnxruntime.transformers fusions do not match attention under per-layer exec masks or inside If.
PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED = {part: fused for fused, parts in PARTS.items() for part in parts}
NEG = float(np.finfo(np.float32).min)  # attention bias of a hidden key (finite: no NaN rows)
# W [V, K] fp32 -> (packed uint8 [V, K * bits / 8], scales [V, K/block], block), with a `.bits`
# attribute (4 or 8): precision.int4_table / int8_table
TableFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, int]]


class OrtLowering(Lowering):
    """Lowering for ONNX Runtime on CPU.

    fuse: q/k/v and gate/up as one projection each (float checkpoints; a quantized checkpoint keeps
    its per-projection grids). table_fn (precision.TABLES, passed in as weight_fn is): stores the
    embedding (GatherBlockQuantized) and the LM head (MatMulNBits) as one int4 or int8 block-quantized table;
    tied weights share its bytes on disk."""

    def __init__(self, b: Builder, w: Weights, ops: str, fuse: bool = True, table_fn: TableFn | None = None):
        super().__init__(b, w, ops)
        self.fuse, self.table_fn = fuse, table_fn
        # GroupQueryAttention's prompt mode for every prefill layer, except where its masking is not
        # the model's (sliding window) or q/k norm sits between projection and rotary
        self.compact_unrouted = not (self.s.window or self.s.qk_norm)
        self._fused: dict = {}
        self._split: dict = {}
        self._tables: dict = {}

    def fused_proj(self, h, p, fused):
        """The fused projection `fused` (qkv_proj, gate_up_proj) of h: (y [.., sum of outs], outs)."""
        key = (h, p, fused)
        if key not in self._fused:
            t = self.w.tensors
            parts = PARTS[fused]
            ws = [t[f"{p}.{m}.weight"] for m in parts]
            y = self.b.weight_fn(self.b, h, f"{p}.{fused}", np.concatenate(ws, 0))
            if all(f"{p}.{m}.bias" in t for m in parts):
                name = f"{p}.{fused}.bias"
                t.setdefault(name, np.concatenate([t[f"{p}.{m}.bias"] for m in parts]))
                y = self.b.op("Add", [y, self.tensor(name)])
            elif any(f"{p}.{m}.bias" in t for m in parts):
                raise QtaleError(f"{p}: some of {', '.join(parts)} have a bias, others not")
            self._fused[key] = (y, [a.shape[0] for a in ws])
        return self._fused[key]

    def proj(self, h, p, n):
        if not self.fuse or n not in FUSED:
            return super().proj(h, p, n)
        fused = FUSED[n]
        key = (h, p, fused)
        if key not in self._split:
            y, outs = self.fused_proj(h, p, fused)
            self._split[key] = dict(zip(PARTS[fused], self.b.op("Split", [y, self.b.const(outs)],
                                                                 n_out=len(outs), axis=-1)))
        return self._split[key][n]

    def rmsnorm(self, x, wname, eps):
        """x / sqrt(mean(x^2) + eps) * w, the pattern of ORT's SimplifiedLayerNormFusion."""
        b = self.b
        var = b.reduce("ReduceMean", b.op("Pow", [x, b.const(2.0, np.float32)]), [-1])
        d = b.op("Div", [x, b.op("Sqrt", [b.op("Add", [var, b.const(eps, np.float32)])])])
        return b.op("Mul", [d, self.tensor(wname)])

    def router_norm(self, h, p):
        """The router's RMSNorm in the pattern ORT fuses (one SimplifiedLayerNormalization)."""
        b = self.b
        var = b.reduce("ReduceMean", b.op("Pow", [h, b.const(2.0, np.float32)]), [-1])
        eps = float(self.w.tensors[f"{p}.eps"])
        d = b.op("Div", [h, b.op("Sqrt", [b.op("Add", [var, b.const(eps, np.float32)])])])
        return b.op("Mul", [d, self.tensor(f"{p}.norm.weight", np.float32)])

    def table(self, name: str):
        """(packed uint8 [V, K/2], scales [V, K/block], block) of an int4 table, made once."""
        if name not in self._tables:
            self._tables[name] = self.table_fn(self.w.tensors[name])
        return self._tables[name]

    def embed(self, ids):
        if self.table_fn is None:
            return super().embed(ids)
        data, scales, bs = self.table("embed")
        b, bits = self.b, self.table_fn.bits
        return b.op("GatherBlockQuantized", [b.init(f"embed.q{bits}", data), ids, b.init(f"embed.q{bits}_scales", scales)],
                    name="embed/GatherBlockQuantized", domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                    bits=bits, block_size=bs)

    def head(self, x):
        if self.table_fn is None:
            return super().head(x)
        b, s = self.b, self.s
        h = self.rmsnorm(x, "norm.weight", s.eps)
        src = "embed" if s.tied else "lm_head.weight"
        data, scales, bs = self.table(src)
        bits = self.table_fn.bits
        n, k = data.shape[0], data.shape[1] * 8 // bits
        # the same bytes as the embedding's table (weights.SharedWeights stores them once); 8 bit runs
        # at fp32 accuracy (level 4 would quantize the activations to int8 as well: not the int8 contract)
        bn = b.init(f"{src}.q{bits}.nbits", data.reshape(n, k // bs, bs * bits // 8))
        sn = b.init(f"{src}.q{bits}_scales.nbits", scales.reshape(-1))
        y = b.op("MatMulNBits", [h, bn, sn], name="lm_head/MatMulNBits", domain=MS_DOMAIN, K=k, N=n, bits=bits,
                 block_size=bs, accuracy_level=4 if bits == 4 else 0)
        if "lm_head.bias" in self.w.tensors:
            y = b.op("Add", [y, self.tensor("lm_head.bias")])
        return y

    def rope_tables(self):
        """cos, sin [positions, head_dim / 2] for GroupQueryAttention, as `rope` computes them. Made
        in the graph from inv_freq (ORT folds the constants once at load), so nothing is stored."""
        if "rope.cos" not in self._tables:
            b, s = self.b, self.s
            if "rope.inv_freq" not in b.inits:
                b.init("rope.inv_freq", s.inv_freq.astype(np.float32))
            n = s.max_positions or 4096
            pos = b.cast(b.op("Range", [b.const(0), b.const(n), b.const(1)]), TensorProto.FLOAT)
            freqs = b.op("Mul", [b.unsq(pos, [1]), b.unsq("rope.inv_freq", [0])])
            out = []
            for f in ("Cos", "Sin"):
                t = b.op(f, [freqs])
                out.append(b.op("Mul", [t, b.const(s.rope_scale, np.float32)]) if s.rope_scale != 1.0 else t)
            self._tables["rope.cos"] = tuple(out)
        return self._tables["rope.cos"]

    def key_biases(self, past_valid, q_pos, past_pos):
        """attention_bias of every layer, [L, B, 1, 1, total]: 0 where the new token may attend, NEG
        elsewhere; layer i's is Gather(., i). A past key counts where its layer executed it
        (past_exec) and it is valid (and, with a window, near). The new token's own key is always
        open: where a row's gate is off, its attention output is discarded (the layer passes x),
        so the mask is made once per step instead of once per layer."""
        b = self.b
        ok = b.op("And", [graph_io.PAST_EXEC, past_valid])  # [L, B, total - 1]
        if self.s.window:  # the new key sits at q_pos, inside its own window
            ok = b.op("And", [ok, b.op("Greater", [past_pos, b.op("Sub", [q_pos, b.const(self.s.window)])])])
        bias = b.op("Where", [ok, b.const(0.0, np.float32), b.const(NEG, np.float32)])
        bias = b.op("Pad", [bias, b.const([0, 0, 0, 0, 0, 1]), b.const(0.0, np.float32)])  # the new key: 0
        return b.unsq(bias, [2, 3])

    def qkv_packed(self, i, x, gate=None):
        """ln1 + q/k/v of x [B, T, H] -> [B, T, (nh + 2 kv) hd], zero rows where `gate` ([B, 1, 1],
        decode) is off."""
        b, s = self.b, self.s
        p = f"layers.{i}"
        h = self.rmsnorm(x, f"{p}.ln1.weight", s.eps)
        if self.fuse and not s.qk_norm:  # GroupQueryAttention takes the fused output as it is
            qkv = self.fused_proj(h, p, "qkv_proj")[0]
            return qkv if gate is None else b.op("Where", [gate, qkv, b.const(0.0, np.float32)])
        q, k, v = (self.proj(h, p, n) for n in ("q_proj", "k_proj", "v_proj"))
        if s.qk_norm:
            q = b.op("Reshape", [self.rmsnorm(b.op("Reshape", [q, b.const([0, 0, s.heads, s.head_dim])]),
                                              f"{p}.q_norm.weight", s.eps), b.const([0, 0, -1])])
            k = b.op("Reshape", [self.rmsnorm(b.op("Reshape", [k, b.const([0, 0, s.kv_heads, s.head_dim])]),
                                              f"{p}.k_norm.weight", s.eps), b.const([0, 0, -1])])
        qkv = b.op("Concat", [q, k, v], axis=-1)
        return qkv if gate is None else b.op("Where", [gate, qkv, b.const(0.0, np.float32)])

    def attention(self, i, qkv, bias, pos, seqlens, total, cache_out: bool = True):
        """GroupQueryAttention of the new token: its output, and with cache_out present.{i}.* as
        graph outputs (past.{i}.* in place when bound to the same buffer); without, (attn, key,
        value) under fresh names (inside an If branch, whose outputs are present.{i}.*)."""
        b, s = self.b, self.s
        cos, sin = self.rope_tables()
        cache = [graph_io.past(i, "key"), graph_io.past(i, "value")]
        outputs = [f"layers.{i}/attn", graph_io.present(i, "key"), graph_io.present(i, "value")] if cache_out else None
        out = b.op("GroupQueryAttention", [qkv, "", "", *cache, seqlens, total, cos, sin, pos, bias],
                   name=f"layers.{i}/GroupQueryAttention", domain=MS_DOMAIN, n_out=3, outputs=outputs,
                   num_heads=s.heads, kv_num_heads=s.kv_heads, scale=s.scaling, do_rotary=1)
        return out[0] if cache_out else out

    def layer(self, i, x, q_pos, k_pos, k_ok, past=None):
        """Prefill on a compacted run x [B, N, H] (row b's first count[b] tokens real, `k_ok`):
        rotary at the original positions q_pos, GroupQueryAttention's prompt mode (causal over the
        run, which keeps the tokens' order; padding only after a row's real tokens), o_proj + MLP.
        K/V [B, kv, N, hd] as the plain form. The plain attention where `compact_unrouted` is off
        or for a cached past."""
        if past is not None or not self.compact_unrouted:
            return super().layer(i, x, q_pos, k_pos, k_ok, past)
        b, s = self.b, self.s
        count = b.reduce("ReduceSum", b.cast(k_ok, TensorProto.INT32), [1], keepdims=0)
        seqlens = b.op("Max", [b.op("Sub", [count, b.const(1, np.int32)]), b.const(0, np.int32)])  # a row of none: 0
        total = b.cast(b.op("Squeeze", [b.op("Shape", [x], start=1, end=2), b.const([0])]), TensorProto.INT32)
        cos, sin = self.rope_tables()
        q, k, v = b.op("Split", [self.qkv_packed(i, x), b.const([s.heads * s.head_dim, s.kv_heads * s.head_dim,
                                                                 s.kv_heads * s.head_dim])], n_out=3, axis=-1)
        # rotary by com.microsoft::RotaryEmbedding, which takes every token's own position: GQA's
        # prompt mode rotates by position_ids[b, 0] + index, wrong for a run with skipped tokens
        q, k = (b.op("RotaryEmbedding", [t, q_pos, cos, sin], domain=MS_DOMAIN, num_heads=n)
                for t, n in ((q, s.heads), (k, s.kv_heads)))
        attn, k, v = b.op("GroupQueryAttention", [q, k, v, "", "", seqlens, total], domain=MS_DOMAIN,
                          name=f"layers.{i}/GroupQueryAttention", n_out=3, num_heads=s.heads,
                          kv_num_heads=s.kv_heads, scale=s.scaling, do_rotary=0)
        return self.mlp_block(i, x, attn), k, v

    def mlp_block(self, i, x, attn):
        """o_proj + residual, ln2, SiLU MLP + residual."""
        b, s = self.b, self.s
        p = f"layers.{i}"
        x = b.op("Add", [x, self.proj(attn, p, "o_proj")])
        h = self.rmsnorm(x, f"{p}.ln2.weight", s.eps)
        g = self.proj(h, p, "gate_proj")
        g = b.op("Mul", [g, b.op("Sigmoid", [g])])
        return b.op("Add", [x, self.proj(b.op("Mul", [g, self.proj(h, p, "up_proj")]), p, "down_proj")])


def build_prefill_ort(w: Weights, ops: str, opset: int, act, weight_fn,
                      table_fn: TableFn | None = None) -> onnx.ModelProto:
    """Prefill for ONNX Runtime on CPU: every layer on its compacted token run (unrouted layers:
    the valid tokens) with GroupQueryAttention's prompt mode (`OrtLowering.layer`)."""
    fuse = bool(getattr(weight_fn, "fusable", True))
    return build_prefill(w, ops, opset, act, weight_fn,
                         lowering=lambda b, w_, o: OrtLowering(b, w_, o, fuse=fuse, table_fn=table_fn))


def build_decode_ort(w: Weights, ops: str, opset: int, act, weight_fn,
                     table_fn: TableFn | None = None) -> onnx.ModelProto:
    """Decode for ONNX Runtime on CPU: the inputs and outputs of `build_decode`, and past.{i}.* may
    also be a preallocated buffer of any length >= total that is bound as present.{i}.* too (the
    runtime's IO binding): GroupQueryAttention then writes the new K/V in place and nothing is copied.

    A routed layer is one If on "some row executes it": the whole layer (ln1, q/k/v, attention
    and MLP; a row whose gate is off gets zero K/V, exec false and its hidden state passed, as in
    `build_decode`), else the hidden state passes and attention is not run at all: the cache's new
    slot is left as it is in a preallocated buffer (zero as the runtime allocates it, and hidden
    from every later step by exec false) or, for an exact-length past, padded with a zero slot.
    A skipped layer costs its router and the If."""
    s = w.spec
    if act != np.float32:
        raise QtaleError("the ort-cpu decode graph takes fp32 activations")
    b = Builder(opset, act, weight_fn)
    L = OrtLowering(b, w, ops, fuse=bool(getattr(weight_fn, "fusable", True)), table_fn=table_fn)
    elem = NP2ONNX[b.act]
    _declare_inputs(b, s, "decode")
    _, _, valid, pos, past_valid, past_pos = L.decode_positions(past_positions=bool(s.window))
    keep = L.keep_mask(valid, pos)
    valid3 = b.unsq(valid, [2])  # [B, 1, 1]: gates stay in this shape
    threshold = L.gate_threshold(graph_io.THETA, valid3, b.unsq(keep, [2]))
    # GroupQueryAttention's lengths: every row holds `total` slots (left padding is masked by the bias)
    total = b.op("Shape", [graph_io.ATTENTION_MASK], start=1, end=2)
    seqlens = b.cast(b.op("Expand", [b.op("Sub", [total, b.const([1])]), b.op("Shape", [graph_io.INPUT_IDS], end=1)]),
                     TensorProto.INT32)
    total32 = b.cast(b.op("Squeeze", [total, b.const([0])]), TensorProto.INT32)
    biases = L.key_biases(past_valid, pos, past_pos)
    x = L.embed(graph_io.INPUT_IDS)
    # the past is a preallocated buffer (length >= total, in place) or exactly total - 1 long
    in_place = b.op("Squeeze", [b.op("GreaterOrEqual", [b.op("Shape", [graph_io.past(0, "key")], start=2, end=3),
                                                         total]), b.const([0])])
    pad_slot = b.const([0, 0, 0, 0, 0, 0, 1, 0])  # one zero slot at the end of the sequence axis
    execs = []
    for i in range(s.num_layers):
        bias = b.op("Gather", [biases, b.const(i)], axis=0)  # [B, 1, 1, total]
        if i not in s.routed:
            gate = valid3
            x = L.mlp_block(i, x, L.attention(i, L.qkv_packed(i, x), bias, pos, seqlens, total32))
            execs.append(gate)
            continue
        gate = b.op(GATE_OP, [L.router_margin(i, x), threshold], name=gate_name(i))
        if b.opset >= 20:  # ReduceMax takes bool from opset 20
            cond = b.reduce("ReduceMax", gate, [0, 1, 2], keepdims=0)
        else:
            cond = b.cast(b.reduce("ReduceMax", b.cast(gate, TensorProto.INT64), [0, 1, 2], keepdims=0),
                          TensorProto.BOOL)
        with b.subgraph() as run:
            attn, k_run, v_run = L.attention(i, L.qkv_packed(i, x, gate), bias, pos, seqlens, total32, cache_out=False)
            y = b.op("Where", [gate, L.mlp_block(i, x, attn), x])
        past = [graph_io.past(i, "key"), graph_io.past(i, "value")]
        with b.subgraph() as keep_buf:
            kept = [b.op("Identity", [t]) for t in past]
        with b.subgraph() as pad_buf:
            padded = [b.op("Pad", [t, pad_slot, b.const(0.0, np.float32)]) for t in past]
        with b.subgraph() as skip:
            y_skip = b.op("Identity", [x])
            k_skip, v_skip = b.op("If", [in_place], n_out=2, name=f"layers.{i}/If_cache",
                                  then_branch=b.branch(keep_buf, f"layers.{i}.cache_in_place", kept, [elem] * 2),
                                  else_branch=b.branch(pad_buf, f"layers.{i}.cache_padded", padded, [elem] * 2))
        x = b.op("If", [cond], name=f"layers.{i}/If", n_out=3,
                 outputs=[f"layers.{i}/out", graph_io.present(i, "key"), graph_io.present(i, "value")],
                 then_branch=b.branch(run, f"layers.{i}.run", [y, k_run, v_run], [elem] * 3),
                 else_branch=b.branch(skip, f"layers.{i}.skip", [y_skip, k_skip, v_skip], [elem] * 3))[0]
        execs.append(gate)  # [B, 1, 1]
    new = b.op("Transpose", [b.op("Concat", execs, axis=2)], perm=[2, 0, 1])  # [B, 1, L] -> [L, B, 1]
    b.op("Concat", [graph_io.PAST_EXEC, new], outputs=[graph_io.EXEC_MASK], axis=2)
    _logits_and_cache_outputs(b, s, L.head(x), "decode")
    return b.model("qtale_decode")
