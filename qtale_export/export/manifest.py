"""manifest.json of an export folder: what the runtimes and the engine builder read.

{"format": "qtale-export", "format_version": 1, "base_model", "checkpoint", "precision", "ops",
"target", "opset", "ratio", "theta", "theta_table", "theta_calibration" (what the table was
calibrated on, theta.py), "router", "graphs", "model", "files", "engines",
"tools", "verification", "files_sha256"}; "files" maps every other file's relative path to its
sha256 and "files_sha256" covers that listing (contract.check_listing: an unlisted file or a
missing listing is an error).
"""
from __future__ import annotations

import os
from pathlib import Path

from .. import safe_write
from ..contract import check_listing, file_sha256, read_contract, seal

FORMAT = "qtale-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# by-products of `qtale build` / build_engine.sh that may sit in an export folder unlisted (no loader
# reads them): trtexec logs, timing caches, trtexec's temporary engine
BYPRODUCTS = ["*.log", "*.cache", ".*.tmp"]


def checksums(folder: str | os.PathLike) -> dict[str, str]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST
            and not any(safe_write.is_ours(part) for part in p.relative_to(folder).parts)}


def write_manifest(folder: str | os.PathLike, data: dict) -> Path:
    """Write manifest.json atomically (temporary file + rename), with the checksum of its listing."""
    path = Path(folder) / MANIFEST
    safe_write.write_json(path, seal(data))
    return path


def read_manifest(folder: str | os.PathLike, verify: bool = True, allow: tuple[str, ...] = ()) -> dict:
    """Read and validate manifest.json; with verify, check the folder against its listing (every
    listed file's sha256, no unlisted file but those in `allow`)."""
    folder = Path(folder)
    data = read_contract(folder / MANIFEST, FORMAT, FORMAT_VERSION, ("graphs", "model", "files"), "export")
    if verify:
        check_listing(folder, data, MANIFEST, "export", allow)
    return data
