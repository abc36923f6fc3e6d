"""`qtale pipeline`: run.sh's main job, a QTALE checkpoint through the deployment path (pipeline.py)."""
from __future__ import annotations

import argparse

from .. import validate
from ..validate import arg


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ..pipeline import PROMPT

    parser.add_argument("--model", default="smollm2-135m",
                        help="QTALE checkpoint folder or embedded model name (default: the shipped smollm2-135m)")
    parser.add_argument("--out", type=arg(validate.output_folder, "--out"), default="runs/deploy",
                        help="where every stage's output goes (default %(default)s)")
    parser.add_argument("--ratio", type=arg(validate.ratio, "--ratio"), default=0.6,
                        help="execution ratio of the export (default %(default)s)")
    parser.add_argument("--other-ratio", type=arg(validate.ratio, "--other-ratio"), default=0.8,
                        help="a second ratio to generate at, on the same export (default %(default)s)")
    parser.add_argument("--prompt", default=PROMPT,
                        help="the prompt of the dial's demonstration, generated at 1.0, --other-ratio and --ratio "
                             "through the model's chat template (default %(default)r)")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..pipeline import run as run_pipeline

    run_pipeline(args.out, model=args.model, ratio=args.ratio, other_ratio=args.other_ratio, prompt=args.prompt)
    return 0
