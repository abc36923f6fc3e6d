"""Weight-only post-training quantization of a RoutedModel's decoder layers (fake quant, CPU or GPU).

Formats (all symmetric, weights only; activations, KV cache, routers, embeddings, norms and lm_head
stay in floating point):

  int4-awq  4-bit integer, per-group scales, AWQ (modelopt `awq_lite`: per-input-channel smoothing
            scales searched on calibration activations, folded into the weights, the inverse kept as
            the input quantizer's `pre_quant_scale`)
  int4      4-bit integer, per-group scales, round-to-nearest (modelopt `max` calibration)
  int3      3-bit integer, per-group scales, round-to-nearest, implemented here ("qtale-rtn"):
            modelopt has no INT3 preset nor an INT3 export/deployment path (TensorRT-LLM has no INT3
            kernels), so the codes and scales are computed explicitly and stay inspectable/exportable.
  int8      8-bit integer, per-output-channel scales (modelopt `max`)
  fp8       FP8 E4M3, per-output-channel scales (modelopt `max`)

Group size: 128 where the layer's input dimension allows it, else 64 (SmolLM2-135M: 576 -> 64 for
q/k/v/o/gate/up, 1536 -> 128 for down_proj); `group_size` forces one size for every layer.

Persistence: no base weights are stored. The checkpoint holds the quantizer tensors (`_amax`,
`_pre_quant_scale` of modelopt's quantizers, or the INT3 scales) in quantizer.safetensors and a JSON
description in qtale.json "quantization". `restore` rebuilds the same quantizer modules from that
description (mtq.quantize with no calibration), loads the tensors and re-folds the AWQ scales into
the base weights exactly as modelopt did; INT3 re-runs the deterministic RTN and checks that it
reproduces the stored scales. `mto.modelopt_state()` is not used for persistence: it holds
torch.dtype objects and tuples (not JSON), and torch.save would need pickle.
"""
from __future__ import annotations

import hashlib
import re
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .data import pad as pad_tokens
from .deploy.precisions import FORMATS, GROUPS, quant_format
from .errors import QtaleError
from .optional import require

QUANTIZER_FILE = "quantizer.safetensors"
INT3_PREFIX = "qtale_rtn."  # tensor-name prefix of INT3 scales in quantizer.safetensors


# ---- which layers, which group size ---------------------------------------------------------
def decoder_linears(model) -> dict[str, nn.Linear]:
    """The decoder layers' Linear modules by name relative to model.causal_lm (LoRA factors and the
    routers excluded; under peft the wrapped `base_layer` is the one quantized)."""
    lm = model.causal_lm
    prefix = None
    for name, mod in lm.named_modules():
        if mod is model.decoder.layers:
            prefix = name + "."
            break
    out = {}
    for name, mod in lm.named_modules():
        if (isinstance(mod, nn.Linear) and prefix and name.startswith(prefix)
                and "lora_" not in name and not name.endswith("modules_to_save")):
            out[name] = mod
    if not out:
        raise QtaleError("the model has no decoder Linear layers to quantize")
    return out


def layer_type(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.base_layer' -> 'self_attn.q_proj'."""
    t = re.sub(r"^.*?layers\.\d+\.", "", name)
    return t[: -len(".base_layer")] if t.endswith(".base_layer") else t


def choose_group(in_features: int, requested: int | None, name: str) -> int:
    if requested is not None:
        if in_features % requested:
            raise QtaleError(f"--group-size {requested} does not divide the input dimension {in_features} "
                             f"of {layer_type(name)}")
        return requested
    for g in GROUPS:
        if in_features % g == 0:
            return g
    raise QtaleError(f"no group size of {' or '.join(map(str, GROUPS))} divides the input dimension {in_features} of "
                     f"{layer_type(name)}; pass --group-size")


def group_sizes(linears: dict[str, nn.Linear], fmt: str, requested: int | None) -> dict[str, int | None]:
    """Group size per layer type (None: per output channel)."""
    if FORMATS[fmt].granularity == "channel":
        if requested is not None:
            raise QtaleError(f"--group-size applies to int4/int4-awq/int3; {fmt} uses per-channel scales")
        return {layer_type(n): None for n in linears}
    if requested is not None and (requested <= 0 or requested & (requested - 1)):
        raise QtaleError(f"--group-size must be a positive power of two, got {requested}")
    out: dict[str, int] = {}
    for name, lin in linears.items():
        g = choose_group(lin.in_features, requested, name)
        t = layer_type(name)
        if out.setdefault(t, g) != g:
            raise QtaleError(f"layers of type {t} have different input dimensions; pass --group-size")
    return out


# ---- modelopt ------------------------------------------------------------------------------
def _modelopt():
    """(modelopt, modelopt.torch.quantization), imported only for the modelopt formats."""
    with warnings.catch_warnings():  # its import warns about optional extensions it does not need here
        warnings.simplefilter("ignore")
        mtq = require("modelopt.torch.quantization", "pip install nvidia-modelopt", "NVIDIA Model Optimizer")
    return require("modelopt", "pip install nvidia-modelopt", "NVIDIA Model Optimizer"), mtq


def _quiet():
    """modelopt prints per-call progress; keep the CLI's stdout clean."""
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO())


