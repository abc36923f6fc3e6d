"""Model extraction: the numpy weights and the structure (`Spec`) of a RoutedModel.

What differs per family is read through its hooks (qtale_export/families/): which norms a layer has
(stored under their HF names, with the family's norm offset folded in: (1 + w) for Gemma), the MLP
activation, the embedding scale, each layer's RoPE table and sliding window.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import numpy as np

from ...errors import QtaleError
from ...families import Llama


@dataclass
class Spec:
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    family: Llama  # the block's hooks (family.block builds every layer)
    act: str  # the MLP activation, as family.block passes it to ops.mlp ("silu", "gelu_tanh")
    embed_scale: float
    rope: list[int]  # per layer: its RoPE table, an index into inv_freqs / rope_scales
    inv_freqs: list[np.ndarray]
    rope_scales: list[float]
    windows: list[int | None]  # per layer: its sliding attention window (None: full attention)
    scaling: float
    qk_norm: bool
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


def _spec(model, lm) -> Spec:
    """The structure of `lm` (the merged causal LM of RoutedModel `model`) through its family."""
    cfg, dec, fam = lm.config, lm.model, model.family
    fam.check(cfg)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layer0 = dec.layers[0]
    tables: dict[int, int] = {}  # id of an inv_freq tensor -> its index
    rope, inv_freqs, rope_scales = [], [], []
    for i in range(cfg.num_hidden_layers):
        inv, scale = fam.inv_freq(dec.rotary_emb, cfg, i)
        if id(inv) not in tables:
            tables[id(inv)] = len(inv_freqs)
            inv_freqs.append(_np(inv))
            rope_scales.append(scale)
        rope.append(tables[id(inv)])
    return Spec(
        num_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads, head_dim=hd, vocab=cfg.vocab_size,
        eps=float(getattr(layer0.input_layernorm, "variance_epsilon", getattr(cfg, "rms_norm_eps", 1e-6))),
        family=fam, act=fam.activation(cfg), embed_scale=fam.embed_scale(dec), rope=rope, inv_freqs=inv_freqs,
        rope_scales=rope_scales, windows=[fam.window(cfg, i) for i in range(cfg.num_hidden_layers)],
        scaling=float(getattr(layer0.self_attn, "scaling", hd ** -0.5)), qk_norm=fam.qk_norm(layer0.self_attn),
        routed=list(model.layer_ids), keep_initial=int(model.router_config.keep_initial),
        eos_token_id=cfg.eos_token_id, tied=lm.lm_head.weight.data_ptr() == dec.embed_tokens.weight.data_ptr(),
        max_positions=int(getattr(cfg, "max_position_embeddings", 0) or 0))


def extract(model) -> Weights:
    """Weights and structure of a RoutedModel; LoRA adapters are merged (on a copy)."""
    lm = model.causal_lm
    if hasattr(model.base, "peft_config"):
        lm = copy.deepcopy(model.base).merge_and_unload()
    w = Weights(_spec(model, lm))
    spec, t, dec = w.spec, w.tensors, lm.model
    fmt = (getattr(model, "quantization_info", None) or {}).get("format")
    norm = lambda mod: _np(mod.weight) + np.float32(spec.family.norm_offset)  # noqa: E731
    t["embed"] = _np(dec.embed_tokens.weight)
    t["norm.weight"] = norm(dec.norm)
    if not spec.tied:
        t["lm_head.weight"] = _np(lm.lm_head.weight)
        if getattr(lm.lm_head, "bias", None) is not None:
            t["lm_head.bias"] = _np(lm.lm_head.bias)
    for i, layer in enumerate(dec.layers):
        p = f"layers.{i}"
        a = layer.self_attn
        for name in spec.family.norms:
            t[f"{p}.{name}.weight"] = norm(getattr(layer, name))
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _linear(w, f"{p}.{n}", getattr(a, n), fmt)
        if spec.qk_norm:
            t[f"{p}.q_norm.weight"] = norm(a.q_norm)
            t[f"{p}.k_norm.weight"] = norm(a.k_norm)
        for n in ("gate_proj", "up_proj", "down_proj"):
            _linear(w, f"{p}.{n}", getattr(layer.mlp, n), fmt)
    if fmt == "int3":
        _int3_scales(w, model)
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
        t[f"{p}.eps"] = np.array(r.norm.eps if r.norm.eps is not None else 1e-6, np.float32)
    return w


def _linear(w: Weights, name: str, mod, fmt: str | None) -> None:
    """A projection's weight (and bias), and its modelopt quantizer state where it has one. The
    weight of a `qtale quantize` checkpoint's projection is the one its PyTorch model applies, the
    fake-quantized weight: precision.checkpoint_grid recovers the codes from it unambiguously, where
    from the float weight a value on a rounding tie (frequent in weights dequantized from a GGUF,
    which lie on a grid) can round the other way than modelopt's own arithmetic."""
    w.tensors[f"{name}.weight"] = _np(mod.weight)
    if getattr(mod, "bias", None) is not None:
        w.tensors[f"{name}.bias"] = _np(mod.bias)
    wq = getattr(mod, "weight_quantizer", None)
    amax = getattr(wq, "amax", None) if wq is not None else None
    if amax is not None and getattr(wq, "is_enabled", True):
        w.quantized[name] = {"amax": _np(amax)}
        if fmt:
            w.tensors[f"{name}.weight"] = _np(wq(mod.weight.detach()))
            w.quantized[name]["format"] = fmt
            iq = getattr(mod, "input_quantizer", None)
            pqs = getattr(iq, "pre_quant_scale", None) if iq is not None else None
            if pqs is not None:
                w.quantized[name]["pre_quant_scale"] = _np(pqs).reshape(-1)


def _int3_scales(w: Weights, model) -> None:
    """qtale-rtn (int3): the stored per-group scales (the weights are codes * scale)."""
    from ...quantize import INT3_PREFIX

    for key, sc in (getattr(model, "quantizer_tensors", None) or {}).items():
        m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)(?:\.base_layer)?\.scale$", key)
        if key.startswith(INT3_PREFIX) and m:
            w.quantized[f"layers.{m.group(1)}.{m.group(2)}"] = {"format": "int3", "rtn_scale": _np(sc)}


def quantizable(name: str) -> bool:
    """Decoder projections are quantized; routers, embeddings, norms and lm_head stay float."""
    return name.startswith("layers.") and name.endswith("_proj")
