"""`qtale experiment RECIPE.yaml`: QTALE vs D-LLM vs quantization-only, end to end, from a recipe.

Stages (each writes its artifacts atomically under the run folder `runs/<recipe name>/` and is skipped
when its output exists; training itself resumes through train's --resume):

  train        routers for every method (qtale, dllm) with the same data, steps, seed (and LoRA if
               used); with LoRA also the all-layers reference (LoRA trained with target ratio 1.0,
               lambda1 = lambda2 = 0). Without LoRA the all-layers reference is the base model itself.
  calibrate    theta for the recipe's ratios on every trained (unquantized) checkpoint
  quantize     every trained checkpoint and the all-layers reference, in every format of the recipe
  recalibrate  theta again on every quantized checkpoint (post-training ratio control; the same for
               QTALE and D-LLM, so both are compared at the same realized ratio); the drift of the
               unquantized thetas on the quantized model is recorded
  eval         every configuration: dense all-layers (fp), quant-only all-layers per format,
               D-LLM + quant and QTALE + quant at each ratio: per-task accuracy with per-item scores,
               realized ratio, FLOPs fraction, perplexity and KL to the dense fp model
  report       docs/results.json, docs/results.md, docs/results.png (see docs/experiment.md)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import tempfile
import time
from argparse import Namespace
from datetime import datetime, timezone
from pathlib import Path

from .errors import QtaleError
from . import theta as theta_policy
from .theta import check_ratio
from .safe_write import tmp_prefix
from .validate import arg, positive_int

STAGES = ("train", "calibrate", "quantize", "recalibrate", "eval", "report")
SCHEMA = "qtale-results/1"
REPO = Path(__file__).resolve().parents[1]
METHODS = ("qtale", "dllm")
CLOSE_POINTS = 0.5  # "gap closed": within 0.5 accuracy points of the quant-only all-layers model
HEADLINE_MAX_RATIO = 0.7  # the claim: QTALE+INT4 within CLOSE_POINTS of INT4 all-layers at ratio <= 0.7

# recipe keys -> defaults (None under REQUIRED means the key must be given)
TRAIN_KEYS = {  # passed to TrainConfig; model, out, method and seed come from elsewhere
    "data": None, "steps": None, "loss": "auto", "batch_size": 4, "grad_accum": 1, "lr": 1e-3,
    "weight_decay": 0.0, "seq_len": 256, "target_ratio": 0.5, "lambda1": 1.0, "lambda1_warmup": 0,
    "lambda2": 0.1, "tau": 1.0, "lora_rank": 0, "save_every": 50, "max_examples": None,
    "first_routed_layer": 2, "keep_initial": 2, "router_hidden": 64, "lora_lr": None, "dtype": "float32",
}
CALIB_KEYS = {"data": "", "seq_len": 256, "max_tokens": 4096, "tol": 0.01}
QUANT_KEYS = {"formats": None, "calib_data": "", "calib_samples": 64, "calib_length": 512, "group_size": None}
EVAL_KEYS = {"tasks": None, "style": "harness", "limit": None, "batch_size": 64, "batch_tokens": 4096,
             "dtype": "float32", "ppl": True, "ppl_file": "", "ppl_tokens": None, "fp_routed": False,
             "baselines": []}
BASELINES = ("dllm-fixed-theta", "layer-drop")  # D-LLM at its own operating point; static layer removal
TOP_KEYS = {"name", "model", "seed", "methods", "ratios", "train", "calibration", "quantization", "eval",
            "description"}
REQUIRED = ("name", "model", "train", "ratios", "quantization", "eval")


# ---- small utilities -------------------------------------------------------------------------
def _key(r: float) -> str:
    """Theta-table key of a ratio (the policy's spelling, theta.py)."""
    return theta_policy.ratio_key(r)


def _lookup(table: dict, r: float) -> dict | None:
    return theta_policy.lookup(table, r)


def _write_json(path: Path, data) -> None:
    from .checkpoint import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path), dir=path.parent)  # pid-tagged: swept if killed
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_gz_json(path: Path, data) -> None:
    """Compressed JSON, written beside and renamed into place (per-item eval files are committed)."""
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(json.dumps(data, separators=(",", ":")).encode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path):
    try:
        if str(path).endswith(".gz"):
            import gzip

            return json.loads(gzip.decompress(Path(path).read_bytes()))
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise QtaleError(f"corrupt {path}: {str(exc).splitlines()[0]} (delete it to redo that step)") from None


def _check_ratio(value) -> float:
    try:
        return check_ratio(value)
    except QtaleError as exc:
        raise QtaleError(f"recipe: {exc}") from None


# ---- the recipe ------------------------------------------------------------------------------
def _section(recipe: dict, name: str, keys: dict) -> dict:
    given = recipe.get(name) or {}
    if not isinstance(given, dict):
        raise QtaleError(f"recipe: '{name}' must be a mapping")
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise QtaleError(f"recipe: unknown key '{name}.{unknown[0]}' (known: {', '.join(keys)})")
    out = {}
    for k, default in keys.items():
        if k in given:
            out[k] = given[k]
        elif default is None and k in ("data", "steps", "formats", "tasks"):
            raise QtaleError(f"recipe: missing required key '{name}.{k}'")
        else:
            out[k] = default
    return out


def _resolve_data(value: str, recipe_dir: Path, what: str) -> str:
    from .corpus import CORPORA, PREFIX, is_corpus

    if is_corpus(value):
        if str(value)[len(PREFIX):] not in CORPORA:
            raise QtaleError(f"recipe: unknown {what} corpus '{value}' (known: "
                             f"{', '.join(PREFIX + k for k in CORPORA)})")
        return str(value)
    p = Path(os.path.expanduser(str(value)))
    tried = [p] if p.is_absolute() else [recipe_dir / p, REPO / p, Path.cwd() / p]
    for cand in tried:
        if cand.is_file():
            return str(cand.resolve())
    raise QtaleError(f"recipe: {what} '{value}' not found (looked in {', '.join(str(t) for t in tried)})")


