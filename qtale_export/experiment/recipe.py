"""The recipe: its keys, their defaults and checks; `load_recipe` reads, validates and resolves one.

Defaults come from the library (train.TrainConfig, calibrate.TextCalibration,
ptq.QuantizeConfig), so a recipe that leaves a key out runs what the command line runs; the
key lists (and their order, which the error messages show) are the recipe's own schema.
"""
from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

from ..errors import QtaleError
from ..deploy.theta import check_ratio
from .layout import REPO

REQUIRED_KEY = None  # a section default of None for data/steps/formats/tasks: the recipe must give it
METHODS = ("qtale", "dllm")
BASELINES = ("dllm-fixed-theta", "layer-drop")  # D-LLM at its own operating point; static layer removal
TOP_KEYS = {"name", "model", "seed", "methods", "ratios", "train", "calibration", "quantization", "eval",
            "description", "extends"}
REQUIRED = ("name", "model", "train", "ratios", "quantization", "eval")

# section keys, in the order error messages list them; model, out, method and seed of training come
# from elsewhere in the recipe
TRAIN_NAMES = ("data", "steps", "loss", "batch_size", "grad_accum", "lr", "weight_decay", "seq_len",
               "target_ratio", "lambda1", "lambda1_warmup", "lambda2", "tau", "lora_rank", "save_every",
               "max_examples", "first_routed_layer", "keep_initial", "router_hidden", "lora_lr", "dtype", "full_every")
CALIB_NAMES = ("data", "seq_len", "max_tokens", "tol")
QUANT_NAMES = ("formats", "calib_data", "calib_samples", "calib_length", "group_size")
# evaluate has no config object: its recipe defaults are written here
EVAL_KEYS = {"tasks": REQUIRED_KEY, "style": "harness", "limit": None, "batch_size": 64, "batch_tokens": 4096,
             "dtype": "float32", "ppl": True, "ppl_file": "", "ppl_tokens": None, "fp_routed": False,
             "baselines": []}


def _defaults(config_class) -> dict:
    return {f.name: f.default for f in fields(config_class)}


def section_keys() -> tuple[dict, dict, dict, dict]:
    """(train, calibration, quantization, eval) recipe keys -> defaults (REQUIRED_KEY: must be given).
    A function because the library's configs live in modules that import torch."""
    from ..calibrate import TextCalibration
    from ..ptq import QuantizeConfig
    from ..train import TrainConfig

    train = _defaults(TrainConfig)
    train.update(data=REQUIRED_KEY, steps=REQUIRED_KEY)
    calib = _defaults(TextCalibration)
    calib["data"] = ""  # the recipe spells "the built-in text" as an empty string
    quant = _defaults(QuantizeConfig)
    quant.update(formats=REQUIRED_KEY, calib_data="")
    return ({k: train[k] for k in TRAIN_NAMES}, {k: calib[k] for k in CALIB_NAMES},
            {k: quant[k] for k in QUANT_NAMES}, dict(EVAL_KEYS))


def _check_ratio(value) -> float:
    try:
        return check_ratio(value)
    except QtaleError as exc:
        raise QtaleError(f"recipe: {exc}") from None


def _section(recipe: dict, name: str, keys: dict) -> dict:
    given = recipe.get(name) or {}
    if not isinstance(given, dict):
        raise QtaleError(f"recipe: '{name}' must be a mapping")
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise QtaleError(f"recipe: unknown key '{name}.{unknown[0]}' (known: {', '.join(keys)})")
    out = {}
    for key, default in keys.items():
        if key in given:
            out[key] = given[key]
        elif default is REQUIRED_KEY and key in ("data", "steps", "formats", "tasks"):
            raise QtaleError(f"recipe: missing required key '{name}.{key}'")
        else:
            out[key] = default
    return out