def modelopt_config(linears: dict[str, nn.Linear], fmt: str, groups: dict, algorithm) -> dict:
    """A modelopt quant config that enables exactly the weight quantizers of `linears`."""
    f = FORMATS[fmt]
    bits = f.float_bits or f.bits  # modelopt: (exponent, mantissa) bits of a float format
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for name in linears:
        if f.granularity == "channel":
            cfg = {"num_bits": bits, "axis": 0}
        else:
            cfg = {"num_bits": bits, "block_sizes": {-1: groups[layer_type(name)], "type": "static"}}
        entries.append({"quantizer_name": f"{name}.weight_quantizer", "cfg": cfg, "enable": True})
    alg = {"method": "awq_lite", "alpha_step": 0.1} if algorithm == "awq_lite" else algorithm
    return {"quant_cfg": entries, "algorithm": alg}


def _modelopt_tensors(model) -> dict[str, torch.Tensor]:
    """Quantizer buffers (amax, AWQ pre_quant_scale) of the decoder Linear layers."""
    names = set(decoder_linears(model))
    out = {}
    for key, t in model.causal_lm.state_dict().items():
        mod = key.rsplit(".", 2)[0]
        if mod in names and ("_quantizer." in key) and key.rsplit(".", 1)[1] in ("_amax", "_pre_quant_scale"):
            out[key] = t.detach().clone().contiguous()
    return out


