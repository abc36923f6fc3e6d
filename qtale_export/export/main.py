"""The export pipeline behind `qtale export` / `qtale-export` (arguments: cli/).

export_checkpoint(...) -> manifest raises QtaleError (one line) on bad input or a failed
verification. `qtale verify` is deploy/verify.py (torch-free) with export/verify.py's live reference.
"""
from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path

from .. import safe_write, validate
from ..deploy.precisions import TARGETS, precision as spec
from ..errors import QtaleError

OPS = ("standard", "plugin")
DEFAULT_OPSET = 21


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
    p = spec(precision)
    if ops not in OPS:
        raise QtaleError(f"unknown op set '{ops}' (choose from {', '.join(OPS)})")
    target = target or p.targets[0]
    if target not in TARGETS:
        raise QtaleError(f"unknown target '{target}' (choose from {', '.join(TARGETS)})")
    if target not in p.targets:  # e.g. FP8: ONNX Runtime on CPU has no FP8 matmul
        raise QtaleError(f"--precision {precision} needs --target {' or '.join(p.targets)}")
    lo, hi = p.min_opset, onnx.defs.onnx_opset_version()
    if not lo <= int(opset) <= hi:
        raise QtaleError(f"--opset {opset} is not supported for {precision} (use {lo}..{hi})")
    if out is None:
        raise QtaleError("--out DIR is required")
    safe_write.check_output(out, force=force)  # the kind and the sources are checked by the callers
    return precision, target


def export(model, out, *, checkpoint: str, ratio: float = 0.6, theta: float | None = None,
           precision: str | None = None, ops: str = "standard", target: str | None = None,
           opset: int = DEFAULT_OPSET, force: bool = False, decode_steps: int = 4,
           verify_thetas=None, allow_stale_theta: bool = False, reference: bool = True,
           trt_decode: str | None = None) -> dict:
    """Export a loaded RoutedModel to `out` (see docs/export.md); returns the manifest.
    A theta table calibrated on other weights (`model.theta_stale`, theta.py) is refused.
    reference False: no reference.npz (a smaller folder; `qtale verify` then needs PyTorch).
    trt_decode: the TensorRT decode graph's form (graphs.TRT_DECODE_FORMS; None: graphs.default_trt_decode)."""
    from ..deploy.manifest import write_manifest
    from . import graphs
    from .precision import make_weight_fn
    from .verify import store_reference, verify_export

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
    out = safe_write.check_output(out, force=force, sources=[checkpoint, getattr(model, "checkpoint_dir", None)],
                                  kind="export")
    t0 = time.time()
    w = graphs.extract(model)
    weight_fn = make_weight_fn(precision, target, w.quantized)
    tmp = safe_write.staging_dir(out)  # pid-tagged; becomes `out` only after the verification passed
    try:
        described = _write_graphs(w, tmp, precision=precision, ops=ops, target=target, opset=opset,
                                  weight_fn=weight_fn, trt_decode=trt_decode)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        # reference inputs + PyTorch outputs, so `qtale verify` works without PyTorch (Polygraphy)
        reference_entry = store_reference(tmp, model, precision, described, theta) if reference else None
        t_build = time.time() - t0
        data = _document(model, w, tmp, checkpoint=checkpoint, precision=precision, ops=ops, target=target,
                         opset=opset, ratio=ratio, theta=theta, graphs_desc=described, reference=reference_entry)
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
        safe_write.check_output(out, force=force, kind="export")  # it may have appeared meanwhile
        safe_write.publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data