def _resolve_data(value: str, recipe_dir: Path, what: str) -> str:
    from ..corpus import CORPORA, PREFIX, is_corpus

    if is_corpus(value):
        if str(value)[len(PREFIX):] not in CORPORA:
            raise QtaleError(f"recipe: unknown {what} corpus '{value}' (known: "
                             f"{', '.join(PREFIX + k for k in CORPORA)})")
        return str(value)
    path = Path(os.path.expanduser(str(value)))
    tried = [path] if path.is_absolute() else [recipe_dir / path, REPO / path, Path.cwd() / path]
    for candidate in tried:
        if candidate.is_file():
            return str(candidate.resolve())
    raise QtaleError(f"recipe: {what} '{value}' not found (looked in {', '.join(str(t) for t in tried)})")


def _train_section(raw: dict, keys: dict, here: Path) -> dict:
    train = _section(raw, "train", keys)
    data = train["data"] if isinstance(train["data"], list) else [train["data"]]
    if not data:
        raise QtaleError("recipe: 'train.data' lists no files")
    train["data"] = [_resolve_data(d, here, "training data") for d in data]
    for key in ("steps", "batch_size", "grad_accum", "seq_len", "lora_rank", "save_every", "lambda1_warmup",
                "full_every"):
        low = 0 if key in ("lora_rank", "lambda1_warmup", "full_every") else 1
        if not isinstance(train[key], int) or isinstance(train[key], bool) or train[key] < low:
            raise QtaleError(f"recipe: 'train.{key}' must be an integer >= {low}, got {train[key]!r}")
    if train["dtype"] not in ("float32", "bfloat16"):
        raise QtaleError(f"recipe: 'train.dtype' must be float32 or bfloat16, got {train['dtype']!r}")
    if train["lora_lr"] is not None:
        train["lora_lr"] = float(train["lora_lr"])
    for key in ("lr", "lambda1", "lambda2", "tau", "weight_decay", "target_ratio"):
        try:
            train[key] = float(train[key])
        except (TypeError, ValueError):
            raise QtaleError(f"recipe: 'train.{key}' must be a number, got {train[key]!r}") from None
    _check_ratio(train["target_ratio"])
    if train["loss"] not in ("auto", "task", "distill"):
        raise QtaleError(f"recipe: unknown train.loss '{train['loss']}' (task, distill or auto)")
    return train


def _quant_section(raw: dict, keys: dict, here: Path) -> dict:
    from ..deploy.precisions import FORMATS

    quant = _section(raw, "quantization", keys)
    formats = quant["formats"] if isinstance(quant["formats"], list) else [quant["formats"]]
    if not formats:
        raise QtaleError("recipe: 'quantization.formats' lists no format")
    for fmt in formats:
        if fmt not in FORMATS:
            raise QtaleError(f"recipe: unknown quantization format '{fmt}' (choose from {', '.join(FORMATS)})")
    quant["formats"] = list(dict.fromkeys(formats))
    if quant["calib_data"]:
        quant["calib_data"] = _resolve_data(quant["calib_data"], here, "quantization calibration data")
    return quant


def _eval_section(raw: dict, keys: dict, here: Path) -> dict:
    from ..tasks import SCIQ, STYLES, parse_tasks

    ev = _section(raw, "eval", keys)
    if ev["dtype"] not in ("float32", "bfloat16"):
        raise QtaleError(f"recipe: 'eval.dtype' must be float32 or bfloat16, got {ev['dtype']!r}")
    for baseline in ev["baselines"] or []:
        if baseline not in BASELINES:
            raise QtaleError(f"recipe: unknown eval baseline '{baseline}' (choose from {', '.join(BASELINES)})")
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
    return ev


MAX_BYTES = 1 << 20  # a recipe is a page of YAML; more is a mistake or an attack
MAX_EXTENDS = 16  # how many recipes an `extends:` chain may go through


