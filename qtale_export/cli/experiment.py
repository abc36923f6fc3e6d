"""`qtale experiment RECIPE.yaml`: QTALE vs D-LLM vs quantization-only from a recipe (experiment/)."""
from __future__ import annotations

import argparse

from ..experiment import ON_REQUEST, STAGES, ExperimentOptions, run_experiment
from ..validate import arg, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("recipe", help="experiment recipe (YAML), e.g. recipes/smollm2-135m.yaml")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<recipe name>)")
    parser.add_argument("--docs", default="docs", help="where results.json/.md/.png go (default: docs)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an existing run folder: finished stages are skipped")
    parser.add_argument("--only", choices=tuple(STAGES) + tuple(ON_REQUEST), default=None,
                        help="run one stage (its inputs must exist): " + ", ".join(STAGES) + "; or 'ship': "
                             "copy the trained QTALE routers into the package (qtale_export/pretrained/<model>/)")
    parser.add_argument("--ship-dir", default=None,
                        help="with --only ship: where the routers go (default: the package's pretrained/<model>/)")
    parser.add_argument("--limit", type=arg(positive_int, "--limit"), default=None,
                        help="evaluate only the first N items of every task (overrides the recipe's "
                             "eval.limit; results are marked as a subset run)")
    parser.add_argument("--configs", default=None,
                        help="eval stage: only these configuration ids, comma-separated shell patterns, in "
                             "this order (e.g. 'quant-only/*,qtale/int4-awq/0.6'); the report lists the rest "
                             "as pending")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    return parser


def run(args: argparse.Namespace) -> dict:
    return run_experiment(args.recipe, ExperimentOptions(
        out=args.out, docs=args.docs, resume=args.resume, only=args.only, ship_dir=args.ship_dir, limit=args.limit,
        configs=args.configs, progress=not args.no_progress, quiet=args.json))
