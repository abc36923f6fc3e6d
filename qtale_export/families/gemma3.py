"""Gemma 3 (text): a sandwich-norm block, GELU-tanh, scaled embeddings, local and global layers.

Against Llama: RMSNorm multiplies by (1 + weight); norms before and after attention and before and
after the MLP; q/k norms; a GELU-tanh gated MLP; embeddings multiplied by sqrt(hidden); five of
every six layers attend over a sliding window with their own RoPE base (`layer_types`: local
10k vs global 1M); a 262k vocabulary with tied embeddings. Attention scales by
query_pre_attn_scalar ** -0.5 (the attention module's `scaling`, read as for every family).
"""
from __future__ import annotations

from ..errors import QtaleError
from .llama import BlockOps, Llama


class Gemma3(Llama):
    norm_offset = 1.0
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm")
    activations = {"gelu_pytorch_tanh": "gelu_tanh"}

    def check(self, cfg) -> None:
        super().check(cfg)
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(cfg, name, None) is not None:
                raise QtaleError(f"Gemma 3 with {name} is not supported (Gemma-3 checkpoints set none)")
        if getattr(cfg, "use_bidirectional_attention", False):
            raise QtaleError("Gemma 3 with bidirectional attention is not a causal decoder")

    def activation(self, cfg) -> str:
        act = getattr(cfg, "hidden_activation", None)
        if act not in self.activations:
            raise QtaleError(f"unsupported MLP activation '{act}' for Gemma 3 (supported: gelu_pytorch_tanh)")
        return self.activations[act]

    def block(self, ops: BlockOps, x, attend, act: str):
        x = ops.add(x, ops.norm(attend(ops.norm(x, "input_layernorm")), "post_attention_layernorm"))
        m = ops.mlp(ops.norm(x, "pre_feedforward_layernorm"), act)
        return ops.add(x, ops.norm(m, "post_feedforward_layernorm"))

    def rope_type(self, cfg, i: int) -> str | None:
        return cfg.layer_types[i]  # "sliding_attention" (local base) or "full_attention" (global base)

    def embed_scale(self, decoder) -> float:
        return float(decoder.embed_tokens.embed_scale)


FAMILY = Gemma3()
