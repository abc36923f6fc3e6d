"""Weight precision policies: how each precision's weights are lowered into ONNX.

Only decoder projections (q/k/v/o, gate/up/down) are quantized; routers stay fp32, embeddings, norms
and lm_head stay in the activation dtype (an int4 or int8 `ort-cpu` export stores the embedding / LM head as
one table of that precision, `int4_table` / `int8_table`). The grids are quantize's (`qtale_export.quantize` owns formats, grids
and group sizes); this module only lowers them:

* a quantized checkpoint (`qtale quantize`): `checkpoint_grid` recomputes the checkpoint's own
  integer codes and scales exactly as the PyTorch model applies them (modelopt: codes =
  clamp(round(w * qmax/amax), +-qmax) per group/channel, FP8: e4m3(w * 448/amax); INT3 "qtale-rtn":
  the stored scales), never re-quantized.
* a float checkpoint at int4: `float_int4_grid`, quantize's symmetric group-wise round-to-nearest
  (`quantize.rtn_codes` at 4 bits, group size by `quantize.choose_group`: 128 where it divides the
  input dimension, else 64) -- the grid `qtale quantize --format int3` uses at 3 bits, the same rule
  for both targets; a dimension neither divides is refused with a hint to quantize first.
* a float checkpoint at int8 / fp8: per-output-channel absmax scales (`quantize_weight`), the grid of
  modelopt's `max` calibration that `qtale quantize --format int8/fp8` applies.

Lowering: INT4/INT3 codes into blocked DequantizeLinear (tensorrt; opset 21) or MatMulNBits packed
here (ort-cpu, block = the group size), INT8/FP8 into per-channel DequantizeLinear, all symmetric (no
zero point). AWQ's pre_quant_scale becomes a Mul on the input.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from ..deploy.precisions import FORMATS, precision as spec
from ..errors import QtaleError
from .graphs import MS_DOMAIN, Builder, quantizable

FP8_MAX = 448.0


def activation_dtype(precision: str):
    """The numpy dtype of the activations and KV cache of `precision` (the registry's)."""
    return np.dtype(spec(precision).activation).type


def _scale_from(absmax: np.ndarray, qmax: float) -> np.ndarray:
    s = (absmax / qmax).astype(np.float32)
    return np.where(s > 0, s, np.float32(1.0)).astype(np.float32)


def quantize_weight(wt: np.ndarray, precision: str, amax: np.ndarray | None = None):
    """wt [K, N] fp32 -> (q, scale, DequantizeLinear attrs, dequantized fp32 [K, N]) per output
    channel (int8, fp8); `amax` (a modelopt weight quantizer's) replaces the weight's own absmax."""
    n = wt.shape[1]
    absmax = np.abs(wt).max(0)  # per output channel [N]
    if amax is not None and amax.size == n:
        absmax = amax.reshape(n).astype(np.float32)
    if precision == "int8":
        scale = _scale_from(absmax, 127.0)
        q = np.clip(np.rint(wt / scale), -128, 127).astype(np.int8)
        return q, scale, {"axis": 1}, q.astype(np.float32) * scale
    if precision == "fp8":
        scale = _scale_from(absmax, FP8_MAX)
        q = np.clip(wt / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
        return q, scale, {"axis": 1}, q.astype(np.float32) * scale
    raise QtaleError(f"unknown weight quantization '{precision}'")


def int4_group(k: int, name: str) -> int:
    """quantize's group size for an input dimension `k` (128 where it divides, else 64), or a hint."""
    from ..quantize import choose_group

    try:
        return choose_group(k, None, name)
    except QtaleError:
        raise QtaleError(f"{name}: no int4 group size of 128 or 64 divides its input dimension {k}; "
                         "run qtale quantize --format int4-awq --group-size N first") from None


def float_int4_grid(w: np.ndarray, name: str) -> dict:
    """The int4 grid of a float W [N, K]: quantize's round-to-nearest with its group-size rule, as a
    grid for `_lower_grid` and `int4_table` (see the module doc)."""
    import torch

    from ..quantize import rtn_codes

    group = int4_group(w.shape[1], name)
    codes, scale = rtn_codes(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)), 4, group)
    return {"codes": codes.numpy(), "scale": scale.numpy(), "block": group, "bits": 4, "fp8": False}