# ---- INT3 round-to-nearest -------------------------------------------------------------------
def rtn_codes(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise round-to-nearest: int8 codes in [-(2^(b-1)-1), 2^(b-1)-1] and float32
    scales [out, in/group] with weight ~= codes * scale (scale = group absmax / (2^(b-1)-1))."""
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    out_f, in_f = w.shape
    wg = w.reshape(out_f, in_f // group, group)
    scale = wg.abs().amax(-1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(wg / scale[..., None]), -qmax, qmax).to(torch.int8)
    return codes.reshape(out_f, in_f), scale


def rtn_dequant(codes: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    out_f, in_f = codes.shape
    return (codes.float().reshape(out_f, in_f // group, group) * scale[..., None]).reshape(out_f, in_f)


def _apply_rtn(linears: dict[str, nn.Linear], bits: int, groups: dict) -> dict[str, torch.Tensor]:
    scales = {}
    with torch.no_grad():
        for name, lin in linears.items():
            g = groups[layer_type(name)]
            codes, scale = rtn_codes(lin.weight, bits, g)
            lin.weight.copy_(rtn_dequant(codes, scale, g).to(lin.weight.dtype))
            scales[f"{INT3_PREFIX}{name}.scale"] = scale.contiguous()
    return scales


# ---- bookkeeping -----------------------------------------------------------------------------
def weight_bytes(linears: dict[str, nn.Linear], fmt: str, groups: dict) -> dict:
    """Storage of the quantized weights at their bit width incl. scales, vs the same weights in fp16."""
    f = FORMATS[fmt]
    bits, gran, alg, scale_b = f.bits, f.granularity, f.algorithm, f.scale_bytes
    q = fp16 = params = 0
    for name, lin in linears.items():
        o, i = lin.out_features, lin.in_features
        n = o * i
        params += n
        fp16 += 2 * n
        n_scales = o if gran == "channel" else n // groups[layer_type(name)]
        q += (n * bits + 7) // 8 + n_scales * scale_b + (2 * i if alg == "awq_lite" else 0)
    return {"quantized": q, "fp16": fp16, "params": params, "ratio": round(q / fp16, 6),
            "bits_per_weight": round(8 * q / params, 4)}


def _texts_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()


def calibration_batches(texts: list[str], tokenizer, max_length: int = 512, batch_size: int = 4):
    """Right-padded batches of the calibration texts (each cut to max_length tokens)."""
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    enc = [e for e in enc if e]
    if not enc:
        raise QtaleError("calibration data is empty after tokenization")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [pad_tokens(enc[s:s + batch_size], pad) for s in range(0, len(enc), batch_size)]
    return batches, sum(map(len, enc))


# ---- public API ------------------------------------------------------------------------------
def merge_lora(model) -> None:
    """Merge a LoRA adapter into the base weights, so the quantization grid is that of W + BA (what
    a deployment runs); the adapter files stay with the checkpoint (restore merges them again)."""
    if not hasattr(model.base, "peft_config"):
        return
    src = model.checkpoint_dir / "adapter" if model.checkpoint_dir else None
    if src is None or not src.is_dir():
        import tempfile

        src = Path(tempfile.mkdtemp(prefix="qtale-adapter-"))
        model.base.save_pretrained(src)
    model.base = model.base.merge_and_unload()
    model.merged_adapter = src


@torch.no_grad()
def quantize(model, fmt: str, calib_texts: list[str] | None, tokenizer=None, group_size: int | None = None,
             *, calib_source: str | None = None, max_length: int = 512) -> dict:
    """Quantize `model`'s decoder Linear weights in place; returns the JSON description (`info`)
    that restore() and the checkpoint need. The quantizer tensors are on model.quantizer_tensors."""
    f = quant_format(fmt)
    if getattr(model, "quantization_info", None):
        raise QtaleError(f"the model is already quantized ({model.quantization_info.get('format')}); "
                         "quantize the unquantized checkpoint")
    tool, bits, gran, algorithm = f.tool, f.bits, f.granularity, f.algorithm
    tokenizer = tokenizer or model.tokenizer
    merge_lora(model)
    linears = decoder_linears(model)
    groups = group_sizes(linears, fmt, group_size)
    calib = {"source": None, "samples": 0, "tokens": 0}
    was_training = model.training
    model.eval()
    t0 = time.time()
    if tool == "modelopt":
        modelopt, mtq = _modelopt()
        batches = []
        if algorithm == "awq_lite":
            if not calib_texts:
                raise QtaleError(f"{fmt} needs calibration data (--calib-data or the built-in text)")
            if tokenizer is None:
                raise QtaleError("calibration needs a tokenizer")
            batches, n_tok = calibration_batches(calib_texts, tokenizer, max_length)
            calib = {"source": calib_source, "samples": len(calib_texts), "tokens": n_tok,
                     "max_length": max_length, "sha256": _texts_digest(calib_texts)}

        def forward_loop(_):
            for ids, mask in batches:
                model(ids, attention_mask=mask, execute_all=True)  # every layer sees every token

        config = modelopt_config(linears, fmt, groups, algorithm)
        try:
            with _quiet(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mtq.quantize(model.causal_lm, config, forward_loop=forward_loop if batches else None)
        except (RuntimeError, ValueError, AssertionError, NotImplementedError) as exc:
            raise QtaleError(f"modelopt could not quantize to {fmt}: {str(exc).splitlines()[0]}") from None
        tensors = _modelopt_tensors(model)
        n_amax = sum(k.endswith("weight_quantizer._amax") for k in tensors)
        if n_amax != len(linears):
            raise QtaleError(f"modelopt calibrated {n_amax} of {len(linears)} weight quantizers for {fmt}")
        quantizer = f"nvidia-modelopt {modelopt.__version__}"
    else:
        tensors = _apply_rtn(linears, bits, groups)
        quantizer = "qtale-rtn"
        calib = {"source": None, "samples": 0, "tokens": 0, "note": "round-to-nearest needs no calibration"}
    model.train(was_training)
    info = {
        "format": fmt,
        "quantizer": quantizer,
        "algorithm": algorithm,
        "bits": bits,
        "dtype": f.dtype,
        "symmetric": True,
        "granularity": "per-group" if gran == "group" else "per-output-channel",
        "group_size": groups,
        "quantized": "decoder layers' Linear weights (q/k/v/o, gate/up/down; a LoRA adapter is merged "
                     "into them first); embeddings, norms, lm_head and routers stay float; activations "
                     "are not quantized",
        "num_layers": len(linears),
        "calibration": calib,
        "weight_bytes": weight_bytes(linears, fmt, groups),
        "seconds": round(time.time() - t0, 2),
        "theta_table_note": "the theta table was calibrated before quantization; re-run qtale calibrate (qtale-export refuses it until then)",
    }
    model.quantization_info = info
    model.quantizer_tensors = tensors
    return info


def quantizer_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors to store next to the checkpoint (quantizer.safetensors)."""
    t = getattr(model, "quantizer_tensors", None)
    if t is None:
        raise QtaleError("the model is not quantized")
    return t


@torch.no_grad()
def restore(model, folder, info: dict) -> None:
    """Rebuild the quantized model from the checkpoint's description and quantizer tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    fmt = info.get("format") if isinstance(info, dict) else None
    if fmt not in FORMATS:
        raise QtaleError(f"checkpoint {folder}: unknown quantization format '{fmt}'")
    path = Path(folder) / QUANTIZER_FILE
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise QtaleError(f"corrupt or missing {path}: {str(exc).splitlines()[0]}") from None
    tool, bits = FORMATS[fmt].tool, FORMATS[fmt].bits
    linears = decoder_linears(model)
    groups = info.get("group_size") or {}
    missing = {layer_type(n) for n in linears} - set(groups)
    if missing:
        raise QtaleError(f"checkpoint {folder}: no group size recorded for {sorted(missing)}")
    if tool == "qtale-rtn":
        scales = _apply_rtn(linears, bits, groups)
        if set(scales) != set(tensors) or any(not torch.equal(scales[k], tensors[k]) for k in scales):
            raise QtaleError(f"checkpoint {folder}: the INT3 scales do not match the base weights "
                             "(another base model?)")
    else:
        _, mtq = _modelopt()
        config = modelopt_config(linears, fmt, groups, None)
        with _quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mtq.quantize(model.causal_lm, config, forward_loop=None)
        modules = dict(model.causal_lm.named_modules())
        want = {f"{n}.weight_quantizer._amax" for n in linears}
        if not want <= set(tensors):
            raise QtaleError(f"corrupt {path}: missing quantizer scales for {len(want - set(tensors))} layers")
        for key, t in tensors.items():
            qname, attr = key.rsplit(".", 1)
            q = modules.get(qname)
            lin = modules.get(qname.rsplit(".", 1)[0])
            if q is None or lin is None or attr not in ("_amax", "_pre_quant_scale"):
                raise QtaleError(f"corrupt {path}: unexpected tensor {key}")
            if attr == "_amax":
                q.amax = t
            else:
                # modelopt's AWQ folds 1/pre_quant_scale into the weight and scales the input by
                # pre_quant_scale; repeat the fold with the same fp32 arithmetic.
                q._enable_pre_quant_scale = True
                q.pre_quant_scale = t.to(lin.weight.dtype)
                inv = 1.0 / t.to(torch.float32)
                lin.weight.data.copy_((lin.weight * inv.squeeze()[None, :]).to(lin.weight.dtype))
    model.quantization_info = info
    model.quantizer_tensors = tensors


@torch.no_grad()
def fold(model) -> None:
    """Replace each fake-quantized weight by its dequantized value and switch its quantizer off, so a
    forward does no quantizer work (evaluation, calibration, bf16). Logits are unchanged; the folded
    model can no longer be exported on its grid (export reloads the checkpoint). INT3 weights are
    stored folded already."""
    info = getattr(model, "quantization_info", None)
    if not info or getattr(model, "quantization_folded", False):
        return
    if FORMATS[info["format"]].tool == "modelopt":
        _, mtq = _modelopt()
        with _quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mtq.fold_weight(model.causal_lm)
    model.quantization_folded = True