def _write_graphs(w, tmp: Path, *, precision: str, ops: str, target: str, opset: int, weight_fn,
                  trt_decode: str | None) -> dict:
    """Build, check and write prefill.onnx and decode.onnx (one shared weights file) into `tmp`;
    returns their manifest descriptions."""
    import numpy as np
    import onnx

    from . import graphs
    from .precision import activation_dtype, ort_table
    from .trt_conformance import check as check_tensorrt_conformance
    from .weights import SharedWeights

    act = activation_dtype(precision)
    described = {}
    trt_decode = trt_decode or graphs.default_trt_decode(precision)
    if trt_decode not in graphs.TRT_DECODE_FORMS:
        raise QtaleError(f"unknown --trt-decode {trt_decode!r} (choose from {', '.join(graphs.TRT_DECODE_FORMS)})")
    builders = graphs.graph_builders(target, trt_decode)
    ort_form = target == "ort-cpu" and np.dtype(act) == np.float32  # ORT contrib ops, in-place KV
    if ort_form:
        table = ort_table(precision)  # the quantized embedding + LM head table, if the precision has one
        builders = (("prefill", functools.partial(graphs.build_prefill_ort, table_fn=table)),
                    ("decode", functools.partial(graphs.build_decode_ort, table_fn=table)))
    with SharedWeights(tmp) as store:  # both graphs point at one copy of the weights
        for kind, build in builders:
            m = build(w, ops, int(opset), act, weight_fn)
            onnx.checker.check_model(m)
            name = f"{kind}.onnx"
            described[kind] = {"file": name, "external_data": [store.name], **graphs.io_description(m)}
            if ort_form and kind == "decode":  # past.* may be bound as present.* (docs/export.md)
                described[kind]["kv_cache"] = "in-place"
            if target == "tensorrt" and kind == "decode":
                described[kind]["form"] = trt_decode
            store.save(m, tmp / name)
            del m
            if target == "tensorrt":  # what TensorRT documents, checked without TensorRT
                check_tensorrt_conformance(tmp / name)
    return described


def _document(model, w, tmp: Path, *, checkpoint: str, precision: str, ops: str, target: str, opset: int,
              ratio: float, theta: float, graphs_desc: dict, reference: dict | None) -> dict:
    """The manifest of the export being written in `tmp` (docs/export.md, deploy/manifest.py)."""
    import numpy as np
    import onnx
    import onnxruntime
    import torch
    import transformers

    from ..deploy.manifest import BYPRODUCTS, FORMAT, FORMAT_VERSION, checksums
    from .precision import activation_dtype, int4_group, int4_group_sizes

    s = w.spec
    embedding = spec(precision).embedding(target)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "base_model": dict(model.base_info),
        "checkpoint": str(Path(checkpoint).resolve()) if Path(checkpoint).exists() else str(checkpoint),
        "precision": precision, "ops": ops, "target": target, "opset": int(opset),
        "ratio": float(ratio), "theta": theta, "theta_table": model.theta_table,
        "theta_calibration": getattr(model, "theta_calibration", None),
        "router": model.router_config.to_dict(),
        "graphs": graphs_desc,
        "reference": reference,
        "model": {"num_layers": s.num_layers, "hidden": s.hidden, "heads": s.heads, "kv_heads": s.kv_heads,
                  "head_dim": s.head_dim, "vocab": s.vocab, "eos_token_id": s.eos_token_id,
                  "mlp_width": int(model.hf_config.intermediate_size),
                  "max_position_embeddings": int(getattr(model.hf_config, "max_position_embeddings", 0) or 0)
                  or None,
                  "routed_layers": s.routed, "keep_initial": s.keep_initial,
                  "activation_dtype": np.dtype(activation_dtype(precision)).name,
                  "weights": spec(precision).weights_op(target), "embedding": embedding,
                  # the int4 embedding / LM-head table's block (int4 ort-cpu and tensorrt exports)
                  "int4_block": int4_group(s.hidden, "embedding") if embedding == "int4" else None,
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

FALLBACK_RATIO = 0.6  # a checkpoint without a recommended ratio (one not shipped by the experiment)


def export_checkpoint(checkpoint: str, out, *, ratio: float | None = None, theta: float | None = None,
                      precision: str | None = None, ops: str = "standard", target: str | None = None,
                      opset: int = DEFAULT_OPSET, force: bool = False, decode_steps: int = 4,
                      allow_stale_theta: bool = False, reference: bool = True, trt_decode: str | None = None) -> dict:
    """Load `checkpoint` (folder or model name) and export it to `out`; the options are checked
    before the model is loaded. ratio None: the checkpoint's recommended ratio, else FALLBACK_RATIO."""
    check_options(ratio if ratio is not None else FALLBACK_RATIO, precision, ops, target, opset, out, force, theta)
    safe_write.check_output(out, force=force, sources=[checkpoint], kind="export")
    import qtale_export

    model = qtale_export.load(checkpoint)
    if ratio is None:  # the experiment's recommendation, recorded when the checkpoint shipped
        ratio = float((model.recommended or {}).get("ratio") or FALLBACK_RATIO)
    return export(model, out, checkpoint=checkpoint, ratio=ratio, theta=theta, precision=precision, ops=ops,
                  target=target, opset=opset, force=force, decode_steps=decode_steps,
                  allow_stale_theta=allow_stale_theta, reference=reference, trt_decode=trt_decode)
