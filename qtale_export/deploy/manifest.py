"""manifest.json of an export folder: what the runtimes and the engine builder read.

{"format": "qtale-export", "format_version": 1, "base_model", "checkpoint", "precision", "ops",
"target", "opset", "ratio", "theta", "theta_table", "theta_calibration" (what the table was
calibrated on, theta.py), "router", "graphs", "model", "files", "engines",
"tools", "verification", "files_sha256", "seal"}; "files" maps every other file's relative path to
its sha256, "files_sha256" covers that listing and "seal" the whole document (contract.py: an
unlisted file or a missing listing is an error).

`read_manifest` is the one reader: besides the listing it checks every field a loader acts on
(docs/threat-model.md): each file a graph or engine names is a plain relative name inside the
folder and listed with its sha256 (`graph_files`, `engine_file` give them resolved), theta and the
theta table are in range, the model's sizes are positive and match the graphs, its maximum
positions is capped. `plugin_library` says which TensorRT plugin library, if any, may be loaded.

`load` gives the checked document as a typed view (`Manifest`, `ModelShape`): what the runtime,
the engine builder, the verifier, the eval of an export and the pipeline read, so they name fields
instead of indexing the JSON. `read_manifest` / `write_manifest` stay for writers that update the
document (engines, benchmarks). Torch-free: the deployment side owns the export contract.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import safe_write
from ..contract import check_listing, file_sha256, is_sha256, member, read_contract, seal
from ..errors import QtaleError
from . import theta as policy

FORMAT = "qtale-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# by-products of `qtale build` / build_engine.sh that may sit in an export folder unlisted (no loader
# reads them): trtexec logs, timing caches, trtexec's temporary engine
BYPRODUCTS = ["*.log", "*.cache", ".*.tmp"]
GRAPHS = ("prefill", "decode")
# the most positions a manifest may claim (2**20; the Llama-family models QTALE routes have 8k-128k):
# a larger value is an edit, and would size buffers from it
MAX_POSITIONS = 1 << 20
# "mlp_width" (the gated MLP's inner size) is recorded since issue 26; older exports lack it
MODEL_SIZES = ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "vocab", "mlp_width")


def checksums(folder: str | os.PathLike) -> dict[str, str]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST
            and not any(safe_write.is_ours(part) for part in p.relative_to(folder).parts)}


def write_manifest(folder: str | os.PathLike, data: dict) -> Path:
    """Write manifest.json atomically (temporary file + rename), sealed (its listing and the whole document)."""
    path = Path(folder) / MANIFEST
    safe_write.write_json(path, seal(data))
    return path


def read_manifest(folder: str | os.PathLike, verify: bool = True, allow: tuple[str, ...] = ()) -> dict:
    """Read and validate manifest.json (its fields and every name it gives, see the module doc);
    with verify, check the folder against its listing (every listed file's sha256, no unlisted
    file but those in `allow`) and the document against its seal."""
    folder = Path(folder)
    data = read_contract(folder / MANIFEST, FORMAT, FORMAT_VERSION, ("graphs", "model", "files"), "export")
    check_fields(folder, data)
    if verify:
        check_listing(folder, data, MANIFEST, "export", allow)
    return data


# ---- fields -----------------------------------------------------------------------------------
def _int(value, what: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        rule = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise QtaleError(f"{what} must be an integer {rule}, got {value!r}")
    return value


def _listed(folder: Path, data: dict, name, what: str) -> Path:
    """A name the manifest gives for a file it loads: inside the folder and listed with its sha256
    (so "unchecked" patterns never cover a file a loader reads)."""
    path = member(folder, name, what)
    if name not in data["files"]:
        raise QtaleError(f"{what}: {name} is not listed in 'files' (every file a loader reads is checksummed)")
    return path


def graph_files(folder: str | os.PathLike, data: dict, graph: str) -> list[Path]:
    """The resolved paths of `graph`'s ONNX file and its external data files, each checked (a plain
    relative name inside the folder, listed in 'files'). What `qtale triton-repo` copies."""
    folder = Path(folder)
    where = f"corrupt {folder / MANIFEST}: graphs.{graph}"
    g = data["graphs"].get(graph)
    if not isinstance(g, dict):
        raise QtaleError(f"export {folder} has no {graph} graph")
    names = [g.get("file")]
    if "external_data" in g:
        if not isinstance(g["external_data"], list):
            raise QtaleError(f"{where}.external_data is not a list of file names")
        names += g["external_data"]
    else:  # exports written before the shared weights file: <graph>.onnx.data next to each graph
        names += sorted(f for f in data["files"] if isinstance(g.get("file"), str) and f.startswith(g["file"] + "."))
    paths = [_listed(folder, data, n, where) for n in names]
    _check_external_data(paths[0], set(names[1:]))
    return paths


def _external_locations(graph) -> set[str]:
    import onnx

    from .onnx_graphs import initializers

    return {e.value for t in initializers(graph) if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


def _check_external_data(onnx_path: Path, listed: set[str]) -> None:
    """The graph may read external data only from the files the manifest lists for it. ONNX Runtime,
    onnx and TensorRT's parser each refuse a location outside the graph's folder too; checking here
    turns it into QTALE's one line before any of them opens anything, and also refuses a listed
    file of the folder that is not this graph's external data."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # a truncated or foreign file: the sha256 check passed, so it was listed so
        raise QtaleError(f"{onnx_path} is not a readable ONNX graph: {str(e).splitlines()[0][:200]}") from None
    extra = sorted(_external_locations(model.graph) - listed)
    if extra:
        raise QtaleError(f"{onnx_path.name} reads external data from {extra[0]!r}, which the manifest does not "
                         "list as its external data")


