"""Running a recipe: the stages in order over one run folder, and the summary (`qtale experiment`,
whose arguments live in cli/experiment.py)."""
from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import QtaleError
from . import report
from .layout import Run
from .recipe import load_recipe
from .stages import ON_REQUEST, STAGES


@dataclass
class ExperimentOptions:
    """How one recipe runs (`qtale experiment`'s options; the recipe says what is computed)."""
    out: str | None = None  # run folder; None: runs/<recipe name>
    docs: str = "docs"  # where results.json/.md/.png go
    resume: bool = False  # continue an existing run folder: finished stages are skipped
    only: str | None = None  # one stage of STAGES or ON_REQUEST
    ship_dir: str | None = None  # with only="ship": where the routers go
    limit: int | None = None  # first N items of every task (overrides the recipe's eval.limit)
    configs: str | None = None  # eval stage: comma-separated shell patterns of configuration ids
    progress: bool = True
    quiet: bool = False  # no console output (the CLI prints a JSON summary instead)


def _command(recipe, options: ExperimentOptions) -> str:
    """The command line as recorded in the results (the options that change what is computed)."""
    parts = ["qtale", "experiment", str(recipe)]
    for flag in ("out", "docs", "only", "limit"):
        value = getattr(options, flag)
        if value is not None and not (flag == "docs" and value == "docs"):
            parts += [f"--{flag}", str(value)]
    if options.resume:
        parts.append("--resume")
    return " ".join(shlex.quote(p) for p in parts)


def run_experiment(recipe_path, options: ExperimentOptions) -> dict:
    """Run the recipe's stages (or `options.only`); returns the summary (run folder, stages, results)."""
    from rich.console import Console

    recipe = load_recipe(recipe_path)
    if options.ship_dir and options.only != "ship":
        raise QtaleError("--ship-dir goes with --only ship")
    if options.limit is not None:
        if options.limit <= 0:
            raise QtaleError(f"--limit must be a positive number of items, got {options.limit}")
        recipe["eval"]["limit"] = options.limit
    root = Path(options.out) if options.out else Path("runs") / recipe["name"]
    docs = Path(options.docs if options.docs is not None else "docs")
    console = Console(quiet=options.quiet, highlight=False,
                      width=None if sys.stdout.isatty() else 140)
    run = Run(recipe, root, docs, progress=options.progress, console=console, command=_command(recipe_path, options))
    run.only_configs = [p.strip() for p in (options.configs or "").split(",") if p.strip()]
    run.ship_dir = Path(options.ship_dir) if options.ship_dir else None
    run.check_folder(options.resume, options.only)
    names = [options.only] if options.only else list(STAGES)
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
