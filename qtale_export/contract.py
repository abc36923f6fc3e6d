"""A folder's versioned JSON contract (qtale.json of a checkpoint, manifest.json of an export): read
it, seal it, check the folder against its file listing, and resolve the names it gives. checkpoint.py
and export/manifest.py both build on it (docs/architecture.md, "the two on-disk contracts").

What a folder may make QTALE do is docs/threat-model.md: every name a contract gives is a plain
relative name inside the folder (`member`), checked before anything is opened or copied, and a
symlink may not lead out of the folder. The seals (sha256 of the listing, "files_sha256", and of
the whole document, "seal") catch damage and careless edits; they are not signatures.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
from pathlib import Path, PurePosixPath

from . import safe_write
from .errors import QtaleError


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


SEAL = "seal"  # sha256 of every other field of the document (files_sha256 included)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_sha256(value) -> bool:
    return isinstance(value, str) and _SHA256.match(value) is not None


def inside(root: Path, path: Path) -> bool:
    """Whether the resolved `path` is `root` (resolved) or below it."""
    return path == root or root in path.parents


def member(folder: str | Path, name, where: str) -> Path:
    """The resolved path of `name`, a plain relative name inside `folder` (no '..', no '.', no
    absolute path, no backslash, no symlink leading out of it); a one-line QtaleError otherwise.
    Every name a contract gives goes through it before anything is opened or copied."""
    if (not isinstance(name, str) or not name or "\x00" in name or "\\" in name
            or PurePosixPath(name).is_absolute() or any(part in ("", ".", "..") for part in name.split("/"))):
        raise QtaleError(f"{where}: {name!r} is not a plain relative name inside the folder "
                         "(no '..', no absolute path)")
    root = Path(folder).resolve()
    real = (root / name).resolve()
    if not inside(root, real):
        raise QtaleError(f"{where}: {name} leads out of {folder} (symlink to {real})")
    return real


def listing_sha256(data: dict) -> str:
    """sha256 of a contract's file listing ("files" and "unchecked"), stored as "files_sha256"."""
    listing = {"files": data.get("files"), "unchecked": sorted(data.get("unchecked") or [])}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def document_sha256(data: dict) -> str:
    """sha256 of every field but "seal", in canonical JSON (as read back: keys sorted, tuples as lists)."""
    body = json.loads(json.dumps({k: v for k, v in data.items() if k != SEAL}))
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(data: dict) -> dict:
    """Set "files_sha256" from the listing and "seal" from the whole document (every writer of
    qtale.json / manifest.json calls it last)."""
    data["files_sha256"] = listing_sha256(data)
    data[SEAL] = document_sha256(data)
    return data


def check_seal(path: Path, data: dict) -> None:
    """The document matches its "seal". A file without one was written before QTALE sealed whole
    documents: it is read as it was then (its listing sealed only) and sealed by
    `python -m qtale_export.checkpoint upgrade` or its next rewrite."""
    if SEAL in data and data[SEAL] != document_sha256(data):
        raise QtaleError(f"corrupt {path}: its fields do not match its 'seal' (edited or damaged); an edit "
                         f"made on purpose is sealed again with: python -m qtale_export.checkpoint upgrade {path.parent}")


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
    if not isinstance(unchecked, list) or not all(isinstance(u, str) and u for u in unchecked):
        raise QtaleError(f"corrupt {meta_path}: 'unchecked' is not a list of names")
    real = {name: member(folder, name, f"corrupt {meta_path}: 'files'") for name in files}  # before any open
    bad = next((n for n, d in files.items() if not is_sha256(d)), None)
    if bad is not None:
        raise QtaleError(f"corrupt {meta_path}: the sha256 of {bad} is not 64 hex digits")
    if "files_sha256" not in data:
        raise QtaleError(f"corrupt {meta_path}: no 'files_sha256' (the checksum of its file listing); if it "
                         f"was written by an older QTALE: python -m qtale_export.checkpoint upgrade {folder}")
    root = folder.resolve()
    for p in sorted(folder.rglob("*")):  # rglob does not descend into symlinked folders
        rel = p.relative_to(folder)
        name = rel.as_posix()
        if p.is_symlink() and not inside(root, p.resolve()):
            raise QtaleError(f"{what} {folder}: {name} is a symlink leading out of the folder (to {p.resolve()})")
        if (p.is_dir() and not p.is_symlink()) or name == meta_name or name in files or name in allow:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in unchecked):
            continue
        if any(safe_write.is_ours(part) for part in rel.parts):  # an unfinished write's temporary
            continue
        raise QtaleError(f"corrupt {what} {folder}: {name} is not listed in {meta_name}")
    if data["files_sha256"] != listing_sha256(data):
        raise QtaleError(f"corrupt {meta_path}: its file listing does not match 'files_sha256' (edited or damaged)")
    check_seal(meta_path, data)
    for name, digest in files.items():
        p = real[name]
        if not p.is_file():
            raise QtaleError(f"{what} {folder} is missing {name}")
        if file_sha256(p) != digest:
            raise QtaleError(f"{what} file {p} does not match its sha256 in {meta_name} (corrupt or modified)")


MAX_JSON = 64 << 20  # the largest qtale.json / manifest.json read (a real one is a few kB)


def read_contract(path: Path, fmt: str, version: int, required: tuple[str, ...], what: str) -> dict:
    """Read a folder's versioned JSON contract (qtale.json, manifest.json) with one-line errors."""
    folder = path.parent
    if not folder.is_dir():
        raise QtaleError(f"{what} not found: {folder} is not a folder")
    if not path.is_file():
        raise QtaleError(f"{folder} is not a QTALE {what} (no {path.name})")
    member(folder, path.name, f"corrupt {path}")  # the JSON file itself may not be a symlink out of the folder
    if path.stat().st_size > MAX_JSON:
        raise QtaleError(f"corrupt {path}: {path.stat().st_size} bytes, more than a {what} file can be "
                         f"({MAX_JSON})")
    try:
        data = json.loads(path.read_text())
    except RecursionError:
        raise QtaleError(f"corrupt {path}: nested too deeply") from None
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
