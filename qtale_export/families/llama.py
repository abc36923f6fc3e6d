"""The Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM): the reference decoder block.

A family is one class of hooks. The routed PyTorch model (`routing.RoutedModel._layer`), the
standard ONNX lowering and the ONNX Runtime lowering (`export/graphs/`) build every layer through
them, so a family's differences are written once, here:

    block(ops, x, attend)   the residual structure: which norms sit where, the MLP's activation
    qk_norm(attn)           whether q and k are RMS-normed per head before rotary
    rope_type(cfg, i)       the RoPE table layer i uses (None: the model's only one)
    window(cfg, i)          layer i's sliding attention window (None: full attention)
    embed_scale(decoder)    the factor on the embedding output (the LM head's table is unscaled)
    norm_offset             RMSNorm multiplies by (norm_offset + weight)
    check(cfg)              refuses what these hooks do not express

`ops` is the implementation's vocabulary: `norm(x, name)` applies the layer's RMSNorm module `name`
(its HF attribute name), `add(x, y)`, `mlp(h, act)` the gated MLP down(act(gate(h)) * up(h)) with
act "silu" or "gelu_tanh". `attend(h)` is the implementation's attention on the normed input,
o_proj included (its K/V kept by the caller).
"""
from __future__ import annotations

from typing import Any, Protocol

from ..errors import QtaleError


class BlockOps(Protocol):
    def norm(self, x: Any, name: str) -> Any: ...
    def add(self, x: Any, y: Any) -> Any: ...
    def mlp(self, h: Any, act: str) -> Any: ...


class Llama:
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)), SiLU gated MLP, one RoPE table."""

    norm_offset = 0.0
    # the layer's RMSNorm modules that `block` applies (export/graphs/extract.py stores these)
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    activations = {"silu": "silu", "swish": "silu"}  # config's hidden_act -> ops.mlp's name

    def check(self, cfg) -> None:
        self.activation(cfg)

    def activation(self, cfg) -> str:
        act = getattr(cfg, "hidden_act", "silu")
        if act not in self.activations:
            raise QtaleError(f"unsupported MLP activation '{act}' for {type(self).__name__} "
                             f"(supported: {', '.join(self.activations)})")
        return self.activations[act]

    def block(self, ops: BlockOps, x, attend, act: str):
        x = ops.add(x, attend(ops.norm(x, "input_layernorm")))
        return ops.add(x, ops.mlp(ops.norm(x, "post_attention_layernorm"), act))

    def qk_norm(self, attn) -> bool:
        return hasattr(attn, "q_norm")  # Qwen3

    def rope_type(self, cfg, i: int) -> str | None:
        return None

    def window(self, cfg, i: int) -> int | None:
        """Per-layer `layer_types` where the config has them (Qwen2/Qwen3: sliding layers from
        max_window_layers on), else Mistral's one window for every layer."""
        size = getattr(cfg, "sliding_window", None)
        if not size or not getattr(cfg, "use_sliding_window", True):
            return None
        types = getattr(cfg, "layer_types", None)
        if types is not None and types[i] != "sliding_attention":
            return None
        return int(size)

    def embed_scale(self, decoder) -> float:
        return 1.0

    # -- RoPE tables: HF's rotary module keeps one per rope type (`{type}_inv_freq`) or just one --
    def rotary(self, rotary_emb, x, pos, cfg, i: int):
        """(cos, sin) [B, T, hd] of layer i at positions pos (the PyTorch model)."""
        kind = self.rope_type(cfg, i)
        return rotary_emb(x, pos) if kind is None else rotary_emb(x, pos, kind)

    def inv_freq(self, rotary_emb, cfg, i: int):
        """(inv_freq tensor, attention_scaling) of layer i's RoPE table (the ONNX lowerings)."""
        kind = self.rope_type(cfg, i)
        prefix = "" if kind is None else f"{kind}_"
        return getattr(rotary_emb, f"{prefix}inv_freq"), float(getattr(rotary_emb, f"{prefix}attention_scaling", 1.0))


FAMILY = Llama()
