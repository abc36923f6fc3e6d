"""load(): the one entry point from a name or folder to a ready RoutedModel."""
from __future__ import annotations

import os
from pathlib import Path

from . import checkpoint
from .compute import place
from .errors import QtaleError
from .models import DEFAULT_MODEL, EMBEDDED, base_sha256, load_base
from .quantize import fold as fold_weights, restore
from .routing import RoutedModel, RouterConfig
from .deploy.theta import stale_reason

PRETRAINED = Path(__file__).parent / "pretrained"


def new_routed(base: str | os.PathLike = DEFAULT_MODEL, config: RouterConfig | None = None,
               dtype=None) -> RoutedModel:
    """The base model (float32 unless `dtype`) with fresh (untrained) routers (always float32)."""
    hf, tokenizer, folder = load_base(base, dtype)
    model = RoutedModel(hf, config)
    model.tokenizer = tokenizer
    base_id = str(base) if str(base) in EMBEDDED else str(Path(folder).resolve())
    model.base_info = {"id": base_id, "sha256": base_sha256(folder, hf)}
    model.training_info = None
    model.quantization_info = None
    return model.eval()


def shipped_checkpoint(name: str) -> Path | None:
    """Routers trained by the project's recipe that ship inside the package, if any."""
    folder = PRETRAINED / name
    return folder if (folder / checkpoint.META).is_file() else None


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, fresh: bool = False, dtype: str | None = None,
         device: str | None = None, fold: bool = False) -> RoutedModel:
    """A RoutedModel from a checkpoint folder, an embedded model name (its shipped routers when
    present, unless fresh=True), or a Hugging Face model folder (fresh routers).

    dtype/device: see compute.place (default float32 on the CPU, the reference); fold: bake
    fake-quantized weights in (faster forwards, same logits; always done for non-float32)."""
    path = Path(name_or_path)
    if (path / checkpoint.META).is_file():
        model = load_checkpoint(path)
    elif not fresh and str(name_or_path) in EMBEDDED and shipped_checkpoint(str(name_or_path)):
        model = load_checkpoint(shipped_checkpoint(str(name_or_path)))
    elif path.is_dir() and not (path / "config.json").is_file():
        raise QtaleError(f"{path} is neither a QTALE checkpoint (no {checkpoint.META}) nor a model folder")
    else:
        model = new_routed(name_or_path)
    if fold:
        fold_weights(model)
    if dtype not in (None, "float32") or device not in (None, "cpu"):
        place(model, dtype, device)
    return model


def load_checkpoint(folder: str | os.PathLike) -> RoutedModel:
    folder = Path(folder)
    meta = checkpoint.read_meta(folder)
    checkpoint.verify_files(folder, meta)
    try:
        config = RouterConfig(**meta["router"])
    except TypeError as exc:
        raise QtaleError(f"corrupt {folder / checkpoint.META}: bad router config ({exc})") from None
    model = new_routed(meta["base_model"]["id"], config)
    want = meta["base_model"]["sha256"]  # required (checkpoint.read_meta): the check cannot be dropped
    if want != model.base_info["sha256"]:
        raise QtaleError(f"checkpoint {folder} was trained on other weights than "
                         f"'{meta['base_model']['id']}' (sha256 differs)")
    state = checkpoint.load_routers(folder)
    missing = set(model.routers.state_dict()) ^ set(state)
    if missing:
        raise QtaleError(f"corrupt {folder / checkpoint.ROUTERS}: tensors do not match the router "
                         f"config ({sorted(missing)[:3]}...)")
    try:
        model.routers.load_state_dict(state)
    except RuntimeError as exc:
        raise QtaleError(f"corrupt {folder / checkpoint.ROUTERS}: {str(exc).splitlines()[0]}") from None
    if (folder / checkpoint.ADAPTER).is_dir():
        from peft import PeftModel

        model.base = PeftModel.from_pretrained(model.base, folder / checkpoint.ADAPTER)
        if meta.get("quantization"):  # quantized after merging: the grid is that of W + BA
            model.base = model.base.merge_and_unload()
            model.merged_adapter = folder / checkpoint.ADAPTER
    model.theta_table = dict(meta.get("theta_table") or {})
    model.theta_calibration = meta.get("calibration")  # what the table was calibrated on
    model.theta_stale = stale_reason(meta)  # the export refuses a stale table (theta.py)
    theta = meta.get("theta")
    model.theta = float(theta if theta is not None else meta.get("threshold", 0.5))  # "threshold": the old name
    model.training_info = meta.get("training")
    model.recommended = meta.get("recommended")
    model.quantization_info = meta.get("quantization")
    if model.quantization_info:
        restore(model, folder, model.quantization_info)
    model.checkpoint_dir = folder
    return model.eval()
