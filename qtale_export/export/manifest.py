"""manifest.json of an export folder: what the runtimes and the engine builder read.

{"format": "qtale-export", "format_version": 1, "base_model", "checkpoint", "precision", "ops",
"target", "opset", "ratio", "theta", "theta_table", "router", "graphs", "model", "files", "engines",
"tools", "verification"}; "files" maps every other file's relative path to its sha256.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import file_sha256, read_contract, write_json_atomic
from ..errors import QtaleError

FORMAT = "qtale-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def checksums(folder: str | os.PathLike) -> dict[str, str]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}.")}


def write_manifest(folder: str | os.PathLike, data: dict) -> Path:
    """Write manifest.json atomically (temporary file + rename)."""
    path = Path(folder) / MANIFEST
    write_json_atomic(path, data)
    return path


def read_manifest(folder: str | os.PathLike, verify: bool = True) -> dict:
    """Read and validate manifest.json; with verify, check every listed file's sha256."""
    folder = Path(folder)
    data = read_contract(folder / MANIFEST, FORMAT, FORMAT_VERSION, ("graphs", "model", "files"), "export")
    if verify:
        for name, digest in data["files"].items():
            p = folder / name
            if not p.is_file():
                raise QtaleError(f"export {folder} is missing {name}")
            if file_sha256(p) != digest:
                raise QtaleError(f"export file {p} does not match its sha256 in {MANIFEST} (corrupt or modified)")
    return data
