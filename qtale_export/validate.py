"""Command-line values, one checker per kind, shared by every subcommand so the rules cannot drift.

Each checker takes the text (or a number) and the option's name, and returns the value or raises a
QtaleError naming the option and the problem. `arg(check, "--flag")` makes one an argparse `type=`:
the QtaleError passes through argparse (which only catches ValueError/TypeError), so the CLI prints
it as its usual one line and library callers that parse with a plain ArgumentParser get the same
QtaleError as from the run functions. NaN and infinity are refused everywhere. Torch-free (the
runtime uses it).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

from .errors import QtaleError
from .deploy.theta import check_ratio


def number(value, what: str = "value") -> float:
    """A finite float."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise QtaleError(f"{what} must be a number, got '{value}'") from None
    if not math.isfinite(x):
        raise QtaleError(f"{what} must be a finite number, got '{value}'")
    return x


def integer(value, what: str = "value") -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise QtaleError(f"{what} must be an integer, got '{value}'") from None


def ratio(value, what: str = "ratio") -> float:
    """A target execution ratio in (0, 1] (the runtime's rule, ratios.check_ratio)."""
    try:
        return check_ratio(value)
    except QtaleError as exc:
        raise QtaleError(f"{what}: {exc}") from None


def ratios(value, what: str = "--ratios") -> list[float]:
    """Comma-separated ratios; an empty item (`0.5,,0.6`) or an empty list is an error."""
    items = [v.strip() for v in str(value).split(",")]
    if not any(items):
        raise QtaleError(f"{what}: no ratios given in '{value}'")
    if not all(items):
        raise QtaleError(f"{what}: empty item in the comma-separated list '{value}'")
    return [ratio(v, what) for v in items]


def positive_ints(value, what: str = "value") -> list[int]:
    """Comma-separated positive integers (`--seq 128,512`); an empty item (`8,,16`) or list is an error."""
    items = [v.strip() for v in str(value).split(",")]
    if not any(items):
        raise QtaleError(f"{what}: no values given in '{value}'")
    if not all(items):
        raise QtaleError(f"{what}: empty item in the comma-separated list '{value}'")
    return [positive_int(v, what) for v in items]


def cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads(value, what: str = "--threads") -> int:
    """A thread count in [1, the CPUs this process may use]: more only adds memory and contention."""
    n = positive_int(value, what)
    if n > cpus():
        raise QtaleError(f"{what} {n} is more than the {cpus()} CPUs this process may use")
    return n


def output_folder(value, what: str = "--out") -> Path:
    """A folder to write into: created if missing; an existing file is an error."""
    p = Path(path(value, what))
    if p.exists() and not p.is_dir():
        raise QtaleError(f"{what} {p} is a file, not a folder")
    return p


def _within(value, what: str, parse: Callable, ok: Callable[[float], bool], rule: str):
    """`parse(value, what)` if `ok` holds for it, else QtaleError("<what> <rule>, got <value>")."""
    x = parse(value, what)
    if not ok(x):
        raise QtaleError(f"{what} {rule}, got {value}")
    return x


def theta(value, what: str = "theta") -> float:
    """A router theta in [0, 1]: a layer runs iff P(execute) >= theta."""
    return _within(value, what, number, lambda x: 0.0 <= x <= 1.0, "must be in [0, 1]")


def positive_int(value, what: str = "value") -> int:
    return _within(value, what, integer, lambda n: n >= 1, "must be a positive integer")


def nonnegative_int(value, what: str = "value") -> int:
    return _within(value, what, integer, lambda n: n >= 0, "must be >= 0")


def positive(value, what: str = "value") -> float:
    """A finite float > 0 (learning rate, tolerance, tau)."""
    return _within(value, what, number, lambda x: x > 0, "must be > 0")


def nonnegative(value, what: str = "value") -> float:
    """A finite float >= 0 (weight decay, loss weights)."""
    return _within(value, what, number, lambda x: x >= 0, "must be >= 0")


def probability(value, what: str = "probability") -> float:
    """A probability in (0, 1] (top-p)."""
    return _within(value, what, number, lambda x: 0.0 < x <= 1.0, "must be in (0, 1]")


def temperature(value, what: str = "temperature") -> float:
    """A sampling temperature: finite and >= 0 (0 = greedy)."""
    return _within(value, what, number, lambda x: x >= 0, "must be >= 0 (0 = greedy)")


def path(value, what: str = "path") -> str:
    """A non-empty path text (existence is checked by the command that reads or writes it)."""
    if value is None or not str(value).strip():
        raise QtaleError(f"{what}: empty path")
    return str(value)


def output_file(value, what: str = "output file", force: bool = True) -> Path:
    """A file to write: not a folder, in an existing folder; an existing file only with `force`."""
    p = Path(path(value, what))
    if p.is_dir():
        raise QtaleError(f"{what} {p} is a folder: give a file name")
    if not p.parent.is_dir():
        raise QtaleError(f"{what} {p}: folder {p.parent} does not exist")
    if p.exists() and not force:
        raise QtaleError(f"{p} already exists; pass --force to replace it")
    return p


def arg(check: Callable, what: str) -> Callable[[str], object]:
    """`type=arg(positive_int, "--steps")`: the checker as an argparse type (see the module doc)."""
    def parse(text: str):
        return check(text, what)

    parse.__name__ = check.__name__
    return parse


# the training options, by kind (the CLI's argparse types and TrainConfig.validate use the same table)
TRAIN_KINDS: dict[str, Callable] = {
    "steps": nonnegative_int, "batch_size": positive_int, "grad_accum": positive_int,
    "seq_len": positive_int, "lora_rank": nonnegative_int, "seed": nonnegative_int,
    "save_every": positive_int, "first_routed_layer": nonnegative_int, "keep_initial": nonnegative_int,
    "router_hidden": positive_int, "lambda1_warmup": nonnegative_int, "full_every": nonnegative_int,
    "lr": positive, "weight_decay": nonnegative, "lambda1": nonnegative, "lambda2": nonnegative,
    "tau": positive, "target_ratio": ratio,
}


def train_numbers(cfg) -> None:
    """Check a TrainConfig's numeric fields (for library callers; the CLI checks them while parsing)."""
    for name, check in TRAIN_KINDS.items():
        check(getattr(cfg, name), "--" + name.replace("_", "-"))
    if cfg.max_examples is not None:
        positive_int(cfg.max_examples, "--max-examples")