def load_recipe(path: str | os.PathLike) -> dict:
    """Read, validate and resolve a recipe (defaults filled in, data paths made absolute)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise QtaleError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise QtaleError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise QtaleError(f"recipe {path} must be a YAML mapping")
    for k in REQUIRED:
        if k not in raw or raw[k] in (None, "", []):
            raise QtaleError(f"recipe: missing required key '{k}'")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise QtaleError(f"recipe: unknown key '{unknown[0]}' (known: {', '.join(sorted(TOP_KEYS))})")
    name = str(raw["name"])
    if not name or "/" in name or name.startswith("."):
        raise QtaleError(f"recipe: invalid name '{name}' (a folder name under runs/)")
    here = path.resolve().parent
    train = _section(raw, "train", TRAIN_KEYS)
    data = train["data"] if isinstance(train["data"], list) else [train["data"]]
    if not data:
        raise QtaleError("recipe: 'train.data' lists no files")
    train["data"] = [_resolve_data(d, here, "training data") for d in data]
    for k in ("steps", "batch_size", "grad_accum", "seq_len", "lora_rank", "save_every", "lambda1_warmup"):
        low = 0 if k in ("lora_rank", "lambda1_warmup") else 1
        if not isinstance(train[k], int) or isinstance(train[k], bool) or train[k] < low:
            raise QtaleError(f"recipe: 'train.{k}' must be an integer >= {low}, got {train[k]!r}")
    if train["dtype"] not in ("float32", "bfloat16"):
        raise QtaleError(f"recipe: 'train.dtype' must be float32 or bfloat16, got {train['dtype']!r}")
    if train["lora_lr"] is not None:
        train["lora_lr"] = float(train["lora_lr"])
    for k in ("lr", "lambda1", "lambda2", "tau", "weight_decay", "target_ratio"):
        try:
            train[k] = float(train[k])
        except (TypeError, ValueError):
            raise QtaleError(f"recipe: 'train.{k}' must be a number, got {train[k]!r}") from None
    _check_ratio(train["target_ratio"])
    if train["loss"] not in ("auto", "task", "distill"):
        raise QtaleError(f"recipe: unknown train.loss '{train['loss']}' (task, distill or auto)")
    methods = raw.get("methods", list(METHODS))
    if not isinstance(methods, list) or not methods:
        raise QtaleError("recipe: 'methods' must be a list (qtale, dllm)")
    for m in methods:
        if m not in METHODS:
            raise QtaleError(f"recipe: unknown method '{m}' (qtale or dllm)")
    if not isinstance(raw["ratios"], list):
        raise QtaleError("recipe: 'ratios' must be a list of execution ratios in (0, 1]")
    ratios = sorted({_check_ratio(r) for r in raw["ratios"]})
    calib = _section(raw, "calibration", CALIB_KEYS)
    if calib["data"]:
        calib["data"] = _resolve_data(calib["data"], here, "calibration data")
    quant = _section(raw, "quantization", QUANT_KEYS)
    from .quantize import FORMATS

    fmts = quant["formats"] if isinstance(quant["formats"], list) else [quant["formats"]]
    if not fmts:
        raise QtaleError("recipe: 'quantization.formats' lists no format")
    for f in fmts:
        if f not in FORMATS:
            raise QtaleError(f"recipe: unknown quantization format '{f}' (choose from {', '.join(FORMATS)})")
    quant["formats"] = list(dict.fromkeys(fmts))
    if quant["calib_data"]:
        quant["calib_data"] = _resolve_data(quant["calib_data"], here, "quantization calibration data")
    ev = _section(raw, "eval", EVAL_KEYS)
    from .tasks import SCIQ, STYLES, parse_tasks

    if ev["dtype"] not in ("float32", "bfloat16"):
        raise QtaleError(f"recipe: 'eval.dtype' must be float32 or bfloat16, got {ev['dtype']!r}")
    for b in ev["baselines"] or []:
        if b not in BASELINES:
            raise QtaleError(f"recipe: unknown eval baseline '{b}' (choose from {', '.join(BASELINES)})")
    ev["baselines"] = list(ev["baselines"] or [])
    ev["tasks"] = parse_tasks(ev["tasks"])
    if ev["style"] not in STYLES:
        raise QtaleError(f"recipe: unknown eval.style '{ev['style']}' (choose from {', '.join(STYLES)})")
    if ev["limit"] is not None and (not isinstance(ev["limit"], int) or ev["limit"] <= 0):
        raise QtaleError(f"recipe: 'eval.limit' must be null or a positive integer, got {ev['limit']!r}")
    if ev["ppl_file"] and ev["ppl_file"] != SCIQ:
        ev["ppl_file"] = _resolve_data(ev["ppl_file"], here, "perplexity text")
    if ev["ppl_tokens"] is not None and (not isinstance(ev["ppl_tokens"], int) or ev["ppl_tokens"] < 2):
        raise QtaleError(f"recipe: 'eval.ppl_tokens' must be null or an integer >= 2, got {ev['ppl_tokens']!r}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise QtaleError(f"recipe: 'seed' must be an integer, got {seed!r}")
    return {"name": name, "description": raw.get("description", ""), "model": str(raw["model"]),
            "seed": seed, "methods": list(dict.fromkeys(methods)), "ratios": ratios, "train": train,
            "calibration": calib, "quantization": quant, "eval": ev, "recipe_file": str(path)}


# ---- the run ---------------------------------------------------------------------------------
class Run:
    """Paths, recipe and console of one experiment run."""

    def __init__(self, recipe: dict, root: Path, docs: Path, progress: bool, console):
        self.r = recipe
        self.root = root
        self.docs = docs
        self.progress = progress
        self.console = console
        self.lora = recipe["train"]["lora_rank"] > 0  # the routed models' weights differ from the base
        # Self-distillation's all-layers reference is the base itself (the teacher); only a task loss
        # with LoRA needs its own all-layers fine-tune to compare against.
        self.trained_reference = self.lora and recipe["train"]["loss"] != "distill"
        self.ref_name = "reference" if self.trained_reference else "base"
        self.timings_file = root / "timings.json"
        self.only_configs: list[str] = []

    # where things live
    def train_dir(self, m: str) -> Path:
        return self.root / "train" / m

    def ref_source(self) -> str:
        return str(self.train_dir("reference")) if self.trained_reference else self.r["model"]

    def quant_dir(self, src: str, fmt: str) -> Path:
        return self.root / "quant" / f"{src}-{fmt}"

    def calib_file(self, m: str, fmt: str) -> Path:
        return self.root / "calib" / f"{m}-{fmt}.json"

    def eval_dir(self) -> Path:
        """Per-configuration results with per-item scores, small and committed beside the report
        (docs/eval/<recipe>/...), so a run can be completed across sessions and machines."""
        ev = self.r["eval"]
        return self.docs / "eval" / self.r["name"] / f"{ev['style']}-limit{ev['limit'] if ev['limit'] else 'all'}"

    def trained(self) -> list[str]:
        return list(self.r["methods"]) + (["reference"] if self.trained_reference else [])

    def say(self, msg: str) -> None:
        self.console.print(msg)

    def selected(self, cid: str) -> bool:
        """--configs: evaluate only these configuration ids (shell-style patterns), in that order."""
        import fnmatch

        return not self.only_configs or any(fnmatch.fnmatchcase(cid, p) for p in self.only_configs)

    def timed(self, stage: str, seconds: float) -> None:
        t = _read_json(self.timings_file) if self.timings_file.is_file() else {}
        t[stage] = round(t.get(stage, 0.0) + seconds, 2)
        _write_json(self.timings_file, t)


def _train_done(folder: Path, steps: int) -> bool:
    from .train import STATE

    if not (folder / STATE).is_file():
        return False
    try:
        return json.loads((folder / STATE).read_text()).get("step", -1) >= steps
    except ValueError:
        return False


def _copy_trained(src: Path, meta: dict, dest: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Copy a checkpoint's router weights, its LoRA adapter's safetensors + config (peft also writes
    a model-card README, left behind) and `extra` files into `dest`; returns the names copied."""
    import shutil

    from . import checkpoint

    names = [checkpoint.ROUTERS, *extra] + [k for k in meta["files"] if k.startswith(checkpoint.ADAPTER + "/")
                                            and k.endswith((".safetensors", ".json"))]
    for k in names:
        (dest / k).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / k, dest / k)
    return names


def kept_dir(run: Run, m: str) -> Path:
    """Where `--only keep` commits a finished training run of this recipe (routers + LoRA + log)."""
    return REPO / "recipes" / "trained" / run.r["name"] / m


KEPT_NOTE = ("trained by `qtale experiment` for this recipe; committed with --only keep (no optimizer "
             "state: finished runs only). The train stage of a new run folder starts from this copy.")


