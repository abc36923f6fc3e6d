"""What a built TensorRT engine holds, from its layer information: layer types, the constants
(weights) each layer keeps and their data types, and the conditional jumps of lazy `If` layers;
and, from the serialized plan's bytes, the text it carries beside the weights (`plan_text`).

TensorRT gives layer information two ways: `IEngineInspector.get_engine_information(JSON)` on a
deserialized engine (needs a GPU), and the builder's own "Layers:" report, one line per layer,
logged at VERBOSE when the config's profiling verbosity is DETAILED (no GPU needed; what a
CPU-only TensorRT-RTX build gives). Both are read into the same records here; no TensorRT import.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from math import prod

# bits per element of TensorRT's DataType names as they appear in layer information
BITS = {"float": 32, "half": 16, "bfloat16": 16, "bf16": 16, "int8": 8, "fp8": 8, "e4m3": 8, "uint8": 8,
        "bool": 8, "int4": 4, "fp4": 4, "int32": 32, "int64": 64, "e8m0": 8}
LAYERS_HEADER = "Layers:"
BRANCH_MARK = "IfConditional"  # how compiled If branches name their layers
JUMP_TYPES = ("cjmp",)  # a conditional jump: the branch is skipped, not computed and selected


@dataclass
class Constant:
    name: str
    dtype: str
    dims: list[int]

    @property
    def bytes(self) -> int:
        return (prod(max(d, 0) for d in self.dims) * BITS.get(self.dtype.lower(), 0) + 7) // 8


@dataclass
class Layer:
    name: str
    type: str
    constants: list[Constant] = field(default_factory=list)


_FIELD = re.compile(r"(Name|LayerType): ([^,]*)")
_CONST = re.compile(r"\{ Name: ([^,]*), Dimensions: \[([-\d,]*)\],.*?Datatype: ([A-Za-z0-9]+)")


def _constants(line: str) -> list[Constant]:
    start = line.find("Constants: [")
    if start < 0:
        return []
    end = line.find("], Outputs:", start)
    block = line[start:end if end > 0 else len(line)]
    return [Constant(name, dtype, [int(d) for d in dims.split(",") if d])
            for name, dims, dtype in _CONST.findall(block)]


def parse_text(text: str) -> list[Layer]:
    """The builder's "Layers:" report (one `Name: ..., LayerType: ..., ...` line per layer)."""
    layers = []
    for line in text.splitlines():
        if not line.startswith("Name: "):
            continue
        fields = dict(_FIELD.findall(line[:line.find(", Inputs:")] if ", Inputs:" in line else line))
        layers.append(Layer(fields.get("Name", "").strip(), fields.get("LayerType", "").strip(), _constants(line)))
    return layers


def parse_json(text: str) -> list[Layer]:
    """`IEngineInspector` JSON (`{"Layers": [{"Name", "LayerType", "Constants": [...]}]}`)."""
    data = json.loads(text)
    layers = []
    for entry in data.get("Layers", []):
        if not isinstance(entry, dict):  # ProfilingVerbosity.LAYER_NAMES_ONLY gives names only
            layers.append(Layer(str(entry), ""))
            continue
        consts = [Constant(str(c.get("Name", "")), str(c.get("Datatype", c.get("Format/Datatype", ""))),
                           [int(d) for d in c.get("Dimensions", [])]) for c in entry.get("Constants", [])]
        layers.append(Layer(str(entry.get("Name", "")), str(entry.get("LayerType", "")), consts))
    return layers


def parse(text: str) -> list[Layer]:
    text = text.strip()
    if text.startswith("{"):
        return parse_json(text)
    if text.startswith(LAYERS_HEADER):
        text = text[len(LAYERS_HEADER):]
    return parse_text(text)


def summary(layers: list[Layer]) -> dict:
    """Counts that say what the engine computes and stores: layers by type, constant bytes by
    data type (each constant once, by name), and the lazy-conditional evidence: conditional
    jumps, and the layers and GEMMs that sit inside If branches (run only when the jump is not
    taken)."""
    seen: dict[str, Constant] = {}
    for layer in layers:
        for c in layer.constants:
            seen.setdefault(c.name, c)
    by_dtype: Counter = Counter()
    for c in seen.values():
        by_dtype[c.dtype] += c.bytes
    in_branch = [layer for layer in layers if BRANCH_MARK in layer.name]
    return {
        "layers": len(layers),
        "layer_types": dict(sorted(Counter(layer.type for layer in layers).items())),
        "constant_bytes": dict(sorted(by_dtype.items())),
        "largest_constants": [{"name": c.name, "dtype": c.dtype, "dims": c.dims, "bytes": c.bytes}
                              for c in sorted(seen.values(), key=lambda c: -c.bytes)[:4]],
        "conditional_jumps": sum(layer.type in JUMP_TYPES for layer in layers),
        "branch_layers": len(in_branch),
        "branch_gemms": sum(layer.type == "gemm" for layer in in_branch),
    }


def layers_report(messages: list[str]) -> str | None:
    """The builder's "Layers:" message among logged `messages`, if any."""
    return next((m for m in messages if m.startswith(LAYERS_HEADER)), None)


def weights_memory(messages: list[str]) -> int | None:
    """"Total Weights Memory: N bytes" from the builder's log."""
    for m in messages:
        match = re.search(r"Total Weights Memory: (\d+) bytes", m)
        if match:
            return int(match.group(1))
    return None


_TEXT_RUN = re.compile(rb"[\t\n\r\x20-\x7e]{1024,}")
KERNEL_MARK = b"__global__"


def plan_text(engine: bytes) -> dict:
    """The readable text inside a serialized plan: kernel source (runs holding `__global__`) and
    the rest (the compiler's graph and tensor descriptions), as runs of >= 1 KiB printable ASCII.

    Why: a TensorRT-RTX plan compiles its kernels on the device (JIT), so it ships each generated
    kernel as CUDA C source, every one with the same long prelude of helper templates. That text,
    not the weights, is what makes its engines larger than their quantized weights (docs/tensorrt.md);
    `source_unique_line_bytes` (each distinct source line once) shows how little of it differs.
    The plan format is not documented: this reads bytes, it does not parse the plan."""
    source = other = blobs = kernels = 0
    lines: set[bytes] = set()
    for match in _TEXT_RUN.finditer(engine):
        run = match.group()
        if KERNEL_MARK in run:
            source += len(run)
            blobs += 1
            kernels += run.count(KERNEL_MARK)
            lines.update(run.split(b"\n"))
        else:
            other += len(run)
    lines.discard(b"")
    return {"kernel_source_bytes": source, "kernel_sources": blobs, "kernels": kernels,
            "source_unique_line_bytes": sum(len(line) + 1 for line in lines), "other_text_bytes": other}


def to_json(layers: list[Layer], summary_: dict) -> str:
    """The layer report as JSON: the summary, then every layer with its constants."""
    return json.dumps({"summary": summary_, "layers": [
        {"name": layer.name, "type": layer.type,
         "constants": [{"name": c.name, "dtype": c.dtype, "dims": c.dims} for c in layer.constants]}
        for layer in layers]}, indent=1)
