"""The run folder: where every stage's artifacts live (`Run`), the configurations evaluated, and
the small atomic file helpers the stages write them with.

    runs/<name>/recipe.json             the frozen part of the recipe the folder was started with
    runs/<name>/train/<method>/         trained checkpoints (and train/reference with a task-loss LoRA)
    runs/<name>/calib/<method>-<fmt>.json   theta tables (fp: before quantization)
    runs/<name>/quant/<source>-<fmt>/   quantized checkpoints
    runs/<name>/layer_drop.json, timings.json
    docs/eval/<name>/<style>-limit<N>/  per-configuration results with per-item scores (committed)
    recipes/trained/<name>/<method>/    `--only keep`: committed copies of finished training runs
"""
from __future__ import annotations

import fnmatch
import gzip
import json
from pathlib import Path

from .. import safe_write
from ..errors import QtaleError
from ..deploy.theta import ratio_key

REPO = Path(__file__).resolve().parents[2]
FROZEN = ("model", "seed", "methods", "ratios", "train", "calibration", "quantization")
# keys added after run folders were first frozen, with the value that means "as before": a stored
# recipe without one of them still matches a recipe that gives it this value
ADDED_LATER = {"train": {"full_every": 0}}


# ---- files -----------------------------------------------------------------------------------
write_json = safe_write.write_json  # every file of a run is written whole or not at all


def write_text(path: Path, text: str) -> None:
    safe_write.write_bytes(path, text.encode())


def write_gz_json(path: Path, data) -> None:
    """Compressed JSON (per-item eval files are committed); mtime 0 keeps the bytes reproducible."""
    safe_write.write_bytes(path, gzip.compress(json.dumps(data, separators=(",", ":")).encode(), mtime=0))


def read_json(path: Path):
    try:
        if str(path).endswith(".gz"):
            return json.loads(gzip.decompress(Path(path).read_bytes()))
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise QtaleError(f"corrupt {path}: {str(exc).splitlines()[0]} (delete it to redo that step)") from None


def need(path: Path, stage: str) -> None:
    if not path.exists():
        raise QtaleError(f"{path} is missing: run the '{stage}' stage first")


def train_done(folder: Path, steps: int) -> bool:
    from ..train import STATE

    if not (folder / STATE).is_file():
        return False
    try:
        return json.loads((folder / STATE).read_text()).get("step", -1) >= steps
    except ValueError:
        return False


