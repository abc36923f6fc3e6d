"""`qtale export` / `qtale verify` / `qtale-export`: argument parsing and the export pipeline.

run_export(args) -> dict and run_verify(args) -> dict raise QtaleError (one line) on bad input;
run_verify returns the report with "ok" false when out of tolerance (the CLI exits non-zero then).
"""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
import time
from pathlib import Path

from .. import safe_write, validate
from ..errors import QtaleError
from ..validate import arg
from .precision import PRECISIONS, TARGETS, min_opset

OPS = ("standard", "plugin")
DEFAULT_OPSET = 21


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("checkpoint", nargs="?", default="smollm2-135m",
                        help="QTALE checkpoint folder, HF model folder or embedded model name (default smollm2-135m)")
    parser.add_argument("--ratio", type=arg(validate.ratio, "--ratio"), default=None,
                        help="execution ratio whose calibrated theta becomes the default (0 < r <= 1; 1.0 = "
                             "theta 0; default: the checkpoint's recommended ratio, else 0.6)")
    parser.add_argument("--theta", type=arg(validate.theta, "--theta"), default=None,
                        help="default theta to record instead of the calibrated one for --ratio")
    parser.add_argument("--precision", default=None,
                        help=f"{'/'.join(PRECISIONS)} (default fp32, or the checkpoint's quantization format)")
    parser.add_argument("--ops", default="standard", help="standard (plain ONNX) or plugin (qtale TokenCompact/TokenScatter)")
    parser.add_argument("--target", default=None,
                        help="ort-cpu or tensorrt (default ort-cpu; tensorrt for fp8)")
    parser.add_argument("--out", required=False, default=None, help="export folder to create")
    parser.add_argument("--opset", type=arg(validate.positive_int, "--opset"), default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--decode-steps", type=arg(validate.positive_int, "--decode-steps"), default=4,
                        help="decode steps checked by the verification")
    parser.add_argument("--allow-stale-theta", action="store_true",
                        help="export a theta table calibrated on other weights (e.g. before quantization)")
    return parser


def add_verify_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("dir", help="export folder (with manifest.json)")
    parser.add_argument("--theta", type=arg(validate.theta, "--theta"), action="append", default=None,
                        help="theta in [0, 1] to check (repeatable; default: 0, the export's theta, 0.3, 0.7)")
    parser.add_argument("--decode-steps", type=arg(validate.positive_int, "--decode-steps"), default=None,
                        help="decode steps compared per theta (>= 1; default: those stored, 4 against live PyTorch)")
    parser.add_argument("--trt", action="store_true",
                        help="check the TensorRT engines recorded in the manifest instead of ONNX Runtime")
    parser.add_argument("--plugin-lib", default=None,
                        help="libqtale_trt_plugins.so for --trt (default: the library recorded with the engine)")
    parser.add_argument("--pytorch", action="store_true",
                        help="compare against the checkpoint run now in PyTorch instead of the stored reference")
    return parser


def _quant_precision(info: dict | None) -> str | None:
    from .precision import checkpoint_precision

    return checkpoint_precision(info)


def check_options(ratio, precision, ops, target, opset, out, force, theta=None) -> tuple[str, str]:
    """Validate the options (before any work); returns (precision, target) with defaults applied."""
    import onnx

    validate.ratio(ratio, "--ratio")
    if theta is not None:
        validate.theta(theta, "--theta")
    precision = precision or "fp32"
    if precision not in PRECISIONS:
        raise QtaleError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if ops not in OPS:
        raise QtaleError(f"unknown op set '{ops}' (choose from {', '.join(OPS)})")
    target = target or ("tensorrt" if precision == "fp8" else "ort-cpu")
    if target not in TARGETS:
        raise QtaleError(f"unknown target '{target}' (choose from {', '.join(TARGETS)})")
    if precision == "fp8" and target == "ort-cpu":
        raise QtaleError("--precision fp8 needs --target tensorrt (ONNX Runtime on CPU has no FP8 matmul)")
    lo, hi = min_opset(precision), onnx.defs.onnx_opset_version()
    if not lo <= int(opset) <= hi:
        raise QtaleError(f"--opset {opset} is not supported for {precision} (use {lo}..{hi})")
    if out is None:
        raise QtaleError("--out DIR is required")
    safe_write.check_output(out, force=force)
    return precision, target


