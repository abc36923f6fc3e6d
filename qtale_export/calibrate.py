"""Post-training ratio control: find theta per target execution ratio by bisection."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint
from .deploy import theta as policy
from .api import load
from .data import CALIBRATION_TEXT, text_batches
from .routing import RoutedModel
from .deploy.theta import ratio_key


@dataclass
class TextCalibration:
    """The text theta is calibrated on and how closely (the defaults of `qtale calibrate` and recipes)."""
    data: str | None = None  # a text or instruction JSON file; None: the package's calibration text
    seq_len: int = 256
    max_tokens: int = 4096
    tol: float = 0.01


def text_batches_for(tokenizer, setting: TextCalibration) -> tuple[list[dict], Path, int]:
    """(batches, the text file, its token count) of a calibration setting."""
    data = Path(setting.data) if setting.data else CALIBRATION_TEXT
    batches = text_batches(data, tokenizer, setting.seq_len, 4, setting.max_tokens)
    return batches, data, int(sum(int(b["attention_mask"].sum()) for b in batches))


@torch.no_grad()
def realized_ratio(model: RoutedModel, batches: list[dict], theta: float) -> float:
    model.eval()
    model.reset_stats()
    for b in batches:
        model(b["input_ids"], attention_mask=b["attention_mask"], theta=theta)
    return model.execution_stats()["execution_ratio"]


@torch.no_grad()
def calibrate(model: RoutedModel, batches: list[dict], ratios: list[float], tol: float = 0.01,
              max_iter: int = 30, progress: bool = True) -> dict[str, dict]:
    """theta for each target ratio on `batches`; stored in model.theta_table and returned.

    The realized ratio falls as theta rises (a layer runs iff P(execute) >= theta), so bisection on
    [0, 1] converges; it stops once within `tol`, else keeps the closest theta it saw.
    """
    table: dict[str, dict] = {}
    seen: dict[float, float] = {}

    def ratio_at(theta: float) -> float:
        if theta not in seen:
            seen[theta] = realized_ratio(model, batches, theta)
        return seen[theta]

    bar = tqdm(sorted(ratios, reverse=True), desc="calibrate", disable=not progress, leave=False)
    for target in bar:
        if target >= 1.0:  # P >= 0 holds for every token: the dense model, exactly
            table[ratio_key(target)] = {"theta": 0.0, "realized": ratio_at(0.0)}
            continue
        lo, hi = 0.0, 1.0
        best = min(seen.items(), key=lambda kv: abs(kv[1] - target), default=(0.5, ratio_at(0.5)))
        for _ in range(max_iter):
            mid = (lo + hi) / 2
            r = ratio_at(mid)
            if abs(r - target) < abs(best[1] - target):
                best = (mid, r)
            if abs(r - target) <= tol:
                break
            lo, hi = (mid, hi) if r > target else (lo, mid)
        table[ratio_key(target)] = {"theta": best[0], "realized": round(best[1], 6)}
        bar.set_postfix(target=target, realized=round(best[1], 4))
    model.theta_table.update(table)
    model.reset_stats()
    return table


def calibrate_checkpoint(folder, ratios: list[float], setting: TextCalibration | None = None, *,
                         dtype: str = "float32", device: str | None = None) -> dict:
    """theta for each target ratio on the checkpoint `folder`, merged into its qtale.json; returns
    {"ratios": table, "data": the text file's name, "tokens": its token count}."""
    setting = setting or TextCalibration()
    folder = Path(folder)
    checkpoint.read_meta(folder)  # a clear error before loading the model
    model = load(folder, dtype=dtype, device=device, fold=True)
    batches, data, tokens = text_batches_for(model.tokenizer, setting)
    table = calibrate(model, batches, ratios, tol=setting.tol)

    def merge(meta: dict) -> None:  # applied to the latest qtale.json under its lock: a concurrent run's ratios stay
        keep = {} if policy.stale_reason(meta) else (meta.get("theta_table") or {})  # stale entries go
        meta["theta_table"] = {**keep, **table}
        meta["calibration"] = policy.calibration_record(
            meta, {"data": data.name, "tokens": tokens, "tol": setting.tol, "dtype": dtype})

    checkpoint.update_meta(folder, merge)
    return {"ratios": table, "data": data.name, "tokens": tokens}
