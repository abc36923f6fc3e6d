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

import math
import os
import shutil
from pathlib import Path

from . import safe_write
# the shared contract helpers, also reached as checkpoint.<name> (ship.py, tests)
from .contract import (SEAL, check_listing, check_seal, document_sha256, file_sha256, is_sha256,  # noqa: F401
                       listing_sha256, read_contract, seal)
from .deploy.theta import check_table
from .errors import QtaleError
from .deploy.manifest import BYPRODUCTS, MANIFEST, read_manifest

FORMAT = "qtale-checkpoint"
FORMAT_VERSION = 1
META = "qtale.json"
ROUTERS = "routers.safetensors"
ADAPTER = "adapter"
QUANTIZER = "quantizer.safetensors"


def write_json_atomic(path: Path, data: dict) -> None:
    safe_write.write_json(path, data)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished temporary folder onto `target`, replacing an older one (safe_write.publish)."""
    safe_write.publish(tmp, target)


# RouterConfig's fields: (check, rule); routing.py imports torch, so the rule is restated here
ROUTER_FIELDS = {
    "first_routed_layer": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "keep_initial": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "router_hidden": (lambda v: _is_int(v) and 1 <= v <= 1 << 16, "an integer in [1, 65536]"),
    "execute_bias": (lambda v: _is_number(v) and abs(v) <= 1e3, "a finite number"),
    "tau": (lambda v: _is_number(v) and 0 < v <= 1e3, "a finite number > 0"),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_meta(path: str | os.PathLike) -> dict:
    """Read and validate qtale.json of a checkpoint folder: every field a loader acts on, by type
    and range (docs/threat-model.md); the files it lists are checked by verify_files."""
    where = f"corrupt {Path(path) / META}"
    meta = read_contract(Path(path) / META, FORMAT, FORMAT_VERSION, ("base_model", "router"), "checkpoint")
    if not isinstance(meta["base_model"].get("id"), str) or not meta["base_model"]["id"]:
        raise QtaleError(f"{where}: 'base_model' has no 'id' (the base model's name or folder)")
    if not is_sha256(meta["base_model"].get("sha256")):
        raise QtaleError(f"{where}: 'base_model' has no 'sha256' (the base weights' identity, checked on every load)")
    unknown = set(meta["router"]) - set(ROUTER_FIELDS)
    if unknown:
        raise QtaleError(f"{where}: unknown router field(s) {sorted(unknown)}")
    for name, value in meta["router"].items():
        ok, rule = ROUTER_FIELDS[name]
        if not ok(value):
            raise QtaleError(f"{where}: router.{name} must be {rule}, got {value!r}")
    for name in ("theta", "threshold"):  # "threshold": theta's old name
        if meta.get(name) is not None and not (_is_number(meta[name]) and 0.0 <= meta[name] <= 1.0):
            raise QtaleError(f"{where}: {name} must be a number in [0, 1], got {meta[name]!r}")
    check_table(meta.get("theta_table"), f"{where}: theta_table")
    for name in ("quantization", "training", "calibration"):
        if meta.get(name) is not None and not isinstance(meta[name], dict):
            raise QtaleError(f"{where}: '{name}' must be an object or null, got {type(meta[name]).__name__}")
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
    """Check the folder against qtale.json's listing (see check_listing); every file the loader
    reads (routers, quantizer state, the adapter) must be listed with its sha256, never "unchecked"."""
    folder = Path(folder)
    check_listing(folder, meta, META, "checkpoint")
    adapter = folder / ADAPTER
    read = [ROUTERS, QUANTIZER] + [p.relative_to(folder).as_posix() for p in sorted(adapter.rglob("*"))
                                   if not p.is_dir()] if adapter.is_dir() else [ROUTERS, QUANTIZER]
    for name in read:
        if (folder / name).exists() and name not in meta["files"]:
            raise QtaleError(f"corrupt {folder / META}: {name} is read by the loader but not listed in 'files'")


def load_routers(folder: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(folder / ROUTERS)
    except (SafetensorError, OSError, ValueError) as exc:
        raise QtaleError(f"corrupt {folder / ROUTERS}: {exc}") from None


def upgrade(folder: str | os.PathLike) -> Path:
    """Seal a checkpoint or export written before QTALE sealed its listing ("files_sha256") or its
    whole document ("seal"), or whose fields were edited on purpose: the fields must pass the
    reader's checks, every listed file must match its sha256, the logs become "unchecked"
    (train_log.jsonl; an export's build logs and caches), any other unlisted file is refused.
    Returns the rewritten JSON file. (A seal is a checksum, not a signature: docs/threat-model.md.)"""
    folder = Path(folder)
    if (folder / META).is_file():
        path, data = folder / META, read_meta(folder)
        logs = [n for n in ("train_log.jsonl",) if (folder / n).is_file()]  # train.LOG (train imports torch)
    else:
        path, data, logs = folder / MANIFEST, read_manifest(folder, verify=False), list(BYPRODUCTS)
    if "files_sha256" in data and data.get(SEAL) == document_sha256(data):
        raise QtaleError(f"{path} already has 'files_sha256' and a matching 'seal': nothing to upgrade")
    if "files_sha256" not in data:
        data["unchecked"] = sorted(set(data.get("unchecked") or []) | set(logs))
    check_listing(folder, seal(data), path.name, "folder")
    if path.name == META:
        verify_files(folder, data)
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
