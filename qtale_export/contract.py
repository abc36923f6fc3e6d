"""A folder's versioned JSON contract (qtale.json of a checkpoint, manifest.json of an export): read
it, seal its file listing, check the folder against that listing. checkpoint.py and export/manifest.py
both build on it (docs/architecture.md, "the two on-disk contracts")."""
from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path

from . import safe_write
from .errors import QtaleError


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def listing_sha256(data: dict) -> str:
    """sha256 of a contract's file listing ("files" and "unchecked"), stored as "files_sha256"."""
    listing = {"files": data.get("files"), "unchecked": sorted(data.get("unchecked") or [])}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def seal(data: dict) -> dict:
    """Set "files_sha256" from the listing (every writer of qtale.json / manifest.json calls it)."""
    data["files_sha256"] = listing_sha256(data)
    return data


def check_listing(folder: Path, data: dict, meta_name: str, what: str, allow: tuple[str, ...] = ()) -> None:
    """Every file in `folder` is listed with a matching sha256 (or declared "unchecked": names or
    glob patterns of logs and caches, which no loader reads), and the listing matches its own
    checksum; a missing listing is an error, never a skipped check. `allow`: relative names that
    may be unlisted for this read (an engine about to be recorded)."""
    meta_path = folder / meta_name
    files = data.get("files")
    if not isinstance(files, dict):
        raise QtaleError(f"corrupt {meta_path}: no 'files' list (sha256 of every file)")
    unchecked = data.get("unchecked") or []
    if not isinstance(unchecked, list):
        raise QtaleError(f"corrupt {meta_path}: 'unchecked' is not a list")
    if "files_sha256" not in data:
        raise QtaleError(f"corrupt {meta_path}: no 'files_sha256' (the checksum of its file listing); if it "
                         f"was written by an older QTALE: python -m qtale_export.checkpoint upgrade {folder}")
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        name = rel.as_posix()
        if p.is_dir() or name == meta_name or name in files or name in allow:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in unchecked):
            continue
        if any(safe_write.is_ours(part) for part in rel.parts):  # an unfinished write's temporary
            continue
        raise QtaleError(f"corrupt {what} {folder}: {name} is not listed in {meta_name}")
    if data["files_sha256"] != listing_sha256(data):
        raise QtaleError(f"corrupt {meta_path}: its file listing does not match 'files_sha256' (edited or damaged)")
    for name, digest in files.items():
        p = folder / name
        if not p.is_file():
            raise QtaleError(f"{what} {folder} is missing {name}")
        if file_sha256(p) != digest:
            raise QtaleError(f"{what} file {p} does not match its sha256 in {meta_name} (corrupt or modified)")


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