def stage_keep(run: Run) -> None:
    """Commit-sized copies of the finished training runs (router and LoRA weights, the trainer's
    state and log; no optimizer state), so a later session or machine continues the experiment
    without retraining."""
    import shutil

    from . import checkpoint
    from .safe_write import staging_dir
    from .train import LOG, STATE

    for m in run.trained():
        src = run.train_dir(m)
        if not _train_done(src, run.r["train"]["steps"]):
            raise QtaleError(f"keep: {src} has not finished training")
        meta = checkpoint.read_meta(src)
        checkpoint.verify_files(src, meta)
        dest = kept_dir(run, m)
        tmp = staging_dir(dest)
        try:
            names = _copy_trained(src, meta, tmp, (STATE,))
            shutil.copy2(src / LOG, tmp / LOG)
            kept = {k: v for k, v in meta.items() if k not in ("files", "unchecked", "files_sha256")}
            kept["files"] = {k: checkpoint.file_sha256(tmp / k) for k in names}
            kept["unchecked"] = [LOG]
            kept["kept"] = KEPT_NOTE
            checkpoint.write_json_atomic(tmp / checkpoint.META, checkpoint.seal(kept))
            checkpoint.replace_dir(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        run.say(f"  kept {src} -> {dest}")


def stage_train(run: Run) -> None:
    import shutil

    from .train import STATE, TrainConfig, train

    t = run.r["train"]
    for m in run.trained():
        out = run.train_dir(m)
        kept = kept_dir(run, m)
        if not out.exists() and _train_done(kept, t["steps"]):
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(kept, out)
            run.say(f"  train {m}: from the committed run {kept}")
        if _train_done(out, t["steps"]):
            run.say(f"  train {m}: done ({out})")
            continue
        kw = dict(t)
        method = m
        if m == "reference":  # LoRA fine-tuned the same way, every layer wanted: no ratio/entropy pull
            method, kw["target_ratio"], kw["lambda1"], kw["lambda2"] = "dllm", 1.0, 0.0, 0.0
        cfg = TrainConfig(model=run.r["model"], out=str(out), method=method, seed=run.r["seed"], **kw)
        resume = (out / STATE).is_file()
        run.say(f"  train {m}: {'resuming' if resume else 'starting'} ({t['steps']} steps) -> {out}")
        t0 = time.time()
        train(cfg, resume=resume, force=out.exists() and not resume, progress=run.progress)
        run.timed(f"train.{m}", time.time() - t0)


def _calib_batches(run: Run, tokenizer):
    from .data import CALIBRATION_TEXT, text_batches

    c = run.r["calibration"]
    data = Path(c["data"]) if c["data"] else CALIBRATION_TEXT
    batches = text_batches(data, tokenizer, c["seq_len"], 4, c["max_tokens"])
    return batches, data, int(sum(int(b["attention_mask"].sum()) for b in batches))


def _need(path: Path, stage: str) -> None:
    if not path.exists():
        raise QtaleError(f"{path} is missing: run the '{stage}' stage first")


def stage_calibrate(run: Run) -> None:
    from . import checkpoint
    from .api import load_checkpoint
    from .calibrate import calibrate

    batches = None
    for m in run.r["methods"]:
        marker = run.calib_file(m, "fp")
        if marker.is_file():
            run.say(f"  calibrate {m} (fp): done")
            continue
        folder = run.train_dir(m)
        _need(folder / checkpoint.META, "train")
        t0 = time.time()
        model = load_checkpoint(folder)
        if batches is None:
            batches, data, tokens = _calib_batches(run, model.tokenizer)
        table = calibrate(model, batches, run.r["ratios"], tol=run.r["calibration"]["tol"],
                          progress=run.progress)
        checkpoint.update_meta(folder, theta_table=model.theta_table,
                               calibration={"data": data.name, "tokens": tokens, "tol": run.r["calibration"]["tol"]})
        _write_json(marker, {"method": m, "format": "fp", "table": table, "data": str(data), "tokens": tokens,
                             "seconds": round(time.time() - t0, 2)})
        run.say(f"  calibrate {m} (fp): " + ", ".join(f"{k}: theta {v['theta']:.4f}" for k, v in table.items()))
        run.timed("calibrate", time.time() - t0)


def _quant_sources(run: Run) -> list[tuple[str, str]]:
    """(name, source) of everything quantized: the all-layers reference and every trained method."""
    return [(run.ref_name, run.ref_source())] + [(m, str(run.train_dir(m))) for m in run.r["methods"]]


def stage_quantize(run: Run) -> None:
    from . import checkpoint
    from .quantize import run_quantize

    q = run.r["quantization"]
    for name, src in _quant_sources(run):
        if name != "base":
            _need(Path(src) / checkpoint.META, "train")
        for fmt in q["formats"]:
            out = run.quant_dir(name, fmt)
            if (out / checkpoint.META).is_file() and (checkpoint.read_meta(out).get("quantization") or {}).get("format") == fmt:
                run.say(f"  quantize {name} -> {fmt}: done")
                continue
            t0 = time.time()
            run.say(f"  quantize {name} -> {fmt}")
            args = Namespace(checkpoint=src, format=fmt, out=str(out), group_size=q["group_size"],
                             calib_data=q["calib_data"] or None, calib_samples=q["calib_samples"],
                             calib_length=q["calib_length"], no_verify=False, json=True,
                             force=True)  # the run folder's own stale result (another format) is replaced
            run_quantize(args)
            run.timed("quantize", time.time() - t0)


def stage_recalibrate(run: Run) -> None:
    from . import checkpoint
    from .api import load_checkpoint
    from .calibrate import calibrate, realized_ratio

    batches = None
    for m in run.r["methods"]:
        fp = run.calib_file(m, "fp")
        _need(fp, "calibrate")
        fp_table = _read_json(fp)["table"]
        for fmt in run.r["quantization"]["formats"]:
            marker = run.calib_file(m, fmt)
            if marker.is_file():
                run.say(f"  recalibrate {m} ({fmt}): done")
                continue
            folder = run.quant_dir(m, fmt)
            _need(folder / checkpoint.META, "quantize")
            t0 = time.time()
            model = load_checkpoint(folder)
            if batches is None:
                batches, data, tokens = _calib_batches(run, model.tokenizer)
            drift = {}
            for r in run.r["ratios"]:
                entry = _lookup(fp_table, r)
                if r < 1.0 and entry is not None:
                    drift[_key(r)] = {"theta_fp": entry["theta"], "realized_fp": entry["realized"],
                                      "realized_at_theta_fp": round(realized_ratio(model, batches, entry["theta"]), 6)}
            model.theta_table = {}
            table = calibrate(model, batches, run.r["ratios"], tol=run.r["calibration"]["tol"],
                              progress=run.progress)
            checkpoint.update_meta(folder, theta_table=model.theta_table,
                                   calibration={"data": data.name, "tokens": tokens,
                                                "tol": run.r["calibration"]["tol"], "after_quantization": True})
            _write_json(marker, {"method": m, "format": fmt, "table": table, "drift": drift, "data": str(data),
                                 "tokens": tokens, "seconds": round(time.time() - t0, 2)})
            run.say(f"  recalibrate {m} ({fmt}): " + ", ".join(
                f"{k}: theta {v['theta']:.4f}" + (f" (fp theta gave {drift[k]['realized_at_theta_fp']:.3f})"
                                                  if k in drift else "") for k, v in table.items()))
            run.timed("recalibrate", time.time() - t0)


# ---- configurations --------------------------------------------------------------------------
def configurations(run: Run) -> list[dict]:
    """Every evaluated configuration: id, kind, method, format, target ratio, source, theta source."""
    out = [{"id": "dense/fp", "kind": "dense", "method": None, "format": "fp", "target_ratio": 1.0,
            "source": run.ref_source(), "theta_from": None}]
    for fmt in run.r["quantization"]["formats"]:
        out.append({"id": f"quant-only/{fmt}", "kind": "quant-only", "method": None, "format": fmt,
                    "target_ratio": 1.0, "source": str(run.quant_dir(run.ref_name, fmt)), "theta_from": None})
    fmts = (["fp"] if run.r["eval"]["fp_routed"] else []) + run.r["quantization"]["formats"]
    for m in run.r["methods"]:
        for fmt in fmts:
            for r in run.r["ratios"]:
                c = {"id": f"{m}/{fmt}/{_key(r)}", "kind": "routed", "method": m, "format": fmt, "target_ratio": r,
                     "source": str(run.train_dir(m) if fmt == "fp" else run.quant_dir(m, fmt)),
                     "theta_from": str(run.calib_file(m, fmt))}
                if r >= 1.0 and not run.lora:
                    # theta 0 runs every layer and without LoRA the weights are the reference's:
                    # the same model as the all-layers one, evaluated once
                    c["same_as"] = "dense/fp" if fmt == "fp" else f"quant-only/{fmt}"
                out.append(c)
    base = run.r["eval"]["baselines"]
    for fmt in run.r["quantization"]["formats"]:
        if "dllm-fixed-theta" in base and "dllm" in run.r["methods"]:
            # D-LLM as published: P(execute) >= 0.5, whatever ratio that gives (no calibration)
            out.append({"id": f"dllm/{fmt}/theta0.5", "kind": "routed-fixed", "method": "dllm", "format": fmt,
                        "target_ratio": None, "source": str(run.quant_dir("dllm", fmt)), "theta_from": None})
        if "layer-drop" in base:
            for r in run.r["ratios"]:
                if r < 1.0:
                    out.append({"id": f"layer-drop/{fmt}/{_key(r)}", "kind": "layer-drop", "method": None,
                                "format": fmt, "target_ratio": r, "source": str(run.quant_dir(run.ref_name, fmt)),
                                "theta_from": None})
    return out


def _theta(run: Run, c: dict) -> float:
    if c["kind"] == "routed-fixed":
        return 0.5
    if c["kind"] != "routed" or c["target_ratio"] >= 1.0:
        return 0.0
    path = Path(c["theta_from"])
    _need(path, "recalibrate" if c["format"] != "fp" else "calibrate")
    try:
        return theta_policy.theta_for(_read_json(path)["table"], c["target_ratio"], "exact")
    except QtaleError as exc:
        raise QtaleError(f"{path}: {exc}; delete it and re-run calibration") from None


def _eval_file(run: Run, cid: str) -> Path:
    return run.eval_dir() / (cid.replace("/", "__") + ".json.gz")


def _load_model(source: str, dtype: str = "float32"):
    from .api import load

    return load(source, fresh=True, dtype=dtype, fold=True)


def _dropped_layers(run: Run, ratio: float) -> list[int]:
    """The static baseline's removed layers at `ratio`: block influence of the dense fp base on the
    calibration text, computed once per run (layer_drop.json)."""
    from .layer_drop import block_influence, layers_to_drop

    f = run.root / "layer_drop.json"
    if not f.is_file():
        base = _load_model(run.ref_source())
        batches, data, tokens = _calib_batches(run, base.tokenizer)
        infl = block_influence(base, batches)
        _write_json(f, {"influence": {str(k): v for k, v in infl.items()}, "data": str(data), "tokens": tokens,
                        "measure": "mean 1 - cos(layer input, layer output), all layers executed"})
    infl = {int(k): v for k, v in _read_json(f)["influence"].items()}
    return layers_to_drop(infl, ratio)


def stage_eval(run: Run) -> None:
    from . import evaluate as E
    from .tasks import heldout_text

    ev = run.r["eval"]
    todo = []
    for c in configurations(run):
        if c.get("same_as") or not run.selected(c["id"]):
            continue
        f = _eval_file(run, c["id"])
        if f.is_file() and _read_json(f).get("tasks_requested") == ev["tasks"]:
            continue
        todo.append(c)
    done = len([c for c in configurations(run) if not c.get("same_as") and run.selected(c["id"])]) - len(todo)
    if done:
        run.say(f"  eval: {done} configuration(s) done")
    if not todo:
        return
    for t in ev["tasks"]:  # fail on missing data before any compute
        E.load_docs(t, 1)
    ppl_text = None
    if ev["ppl"]:
        ppl_text, ppl_source = heldout_text(ev["ppl_file"])
    reference = None
    if run.only_configs:  # the order the user asked for: the most wanted results land first
        import fnmatch

        rank = lambda c: next(k for k, p in enumerate(run.only_configs) if fnmatch.fnmatchcase(c["id"], p))  # noqa: E731
        todo.sort(key=rank)
    by_source: dict[str, list[dict]] = {}
    for c in todo:
        by_source.setdefault(c["source"], []).append(c)
    for source, cs in by_source.items():
        if not (Path(source).exists() or source == run.r["model"]):
            raise QtaleError(f"{source} is missing: run the 'quantize' stage first")
        model = _load_model(source, ev["dtype"])
        for c in cs:
            theta = _theta(run, c)
            dropped = _dropped_layers(run, c["target_ratio"]) if c["kind"] == "layer-drop" else None
            model.static_skip = frozenset(dropped) if dropped is not None else None
            run.say(f"  eval {c['id']}  theta={theta:.4f}" + (f"  dropped layers {dropped}" if dropped else ""))
            t0 = time.time()
            res = E.evaluate_tasks(model, ev["tasks"], style=ev["style"], limit=ev["limit"],
                                   batch_size=ev["batch_size"], theta=theta, progress=run.progress,
                                   batch_tokens=ev["batch_tokens"])
            out = {**c, "theta": theta, "tasks_requested": ev["tasks"], "style": ev["style"], "limit": ev["limit"],
                   "dtype": ev["dtype"], "dropped_layers": dropped, **res}
            if ppl_text is not None:
                dense = c["id"] == "dense/fp"  # its own all-layers pass is the reference
                if reference is None and not dense:
                    reference = _load_model(run.ref_source(), ev["dtype"])
                pk = E.perplexity_and_kl(model, ppl_text, theta=theta, reference=None if dense else reference,
                                         max_tokens=ev["ppl_tokens"])
                out.update(pk)
                out["ppl_file"] = ppl_source
                out["kl_reference"] = "dense/fp (all layers, unquantized)"
            model.static_skip = None
            out["seconds_total"] = round(time.time() - t0, 2)
            _write_gz_json(_eval_file(run, c["id"]), out)
            run.timed("eval", time.time() - t0)
        del model


# ---- statistics and the report ---------------------------------------------------------------
def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if not n:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def paired(items_a: dict, items_b: dict, tasks: list[str]) -> dict:
    """Paired difference a - b of the primary metric on the same items, per task and averaged."""
    from .tasks import PRIMARY

    per = {}
    for t in tasks:
        metric = PRIMARY[t]
        a = {it["idx"]: it[metric] for it in items_a.get(t, [])}
        b = {it["idx"]: it[metric] for it in items_b.get(t, [])}
        common = sorted(set(a) & set(b))
        d, se = _mean_se([a[i] - b[i] for i in common])
        per[t] = {"diff": d, "stderr": se, "n": len(common), "metric": metric}
    diffs = [per[t]["diff"] for t in tasks]
    avg = {"diff": sum(diffs) / len(diffs), "stderr": math.sqrt(sum(per[t]["stderr"] ** 2 for t in tasks)) / len(tasks)}
    return {"tasks": per, "avg": avg}


def _summary(res: dict, tasks: list[str]) -> dict:
    from .tasks import AVG7, PRIMARY

    prim = [res["tasks"][t][PRIMARY[t]] for t in tasks]
    ses = [res["tasks"][t][PRIMARY[t].replace("acc_norm", "acc_norm") + "_stderr"] for t in tasks]
    out = {"avg": sum(prim) / len(prim), "avg_stderr": math.sqrt(sum(s * s for s in ses)) / len(ses),
           "avg_tasks": len(tasks)}
    if all(t in tasks for t in AVG7):
        out["avg7"] = sum(res["tasks"][t][PRIMARY[t]] for t in AVG7) / len(AVG7)
    return out


RESULT_FIELDS = ("realized_ratio", "flops_fraction", "tokens", "ppl", "nll", "kl", "ppl_tokens",
                 "ppl_realized_ratio", "ppl_flops_fraction", "kl_reference", "seconds", "seconds_total")


def collect(run: Run) -> tuple[list[dict], dict[str, dict]]:
    """Every configuration's result (without per-item scores) and the per-item scores by id."""
    tasks = run.r["eval"]["tasks"]
    results, items = [], {}
    cfgs = configurations(run)
    raw = {}
    for c in cfgs:
        if c.get("same_as"):
            continue
        f = _eval_file(run, c["id"])
        if f.is_file():
            raw[c["id"]] = _read_json(f)
    if not raw:
        raise QtaleError(f"no evaluation results in {run.eval_dir()}: run the 'eval' stage first")
    run.pending = [c["id"] for c in cfgs if (c.get("same_as") or c["id"]) not in raw]
    for c in cfgs:
        if (c.get("same_as") or c["id"]) not in raw:
            continue
        src = raw[c.get("same_as") or c["id"]]
        items[c["id"]] = src["items"]
        entry = {k: c[k] for k in ("id", "kind", "method", "format", "target_ratio")}
        entry["theta"] = 0.0 if c.get("same_as") else src["theta"]
        entry["same_as"] = c.get("same_as")
        entry["tasks"] = src["tasks"]
        entry.update(_summary(src, tasks))
        entry.update({k: src[k] for k in RESULT_FIELDS if k in src})
        entry["layer_ratio"] = src.get("layer_ratio")
        results.append(entry)
    ids = {e["id"]: e for e in results}
    for e in results:
        if e["kind"] == "quant-only" and "dense/fp" in items:
            e["vs_dense"] = paired(items[e["id"]], items["dense/fp"], tasks)
        if e["kind"] in ("routed", "routed-fixed", "layer-drop"):
            ref = "dense/fp" if e["format"] == "fp" else f"quant-only/{e['format']}"
            if ref in items:
                e["vs_quant_only" if e["format"] != "fp" else "vs_dense"] = {
                    "reference": ref, **paired(items[e["id"]], items[ref], tasks)}
            other = f"dllm/{e['format']}/{_key(e['target_ratio'])}" if e["target_ratio"] else None
            if e["method"] == "qtale" and other in ids:
                e["vs_dllm"] = {"reference": other, **paired(items[e["id"]], items[other], tasks)}
        if "vs_dense" in e and "reference" not in e["vs_dense"]:
            e["vs_dense"] = {"reference": "dense/fp", **e["vs_dense"]}
    return results, items


def headline(run: Run, results: list[dict]) -> dict:
    ids = {e["id"]: e for e in results}
    fmts = run.r["quantization"]["formats"]
    out: dict = {"units": "accuracy fractions (x100 = points); gap = paired difference in the task average"}
    int4 = next((f for f in fmts if f.startswith("int4")), None)
    if int4 and "qtale" in run.r["methods"]:
        rows = []
        for r in run.r["ratios"]:
            if r > HEADLINE_MAX_RATIO:
                continue
            q = ids.get(f"qtale/{int4}/{_key(r)}")
            if not q or "vs_quant_only" not in q:
                continue
            row = {"ratio": r, "realized_ratio": q.get("realized_ratio"), "avg": q["avg"],
                   "gap_vs_quant_only": q["vs_quant_only"]["avg"]}
            if "vs_dllm" in q:
                row["gap_vs_dllm"] = q["vs_dllm"]["avg"]
            rows.append(row)
        out[f"qtale_{int4}_at_ratio_le_{HEADLINE_MAX_RATIO:g}"] = rows
    for f in fmts:
        if not f.startswith("int3"):
            continue
        for m in run.r["methods"]:
            if not any(f"{m}/{f}/{_key(r)}" in ids for r in run.r["ratios"]):
                continue  # not evaluated yet: no claim either way
            closes = None
            for r in run.r["ratios"]:
                e = ids.get(f"{m}/{f}/{_key(r)}")
                if e and "vs_quant_only" in e and e["vs_quant_only"]["avg"]["diff"] >= -CLOSE_POINTS / 100:
                    closes = r
                    break
            out[f"{m}_{f}_gap_closes_at_ratio"] = closes
    out["close_threshold_points"] = CLOSE_POINTS
    return out


def _machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _pct(x, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def _diff(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{100 * d['diff']:+.2f} ± {100 * d['stderr']:.2f}"


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def render_headline(res: dict) -> list[str]:
    """The headline section's bullet lines (results.md, the console report, the README block)."""
    h = res["headline"]
    lines = []
    for k, v in h.items():
        if isinstance(v, list):
            for row in v:
                s = (f"- QTALE+{k.split('_')[1]} at ratio {row['ratio']:g} (realized {_fmt(row['realized_ratio'], '.3f')}): "
                     f"{_pct(row['avg'])} points; gap vs quant-only all-layers {_diff(row['gap_vs_quant_only'])}")
                if "gap_vs_dllm" in row:
                    s += f"; vs D-LLM at the same ratio {_diff(row['gap_vs_dllm'])}"
                lines.append(s)
        elif k.endswith("_gap_closes_at_ratio"):
            m, f = k.split("_")[:2]
            lines.append(f"- {m.upper() if m == 'qtale' else 'D-LLM'}+{f}: gap to quant-only all-layers within "
                         f"{h['close_threshold_points']} points from ratio "
                         + (f"{v:g}" if v is not None else "— never (at the ratios evaluated)"))
    return lines


def _sizes(res: dict) -> str:
    return ", ".join(f"{t} {n}" for t, n in (res.get("validation_sizes") or {}).items())


def render_markdown(res: dict) -> str:
    from .tasks import PRIMARY

    tasks = res["tasks"]
    avg_name = "avg7" if len(tasks) == 7 and res["configs"] and "avg7" in res["configs"][0] else f"avg{len(tasks)}"
    lines = [f"# QTALE experiment results: {res['recipe']['name']}", "",
             "Generated by `qtale experiment` from `docs/results.json`; do not edit by hand.", ""]
    if res.get("subset"):
        lines += [f"**Subset run: every task limited to its first {res['limit']} validation items "
                  f"(full validation sets: {_sizes(res)}).** Standard errors and paired differences are those of "
                  "the subset.", ""]
    lines += ["Command:", "", "```bash", res["command"], "```", "",
              f"Model `{res['recipe']['model']}`; methods {', '.join(res['recipe']['methods'])}; "
              f"ratios {', '.join(str(r) for r in res['recipe']['ratios'])}; formats "
              f"{', '.join(res['recipe']['quantization']['formats'])}; prompt style `{res['style']}`; "
              f"tasks {', '.join(tasks)} (primary metric: " + ", ".join(f"{t} {PRIMARY[t]}" for t in tasks) + ").",
              "", f"All-layers reference: {res['reference']}", "",
              "Accuracies in points (%). Δ = paired difference on the same items vs the all-layers model of the "
              "same format (quant-only; dense fp for fp rows), ± its standard error. theta re-calibrated after "
              "quantization for both routed methods.", "",
              "| configuration | target ratio | realized ratio | FLOPs frac. | " + " | ".join(tasks)
              + f" | {avg_name} | Δ vs all-layers | Δ vs D-LLM | ppl | KL |",
              "|" + "---|" * (len(tasks) + 9)]
    for e in res["configs"]:
        delta = e.get("vs_quant_only") or e.get("vs_dense")
        cells = [e["id"] + (f" (= {e['same_as']})" if e.get("same_as") else ""),
                 "—" if e["target_ratio"] is None else f"{e['target_ratio']:g}",
                 _fmt(e.get("realized_ratio")), _fmt(e.get("flops_fraction"))]
        cells += [_pct(e["tasks"][t][PRIMARY[t]], 1) for t in tasks]
        cells += [_pct(e.get("avg7", e["avg"])), _diff(delta["avg"] if delta else None),
                  _diff(e["vs_dllm"]["avg"] if e.get("vs_dllm") else None),
                  _fmt(e.get("ppl"), ".3f"), _fmt(e.get("kl"), ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    if res.get("pending"):
        lines += [f"**Not evaluated yet ({len(res['pending'])} configurations):** "
                  + ", ".join(f"`{p}`" for p in res["pending"]) + ". `qtale experiment RECIPE --resume "
                  "--only eval` adds them (per-configuration files under `docs/eval/`).", ""]
    lines += ["", "## Headline", ""] + [f"- **{x}**" for x in res.get("training_ratio_failures") or []]
    lines += render_headline(res)
    lines += ["", "## Calibration after quantization", "",
              "| method | format | ratio | theta (fp) | realized (fp) | realized on the quantized model at theta (fp) "
              "| theta (re-calibrated) | realized |", "|---|---|---|---|---|---|---|---|"]
    for m, per in res["calibration"].items():
        for fmt, c in per.items():
            if fmt == "fp":
                continue
            for k, v in sorted(c["table"].items(), key=lambda kv: float(kv[0])):
                d = c.get("drift", {}).get(k, {})
                lines.append(f"| {m} | {fmt} | {k} | {_fmt(d.get('theta_fp'))} | {_fmt(d.get('realized_fp'))} | "
                             f"{_fmt(d.get('realized_at_theta_fp'))} | {v['theta']:.4f} | {v['realized']:.4f} |")
    lines += ["", "## Training", "", "| run | steps | seconds | final losses |", "|---|---|---|---|"]
    for m, t in res["training"].items():
        lines.append(f"| {m} | {t.get('steps_done')} | {_fmt(t.get('seconds'), '.0f')} | "
                     + ", ".join(f"{k} {v:.4g}" for k, v in (t.get("final_losses") or {}).items()) + " |")
    lines += ["", "## Recipe", "", "```json", json.dumps(res["recipe"], indent=2), "```", "",
              "## Timings (seconds, this machine)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in res["timings"].items()]
    lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in res["machine"].items()]
    lines += ["", f"Created {res['created']}. Plot: `results.png`. Every number: `results.json`.", ""]
    return "\n".join(lines)


def render_plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = res["configs"]
    fmts = res["recipe"]["quantization"]["formats"]
    colors = {f: c for f, c in zip(["fp"] + fmts, ["black", "tab:blue", "tab:red", "tab:green", "tab:purple",
                                                   "tab:orange"])}
    n = len(res["tasks"])
    label = "avg7" if n == 7 else f"average of {n} tasks"
    # accuracy (left) and KL to the dense model (right): at a few hundred items per task accuracy
    # differences are noisy, KL on the same held-out tokens is the sensitive measure
    fig, (ax, kx) = plt.subplots(1, 2, figsize=(13, 5))
    has_kl = any(e.get("kl") is not None for e in cfgs)
    for e in cfgs:
        if e["kind"] == "dense":
            ax.axhline(100 * e["avg"], color="black", lw=1.2, label="dense all-layers (fp)")
        elif e["kind"] == "quant-only":
            c = colors.get(e["format"], "gray")
            ax.axhline(100 * e["avg"], color=c, lw=1, ls=":", label=f"{e['format']} all-layers (quant-only)")
            ax.plot([e.get("realized_ratio") or 1.0], [100 * e["avg"]], marker="*", color=c, ms=10, ls="none")
            if e.get("kl") is not None:
                kx.axhline(e["kl"], color=c, lw=1, ls=":", label=f"{e['format']} all-layers (quant-only)")
    def xpos(e):  # the compute the configuration spends, relative to the dense model
        return e.get("flops_fraction") or e.get("realized_ratio") or e["target_ratio"] or 1.0

    series = [(f"{'QTALE' if m == 'qtale' else 'D-LLM'} + {{fmt}}", marker, ls,
               lambda e, m=m: e["kind"] == "routed" and e["method"] == m)
              for m, marker, ls in (("qtale", "o", "-"), ("dllm", "s", "--"))]
    series += [("D-LLM + {fmt}, theta 0.5 (own operating point)", "D", "none", lambda e: e["kind"] == "routed-fixed"),
               ("static layer drop + {fmt}", "x", ":", lambda e: e["kind"] == "layer-drop")]
    for name_t, marker, ls, pick in series:
        for fmt in ["fp"] + fmts:
            rows = sorted(((xpos(e), e) for e in cfgs if pick(e) and e["format"] == fmt), key=lambda xe: xe[0])
            if not rows:
                continue
            name = name_t.format(fmt=fmt)
            xs = [x for x, _ in rows]
            ax.errorbar(xs, [100 * e["avg"] for _, e in rows], yerr=[100 * e.get("avg_stderr", 0.0) for _, e in rows],
                        marker=marker, ls=ls, color=colors.get(fmt, "gray"), capsize=2, lw=1.4, elinewidth=0.7,
                        label=name)
            kl = [(x, e["kl"]) for x, e in rows if e.get("kl") is not None and e["kl"] > 0]
            if kl:
                kx.plot([x for x, _ in kl], [k for _, k in kl], marker=marker, ls=ls, color=colors.get(fmt, "gray"),
                        lw=1.4, label=name)
    ax.set_xlabel("FLOPs fraction of the dense model (on the evaluation tokens)")
    ax.set_ylabel(f"{label} accuracy (%)")
    title = f"{res['recipe']['name']}: {label} vs FLOPs"
    if res.get("subset"):
        title += f" (first {res['limit']} items/task)"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    kx.set_xlabel("FLOPs fraction of the dense model (on the evaluation tokens)")
    kx.set_ylabel("KL(dense || model) per token, nats")
    kx.set_title("KL to the dense all-layers model on the held-out text", fontsize=10)
    if has_kl:
        kx.set_yscale("log")
        kx.legend(fontsize=7, loc="upper right")
    kx.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path), suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def _training_info(run: Run) -> dict:
    from . import checkpoint
    from .train import STATE

    out = {}
    for m in run.trained():
        folder = run.train_dir(m)
        if not (folder / checkpoint.META).is_file():
            continue
        meta = checkpoint.read_meta(folder)
        tr = meta.get("training") or {}
        state = _read_json(folder / STATE) if (folder / STATE).is_file() else {}
        out[m] = {"steps_done": tr.get("steps_done"), "final_losses": tr.get("final_losses"),
                  "seconds": state.get("elapsed_s"), "method": (tr.get("config") or {}).get("method"),
                  "checkpoint": str(folder), "ratio_reached": tr.get("ratio_reached"),
                  "data_sha256": tr.get("data_sha256")}
    return out


def ratio_failures(training: dict) -> list[str]:
    """One line per trained method whose realized training ratio missed its target Omega."""
    out = []
    for m, t in training.items():
        rr = t.get("ratio_reached")
        if m != "reference" and rr and not rr["within"]:
            out.append(f"TRAINING MISSED ITS RATIO: {m} ended at {rr['mean_last']:.3f} (mean of the last "
                       f"{rr['steps']} steps), target {rr['target']:g} ± {rr['tolerance']:g}")
    return out


def stage_report(run: Run, command: str) -> dict:
    results, _ = collect(run)
    calib = {}
    for m in run.r["methods"]:
        calib[m] = {}
        for fmt in ["fp"] + run.r["quantization"]["formats"]:
            f = run.calib_file(m, fmt)
            if f.is_file():
                calib[m][fmt] = {k: v for k, v in _read_json(f).items() if k in ("table", "drift", "tokens", "data")}
    quant = {}
    from . import checkpoint

    for name, _ in _quant_sources(run):
        for fmt in run.r["quantization"]["formats"]:
            d = run.quant_dir(name, fmt)
            if (d / checkpoint.META).is_file():
                info = checkpoint.read_meta(d).get("quantization") or {}
                quant[f"{name}-{fmt}"] = {k: info.get(k) for k in ("format", "quantizer", "algorithm", "bits",
                                                                  "group_size", "weight_bytes", "seconds")}
    ev = run.r["eval"]
    from .tasks import PRIMARY, validation_size

    if run.trained_reference:
        reference = ("the base + LoRA fine-tuned the same way with target ratio 1.0, lambda1 = lambda2 = 0, "
                     "evaluated with theta 0 (every layer)")
    elif run.lora:
        reference = ("the base model with every layer executed: the self-distillation teacher that the routed "
                     "models (routers + LoRA) were trained to match")
    else:
        reference = ("the base model with every layer executed (routers are the only trained parameters, so the "
                     "base is what the same fine-tuning with every layer executed gives)")
    recipe = {k: v for k, v in run.r.items()}
    res = {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": command, "run_dir": str(run.root), "recipe": recipe, "limit": ev["limit"],
           "subset": ev["limit"] is not None, "validation_sizes": {t: validation_size(t) for t in ev["tasks"]},
           "style": ev["style"], "tasks": ev["tasks"],
           "primary_metric": {t: PRIMARY[t] for t in ev["tasks"]}, "reference": reference,
           "machine": _machine(), "timings": _read_json(run.timings_file) if run.timings_file.is_file() else {},
           "training": _training_info(run), "calibration": calib, "quantization": quant,
           "configs": results}
    res["headline"] = headline(run, results)
    res["training_ratio_failures"] = ratio_failures(res["training"])
    res["pending"] = list(getattr(run, "pending", []))
    run.docs.mkdir(parents=True, exist_ok=True)
    _write_json(run.docs / "results.json", res)
    _write_text(run.docs / "results.md", render_markdown(res))
    render_plot(res, run.docs / "results.png")
    return res


def print_report(run: Run, res: dict) -> None:
    from rich.table import Table

    tasks = res["tasks"]
    table = Table(title=f"{res['recipe']['name']}: {'avg7' if len(tasks) == 7 else f'avg of {len(tasks)} tasks'}"
                  + (f" (first {res['limit']} items/task)" if res["subset"] else "") + ", points; per task: results.md")
    for c in ["configuration", "ratio", "realized", "FLOPs", "avg", "Δ all-layers", "Δ D-LLM", "ppl", "KL"]:
        table.add_column(c, no_wrap=c == "configuration")
    for e in res["configs"]:
        delta = e.get("vs_quant_only") or e.get("vs_dense")
        table.add_row(e["id"], "—" if e["target_ratio"] is None else f"{e['target_ratio']:g}", _fmt(e.get("realized_ratio"), ".3f"),
                      _fmt(e.get("flops_fraction"), ".3f"), _pct(e["avg"]), _diff(delta["avg"] if delta else None),
                      _diff(e["vs_dllm"]["avg"] if e.get("vs_dllm") else None), _fmt(e.get("ppl"), ".2f"),
                      _fmt(e.get("kl"), ".4f"))
    run.console.print(table)
    for line in res.get("training_ratio_failures") or []:
        run.console.print(f"[bold red]{line}[/]")
    for line in render_headline(res):
        run.console.print(line, markup=False)


# ---- the README's results block -------------------------------------------------------------
README_BEGIN = "<!-- results:begin (generated by qtale experiment --only ship from docs/results.json) -->"
README_END = "<!-- results:end -->"


def render_readme_block(res: dict, results_sha256: str) -> str:
    """The README's summary of docs/results.json: every number in it is a field of that file."""
    tasks = res["tasks"]
    avg_name = "avg7" if len(tasks) == 7 else f"avg{len(tasks)}"
    scope = (f"first {res['limit']} validation items of every task ({_sizes(res)} in the full sets)"
             if res.get("subset") else "full validation sets")
    lines = [README_BEGIN,
             f"Source: `docs/results.json` (sha256 `{results_sha256[:16]}`), created {res['created']} by "
             f"`{res['command']}`; {scope}; prompt style `{res['style']}`. Accuracy in points; Δ is the "
             "paired difference on the same items ± its standard error.", "",
             f"| configuration | realized ratio | FLOPs frac. | {avg_name} | Δ vs all-layers (same format) "
             "| Δ vs D-LLM | KL to dense |", "|---|---|---|---|---|---|---|"]
    for e in res["configs"]:
        if e.get("same_as"):
            continue
        delta = e.get("vs_quant_only") or e.get("vs_dense")
        lines.append(f"| {e['id']} | {_fmt(e.get('realized_ratio'), '.3f')} | {_fmt(e.get('flops_fraction'), '.3f')} "
                     f"| {_pct(e.get('avg7', e['avg']))} | {_diff(delta['avg'] if delta else None)} "
                     f"| {_diff(e['vs_dllm']['avg'] if e.get('vs_dllm') else None)} | {_fmt(e.get('kl'), '.4f')} |")
    lines += [""] + [f"- **{x}**" for x in res.get("training_ratio_failures") or []] + render_headline(res)
    if res.get("pending"):
        lines += [f"- Not evaluated yet ({len(res['pending'])} configurations): "
                  + ", ".join(res["pending"])]
    lines += [README_END]
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> bool:
    """Replace the README's results block (between the markers); False when it has no markers."""
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    _write_text(readme, head + block + tail)
    return True


# ---- shipping the trained routers -----------------------------------------------------------
def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def recommended_ratio(res: dict) -> dict | None:
    """The lowest evaluated ratio at which QTALE + INT4 is within CLOSE_POINTS of INT4 all-layers
    (paired, in the task average): the default of qtale-export for the shipped model."""
    rows = next((v for k, v in res.get("headline", {}).items() if k.startswith("qtale_int4")
                 and isinstance(v, list)), [])
    ok = [r for r in rows if r["gap_vs_quant_only"]["diff"] >= -CLOSE_POINTS / 100]
    if not ok:
        return None
    best = min(ok, key=lambda r: r["ratio"])
    return {"ratio": best["ratio"], "gap_vs_quant_only": best["gap_vs_quant_only"],
            "rule": f"lowest ratio <= {HEADLINE_MAX_RATIO:g} whose QTALE+INT4 task-average gap to INT4 all-layers is "
                    f">= -{CLOSE_POINTS:g} points (paired)", "subset": res.get("subset"), "limit": res.get("limit")}


def stage_ship(run: Run, dest: Path | None = None, command: str = "") -> Path:
    """Copy the QTALE routers and their fp theta table (no optimizer state, no base weights) to
    `dest` (default: the package's pretrained/<model>/, what load(<model>) picks up), with a
    provenance.json tying them to the recipe, the training run and docs/results.json."""
    import shutil

    from . import checkpoint
    from .api import PRETRAINED
    from .models import EMBEDDED

    if "qtale" not in run.r["methods"]:
        raise QtaleError("ship: the recipe trains no 'qtale' method")
    if dest is None:
        if run.r["model"] not in EMBEDDED:
            raise QtaleError(f"ship: {run.r['model']} is not an embedded model; pass --ship-dir")
        dest = PRETRAINED / run.r["model"]
    src = run.train_dir("qtale")
    if not _train_done(src, run.r["train"]["steps"]):
        raise QtaleError(f"ship: {src} has not finished training: run the 'train' stage first")
    meta = checkpoint.read_meta(src)
    checkpoint.verify_files(src, meta)
    if not meta.get("theta_table"):
        raise QtaleError(f"ship: {src} is not calibrated: run the 'calibrate' stage first")
    results = run.docs / "results.json"
    _need(results, "report")
    res = _read_json(results)
    calib = {fmt: _read_json(run.calib_file("qtale", fmt))["table"]
             for fmt in run.r["quantization"]["formats"] if run.calib_file("qtale", fmt).is_file()}
    recipe_file = Path(run.r["recipe_file"])
    provenance = {
        "what": "QTALE routers (router weights + theta table) and, when trained, the LoRA adapter for the "
                "embedded base model; no base weights",
        "method": "qtale", "base_model": meta["base_model"], "router": meta["router"],
        "recipe": {"file": os.path.relpath(recipe_file, REPO), "sha256": checkpoint.file_sha256(recipe_file),
                   "name": run.r["name"]},
        "train": {**run.r["train"], "seed": run.r["seed"],
                  "data_sha256": (meta.get("training") or {}).get("data_sha256") or
                  {os.path.relpath(d, REPO): checkpoint.file_sha256(Path(d)) for d in run.r["train"]["data"]},
                  "steps_done": (meta.get("training") or {}).get("steps_done"),
                  "final_losses": (meta.get("training") or {}).get("final_losses")},
        "theta_table_fp": meta["theta_table"],
        "theta_tables_after_quantization": calib,
        "results": {"file": "docs/results.json", "sha256": checkpoint.file_sha256(results),
                    "created": res.get("created"), "subset": res.get("subset"), "limit": res.get("limit"),
                    "headline": res.get("headline")},
        "command": command, "git_commit": _git_commit(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    from .safe_write import staging_dir

    tmp = staging_dir(dest)
    try:
        shipped = {k: v for k, v in meta.items() if k not in ("files", "unchecked", "files_sha256")}
        shipped["files"] = {k: meta["files"][k] for k in _copy_trained(src, meta, tmp)}
        shipped["unchecked"] = ["provenance.json"]  # written after qtale.json, it records its tables
        shipped["recommended"] = recommended_ratio(res)
        checkpoint.write_json_atomic(tmp / checkpoint.META, checkpoint.seal(shipped))
        checkpoint.write_json_atomic(tmp / "provenance.json", provenance)
        checkpoint.replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    run.say(f"  shipped {src} -> {dest}")
    if dest == PRETRAINED / run.r["model"] and update_readme(REPO / "README.md", render_readme_block(
            res, provenance["results"]["sha256"])):
        run.say(f"  updated the results block of {REPO / 'README.md'}")
    return dest


# ---- CLI -------------------------------------------------------------------------------------
def add_experiment_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("recipe", help="experiment recipe (YAML), e.g. recipes/smollm2-135m.yaml")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<recipe name>)")
    parser.add_argument("--docs", default="docs", help="where results.json/.md/.png go (default: docs)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an existing run folder: finished stages are skipped")
    parser.add_argument("--only", choices=STAGES + ("ship", "keep"), default=None,
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
    parts = ["qtale", "experiment", str(args.recipe)]
    for flag in ("out", "docs", "only", "limit"):
        v = getattr(args, flag, None)
        if v is not None and not (flag == "docs" and v == "docs"):
            parts += [f"--{flag}", str(v)]
    if getattr(args, "resume", False):
        parts.append("--resume")
    return " ".join(shlex.quote(p) for p in parts)


FROZEN = ("model", "seed", "methods", "ratios", "train", "calibration", "quantization")


def _check_run_dir(recipe: dict, root: Path, resume: bool, only: str | None) -> None:
    stored = root / "recipe.json"
    frozen = {k: recipe[k] for k in FROZEN}
    if stored.is_file():
        if not resume and only is None:
            raise QtaleError(f"run folder {root} exists: pass --resume to continue it (or --out another folder)")
        old = _read_json(stored)
        for k in FROZEN:
            if old.get(k) != frozen[k]:
                raise QtaleError(f"recipe key '{k}' differs from the one run folder {root} was started with; "
                                 "use another --out")
    else:
        _write_json(stored, frozen)


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
    quiet = getattr(args, "json", False)
    import sys

    console = Console(quiet=quiet, highlight=False, width=None if sys.stdout.isatty() else 140)
    run = Run(recipe, root, docs, progress=not getattr(args, "no_progress", False), console=console)
    run.only_configs = [p.strip() for p in (getattr(args, "configs", None) or "").split(",") if p.strip()]
    _check_run_dir(recipe, root, args.resume, args.only)
    command = _command(args)
    stages = [args.only] if args.only else list(STAGES)
    t_all = time.time()
    res = shipped = None
    for k, stage in enumerate(stages, 1):
        console.rule(f"[{k}/{len(stages)}] {stage}")
        if stage == "report":
            res = stage_report(run, command)
        elif stage == "keep":
            stage_keep(run)
        elif stage == "ship":
            ship_dir = getattr(args, "ship_dir", None)
            shipped = stage_ship(run, Path(ship_dir) if ship_dir else None, command)
        else:
            globals()[f"stage_{stage}"](run)
    summary = {"run_dir": str(root), "stages": stages, "seconds": round(time.time() - t_all, 2)}
    if shipped is not None:
        summary["shipped"] = str(shipped)
    if res is not None:
        print_report(run, res)
        summary.update({"results": str(docs / "results.json"), "markdown": str(docs / "results.md"),
                        "plot": str(docs / "results.png"), "headline": res["headline"]})
    return summary
