"""`qtale experiment RECIPE.yaml`: the command line over the stages (arguments, run folder, summary)."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ..errors import QtaleError
from ..validate import arg, positive_int
from . import report
from .layout import Run
from .recipe import load_recipe
from .stages import ON_REQUEST, STAGES


def add_experiment_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
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


def _command(args) -> str:
    """The command line as recorded in the results (the options that change what is computed)."""
    parts = ["qtale", "experiment", str(args.recipe)]
    for flag in ("out", "docs", "only", "limit"):
        value = getattr(args, flag, None)
        if value is not None and not (flag == "docs" and value == "docs"):
            parts += [f"--{flag}", str(value)]
    if getattr(args, "resume", False):
        parts.append("--resume")
    return " ".join(shlex.quote(p) for p in parts)


def run_experiment(args) -> dict:
    from rich.console import Console

    recipe = load_recipe(args.recipe)
    if getattr(args, "ship_dir", None) and args.only != "ship":
        raise QtaleError("--ship-dir goes with --only ship")
    if args.limit is not None:
        if args.limit <= 0:
            raise QtaleError(f"--limit must be a positive number of items, got {args.limit}")
        recipe["eval"]["limit"] = args.limit
    root = Path(args.out) if args.out else Path("runs") / recipe["name"]
    docs = Path(args.docs if args.docs is not None else "docs")
    console = Console(quiet=getattr(args, "json", False), highlight=False,
                      width=None if sys.stdout.isatty() else 140)
    run = Run(recipe, root, docs, progress=not getattr(args, "no_progress", False), console=console,
              command=_command(args))
    run.only_configs = [p.strip() for p in (getattr(args, "configs", None) or "").split(",") if p.strip()]
    run.ship_dir = Path(args.ship_dir) if getattr(args, "ship_dir", None) else None
    run.check_folder(args.resume, args.only)
    names = [args.only] if args.only else list(STAGES)
    t_all = time.time()
    outputs = {}
    for k, name in enumerate(names, 1):
        console.rule(f"[{k}/{len(names)}] {name}")
        outputs[name] = {**STAGES, **ON_REQUEST}[name](run)
    summary = {"run_dir": str(root), "stages": names, "seconds": round(time.time() - t_all, 2)}
    if outputs.get("ship") is not None:
        summary["shipped"] = str(outputs["ship"])
    res = outputs.get("report")
    if res is not None:
        report.print_report(run, res)
        summary.update({"results": str(docs / "results.json"), "markdown": str(docs / "results.md"),
                        "plot": str(docs / "results.png"), "headline": res["headline"]})
    return summary