def engine_file(folder: str | os.PathLike, data: dict, entry: dict) -> Path:
    """The resolved, checked path of an engine entry's "file"."""
    return _listed(Path(folder), data, entry.get("file"), f"corrupt {Path(folder) / MANIFEST}: engines")


def _layers_in(io: dict) -> int:
    """How many layers a graph's I/O description carries (past.{i}.key inputs or present.{i}.key outputs)."""
    names = [*(io.get("inputs") or {}), *(io.get("outputs") or {})]
    return len({n.split(".")[1] for n in names if n.startswith(("past.", "present.")) and n.endswith(".key")})


def check_fields(folder: Path, data: dict) -> None:
    """Every field a loader acts on, by type and range (one-line QtaleError naming the field)."""
    where = f"corrupt {folder / MANIFEST}"
    for key in ("ratio",):
        if data.get(key) is not None:
            try:
                policy.check_ratio(data[key])
            except QtaleError as exc:
                raise QtaleError(f"{where}: {key}: {exc}") from None
    if data.get("theta") is not None:
        if isinstance(data["theta"], bool) or not isinstance(data["theta"], (int, float)):
            raise QtaleError(f"{where}: theta must be a number in [0, 1], got {data['theta']!r}")
        try:
            policy.check_theta(data["theta"])
        except QtaleError as exc:
            raise QtaleError(f"{where}: {exc}") from None
    policy.check_table(data.get("theta_table"), f"{where}: theta_table")
    m = data["model"]
    sizes = {k: _int(m[k], f"{where}: model.{k}", 1) for k in MODEL_SIZES if m.get(k) is not None}
    if "num_layers" not in sizes:
        raise QtaleError(f"{where}: model.num_layers is missing")
    n = sizes["num_layers"]
    if m.get("keep_initial") is not None:
        _int(m["keep_initial"], f"{where}: model.keep_initial", 0)
    routed = m.get("routed_layers")
    if routed is not None and (not isinstance(routed, list)
                               or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in routed)):
        raise QtaleError(f"{where}: model.routed_layers must list layer indices in [0, {n}), got {routed!r}")
    if m.get("max_position_embeddings") is not None:
        _int(m["max_position_embeddings"], f"{where}: model.max_position_embeddings", 1, MAX_POSITIONS)
    graphs = data["graphs"]
    for g, io in graphs.items():
        if g not in GRAPHS or not isinstance(io, dict):
            raise QtaleError(f"{where}: unknown graph {g!r} (graphs are {', '.join(GRAPHS)})")
        graph_files(folder, data, g)
        layers = _layers_in(io)
        if layers and layers != n:
            raise QtaleError(f"{where}: model.num_layers is {n} but the {g} graph carries {layers} layers")
    engines = data.get("engines") or []
    if not isinstance(engines, list) or not all(isinstance(e, dict) for e in engines):
        raise QtaleError(f"{where}: 'engines' is not a list of entries")
    for e in engines:
        engine_file(folder, data, e)
        lib = e.get("plugin_library")
        if lib is not None and (not isinstance(lib, dict) or not isinstance(lib.get("path"), str)
                                or not is_sha256(lib.get("sha256"))):
            raise QtaleError(f"{where}: engines[].plugin_library must be {{'path', 'sha256'}}, got {lib!r}")


