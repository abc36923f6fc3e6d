"""The standard lowering: the decoder math (norms, rotary, attention, MLP, routers, token
compaction) as plain ONNX ops or the qtale TokenCompact/TokenScatter ops."""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ...deploy import graph_io
from ...errors import QtaleError
from .builder import NP2ONNX, PLUGIN_ATTRS, QTALE_DOMAIN, Builder
from .extraction import Weights
from ...deploy.routers import GATE_OP, gate_name


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

    def rope(self, pos, i):
        """cos, sin [B, 1, T, hd] (act dtype) of layer i's RoPE table for int64 positions [B, T]."""
        b, s = self.b, self.s
        freqs = b.op("Mul", [b.unsq(b.cast(pos, TensorProto.FLOAT), [-1]), self.inv_freq(i)])
        emb = b.op("Concat", [freqs, freqs], axis=-1)
        out = []
        for f in ("Cos", "Sin"):
            t = b.op(f, [emb])
            if s.rope_scales[s.rope[i]] != 1.0:
                t = b.op("Mul", [t, b.const(s.rope_scales[s.rope[i]], np.float32)])
            out.append(b.unsq(b.to_act(t), [1]))
        return out

    def inv_freq(self, i) -> str:
        """The initializer of layer i's RoPE inverse frequencies (one per distinct table)."""
        r = self.s.rope[i]
        name = "rope.inv_freq" if r == 0 else f"rope.{r}.inv_freq"
        if name not in self.b.inits:
            self.b.init(name, self.s.inv_freqs[r].astype(np.float32))
        return name

    def rotate(self, x, cos, sin):
        b, h = self.b, self.s.head_dim // 2
        x1, x2 = b.op("Split", [x, b.const([h, h])], n_out=2, axis=-1)
        rot = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
        return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rot, sin])])

    def attn_mask(self, q_pos, k_pos, k_ok, window: int | None):
        """[B, 1, 1, Tq, Tk] bool, as routing.attention_mask_4d (rows with no key see every key)."""
        b = self.b
        kp = b.unsq(k_pos, [1])  # [B, 1, Tk]
        qp = b.unsq(q_pos, [2])  # [B, Tq, 1]
        allowed = b.op("And", [b.unsq(k_ok, [1]), b.op("LessOrEqual", [kp, qp])])
        if window:
            allowed = b.op("And", [allowed, b.op("Greater", [kp, b.op("Sub", [qp, b.const(window)])])])
        anyk = b.reduce("ReduceMax", b.cast(allowed, TensorProto.INT32), [-1])
        allowed = b.op("Or", [allowed, b.op("Equal", [anyk, b.const(0, np.int32)])])
        return b.unsq(allowed, [1, 2])

    # -- blocks --
    def block(self, i, x, attend):
        """Layer i on x through its family's block (families/llama.py); attend(h) is the attention
        on the normed input, o_proj included."""
        return self.s.family.block(LayerOps(self, i), x, attend, self.s.act)

    def layer(self, i, x, q_pos, k_pos, k_ok, past=None):
        """Block i on x [B, T, H]; returns (y, k, v) with k/v [B, kv, T, hd] of x only."""
        kv = {}

        def attend(h):
            o, kv["k"], kv["v"] = self.attention(i, h, q_pos, k_pos, k_ok, past)
            return o
        return self.block(i, x, attend), kv["k"], kv["v"]

    def attention(self, i, h, q_pos, k_pos, k_ok, past=None):
        """Self-attention of layer i on the normed h [B, T, H] against past (key, value) and h's own
        keys: (o_proj output, k, v of h [B, kv, T, hd])."""
        b, s = self.b, self.s
        p = f"layers.{i}"
        nh, kv, hd = s.heads, s.kv_heads, s.head_dim
        q = b.op("Reshape", [self.proj(h, p, "q_proj"), b.const([0, 0, nh, hd])])
        k = b.op("Reshape", [self.proj(h, p, "k_proj"), b.const([0, 0, kv, hd])])
        v = b.op("Reshape", [self.proj(h, p, "v_proj"), b.const([0, 0, kv, hd])])
        if s.qk_norm:
            q = self.rmsnorm(q, f"{p}.q_norm.weight", s.eps)
            k = self.rmsnorm(k, f"{p}.k_norm.weight", s.eps)
        q, k, v = (b.op("Transpose", [t], perm=[0, 2, 1, 3]) for t in (q, k, v))
        cos, sin = self.rope(q_pos, i)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        kk, vv = k, v
        if past is not None:
            kk = b.op("Concat", [past[0], k], axis=2)
            vv = b.op("Concat", [past[1], v], axis=2)
        q5 = b.op("Reshape", [q, b.const([0, kv, nh // kv, -1, hd])])  # head h uses kv head h // rep
        kt = b.unsq(b.op("Transpose", [kk], perm=[0, 1, 3, 2]), [2])  # [B, kv, 1, hd, Tk]
        scores = b.op("Mul", [b.op("MatMul", [q5, kt]), b.actc(s.scaling)])
        mask = self.attn_mask(q_pos, k_pos, k_ok, s.windows[i])
        scores = b.op("Where", [mask, b.to_f32(scores), b.const(-np.inf, np.float32)])
        probs = b.to_act(b.op("Softmax", [scores], axis=-1))
        o = b.op("MatMul", [probs, b.unsq(vv, [2])])  # [B, kv, rep, T, hd]
        o = b.op("Reshape", [o, b.const([0, nh, -1, hd])])
        o = b.op("Reshape", [b.op("Transpose", [o], perm=[0, 2, 1, 3]), b.const([0, 0, nh * hd])])
        return self.proj(o, p, "o_proj"), k, v

    def mlp(self, h, p, act):
        """The gated MLP of layer prefix p: down(act(gate(h)) * up(h))."""
        g = self.activation(self.proj(h, p, "gate_proj"), act)
        return self.proj(self.b.op("Mul", [g, self.proj(h, p, "up_proj")]), p, "down_proj")

    def activation(self, x, act):
        """silu: x sigmoid(x). gelu_tanh: 0.5 x (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2/pi),
        written as x sigmoid(2c (x + 0.044715 x^3)) (the same function: 0.5 (1 + tanh z) =
        sigmoid(2z)) in fp32, with ops every target documents (TensorRT's table has no Tanh/Gelu)."""
        b = self.b
        if act == "silu":
            return b.op("Mul", [x, b.op("Sigmoid", [x])])
        if act != "gelu_tanh":
            raise QtaleError(f"no ONNX lowering of the MLP activation '{act}'")
        xf = b.to_f32(x)
        inner = b.op("Add", [xf, b.op("Mul", [b.op("Mul", [b.op("Mul", [xf, xf]), xf]), b.const(0.044715, np.float32)])])
        gate = b.op("Sigmoid", [b.op("Mul", [inner, b.const(2 * math.sqrt(2 / math.pi), np.float32)])])
        return b.to_act(b.op("Mul", [xf, gate]))

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
        """The embedding of ids, times the family's embedding scale (the LM head's table is unscaled)."""
        x = self.lookup(ids)
        return x if self.s.embed_scale == 1.0 else self.b.op("Mul", [x, self.b.actc(self.s.embed_scale)])

    def lookup(self, ids):
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


class LayerOps:
    """The vocabulary of a family's `block` (families/llama.py) on layer i of a lowering."""

    def __init__(self, lowering: Lowering, i: int):
        self.L, self.p = lowering, f"layers.{i}"

    def norm(self, x, name):
        return self.L.rmsnorm(x, f"{self.p}.{name}.weight", self.L.s.eps)

    def add(self, x, y):
        return self.L.b.op("Add", [x, y])

    def mlp(self, h, act):
        return self.L.mlp(h, self.p, act)