# ---- quantized checkpoints: the checkpoint's own grid -----------------------------------------
_EPS = 1.0 / (1 << 24)  # modelopt: amax at or below this quantizes to 0


def checkpoint_precision(info: dict | None) -> str | None:
    """The export precision of a quantized checkpoint's format (None: not quantized)."""
    if not info:
        return None
    fmt = str(info.get("format", "")).lower()
    if fmt not in FORMATS:
        raise QtaleError(f"checkpoint quantization format '{info.get('format')}' has no ONNX lowering")
    return FORMATS[fmt].precision


def checkpoint_grid(w: np.ndarray, entry: dict) -> dict:
    """The codes and scales the PyTorch quantized model applies to W [N, K] (fp32), recomputed with
    the same fp32 arithmetic: {"codes": [N, K] int8 (or float8_e4m3fn), "scale": [N, n_blocks] fp32,
    "block": K / n_blocks, "bits": 3/4/8, "fp8": bool}; codes * scale reproduces the fake-quantized
    weight (modelopt divides by qmax/amax instead of multiplying by amax/qmax: <= 1 ulp apart)."""
    import torch

    wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    n, k = wt.shape
    fmt = entry["format"]
    if fmt == "int3":  # qtale-rtn: the weight is codes * stored scale already
        bits = 3
        scale = torch.from_numpy(np.asarray(entry["rtn_scale"], np.float32)).reshape(n, -1)
        nb = scale.shape[1]
        qmax = 2 ** (bits - 1) - 1
        codes = torch.clamp(torch.round(wt.reshape(n, nb, k // nb) / scale[..., None]), -qmax, qmax)
        return {"codes": codes.reshape(n, k).to(torch.int8).numpy(), "scale": scale.numpy(),
                "block": k // nb, "bits": bits, "fp8": False}
    amax = torch.from_numpy(np.asarray(entry["amax"], np.float32)).reshape(-1)
    if amax.numel() % n or k % (amax.numel() // n):
        raise QtaleError(f"quantizer amax of shape {tuple(entry['amax'].shape)} does not fit a [{n}, {k}] weight")
    nb = amax.numel() // n
    amax = amax.reshape(n, nb, 1)
    wb = wt.reshape(n, nb, k // nb)
    zero = amax <= _EPS
    if FORMATS[fmt].float_bits == (4, 3):  # E4M3: modelopt _fp8_eager
        mult = 448.0 / torch.where(zero, torch.ones_like(amax), amax)
        inv = 1 / mult
        codes = (wb * mult).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return {"codes": codes.reshape(n, k).float().numpy().astype(ml_dtypes.float8_e4m3fn),
                "scale": inv[..., 0].numpy(), "block": k // nb, "bits": 8, "fp8": True}
    bits = FORMATS[fmt].bits
    qmax = float(2 ** (bits - 1) - 1)
    mult = qmax / amax  # modelopt _tensor_quant: scale = max_bound / amax, narrow range
    mult = torch.where(zero, torch.zeros_like(mult), mult)
    codes = torch.clamp(torch.round(wb * mult), -qmax, qmax)
    scale = torch.where(zero, torch.ones_like(mult), 1 / torch.where(zero, torch.ones_like(mult), mult))
    return {"codes": codes.reshape(n, k).to(torch.int8).numpy(), "scale": scale[..., 0].numpy(),
            "block": k // nb, "bits": bits, "fp8": False}


def pack_matmul_nbits(codes: np.ndarray, block: int) -> np.ndarray:
    """Signed 4-bit codes [N, K] (-8..7) -> MatMulNBits B uint8 [N, K/block, block/2]: unsigned
    code + 8 (the default zero point of a symmetric 4-bit MatMulNBits), element 2j in the low and
    2j+1 in the high nibble."""
    n, k = codes.shape
    u = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(n, k // block, block)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4))


def int4_table(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """An embedding / LM head table W [V, K] fp32 -> (uint8 [V, K/2], fp32 scales [V, K/block], block):
    quantize's 4-bit round-to-nearest grid along K (`float_int4_grid`), packed as MatMulNBits and GatherBlockQuantized
    both read it (code + 8, low nibble first), so one copy serves the gather and the LM head."""
    v, k = w.shape
    grid = float_int4_grid(w, "embedding")
    return pack_matmul_nbits(grid["codes"], grid["block"]).reshape(v, k // 2), grid["scale"], grid["block"]


int4_table.bits = 4


def int8_table(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The 8-bit table of the int8 exports: W [V, K] fp32 -> (uint8 [V, K] = code + 128, fp32 scales
    [V, K/block], block): quantize's 8-bit round-to-nearest grid (`rtn_codes`) with the int4 table's
    block rule, the layout MatMulNBits and GatherBlockQuantized (bits 8) read with their default zero point."""
    import torch

    from ..quantize import rtn_codes

    block = int4_group(w.shape[1], "embedding")
    codes, scale = rtn_codes(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)), 8, block)
    return (codes.numpy().astype(np.int16) + 128).astype(np.uint8), scale.numpy(), block


int8_table.bits = 8
# the table lowerings of the precisions whose ort-cpu form quantizes the tables (`Precision.ort_table`)
TABLES = {"int4": int4_table, "int8": int8_table}


def ort_table(precision: str):
    """The ort-cpu form's embedding + LM-head table lowering of `precision`, None when it stays float."""
    return TABLES[precision] if spec(precision).ort_table else None


def int4_group_sizes(weights) -> dict[str, int]:
    """Group size per layer type of a float checkpoint's int4 export (quantize's rule, keyed as
    `qtale quantize` records it: {"self_attn.q_proj": 64, ...})."""
    parents = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    out = {}
    for key, w in weights.tensors.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[0] == "layers" and parts[3] == "weight" and parts[2] in parents:
            out.setdefault(f"{parents[parts[2]]}.{parts[2]}", int4_group(w.shape[1], key))
    return out


def _lower_grid(b: Builder, x: str, name: str, grid: dict, target: str) -> str:
    n, k = grid["codes"].shape
    bs = grid["block"]
    if grid["bits"] <= 4 and target == "ort-cpu":
        if bs < 16 or bs & (bs - 1):
            raise QtaleError(f"{name}: group size {bs} is not a MatMulNBits block size (power of two >= 16)")
        bn = b.init(f"{name}.weight_nbits", pack_matmul_nbits(grid["codes"], bs))
        sn = b.init(f"{name}.weight_nbits_scales", grid["scale"].reshape(-1).astype(b.act))
        return b.op("MatMulNBits", [x, bn, sn], name=f"{name}/MatMulNBits", domain=MS_DOMAIN,
                    K=k, N=n, bits=4, block_size=bs, accuracy_level=4)
    codes_t = np.ascontiguousarray(grid["codes"].T)  # [K, N]
    if grid["fp8"]:
        q = codes_t
    else:
        q = codes_t.astype(ml_dtypes.int4 if grid["bits"] <= 4 else np.int8)
    if grid["scale"].shape[1] == 1:  # per output channel
        scale, attrs = np.ascontiguousarray(grid["scale"][:, 0]), {"axis": 1}
    else:
        scale, attrs = np.ascontiguousarray(grid["scale"].T), {"axis": 0, "block_size": bs}
    qn = b.init(f"{name}.weight_q", q)
    sn = b.init(f"{name}.weight_scale", scale.astype(np.float32))
    deq = b.op("DequantizeLinear", [qn, sn], name=f"{name}/DequantizeLinear", **attrs)
    return b.op("MatMul", [x, deq], name=f"{name}/MatMul")


def make_weight_fn(precision: str, target: str, quantized: dict | None = None):
    """The Builder callback that lowers `x @ W.T` for one projection under `precision`.

    `quantized` (graphs.Weights.quantized): per projection, the checkpoint's quantizer state; when
    it comes from `qtale quantize` (entries with "format") the checkpoint's grid is lowered as is."""
    quantized = quantized or {}
    act = np.dtype(activation_dtype(precision))
    fmts = {e["format"] for e in quantized.values() if "format" in e}
    if fmts:
        fams = {FORMATS[f].precision if f in FORMATS else None for f in fmts}
        if fams != {precision}:
            raise QtaleError(f"the checkpoint is quantized to {'/'.join(sorted(fmts))}; export it with "
                             f"--precision {'/'.join(sorted(str(f) for f in fams))}, not {precision}")
    elif precision == "int4" and quantized:
        raise QtaleError("the model carries modelopt weight quantizers but no quantization description; "
                         "quantize it with qtale quantize and export that checkpoint")

    def fn(b: Builder, x: str, name: str, w: np.ndarray) -> str:
        if not quantizable(name) or not spec(precision).quantized:
            return b.op("MatMul", [x, b.init(f"{name}.weight_t", np.ascontiguousarray(w.T).astype(act))],
                        name=f"{name}/MatMul")
        if fmts:
            entry = quantized.get(name)
            if entry is None:
                raise QtaleError(f"the quantized checkpoint has no quantizer state for {name}")
            pqs = entry.get("pre_quant_scale")
            if pqs is not None:  # AWQ: the input quantizer scales x (the weight holds 1/pqs)
                x = b.op("Mul", [x, b.init(f"{name}.pre_quant_scale", np.asarray(pqs, act).reshape(-1))],
                         name=f"{name}/PreQuantScale")
            return _lower_grid(b, x, name, checkpoint_grid(w, entry), target)
        if precision == "int4":
            return _lower_grid(b, x, name, float_int4_grid(w, name), target)
        q, scale, attrs, _ = quantize_weight(np.ascontiguousarray(w.T), precision, quantized.get(name, {}).get("amax"))
        deq = b.op("DequantizeLinear", [b.init(f"{name}.weight_q", q), b.init(f"{name}.weight_scale", scale)],
                   name=f"{name}/DequantizeLinear", **attrs)
        return b.op("MatMul", [x, deq], name=f"{name}/MatMul")

    fn.fusable = not fmts  # a quantized checkpoint's grids are lowered per projection
    fn.table = DQ_TABLES[precision] if target == "tensorrt" and spec(precision).trt_table else None
    return fn


def dq_int4_table(b: Builder, name: str, w: np.ndarray) -> str:
    """The embedding table W [V, K] of a TensorRT int4 export behind one block-wise INT4
    DequantizeLinear (quantize's round-to-nearest grid along K, the ort-cpu int4 table's grid).
    Why quantized: TensorRT compiles a prefill with token compaction into several subgraphs, each
    keeping its own copy of the constants it reads, so a float table read by the gather and by the
    tied LM head is stored twice (226 MB of the default model's 302 MB engine); as INT4 both copies
    take 28 MB, and TensorRT keeps INT4 constants in 4 bits (docs/tensorrt.md)."""
    grid = float_int4_grid(w, "embedding")
    q = b.init(f"{name}.weight_q", grid["codes"].astype(ml_dtypes.int4))
    s = b.init(f"{name}.weight_scale", np.ascontiguousarray(grid["scale"], dtype=np.float32))
    return b.op("DequantizeLinear", [q, s], name=b.fresh(f"{name}/DequantizeLinear"), axis=1, block_size=grid["block"])


def dq_fp8_table(b: Builder, name: str, w: np.ndarray) -> str:
    """The FP8 export's table, for the same reason as `dq_int4_table`: E4M3 codes with one scale
    per row (amax / 448), behind one DequantizeLinear on axis 0."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    scale = np.maximum(np.abs(w).max(axis=1), _EPS) / FP8_MAX
    codes = np.clip(w / scale[:, None], -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    q = b.init(f"{name}.weight_q", codes)
    s = b.init(f"{name}.weight_scale", scale.astype(np.float32))
    return b.op("DequantizeLinear", [q, s], name=b.fresh(f"{name}/DequantizeLinear"), axis=0)


# the table lowerings of the precisions whose TensorRT form quantizes the embedding table (the tied
# LM head's too; `Precision.trt_table`)
DQ_TABLES = {"int4": dq_int4_table, "fp8": dq_fp8_table}
