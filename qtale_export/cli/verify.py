"""`qtale verify EXPORT_DIR`: an export against its stored PyTorch outputs (Polygraphy; no PyTorch)."""
from __future__ import annotations

import argparse
import json
import sys

from .. import validate
from ..deploy.verify import Cases, verify
from ..validate import arg
from .common import print_table, verification_rows


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
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
    parser.add_argument("--json", action="store_true")
    return parser


def live_reference(*args, **kwargs) -> Cases:
    """The PyTorch side's reference, computed now: imported only when asked for (`--pytorch`, or
    thetas / steps the stored reference does not hold), so `qtale verify` stays torch-free."""
    from ..export.verify import live_cases

    return live_cases(*args, **kwargs)


def verify_of(args: argparse.Namespace) -> dict:
    """The verification the arguments ask for; returns the report ("ok" false: out of tolerance)."""
    return verify(args.dir, thetas=args.theta, decode_steps=args.decode_steps,
                  backend="tensorrt" if args.trt else "onnxrt", plugin_lib=args.plugin_lib, live=args.pytorch,
                  live_cases=live_reference)


def run(args: argparse.Namespace) -> int:
    report = verify_of(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(f"verification of {args.dir}", ["check", "value"], verification_rows(report))
    if not report.get("ok", False):
        print(f"qtale verify: error: {args.dir} does not match PyTorch within tolerance", file=sys.stderr)
        return 1
    return 0
