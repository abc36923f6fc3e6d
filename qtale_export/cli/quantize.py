"""`qtale quantize CHECKPOINT --format F --out DIR`: a quantized copy of a checkpoint (ptq.py)."""
from __future__ import annotations

import argparse

from .. import validate
from ..ptq import QuantizeConfig, quantize_checkpoint
from ..deploy.precisions import FORMATS
from ..validate import arg


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("checkpoint", help="QTALE checkpoint folder or model name (unquantized)")
    parser.add_argument("--format", required=True, choices=list(FORMATS), dest="format",
                        help="weight format of the decoder layers")
    parser.add_argument("--out", required=True, help="output checkpoint folder (not the source)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --out (once the new one is complete)")
    parser.add_argument("--group-size", type=arg(validate.positive_int, "--group-size"), default=None,
                        help="group size for int4/int4-awq/int3 (default: 128 where the input "
                             "dimension allows, else 64)")
    parser.add_argument("--calib-data", default=None,
                        help="calibration text (.txt: one sample per paragraph/line) or instruction "
                             "JSON (LLM-Adapters records); default: the package's calibration text")
    parser.add_argument("--calib-samples", type=arg(validate.positive_int, "--calib-samples"),
                        default=QuantizeConfig.calib_samples,
                        help="calibration samples (default %(default)s)")
    parser.add_argument("--calib-length", type=arg(validate.positive_int, "--calib-length"),
                        default=QuantizeConfig.calib_length,
                        help="max tokens per sample (default %(default)s)")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading the output to compare logits")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def run(args: argparse.Namespace) -> dict:
    """The arguments as a QuantizeConfig; one summary line unless --json (then the registry prints the dict)."""
    config = QuantizeConfig(format=args.format, group_size=args.group_size, calib_data=args.calib_data,
                            calib_samples=args.calib_samples, calib_length=args.calib_length)
    result = quantize_checkpoint(args.checkpoint, args.out, config, verify=not args.no_verify, force=args.force)
    if not args.json:
        wb = result["weight_bytes"]
        print(f"{result['out']}: {config.format} ({result['quantizer']}, {result['algorithm']}), groups "
              f"{result['group_size']}, {wb['quantized'] / 2**20:.2f} MiB vs {wb['fp16'] / 2**20:.2f} MiB fp16 "
              f"({wb['bits_per_weight']} bits/weight)")
    return result
