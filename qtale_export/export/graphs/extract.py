"""Model extraction: the numpy weights and the structure (`Spec`) of a RoutedModel."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from ...errors import QtaleError


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
