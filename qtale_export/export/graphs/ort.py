"""The ONNX Runtime CPU form (--target ort-cpu, fp32 activations)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto

from ...deploy import graph_io
from ...errors import QtaleError
from .assemble import _declare_inputs, _logits_and_cache_outputs, build_prefill
from .builder import MS_DOMAIN, NP2ONNX, Builder
from .extraction import Weights
from .lowering import Lowering
from ...deploy.routers import GATE_OP, gate_name

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
        self.compact_unrouted = not (any(self.s.windows) or self.s.qk_norm)
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

    def lookup(self, ids):
        if self.table_fn is None:
            return super().lookup(ids)
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

    def rope_tables(self, i):
        """cos, sin [positions, head_dim / 2] of layer i's RoPE table for GroupQueryAttention and
        RotaryEmbedding, as `rope` computes them. Made in the graph from inv_freq (ORT folds the
        constants once at load), so nothing is stored."""
        key = ("rope", self.s.rope[i])
        if key not in self._tables:
            b, s = self.b, self.s
            n = s.max_positions or 4096
            pos = b.cast(b.op("Range", [b.const(0), b.const(n), b.const(1)]), TensorProto.FLOAT)
            freqs = b.op("Mul", [b.unsq(pos, [1]), b.unsq(self.inv_freq(i), [0])])
            scale = s.rope_scales[s.rope[i]]
            out = []
            for f in ("Cos", "Sin"):
                t = b.op(f, [freqs])
                out.append(b.op("Mul", [t, b.const(scale, np.float32)]) if scale != 1.0 else t)
            self._tables[key] = tuple(out)
        return self._tables[key]

    def key_biases(self, past_valid, q_pos, past_pos, window: int | None):
        """attention_bias of every layer with attention window `window`, [L, B, 1, 1, total]: 0
        where the new token may attend, NEG elsewhere; layer i's is Gather(., i). A past key counts
        where its layer executed it (past_exec) and it is valid (and, with a window, near). The new
        token's own key is always open: where a row's gate is off, its attention output is
        discarded (the layer passes x), so the mask is made once per step instead of once per layer."""
        b = self.b
        ok = b.op("And", [graph_io.PAST_EXEC, past_valid])  # [L, B, total - 1]
        if window:  # the new key sits at q_pos, inside its own window
            ok = b.op("And", [ok, b.op("Greater", [past_pos, b.op("Sub", [q_pos, b.const(window)])])])
        bias = b.op("Where", [ok, b.const(0.0, np.float32), b.const(NEG, np.float32)])
        bias = b.op("Pad", [bias, b.const([0, 0, 0, 0, 0, 1]), b.const(0.0, np.float32)])  # the new key: 0
        return b.unsq(bias, [2, 3])

    def qkv_packed(self, i, h, gate=None):
        """q/k/v of the normed h [B, T, H] -> [B, T, (nh + 2 kv) hd], zero rows where `gate`
        ([B, 1, 1], decode) is off."""
        b, s = self.b, self.s
        p = f"layers.{i}"
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

    def decode_layer(self, i, x, bias, pos, seqlens, total, gate=None):
        """Layer i (its family's block) on the new token x [B, 1, H], attention by
        GroupQueryAttention on the cache: (y, k, v). gate None (an unrouted layer): k, v are the
        graph outputs present.{i}.* (past.{i}.* in place when bound to the same buffer); else q/k/v
        are zero where the gate is off and k, v come under fresh names (an If branch's outputs)."""
        b, s = self.b, self.s
        cos, sin = self.rope_tables(i)
        cache = [graph_io.past(i, "key"), graph_io.past(i, "value")]
        names = None if gate is not None else [f"layers.{i}/attn", graph_io.present(i, "key"),
                                               graph_io.present(i, "value")]
        kv = []

        def attend(h):
            attn, k, v = b.op("GroupQueryAttention", [self.qkv_packed(i, h, gate), "", "", *cache, seqlens, total,
                                                      cos, sin, pos, bias],
                              name=f"layers.{i}/GroupQueryAttention", domain=MS_DOMAIN, n_out=3, outputs=names,
                              num_heads=s.heads, kv_num_heads=s.kv_heads, scale=s.scaling, do_rotary=1)
            kv.extend((k, v))
            return self.proj(attn, f"layers.{i}", "o_proj")
        return self.block(i, x, attend), kv[0], kv[1]

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
        cos, sin = self.rope_tables(i)
        kv = []

        def attend(h):
            q, k, v = b.op("Split", [self.qkv_packed(i, h), b.const([s.heads * s.head_dim, s.kv_heads * s.head_dim,
                                                                     s.kv_heads * s.head_dim])], n_out=3, axis=-1)
            # rotary by com.microsoft::RotaryEmbedding, which takes every token's own position: GQA's
            # prompt mode rotates by position_ids[b, 0] + index, wrong for a run with skipped tokens
            q, k = (b.op("RotaryEmbedding", [t, q_pos, cos, sin], domain=MS_DOMAIN, num_heads=n)
                    for t, n in ((q, s.heads), (k, s.kv_heads)))
            attn, k, v = b.op("GroupQueryAttention", [q, k, v, "", "", seqlens, total], domain=MS_DOMAIN,
                              name=f"layers.{i}/GroupQueryAttention", n_out=3, num_heads=s.heads,
                              kv_num_heads=s.kv_heads, scale=s.scaling, do_rotary=0)
            kv.extend((k, v))
            return self.proj(attn, f"layers.{i}", "o_proj")
        return self.block(i, x, attend), kv[0], kv[1]


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

    A routed layer is one If on "some row executes it": the whole layer (norms, q/k/v, attention
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
    _, _, valid, pos, past_valid, past_pos = L.decode_positions(past_positions=any(s.windows))
    keep = L.keep_mask(valid, pos)
    valid3 = b.unsq(valid, [2])  # [B, 1, 1]: gates stay in this shape
    threshold = L.gate_threshold(graph_io.THETA, valid3, b.unsq(keep, [2]))
    # GroupQueryAttention's lengths: every row holds `total` slots (left padding is masked by the bias)
    total = b.op("Shape", [graph_io.ATTENTION_MASK], start=1, end=2)
    seqlens = b.cast(b.op("Expand", [b.op("Sub", [total, b.const([1])]), b.op("Shape", [graph_io.INPUT_IDS], end=1)]),
                     TensorProto.INT32)
    total32 = b.cast(b.op("Squeeze", [total, b.const([0])]), TensorProto.INT32)
    biases = {win: L.key_biases(past_valid, pos, past_pos, win) for win in dict.fromkeys(s.windows)}
    x = L.embed(graph_io.INPUT_IDS)
    # the past is a preallocated buffer (length >= total, in place) or exactly total - 1 long
    in_place = b.op("Squeeze", [b.op("GreaterOrEqual", [b.op("Shape", [graph_io.past(0, "key")], start=2, end=3),
                                                         total]), b.const([0])])
    pad_slot = b.const([0, 0, 0, 0, 0, 0, 1, 0])  # one zero slot at the end of the sequence axis
    for i in range(s.num_layers):  # every RoPE table in the main graph: one made inside a layer's If
        L.rope_tables(i)           # branch would be out of scope for the later layers that share it
    execs = []
    for i in range(s.num_layers):
        bias = b.op("Gather", [biases[s.windows[i]], b.const(i)], axis=0)  # [B, 1, 1, total]
        if i not in s.routed:
            gate = valid3
            x = L.decode_layer(i, x, bias, pos, seqlens, total32)[0]
            execs.append(gate)
            continue
        gate = b.op(GATE_OP, [L.router_margin(i, x), threshold], name=gate_name(i))
        if b.opset >= 20:  # ReduceMax takes bool from opset 20
            cond = b.reduce("ReduceMax", gate, [0, 1, 2], keepdims=0)
        else:
            cond = b.cast(b.reduce("ReduceMax", b.cast(gate, TensorProto.INT64), [0, 1, 2], keepdims=0),
                          TensorProto.BOOL)
        with b.subgraph() as run:
            y, k_run, v_run = L.decode_layer(i, x, bias, pos, seqlens, total32, gate)
            y = b.op("Where", [gate, y, x])
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
