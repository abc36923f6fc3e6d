"""`qtale export` / `qtale-export`: ONNX export of a routed checkpoint (export/main.py)."""
from __future__ import annotations

import argparse
import json

from .. import validate
from ..export.main import DEFAULT_OPSET, export_checkpoint
from ..deploy.precisions import PRECISIONS, TARGETS
from ..validate import arg
from .common import print_table, verification_rows


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
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
                        help=f"{' or '.join(TARGETS)} (default {TARGETS[0]}" + "".join(
                            f"; {p.targets[0]} for {p.name}" for p in PRECISIONS.values() if p.targets[0] != TARGETS[0])
                        + ")")
    parser.add_argument("--out", required=False, default=None, help="export folder to create")
    parser.add_argument("--opset", type=arg(validate.positive_int, "--opset"), default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--decode-steps", type=arg(validate.positive_int, "--decode-steps"), default=4,
                        help="decode steps checked by the verification")
    parser.add_argument("--allow-stale-theta", action="store_true",
                        help="export a theta table calibrated on other weights (e.g. before quantization)")
    parser.add_argument("--no-reference", action="store_true",
                        help="do not store reference.npz (PyTorch outputs for torch-free `qtale verify`, "
                             "~12 MB on the default model); verifying such an export later needs PyTorch")
    parser.add_argument("--trt-decode", choices=("if", "compact"), default=None,
                        help="--target tensorrt decode graph: 'if' skips a routed layer no row executes "
                             "(TensorRT conditional; batch 1: every skipped layer), 'compact' runs every layer "
                             "and selects (default: if; compact for int8, docs/tensorrt.md)")
    parser.add_argument("--json", action="store_true", help="print the manifest's verification as JSON")
    return parser


def export_of(args: argparse.Namespace) -> dict:
    """The export the arguments ask for; returns its manifest."""
    return export_checkpoint(args.checkpoint, args.out, ratio=args.ratio, theta=args.theta,
                             precision=args.precision, ops=args.ops, target=args.target, opset=args.opset,
                             force=args.force, decode_steps=args.decode_steps,
                             allow_stale_theta=args.allow_stale_theta, reference=not args.no_reference,
                             trt_decode=args.trt_decode)


def run(args: argparse.Namespace) -> int:
    manifest = export_of(args)
    report = manifest.get("verification", {})
    if args.json:
        print(json.dumps({"out": str(args.out), "verification": report}))
    else:
        print_table(f"exported {args.out} ({manifest.get('precision')}, {manifest.get('ops')} ops)",
                    ["check", "value"], verification_rows(report))
    return 0