# ---- native code --------------------------------------------------------------------------------
def plugin_library(folder: str | os.PathLike, data: dict, entry: dict, named: str | os.PathLike | None = None) -> Path | None:
    """The TensorRT plugin library to load for engine `entry`, or None when it needs none.

    The rule (docs/threat-model.md): a library is loaded only when the user names it (`named`:
    --plugin-lib, the server's config), or when the manifest records one that lies inside the
    export folder, is listed in 'files', and matches its recorded sha256. A recorded path outside
    the folder (what `qtale build` wrote before) is never loaded on the manifest's word: the user
    names it. Nothing is opened before these checks."""
    folder = Path(folder)
    if named is not None:
        path = Path(named)
        if not path.is_file():
            raise QtaleError(f"TensorRT plugin library {path} not found")
        return path
    lib = entry.get("plugin_library")
    if lib is None:
        return None
    what = f"engine {entry.get('file')} needs the plugin library {lib.get('path')}"
    hint = "pass --plugin-lib PATH to name the library yourself"
    try:
        path = _listed(folder, data, lib.get("path"), f"{what}, which")
    except QtaleError as exc:
        raise QtaleError(f"{exc}: a plugin library is loaded from the manifest only when it lies inside "
                         f"the export folder; {hint}") from None
    if not path.is_file():
        raise QtaleError(f"{what}, which is missing; {hint}")
    digest = file_sha256(path)
    if digest != lib["sha256"] or digest != data["files"][lib["path"]]:
        raise QtaleError(f"{what}, which does not match its recorded sha256; {hint}")
    return path


# ---- the typed view -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """manifest["model"]: the decoder's sizes and what the graphs' I/O depends on."""

    num_layers: int
    hidden: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    vocab: int | None
    mlp_width: int | None  # None: an export written before the width was recorded
    routed_layers: tuple[int, ...]
    keep_initial: int | None
    eos_ids: tuple[int, ...]
    activation_dtype: str
    max_positions: int | None
    weights: str | None  # how the projections are stored: float, DequantizeLinear, MatMulNBits
    embedding: str | None  # float, int4 or fp8
    group_sizes: dict | None

    @classmethod
    def of(cls, m: dict) -> "ModelShape":
        eos = m.get("eos_token_id")
        return cls(num_layers=m["num_layers"], hidden=m.get("hidden"), heads=m.get("heads"),
                   kv_heads=m.get("kv_heads"), head_dim=m.get("head_dim"), vocab=m.get("vocab"),
                   mlp_width=m.get("mlp_width"), routed_layers=tuple(m.get("routed_layers") or ()),
                   keep_initial=m.get("keep_initial"),
                   eos_ids=tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None),
                   activation_dtype=m.get("activation_dtype") or "float32",
                   max_positions=m.get("max_position_embeddings"), weights=m.get("weights"),
                   embedding=m.get("embedding"), group_sizes=m.get("group_sizes"))


@dataclass(frozen=True)
class Manifest:
    """A checked manifest.json (`load`): typed fields, and the file paths resolved through the
    checks above. `data` is the document itself, for writers."""

    folder: Path
    data: dict[str, Any]
    precision: str
    ops: str | None
    target: str | None
    opset: int | None
    ratio: float | None
    theta: float
    theta_table: dict | None
    router_hidden: int | None
    model: ModelShape
    engines: tuple[dict, ...]
    files_sha256: str | None  # the listing's checksum: changes with any listed file

    @property
    def graphs(self) -> dict[str, dict]:
        """{graph: {"file", "external_data", "inputs", "outputs", ...}}."""
        return self.data["graphs"]

    def graph_file(self, graph: str) -> Path:
        """The checked path of `graph`'s ONNX file."""
        return graph_files(self.folder, self.data, graph)[0]

    def graph_files(self, graph: str) -> list[Path]:
        return graph_files(self.folder, self.data, graph)

    def engine_file(self, entry: dict) -> Path:
        return engine_file(self.folder, self.data, entry)

    def plugin_library(self, entry: dict, named: str | os.PathLike | None = None) -> Path | None:
        return plugin_library(self.folder, self.data, entry, named)

    @property
    def verification(self) -> dict:
        """The export-time check's report ({} when none was recorded)."""
        return self.data.get("verification") or {}

    @property
    def in_place_kv(self) -> bool:
        """Whether decode may bind past.* as present.* (the ort-cpu form, docs/export.md)."""
        return self.graphs.get("decode", {}).get("kv_cache") == "in-place"

    @property
    def decode_form(self) -> str | None:
        """The TensorRT decode graph's form (graphs.TRT_DECODE_FORMS), None for other targets."""
        return self.graphs.get("decode", {}).get("form")


def view(folder: str | os.PathLike, data: dict) -> Manifest:
    """The typed view of a document `read_manifest` checked."""
    return Manifest(folder=Path(folder), data=data, precision=data.get("precision") or "fp32",
                    ops=data.get("ops"), target=data.get("target"), opset=data.get("opset"),
                    ratio=data.get("ratio"), theta=float(data.get("theta") or 0.0),
                    theta_table=data.get("theta_table"),
                    router_hidden=(data.get("router") or {}).get("router_hidden"),
                    model=ModelShape.of(data["model"]), engines=tuple(data.get("engines") or ()),
                    files_sha256=data.get("files_sha256"))


def load(folder: str | os.PathLike, verify: bool = True, allow: tuple[str, ...] = ()) -> Manifest:
    """`read_manifest` (every check) as a typed `Manifest`."""
    return view(folder, read_manifest(folder, verify=verify, allow=allow))