def _loader():
    """yaml.SafeLoader without aliases: a recipe has no use for them, and nested aliases (a "billion
    laughs" bomb) expand to gigabytes once the recipe is merged or written out."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in a recipe",
                                                  event.start_mark)
            return super().compose_node(parent, index)

    return NoAliases


def _read(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise QtaleError(f"recipe not found: {path}")
    if path.stat().st_size > MAX_BYTES:
        raise QtaleError(f"recipe {path} is {path.stat().st_size} bytes; a recipe is at most {MAX_BYTES}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_loader())  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as exc:
        raise QtaleError(f"recipe {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise QtaleError(f"recipe {path} is nested too deeply") from None
    except yaml.YAMLError as exc:
        raise QtaleError(f"recipe {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise QtaleError(f"recipe {path} must be a YAML mapping")
    return raw


def read_raw(path: Path, _chain: tuple[Path, ...] = ()) -> tuple[dict, list[Path]]:
    """The recipe's mapping with its `extends:` chain merged in, and the files it came from (this one
    first). `extends: OTHER.yaml` (relative to this file) takes OTHER's keys; a section given here
    (train, eval, ...) overrides OTHER's keys one by one, any other key replaces OTHER's. So a
    variant says only what differs, and a change to the base recipe reaches every variant."""
    raw = _read(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw, [path]
    if not isinstance(parent, str) or not parent:
        raise QtaleError(f"recipe {path}: 'extends' must name one recipe file")
    if "name" not in raw:
        raise QtaleError(f"recipe {path}: a recipe that extends another must give its own 'name' "
                         "(the run folder and the eval files are named after it)")
    parent_path = Path(os.path.expanduser(parent))
    parent_path = parent_path if parent_path.is_absolute() else path.parent / parent_path
    chain = _chain + (path.resolve(),)
    if parent_path.resolve() in chain:
        raise QtaleError(f"recipe {path}: 'extends' loops back to {parent_path}")
    if len(chain) >= MAX_EXTENDS:
        raise QtaleError(f"recipe {path}: the 'extends' chain goes through more than {MAX_EXTENDS} recipes")
    base, files = read_raw(parent_path, chain)
    merged = dict(base)
    for key, value in raw.items():
        merged[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged, [path] + files


def load_recipe(path: str | os.PathLike) -> dict:
    """Read, validate and resolve a recipe (`extends:` merged, defaults filled in, data paths made
    absolute; relative paths resolve from this recipe's folder, then the repository, then the
    working directory)."""
    path = Path(path)
    raw, files = read_raw(path)
    for key in REQUIRED:
        if key not in raw or raw[key] in (None, "", []):
            raise QtaleError(f"recipe: missing required key '{key}'")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise QtaleError(f"recipe: unknown key '{unknown[0]}' (known: {', '.join(sorted(TOP_KEYS))})")
    name = str(raw["name"])
    if not name or "/" in name or name.startswith("."):
        raise QtaleError(f"recipe: invalid name '{name}' (a folder name under runs/)")
    here = path.resolve().parent
    train_keys, calib_keys, quant_keys, eval_keys = section_keys()
    train = _train_section(raw, train_keys, here)
    methods = raw.get("methods", list(METHODS))
    if not isinstance(methods, list) or not methods:
        raise QtaleError("recipe: 'methods' must be a list (qtale, dllm)")
    for method in methods:
        if method not in METHODS:
            raise QtaleError(f"recipe: unknown method '{method}' (qtale or dllm)")
    if not isinstance(raw["ratios"], list):
        raise QtaleError("recipe: 'ratios' must be a list of execution ratios in (0, 1]")
    ratios = sorted({_check_ratio(r) for r in raw["ratios"]})
    calib = _section(raw, "calibration", calib_keys)
    if calib["data"]:
        calib["data"] = _resolve_data(calib["data"], here, "calibration data")
    quant = _quant_section(raw, quant_keys, here)
    ev = _eval_section(raw, eval_keys, here)
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise QtaleError(f"recipe: 'seed' must be an integer, got {seed!r}")
    return {"name": name, "description": raw.get("description", ""), "model": str(raw["model"]),
            "seed": seed, "methods": list(dict.fromkeys(methods)), "ratios": ratios, "train": train,
            "calibration": calib, "quantization": quant, "eval": ev, "recipe_file": str(path),
            "extends": [str(f) for f in files[1:]]}
