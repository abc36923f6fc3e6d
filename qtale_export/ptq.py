"""Post-training quantization of a checkpoint: read calibration text, quantize a loaded model
(`quantize.py` owns the formats, grids and the model-level quantize/restore/fold), save it as a
new checkpoint and check that the reload reproduces the quantized logits. Above `api` (it loads
models), so `api` can restore a quantized checkpoint through `quantize` without a cycle.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, quantize, safe_write
from . import data as qdata
from .api import load
from .deploy.precisions import quant_format
from .errors import QtaleError


@dataclass
class QuantizeConfig:
    """One quantization of a checkpoint (the defaults of `qtale quantize` and recipes)."""
    format: str
    group_size: int | None = None  # None: choose_group's rule per layer
    calib_data: str | None = None  # None: the package's calibration text (AWQ only)
    calib_samples: int = 64
    calib_length: int = 512


def read_calibration(path: str | Path | None, samples: int) -> tuple[list[str], str]:
    """(texts, source): paragraphs of a text file or prompt+answer of instruction records."""
    if samples is None or samples <= 0:
        raise QtaleError(f"--calib-samples must be positive, got {samples}")
    p = Path(path) if path else qdata.CALIBRATION_TEXT
    src = qdata.read_source(p)
    if isinstance(src, str):
        texts = [t.strip() for t in re.split(r"\n\s*\n", src) if t.strip()]
        if len(texts) == 1:
            texts = [t.strip() for t in src.splitlines() if t.strip()]
    else:
        texts = [qdata.format_prompt(r["instruction"], r.get("input", "")) + str(r["output"]) for r in src]
    name = str(p) if path else f"qtale_export/data/{p.name} (built-in)"
    return texts[:samples], name


PROBE = "The weather today is calm, and the river runs slowly past the town."


def quantize_checkpoint(source: str | Path, out: str | Path, config: QuantizeConfig, *, verify: bool = True,
                        force: bool = False) -> dict:
    """Quantize the checkpoint (or model name) `source` into the new checkpoint folder `out`;
    returns the quantization description plus "out". Written and verified beside `out` (the
    reloaded checkpoint must reproduce the quantized logits exactly); it replaces an existing
    `out` (force) only once complete."""
    out = safe_write.check_output(out, force=force, sources=[source], kind="checkpoint")  # before any work
    model = load(source)
    if model.quantization_info:
        raise QtaleError(f"{source} is already quantized ({model.quantization_info.get('format')})")
    texts, calib_source = ([], None)
    if quant_format(config.format).algorithm == "awq_lite":  # the others are round-to-nearest
        texts, calib_source = read_calibration(config.calib_data, config.calib_samples)
    info = quantize.quantize(model, config.format, texts, model.tokenizer, config.group_size,
                    calib_source=calib_source, max_length=config.calib_length)
    result = {"out": str(out), **info}
    with safe_write.staged(out, force=force, sources=[source, getattr(model, "checkpoint_dir", None)],
                           kind="checkpoint") as tmp:
        checkpoint.save(model, tmp, quantization=info, extra_tensors=quantize.quantizer_tensors(model))
        if verify:
            probe = model.tokenizer([PROBE], return_tensors="pt")
            with torch.no_grad():
                ref = model(probe.input_ids, execute_all=True).logits
                again = load(tmp)(probe.input_ids, execute_all=True).logits
            if not torch.equal(ref, again):
                raise QtaleError(f"reloading {out} does not reproduce the quantized logits "
                                 f"(max diff {(ref - again).abs().max().item():.3g}); nothing was written")
            result["verified_identical_logits"] = True
    return result
