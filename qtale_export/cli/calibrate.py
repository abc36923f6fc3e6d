"""`qtale calibrate CHECKPOINT --ratios ...`: theta per target execution ratio, into qtale.json."""
from __future__ import annotations

import argparse
import json

from .. import validate
from ..calibrate import TextCalibration, calibrate_checkpoint
from ..validate import arg
from .common import add_compute_arguments, print_table, ratios_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TextCalibration()
    p.add_argument("checkpoint", help="checkpoint folder (qtale train --out)")
    p.add_argument("--ratios", type=ratios_arg, default=[0.5, 0.6, 0.7, 0.8, 1.0],
                   help="comma-separated target execution ratios in (0, 1]")
    p.add_argument("--data", default=d.data, help="calibration text or JSON (default: built-in text)")
    p.add_argument("--seq-len", type=arg(validate.positive_int, "--seq-len"), default=d.seq_len)
    p.add_argument("--max-tokens", type=arg(validate.positive_int, "--max-tokens"), default=d.max_tokens)
    p.add_argument("--tol", type=arg(validate.positive, "--tol"), default=d.tol)
    add_compute_arguments(p)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    setting = TextCalibration(data=args.data, seq_len=args.seq_len, max_tokens=args.max_tokens, tol=args.tol)
    res = calibrate_checkpoint(args.checkpoint, args.ratios, setting, dtype=args.dtype, device=args.device)
    table = res["ratios"]
    if args.json:
        print(json.dumps({"ratios": table}))
    else:
        print_table(f"theta table of {args.checkpoint} ({res['tokens']} tokens of {res['data']})",
                    ["ratio", "theta", "realized"], [[k, v["theta"], v["realized"]] for k, v in table.items()])
    return 0