def export(model, out, *, checkpoint: str, ratio: float = 0.6, theta: float | None = None,
           precision: str | None = None, ops: str = "standard", target: str | None = None,
           opset: int = DEFAULT_OPSET, force: bool = False, decode_steps: int = 4,
           verify_thetas=None, allow_stale_theta: bool = False) -> dict:
    """Export a loaded RoutedModel to `out` (see docs/export.md); returns the manifest.
    A theta table calibrated on other weights (`model.theta_stale`, theta.py) is refused."""
    import numpy as np
    import onnx
    import onnxruntime
    import torch
    import transformers

    from . import graphs
    from .manifest import BYPRODUCTS, FORMAT, FORMAT_VERSION, checksums, write_manifest
    from .precision import activation_dtype, int4_group, int4_group_sizes, make_weight_fn
    from .trt_conformance import check as check_tensorrt_conformance
    from .verify import store_reference, verify_export
    from .weights import SharedWeights

    qprec = _quant_precision(getattr(model, "quantization_info", None))
    if qprec and precision and precision != qprec:
        raise QtaleError(f"the checkpoint is quantized to {qprec}; export it with --precision {qprec}")
    precision, target = check_options(ratio, precision or qprec, ops, target, opset, out, force, theta)
    stale = getattr(model, "theta_stale", None)
    if stale and not allow_stale_theta:
        raise QtaleError(f"{checkpoint}: {stale}; run `qtale calibrate {checkpoint}` first "
                         "(or pass --allow-stale-theta)")
    if theta is None:
        theta = model.set_ratio(ratio)
    theta = float(theta)
    out = safe_write.check_output(out, force=force, sources=[checkpoint, getattr(model, "checkpoint_dir", None)])
    t0 = time.time()
    w = graphs.extract(model)
    s = w.spec
    weight_fn = make_weight_fn(precision, target, w.quantized)
    act = activation_dtype(precision)
    tmp = safe_write.staging_dir(out)  # pid-tagged; becomes `out` only after the verification passed
    try:
        described = {}
        builders = graphs.graph_builders(target)
        ort_form = target == "ort-cpu" and np.dtype(act) == np.float32  # ORT contrib ops, in-place KV
        if ort_form:
            bits = 4 if precision == "int4" else None  # int4 embedding / LM head table
            builders = (("prefill", functools.partial(graphs.build_prefill_ort, table_bits=bits)),
                        ("decode", functools.partial(graphs.build_decode_ort, table_bits=bits)))
        with SharedWeights(tmp) as store:  # both graphs point at one copy of the weights
            for kind, build in builders:
                m = build(w, ops, int(opset), act, weight_fn)
                onnx.checker.check_model(m)
                name = f"{kind}.onnx"
                described[kind] = {"file": name, "external_data": [store.name], **graphs.io_description(m)}
                if ort_form and kind == "decode":  # past.* may be bound as present.* (docs/export.md)
                    described[kind]["kv_cache"] = "in-place"
                store.save(m, tmp / name)
                del m
                if target == "tensorrt":  # what TensorRT documents, checked without TensorRT
                    check_tensorrt_conformance(tmp / name)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        # reference inputs + PyTorch outputs, so `qtale verify` works without PyTorch (Polygraphy)
        reference_entry = store_reference(tmp, model, precision, described, theta)
        t_build = time.time() - t0
        ckpt = str(Path(checkpoint).resolve()) if Path(checkpoint).exists() else str(checkpoint)
        eos = s.eos_token_id
        data = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "base_model": dict(model.base_info), "checkpoint": ckpt,
            "precision": precision, "ops": ops, "target": target, "opset": int(opset),
            "ratio": float(ratio), "theta": theta, "theta_table": model.theta_table,
            "theta_calibration": getattr(model, "theta_calibration", None),
            "router": model.router_config.to_dict(),
            "graphs": described,
            "reference": reference_entry,
            "model": {"num_layers": s.num_layers, "hidden": s.hidden, "heads": s.heads, "kv_heads": s.kv_heads,
                      "head_dim": s.head_dim, "vocab": s.vocab, "eos_token_id": eos,
                      "max_position_embeddings": int(getattr(model.hf_config, "max_position_embeddings", 0) or 0)
                      or None,
                      "routed_layers": s.routed, "keep_initial": s.keep_initial,
                      "activation_dtype": np.dtype(act).name,
                      "weights": {"int4": ("MatMulNBits" if target == "ort-cpu" else "DequantizeLinear"),
                                  "int8": "DequantizeLinear", "fp8": "DequantizeLinear"}.get(precision, "float"),
                      "embedding": "int4" if ort_form and precision == "int4" else "float",
                      # the int4 embedding / LM-head table's block (int4 ort-cpu exports only)
                      "int4_block": int4_group(s.hidden, "embedding") if ort_form and precision == "int4" else None,
                      # group size per layer type: a quantized checkpoint's own, or quantize's rule (int4)
                      "group_sizes": ((model.quantization_info or {}).get("group_size")
                                      or (int4_group_sizes(w) if precision == "int4" else None))},
            "files": checksums(tmp),
            "unchecked": BYPRODUCTS,
            "engines": [],
            "tools": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
            "verification": None,
        }
        write_manifest(tmp, data)
        t1 = time.time()
        report = verify_export(tmp, model=model, decode_steps=decode_steps, check_files=False,
                               thetas=verify_thetas)
        report["seconds"] = {"build": round(t_build, 2), "verify": round(time.time() - t1, 2)}
        data["verification"] = report
        write_manifest(tmp, data)
        if not report["ok"]:
            bad = next(c for c in report["cases"] if not c["ok"])
            raise QtaleError(f"verification failed ({precision}, {ops}): theta {bad['theta']}: "
                             f"max abs diff {bad.get('max_abs_diff')}, top-1 {bad.get('top1')}, "
                             f"exec agreement {bad.get('exec_agreement')}; nothing was written to {out}")
        safe_write.check_output(out, force=force)  # it may have appeared meanwhile
        safe_write.publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data


