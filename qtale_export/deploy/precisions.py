"""The precision registry: one record per quantization format (`qtale quantize --format`) and per
export precision (`qtale-export --precision`, `qtale build --precision`), torch-free.

Every fact about a format or a precision that more than one stage acts on lives here: bits, the
group rule, the tool, the export precision a format lowers to, the minimum opset, the targets it
may be exported for, the verification tolerances, and TensorRT's rules (the SM an engine needs,
whether Jetson Orin builds it, whether the embedding table is quantized). quantize.py, the
lowering (export/precision.py), both verifiers, the engine builder (deploy/tensorrt.py), eval and
the command lines read it; the grids and their lowering stay with their owners (quantize.py,
export/precision.py). Adding a precision: one `Precision` here (+ a `Format` when `qtale quantize`
makes it) and its lowering (docs/architecture.md, "Where to add").
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import QtaleError

TARGETS = ("ort-cpu", "tensorrt")


@dataclass(frozen=True)
class Tolerance:
    """Verification against PyTorch: max |logit diff| <= atol + rtol * max|logits| over real tokens,
    exec-mask mismatches within `tie` of theta are ties, top-1 agreement >= min_top1."""

    atol: float
    rtol: float
    tie: float
    min_top1: float


@dataclass(frozen=True)
class Precision:
    """An export precision: how the decoder projections' weights are stored in the graphs."""

    name: str
    bits: int  # weight bits (32 / 16: float)
    activation: str  # numpy dtype name of the activations and the KV cache
    min_opset: int
    targets: tuple[str, ...]  # the --target values it may be exported for (the first is the default)
    tolerance: Tolerance
    trt_min_sm: tuple[int, int] | None = None  # the SM a TensorRT engine of it needs (None: any)
    jetson: bool = True  # whether Jetson Orin (SM 8.7) builds it
    trt_table: bool = False  # the TensorRT form quantizes the embedding table (and the tied LM head)
    ort_table: bool = False  # the ort-cpu form stores embedding + LM head as one quantized table
    ort_weights: str = "DequantizeLinear"  # the ort-cpu form's quantized projection op

    @property
    def quantized(self) -> bool:
        """Whether the projections are stored quantized (verification then compares against the
        export's own dequantized weights, eval reports the quantization)."""
        return self.bits < 16

    def weights_op(self, target: str) -> str:
        """How the projections are stored: "float", "DequantizeLinear" or "MatMulNBits" (manifest model.weights)."""
        if not self.quantized:
            return "float"
        return self.ort_weights if target == "ort-cpu" else "DequantizeLinear"

    def embedding(self, target: str) -> str:
        """The embedding table's storage in an export for `target` (manifest model.embedding)."""
        quantized = self.trt_table if target == "tensorrt" else self.ort_table
        return self.name if quantized else "float"


@dataclass(frozen=True)
class Format:
    """A quantization format of `qtale quantize`: its grid and the export precision it lowers to."""

    name: str
    tool: str  # "modelopt" or "qtale-rtn" (computed here, INT3)
    bits: int
    granularity: str  # "group" (GROUPS rule) or "channel" (one scale per output channel)
    algorithm: str  # modelopt's calibration ("max", "awq_lite") or "rtn"
    precision: str  # the export precision of a checkpoint in this format
    dtype: str  # the stored codes' type, as qtale.json records it
    scale_bytes: int  # bytes per stored scale (fp16 for integer formats, fp32 for FP8, as TensorRT-LLM)
    float_bits: tuple[int, int] | None = None  # (exponent, mantissa) of a float format: modelopt's num_bits


# the group-size rule of the group formats and of a float checkpoint's int4 export: the first that
# divides a layer's input dimension (SmolLM2-135M: 576 -> 64, 1536 -> 128)
GROUPS = (128, 64)
_QUANT = Tolerance(atol=2e-3, rtol=1e-4, tie=1e-3, min_top1=0.98)  # vs the dequantized-weight PyTorch model

PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", 32, "float32", 18, TARGETS, Tolerance(1e-3, 0.0, 1e-4, 0.99)),
    Precision("fp16", 16, "float16", 18, TARGETS, Tolerance(0.0, 2e-2, 5e-2, 0.95)),  # vs fp32 PyTorch
    Precision("int4", 4, "float32", 21, TARGETS, _QUANT, trt_table=True, ort_table=True, ort_weights="MatMulNBits"),
    Precision("int8", 8, "float32", 18, TARGETS, _QUANT, ort_table=True),
    # ONNX Runtime on CPU has no FP8 matmul; FP8 tensor cores are Ada / Hopper and newer
    Precision("fp8", 8, "float32", 19, ("tensorrt",), _QUANT, trt_min_sm=(8, 9), jetson=False, trt_table=True),
)}

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("int4-awq", "modelopt", 4, "group", "awq_lite", "int4", "int4", 2),
    Format("int4", "modelopt", 4, "group", "max", "int4", "int4", 2),
    Format("int3", "qtale-rtn", 3, "group", "rtn", "int4", "int3", 2),  # lowered as int4 codes
    Format("int8", "modelopt", 8, "channel", "max", "int8", "int8", 2),
    Format("fp8", "modelopt", 8, "channel", "max", "fp8", "fp8_e4m3", 4, float_bits=(4, 3)),
)}


def precision(name: str) -> Precision:
    """The record of export precision `name`; a one-line QtaleError naming the choices otherwise."""
    if name not in PRECISIONS:
        raise QtaleError(f"unknown precision '{name}' (choose from {', '.join(PRECISIONS)})")
    return PRECISIONS[name]


def quant_format(name: str) -> Format:
    """The record of quantization format `name`; a one-line QtaleError naming the choices otherwise."""
    if name not in FORMATS:
        raise QtaleError(f"unknown quantization format '{name}' (choose from {', '.join(FORMATS)})")
    return FORMATS[name]


def parse_sm(text: str | None) -> tuple[int, int] | None:
    """'8.9' -> (8, 9); None or anything but MAJOR.MINOR -> None."""
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_tensorrt(name: str, jetson: bool, sm: str | None) -> None:
    """Whether TensorRT can build precision `name` for this device: Jetson Orin (SM 8.7) and GPUs
    below the precision's SM are refused with the precisions that do build."""
    p = precision(name)
    if p.trt_min_sm is None:
        return
    need = ".".join(map(str, p.trt_min_sm))
    others = [q.name for q in PRECISIONS.values() if q.trt_min_sm is None and q.quantized]
    if jetson and not p.jetson:
        raise QtaleError(f"{name.upper()} is not supported on Jetson Orin (SM 8.7): use --precision "
                         f"{' or '.join(others)}, or fp16")
    parsed = parse_sm(sm)
    if parsed is not None and parsed < p.trt_min_sm:
        raise QtaleError(f"{name.upper()} needs SM >= {need} but this GPU is SM {sm}: use --precision "
                         f"{' or '.join(others)}, or fp16")


def capable(name: str, sms: tuple[str, ...]) -> tuple[str, ...]:
    """The SM versions of `sms` that can run precision `name`."""
    need = precision(name).trt_min_sm
    return tuple(sm for sm in sms if need is None or (parse_sm(sm) or (0, 0)) >= need)
