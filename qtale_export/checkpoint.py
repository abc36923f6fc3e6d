"""The checkpoint contract: a folder with qtale.json + routers.safetensors [+ adapter/ (LoRA)].

qtale.json: {"format": "qtale-checkpoint", "format_version": 1, "base_model": {"id", "sha256"},
"router": RouterConfig, "theta_table": {ratio: {"theta", "realized"}}, "training": {...},
"quantization": null | {...}, "files": {name: sha256}}. No pickle anywhere: tensors are safetensors.
Every write goes to a temporary name first and is renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import QtaleError

FORMAT = "qtale-checkpoint"
FORMAT_VERSION = 1
META = "qtale.json"
ROUTERS = "routers.safetensors"
ADAPTER = "adapter"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished temporary folder onto `target`, replacing an older one."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_contract(path: Path, fmt: str, version: int, required: tuple[str, ...], what: str) -> dict:
    """Read a folder's versioned JSON contract (qtale.json, manifest.json) with one-line errors."""
    folder = path.parent
    if not folder.is_dir():
        raise QtaleError(f"{what} not found: {folder} is not a folder")
    if not path.is_file():
        raise QtaleError(f"{folder} is not a QTALE {what} (no {path.name})")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise QtaleError(f"corrupt {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise QtaleError(f"corrupt {path}: not a {fmt} file")
    if data.get("format_version") != version:
        raise QtaleError(f"{path} has format version {data.get('format_version')}; "
                         f"this QTALE reads version {version}")
    for key in required:
        if not isinstance(data.get(key), dict):
            raise QtaleError(f"corrupt {path}: missing '{key}'")
    return data


def read_meta(path: str | os.PathLike) -> dict:
    """Read and validate qtale.json of a checkpoint folder."""
    return read_contract(Path(path) / META, FORMAT, FORMAT_VERSION, ("base_model", "router"), "checkpoint")


def save(model, path: str | os.PathLike, *, training: dict | None = None,
         quantization: dict | None = None, extra_tensors: dict | None = None,
         extra_files: dict[str, Path] | None = None, logs: dict[str, Path] | None = None,
         routers: dict | None = None) -> Path:
    """Write `model` (a RoutedModel) as a checkpoint folder, atomically. Returns the folder.
    `extra_files` are copied and checksummed; `logs` are copied but not checksummed (they grow)."""
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
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
            "threshold": model.threshold,
            "theta_table": model.theta_table,
            "training": training if training is not None else model.training_info,
            "quantization": quantization if quantization is not None else model.quantization_info,
            "files": {p.relative_to(tmp).as_posix(): file_sha256(p)
                      for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        write_json_atomic(tmp / META, meta)
        for name, src in (logs or {}).items():
            shutil.copy2(src, tmp / name)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def update_meta(path: str | os.PathLike, **fields) -> dict:
    """Change top-level fields of qtale.json in place (atomic rename), e.g. the theta table."""
    meta = read_meta(path)
    meta.update(fields)
    write_json_atomic(Path(path) / META, meta)
    return meta


def verify_files(folder: Path, meta: dict) -> None:
    for name, digest in meta.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            raise QtaleError(f"checkpoint {folder} is missing {name}")
        if file_sha256(p) != digest:
            raise QtaleError(f"checkpoint file {p} does not match its sha256 in {META} (corrupt or modified)")


def load_routers(folder: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(folder / ROUTERS)
    except (SafetensorError, OSError, ValueError) as exc:
        raise QtaleError(f"corrupt {folder / ROUTERS}: {exc}") from None
