"""The two stages that write outside the run folder, into the repository: `ship` (the QTALE routers
and their theta tables into the package's pretrained/<model>/, with provenance, and the README's
results block) and `keep` (finished training runs into recipes/trained/, so a later session
continues without retraining). Nothing else in the experiment writes into the source tree."""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from .. import checkpoint
from ..errors import QtaleError
from ..safe_write import staging_dir
from . import report
from .layout import REPO, Run, need, read_json, train_done

KEPT_NOTE = ("trained by `qtale experiment` for this recipe; committed with --only keep (no optimizer "
             "state: finished runs only). The train stage of a new run folder starts from this copy.")
DROPPED_META = ("files", "unchecked", "files_sha256")  # the copy lists its own files


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _finished(run: Run, method: str, stage: str) -> tuple[Path, dict]:
    """A finished, intact training run of `method`: its folder and metadata."""
    src = run.train_dir(method)
    if not train_done(src, run.r["train"]["steps"]):
        hint = ": run the 'train' stage first" if stage == "ship" else ""
        raise QtaleError(f"{stage}: {src} has not finished training{hint}")
    meta = checkpoint.read_meta(src)
    checkpoint.verify_files(src, meta)
    return src, meta


def _copy_trained(src: Path, meta: dict, dest: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Copy a checkpoint's router weights, its LoRA adapter's safetensors + config (peft also writes
    a model-card README, left behind) and `extra` files into `dest`; returns the names copied."""
    names = [checkpoint.ROUTERS, *extra] + [k for k in meta["files"] if k.startswith(checkpoint.ADAPTER + "/")
                                            and k.endswith((".safetensors", ".json"))]
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, dest / name)
    return names


def _publish_copy(src: Path, meta: dict, dest: Path, extra: tuple[str, ...],
                  finish: Callable[[Path, dict, list[str]], None]) -> None:
    """Copy the trained files (+ `extra`) into a folder beside `dest`; `finish(tmp, meta_copy, names)`
    completes the copy's metadata and files; then it replaces `dest` in one step."""
    tmp = staging_dir(dest)
    try:
        names = _copy_trained(src, meta, tmp, extra)
        copied = {k: v for k, v in meta.items() if k not in DROPPED_META}
        finish(tmp, copied, names)
        checkpoint.replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stage_keep(run: Run) -> None:
    """Commit-sized copies of the finished training runs (router and LoRA weights, the trainer's
    state and log; no optimizer state), so a later session or machine continues the experiment
    without retraining."""
    from ..train import LOG, STATE

    def finish(tmp: Path, kept: dict, names: list[str]) -> None:
        shutil.copy2(src / LOG, tmp / LOG)
        kept["files"] = {k: checkpoint.file_sha256(tmp / k) for k in names}
        kept["unchecked"] = [LOG]
        kept["kept"] = KEPT_NOTE
        checkpoint.write_json_atomic(tmp / checkpoint.META, checkpoint.seal(kept))

    for method in run.trained():
        src, meta = _finished(run, method, "keep")
        dest = run.kept_dir(method)
        _publish_copy(src, meta, dest, (STATE,), finish)
        run.say(f"  kept {src} -> {dest}")


def recommended_ratio(res: dict) -> dict | None:
    """The default ratio of qtale-export for the shipped model, from the results: the lowest
    evaluated ratio below 1.0 (also above the headline's HEADLINE_MAX_RATIO: a user wants the
    cheapest ratio that keeps the accuracy) at which QTALE + INT4 is within CLOSE_POINTS of INT4
    all-layers (paired, task average); when none is, the one with the smallest gap, marked
    "within": false. None without QTALE + INT4 results."""
    rows = [{"ratio": e["target_ratio"], "gap_vs_quant_only": e["vs_quant_only"]["avg"]}
            for e in res.get("configs") or [] if e.get("kind") == "routed" and e.get("method") == "qtale"
            and str(e.get("format", "")).startswith("int4") and "vs_quant_only" in e
            and e.get("target_ratio") is not None and e["target_ratio"] < 1.0]
    if not rows:
        return None
    ok = [r for r in rows if r["gap_vs_quant_only"]["diff"] >= -report.CLOSE_POINTS / 100]
    best = min(ok, key=lambda r: r["ratio"]) if ok else max(rows, key=lambda r: (r["gap_vs_quant_only"]["diff"],
                                                                                 -r["ratio"]))
    return {"ratio": best["ratio"], "gap_vs_quant_only": best["gap_vs_quant_only"], "within": bool(ok),
            "rule": f"lowest evaluated ratio < 1 whose QTALE+INT4 task-average gap to INT4 all-layers is "
                    f">= -{report.CLOSE_POINTS:g} points (paired); if none is, the smallest gap",
            "subset": res.get("subset"), "limit": res.get("limit")}


def _provenance(run: Run, meta: dict, res: dict, results: Path) -> dict:
    """What the shipped routers were made from: recipe, training data and run, results."""
    calib = {fmt: read_json(run.calib_file("qtale", fmt))["table"]
             for fmt in run.r["quantization"]["formats"] if run.calib_file("qtale", fmt).is_file()}
    recipe_file = Path(run.r["recipe_file"])
    training = meta.get("training") or {}
    return {
        "what": "QTALE routers (router weights + theta table) and, when trained, the LoRA adapter for the "
                "embedded base model; no base weights",
        "method": "qtale", "base_model": meta["base_model"], "router": meta["router"],
        "recipe": {"file": os.path.relpath(recipe_file, REPO), "sha256": checkpoint.file_sha256(recipe_file),
                   "name": run.r["name"],
                   "extends": [{"file": os.path.relpath(f, REPO), "sha256": checkpoint.file_sha256(Path(f))}
                               for f in run.r.get("extends") or []]},
        "train": {**run.r["train"], "seed": run.r["seed"],
                  "data_sha256": training.get("data_sha256") or
                  {os.path.relpath(d, REPO): checkpoint.file_sha256(Path(d)) for d in run.r["train"]["data"]},
                  "steps_done": training.get("steps_done"), "final_losses": training.get("final_losses")},
        "theta_table_fp": meta["theta_table"],
        "theta_tables_after_quantization": calib,
        "results": {"file": "docs/results.json", "sha256": checkpoint.file_sha256(results),
                    "created": res.get("created"), "subset": res.get("subset"), "limit": res.get("limit"),
                    "headline": res.get("headline")},
        "command": run.command, "git_commit": _git_commit(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def stage_ship(run: Run) -> Path:
    """Copy the QTALE routers and their fp theta table (no optimizer state, no base weights) to
    `run.ship_dir` (default: the package's pretrained/<model>/, what load(<model>) picks up), with a
    provenance.json tying them to the recipe, the training run and docs/results.json."""
    from ..api import PRETRAINED
    from ..models import EMBEDDED

    if "qtale" not in run.r["methods"]:
        raise QtaleError("ship: the recipe trains no 'qtale' method")
    dest = run.ship_dir
    if dest is None:
        if run.r["model"] not in EMBEDDED:
            raise QtaleError(f"ship: {run.r['model']} is not an embedded model; pass --ship-dir")
        dest = PRETRAINED / run.r["model"]
    src, meta = _finished(run, "qtale", "ship")
    if not meta.get("theta_table"):
        raise QtaleError(f"ship: {src} is not calibrated: run the 'calibrate' stage first")
    results = run.docs / "results.json"
    need(results, "report")
    res = read_json(results)
    provenance = _provenance(run, meta, res, results)

    def finish(tmp: Path, shipped: dict, names: list[str]) -> None:
        shipped["files"] = {k: meta["files"][k] for k in names}
        shipped["unchecked"] = ["provenance.json"]  # written after qtale.json, it records its tables
        shipped["recommended"] = recommended_ratio(res)
        checkpoint.write_json_atomic(tmp / checkpoint.META, checkpoint.seal(shipped))
        checkpoint.write_json_atomic(tmp / "provenance.json", provenance)

    _publish_copy(src, meta, dest, (), finish)
    run.say(f"  shipped {src} -> {dest}")
    if dest == PRETRAINED / run.r["model"] and report.update_readme(REPO / "README.md", report.render_readme_block(
            res, provenance["results"]["sha256"])):
        run.say(f"  updated the results block of {REPO / 'README.md'}")
    return dest
