"""The checkpoint contract: a folder with qtale.json + routers.safetensors [+ adapter/ (LoRA)].

qtale.json: {"format": "qtale-checkpoint", "format_version": 1, "base_model": {"id", "sha256"},
"router": RouterConfig, "theta_table": {ratio: {"theta", "realized"}}, "training": {...},
"quantization": null | {...}, "files": {name: sha256}, "unchecked": [name], "files_sha256"}.
No pickle anywhere: tensors are safetensors. Every write goes to a temporary name first and is
renamed into place (qtale_export.safe_write). The checks cannot be switched off by omission: every
file in the folder is either in "files" (with its sha256) or in "unchecked" (logs that grow), and
"files_sha256" is the sha256 of that listing, so qtale.json's own listing is covered too.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import safe_write
# the shared contract helpers, also reached as checkpoint.<name> (ship.py, tests)
from .contract import check_listing, file_sha256, listing_sha256, read_contract, seal  # noqa: F401
from .errors import QtaleError
from .export.manifest import BYPRODUCTS, MANIFEST, read_manifest

FORMAT = "qtale-checkpoint"
FORMAT_VERSION = 1
META = "qtale.json"
ROUTERS = "routers.safetensors"
ADAPTER = "adapter"


def write_json_atomic(path: Path, data: dict) -> None:
    safe_write.write_json(path, data)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished temporary folder onto `target`, replacing an older one (safe_write.publish)."""
    safe_write.publish(tmp, target)


def read_meta(path: str | os.PathLike) -> dict:
    """Read and validate qtale.json of a checkpoint folder."""
    meta = read_contract(Path(path) / META, FORMAT, FORMAT_VERSION, ("base_model", "router"), "checkpoint")
    if not isinstance(meta["base_model"].get("id"), str) or not meta["base_model"]["id"]:
        raise QtaleError(f"corrupt {Path(path) / META}: 'base_model' has no 'id' (the base model's name or folder)")
    return meta


def save(model, path: str | os.PathLike, *, training: dict | None = None,
         quantization: dict | None = None, extra_tensors: dict | None = None,
         extra_files: dict[str, Path] | None = None, logs: dict[str, Path] | None = None,
         routers: dict | None = None) -> Path:
    """Write `model` (a RoutedModel) as a checkpoint folder, atomically. Returns the folder.
    `extra_files` are copied and checksummed; `logs` are copied but not checksummed (they grow)."""
    from safetensors.torch import save_file

    target = Path(path)
    tmp = safe_write.staging_dir(target)
    try:
        save_file(routers if routers is not None else model.router_state(), tmp / ROUTERS)
        if hasattr(model.base, "peft_config"):
            model.base.save_pretrained(tmp / ADAPTER)
        elif getattr(model, "merged_adapter", None):  # LoRA merged into the weights before quantization
            shutil.copytree(model.merged_adapter, tmp / ADAPTER)
        if extra_tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()},
                      tmp / "quantizer.safetensors")
        for name, src in (extra_files or {}).items():
            shutil.copy2(src, tmp / name)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_model": dict(model.base_info),
            "router": model.router_config.to_dict(),
            "theta": model.theta,
            "theta_table": model.theta_table,
            "training": training if training is not None else model.training_info,
            "quantization": quantization if quantization is not None else model.quantization_info,
            "files": {p.relative_to(tmp).as_posix(): file_sha256(p)
                      for p in sorted(tmp.rglob("*")) if p.is_file()},
            "unchecked": sorted(logs or {}),
        }
        write_json_atomic(tmp / META, seal(meta))
        for name, src in (logs or {}).items():
            shutil.copy2(src, tmp / name)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def update_meta(path: str | os.PathLike, change=None, **fields) -> dict:
    """Change qtale.json in place: set top-level `fields` and/or apply `change(meta)` (which may
    mutate it). Read, change and write happen under the folder's lock, so concurrent updates
    (two `qtale calibrate` runs) all land instead of the last writer winning."""
    def apply(meta: dict) -> dict:
        meta.update(fields)
        if change is not None:
            meta = change(meta) or meta
        return seal(meta)

    safe_write.sweep(path)
    return safe_write.update_json(Path(path) / META, apply, lambda p: read_meta(p.parent))


def verify_files(folder: Path, meta: dict) -> None:
    """Check the folder against qtale.json's listing (see check_listing)."""
    check_listing(Path(folder), meta, META, "checkpoint")


def load_routers(folder: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(folder / ROUTERS)
    except (SafetensorError, OSError, ValueError) as exc:
        raise QtaleError(f"corrupt {folder / ROUTERS}: {exc}") from None


def upgrade(folder: str | os.PathLike) -> Path:
    """Seal a checkpoint or export written before listings were sealed (no "files_sha256"): every
    listed file must match its sha256, the logs become "unchecked" (train_log.jsonl; an export's
    build logs and caches), any other unlisted file is refused. Returns the rewritten JSON file."""
    folder = Path(folder)
    if (folder / META).is_file():
        path, data = folder / META, read_meta(folder)
        logs = [n for n in ("train_log.jsonl",) if (folder / n).is_file()]  # train.LOG (train imports torch)
    else:
        path, data, logs = folder / MANIFEST, read_manifest(folder, verify=False), list(BYPRODUCTS)
    if "files_sha256" in data:
        raise QtaleError(f"{path} already has 'files_sha256': nothing to upgrade")
    data["unchecked"] = sorted(set(data.get("unchecked") or []) | set(logs))
    check_listing(folder, seal(data), path.name, "folder")
    with safe_write.locked(folder):
        write_json_atomic(path, data)
    return path


if __name__ == "__main__":  # python -m qtale_export.checkpoint upgrade DIR...
    import sys

    if len(sys.argv) < 3 or sys.argv[1] != "upgrade":
        print("usage: python -m qtale_export.checkpoint upgrade DIR...", file=sys.stderr)
        sys.exit(2)
    for d in sys.argv[2:]:
        try:
            print(f"sealed {upgrade(d)}")
        except QtaleError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
