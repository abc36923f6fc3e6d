"""Weight precision policies: fp32, fp16, weight-only INT4/INT8/FP8 Q/DQ, and ORT MatMulNBits.

Only decoder projections (q/k/v/o, gate/up/down) are quantized; routers stay fp32, embeddings, norms
and lm_head stay in the activation dtype. The DequantizeLinear forms are what TensorRT consumes:
INT4 blocked along the input dim (block 128 where it divides, else 64, else 32; opset 21),
INT8 and FP8 (E4M3FN) per output channel, all symmetric (no zero point). For ONNX Runtime on CPU
INT4 becomes onnxruntime's MatMulNBits, made by onnxruntime's own MatMulNBitsQuantizer.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx

from ..errors import QtaleError
from .graphs import Builder, quantizable

PRECISIONS = ("fp32", "fp16", "int4", "int8", "fp8")
TARGETS = ("ort-cpu", "tensorrt")
FP8_MAX = 448.0


def activation_dtype(precision: str):
    return np.float16 if precision == "fp16" else np.float32


def min_opset(precision: str) -> int:
    return {"int4": 21, "fp8": 19}.get(precision, 18)


def int4_block(k: int) -> int | None:
    for bs in (128, 64, 32):
        if k % bs == 0:
            return bs
    return None


def matmul_nbits_block(ks) -> int:
    for bs in (128, 64, 32):
        if all(k % bs == 0 for k in ks):
            return bs
    return 32


def _scale_from(absmax: np.ndarray, qmax: float) -> np.ndarray:
    s = (absmax / qmax).astype(np.float32)
    return np.where(s > 0, s, np.float32(1.0)).astype(np.float32)


def quantize_weight(wt: np.ndarray, precision: str, amax: np.ndarray | None = None):
    """wt [K, N] fp32 -> (q, scale, DequantizeLinear attrs, dequantized fp32 [K, N])."""
    k, n = wt.shape
    if precision == "int4":
        bs = int4_block(k)
        if bs is None:  # per output channel
            absmax = np.abs(wt).max(0, keepdims=True)
            scale = _scale_from(absmax, 7.0)
            attrs = {"axis": 1}
            q = np.clip(np.rint(wt / scale), -8, 7)
            return q.astype(ml_dtypes.int4), scale[0], attrs, q.astype(np.float32) * scale
        blocks = wt.reshape(k // bs, bs, n)
        absmax = np.abs(blocks).max(1)  # [K/bs, N]
        if amax is not None and amax.size == absmax.size:
            absmax = amax.reshape(n, k // bs).T.astype(np.float32)  # modelopt: [N * K/bs] row-major per out
        scale = _scale_from(absmax, 7.0)
        full = np.repeat(scale, bs, axis=0)
        q = np.clip(np.rint(wt / full), -8, 7)
        return q.astype(ml_dtypes.int4), scale, {"axis": 0, "block_size": bs}, q.astype(np.float32) * full
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


def make_weight_fn(precision: str, target: str, quantized: dict | None = None):
    """The Builder callback that lowers `x @ W.T` for one projection under `precision`."""
    quantized = quantized or {}
    act = np.dtype(activation_dtype(precision))
    dq_form = precision in ("int8", "fp8") or (precision == "int4" and target == "tensorrt")

    def fn(b: Builder, x: str, name: str, w: np.ndarray) -> str:
        wt = np.ascontiguousarray(w.T)
        node = f"{name}/MatMul"
        if dq_form and quantizable(name):
            amax = quantized.get(name, {}).get("amax")
            q, scale, attrs, _ = quantize_weight(wt, precision, amax)
            qn = b.init(f"{name}.weight_q", q)
            sn = b.init(f"{name}.weight_scale", scale)
            deq = b.op("DequantizeLinear", [qn, sn], name=f"{name}/DequantizeLinear", **attrs)
            return b.op("MatMul", [x, deq], name=node)
        wn = b.init(f"{name}.weight_t", wt.astype(act))
        return b.op("MatMul", [x, wn], name=node)

    return fn


def to_matmul_nbits(model: onnx.ModelProto, ks: list[int]) -> onnx.ModelProto:
    """Replace the decoder projections' MatMuls by MatMulNBits (4 bit, symmetric) with ORT's tool."""
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    nodes = [n.name for n in model.graph.node
             if n.op_type == "MatMul" and quantizable(n.name.rsplit("/", 1)[0])]
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in nodes]
    block = matmul_nbits_block(ks)
    level = logging.getLogger().level
    try:
        cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4)
        q = mnq.MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=cfg)
        q.process()
    finally:
        logging.getLogger().setLevel(level)
    out = q.model.model
    left = [n.name for n in out.graph.node if n.op_type == "MatMul" and n.name in nodes]
    left += [n.name for n in out.graph.node if n.op_type == "MatMulNBits" and n.name.split("/")[0] + "/MatMul" in others]
    if left:
        raise QtaleError(f"MatMulNBits quantization skipped {len(left)} projections (e.g. {left[0]})")
    return out