FALLBACK_RATIO = 0.6  # a checkpoint without a recommended ratio (one not shipped by the experiment)


def run_export(args) -> dict:
    precision, _ = check_options(args.ratio if args.ratio is not None else FALLBACK_RATIO,
                                 getattr(args, "precision", None), args.ops, args.target,
                                 args.opset, args.out, args.force, getattr(args, "theta", None))
    safe_write.check_output(args.out, force=args.force, sources=[args.checkpoint])
    import qtale_export

    model = qtale_export.load(args.checkpoint)
    ratio = args.ratio
    if ratio is None:  # the experiment's recommendation, recorded when the checkpoint shipped
        ratio = float((model.recommended or {}).get("ratio") or FALLBACK_RATIO)
    return export(model, args.out, checkpoint=args.checkpoint, ratio=ratio, theta=getattr(args, "theta", None),
                  precision=args.precision, ops=args.ops, target=args.target, opset=args.opset,
                  force=args.force, decode_steps=getattr(args, "decode_steps", 4),
                  allow_stale_theta=getattr(args, "allow_stale_theta", False))


def run_verify(args) -> dict:
    """Polygraphy against the stored reference outputs (see verify.verify_with_polygraphy)."""
    from .verify import verify_with_polygraphy

    for t in args.theta or []:
        validate.theta(t, "--theta")
    if args.decode_steps is not None:
        validate.positive_int(args.decode_steps, "--decode-steps")
    return verify_with_polygraphy(args.dir, thetas=args.theta, decode_steps=args.decode_steps,
                                  backend="tensorrt" if args.trt else "onnxrt", plugin_lib=args.plugin_lib,
                                  live=args.pytorch)


if __name__ == "__main__":  # python -m qtale_export.export.main: the same program as qtale-export
    from ..cli import export_main

    sys.exit(export_main())