# ---- the run ---------------------------------------------------------------------------------
class Run:
    """Paths, recipe and console of one experiment run."""

    def __init__(self, recipe: dict, root: Path, docs: Path, progress: bool, console, command: str = ""):
        self.r = recipe
        self.root = root
        self.docs = docs
        self.progress = progress
        self.console = console
        self.command = command  # the command line recorded in the results and the shipped provenance
        self.ship_dir: Path | None = None  # --only ship: where the routers go (None: the package)
        self.lora = recipe["train"]["lora_rank"] > 0  # the routed models' weights differ from the base
        # Self-distillation's all-layers reference is the base itself (the teacher); only a task loss
        # with LoRA needs its own all-layers fine-tune to compare against.
        self.trained_reference = self.lora and recipe["train"]["loss"] != "distill"
        self.ref_name = "reference" if self.trained_reference else "base"
        self.timings_file = root / "timings.json"
        self.only_configs: list[str] = []
        self.pending: list[str] = []

    # where things live
    def train_dir(self, method: str) -> Path:
        return self.root / "train" / method

    def kept_dir(self, method: str) -> Path:
        """Where `--only keep` commits a finished training run of this recipe (routers + LoRA + log)."""
        return REPO / "recipes" / "trained" / self.r["name"] / method

    def ref_source(self) -> str:
        return str(self.train_dir("reference")) if self.trained_reference else self.r["model"]

    def quant_dir(self, src: str, fmt: str) -> Path:
        return self.root / "quant" / f"{src}-{fmt}"

    def calib_file(self, method: str, fmt: str) -> Path:
        return self.root / "calib" / f"{method}-{fmt}.json"

    def eval_dir(self) -> Path:
        """Per-configuration results with per-item scores, small and committed beside the report
        (docs/eval/<recipe>/...), so a run can be completed across sessions and machines."""
        ev = self.r["eval"]
        return self.docs / "eval" / self.r["name"] / f"{ev['style']}-limit{ev['limit'] if ev['limit'] else 'all'}"

    def eval_file(self, cid: str) -> Path:
        return self.eval_dir() / (cid.replace("/", "__") + ".json.gz")

    def partial_dir(self, cid: str) -> Path:
        """Finished tasks of a configuration still being evaluated (committed like the eval files, so a
        stopped session's next one continues with the task it was on)."""
        return self.eval_dir() / "partial" / cid.replace("/", "__")

    def read_partials(self, cid: str, key: dict) -> dict[str, dict]:
        """Finished task parts of `cid` evaluated with exactly this setting (`key`); others are ignored."""
        out = {}
        folder = self.partial_dir(cid)
        for f in sorted(folder.glob("*.json.gz")) if folder.is_dir() else []:
            part = read_json(f)
            if part.get("key") == key:
                out[part["task"]] = part
        return out

    def trained(self) -> list[str]:
        return list(self.r["methods"]) + (["reference"] if self.trained_reference else [])

    def quant_sources(self) -> list[tuple[str, str]]:
        """(name, source) of everything quantized: the all-layers reference and every trained method."""
        return [(self.ref_name, self.ref_source())] + [(m, str(self.train_dir(m))) for m in self.r["methods"]]

    def say(self, msg: str) -> None:
        self.console.print(msg)

    def selected(self, cid: str) -> bool:
        """--configs: evaluate only these configuration ids (shell-style patterns), in that order."""
        return not self.only_configs or any(fnmatch.fnmatchcase(cid, p) for p in self.only_configs)

    def rank(self, cid: str) -> int:
        """Position of the first --configs pattern that `cid` matches (the order the user asked for)."""
        return next(k for k, p in enumerate(self.only_configs) if fnmatch.fnmatchcase(cid, p))

    def timed(self, stage: str, seconds: float) -> None:
        timings = read_json(self.timings_file) if self.timings_file.is_file() else {}
        timings[stage] = round(timings.get(stage, 0.0) + seconds, 2)
        write_json(self.timings_file, timings)

    def check_folder(self, resume: bool, only: str | None) -> None:
        """A new folder records the frozen recipe; an existing one must have been started with it."""
        stored = self.root / "recipe.json"
        frozen = {k: self.r[k] for k in FROZEN}
        if stored.is_file():
            if not resume and only is None:
                raise QtaleError(f"run folder {self.root} exists: pass --resume to continue it "
                                 "(or --out another folder)")
            old = read_json(stored)
            for k in FROZEN:
                if isinstance(old.get(k), dict) and k in ADDED_LATER:
                    old[k] = {**ADDED_LATER[k], **old[k]}
                if old.get(k) != frozen[k]:
                    raise QtaleError(f"recipe key '{k}' differs from the one run folder {self.root} was "
                                     "started with; use another --out")
        else:
            write_json(stored, frozen)


# ---- configurations --------------------------------------------------------------------------
def _config(cid: str, kind: str, method: str | None, fmt: str, ratio: float | None, source,
            theta_from=None) -> dict:
    return {"id": cid, "kind": kind, "method": method, "format": fmt, "target_ratio": ratio,
            "source": str(source), "theta_from": None if theta_from is None else str(theta_from)}


def configurations(run: Run) -> list[dict]:
    """Every evaluated configuration: id, kind, method, format, target ratio, source, theta source."""
    formats = run.r["quantization"]["formats"]
    out = [_config("dense/fp", "dense", None, "fp", 1.0, run.ref_source())]
    for fmt in formats:
        out.append(_config(f"quant-only/{fmt}", "quant-only", None, fmt, 1.0, run.quant_dir(run.ref_name, fmt)))
    routed_formats = (["fp"] if run.r["eval"]["fp_routed"] else []) + formats
    for method in run.r["methods"]:
        for fmt in routed_formats:
            for ratio in run.r["ratios"]:
                source = run.train_dir(method) if fmt == "fp" else run.quant_dir(method, fmt)
                config = _config(f"{method}/{fmt}/{ratio_key(ratio)}", "routed", method, fmt, ratio, source,
                                 run.calib_file(method, fmt))
                if ratio >= 1.0 and not run.lora:
                    # theta 0 runs every layer and without LoRA the weights are the reference's:
                    # the same model as the all-layers one, evaluated once
                    config["same_as"] = "dense/fp" if fmt == "fp" else f"quant-only/{fmt}"
                out.append(config)
    baselines = run.r["eval"]["baselines"]
    for fmt in formats:
        if "dllm-fixed-theta" in baselines and "dllm" in run.r["methods"]:
            # D-LLM as published: P(execute) >= 0.5, whatever ratio that gives (no calibration)
            out.append(_config(f"dllm/{fmt}/theta0.5", "routed-fixed", "dllm", fmt, None, run.quant_dir("dllm", fmt)))
        if "layer-drop" in baselines:
            for ratio in run.r["ratios"]:
                if ratio < 1.0:
                    out.append(_config(f"layer-drop/{fmt}/{ratio_key(ratio)}", "layer-drop", None, fmt, ratio,
                                       run.quant_dir(run.ref_name, fmt)))
    return out
