"""An export folder edited on purpose (and resealed: a sha256 is not a signature) cannot make QTALE
open, copy or run anything outside it, nor use out-of-range fields (issue 24, docs/threat-model.md).
Each probe is one row: an edit of a copy of the tiny export, then the command that used to act on
it; the command must exit 2 with one line naming the problem, and nothing outside is touched."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from qtale_export import cli
from qtale_export.contract import file_sha256, seal
from qtale_export.errors import QtaleError
from qtale_export.deploy.manifest import MAX_POSITIONS, graph_files, plugin_library, read_manifest

OUTSIDE = "outside.bin"  # a file beside the export folder, which nothing may read or copy


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _listed(m, name, data: bytes):
    m["files"][name] = _sha(data)


# ---- the edits ----------------------------------------------------------------------------------
def graph_outside(f, m):
    m["graphs"]["prefill"]["file"] = f"../{OUTSIDE}"


def graph_absolute(f, m):
    m["graphs"]["prefill"]["file"] = str(f.parent / OUTSIDE)


def external_data_absolute(f, m):
    m["graphs"]["prefill"]["external_data"].append(str(f.parent / OUTSIDE))


def external_data_unlisted(f, m):
    (f / "x.log").write_text("a log: 'unchecked', so never read by a loader")
    m["graphs"]["prefill"]["external_data"].append("x.log")


def files_traversal(f, m):
    m["files"]["../../../../etc/passwd"] = "0" * 64


def files_absolute(f, m):
    m["files"]["/etc/hostname"] = "0" * 64


def listed_symlink_out(f, m):
    os.symlink(f.parent / OUTSIDE, f / "extra.onnx.data")
    m["files"]["extra.onnx.data"] = file_sha256(f.parent / OUTSIDE)


def unlisted_symlink_to_folder(f, m):
    os.symlink(f.parent, f / "up")


def weights_swapped_for_symlink(f, m):
    data = f / "weights.onnx.data"
    shutil.move(data, f.parent / "moved.data")
    os.symlink(f.parent / "moved.data", data)


def graph_reads_outside(f, m):
    """The graph itself names data outside the folder (an initializer's external-data location): the
    loader refuses it before any reader (ONNX Runtime, onnx and TensorRT's parser refuse it too)."""
    import onnx

    path = f / m["graphs"]["prefill"]["file"]
    model = onnx.load(str(path), load_external_data=False)
    init = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in init.external_data if e.key == "location").value = f"../{OUTSIDE}"
    path.write_bytes(model.SerializeToString())
    m["files"][m["graphs"]["prefill"]["file"]] = file_sha256(path)


def theta_nan(f, m):
    m["theta"] = math.nan


def table_theta_7(f, m):
    next(iter(m["theta_table"].values()))["theta"] = 7.0


def table_string(f, m):
    m["theta_table"] = "0.6: 0.3"


def table_bad_key(f, m):
    m["theta_table"]["fast"] = {"theta": 0.5, "realized": 0.5}


def layers_negative(f, m):
    m["model"]["num_layers"] = -3


def keep_initial_negative(f, m):
    m["model"]["keep_initial"] = -5


def layers_mismatch(f, m):
    m["model"]["num_layers"] += 1


def positions_huge(f, m):
    m["model"]["max_position_embeddings"] = 10 ** 12


def engine_outside(f, m):
    m["engines"] = [{"file": f"../{OUTSIDE}", "graph": "prefill", "precision": "fp32"}]


def unsealed_edit(f, m):
    m["theta"] = 0.9
    return "no reseal"


# (edit, text of the one-line error)
CASES = [
    (graph_outside, "is not a plain relative name inside the folder"),
    (graph_absolute, "is not a plain relative name inside the folder"),
    (external_data_absolute, "is not a plain relative name inside the folder"),
    (external_data_unlisted, "x.log is not listed in 'files'"),
    (files_traversal, "is not a plain relative name inside the folder"),
    (files_absolute, "is not a plain relative name inside the folder"),
    (listed_symlink_out, "leads out of"),
    (unlisted_symlink_to_folder, "up is a symlink leading out of the folder"),
    (weights_swapped_for_symlink, "weights.onnx.data leads out of"),
    (graph_reads_outside, "reads external data from '../outside.bin', which the manifest does not list"),
    (theta_nan, "theta must be in [0, 1]"),
    (table_theta_7, "theta of ratio"),
    (table_string, "theta_table must be a mapping"),
    (table_bad_key, "key 'fast' is not a ratio"),
    (layers_negative, "model.num_layers must be an integer >= 1, got -3"),
    (keep_initial_negative, "model.keep_initial must be an integer >= 0, got -5"),
    (layers_mismatch, "carries"),
    (positions_huge, f"max_position_embeddings must be an integer in [1, {MAX_POSITIONS}]"),
    (engine_outside, "is not a plain relative name inside the folder"),
    (unsealed_edit, "do not match its 'seal'"),
]


@pytest.fixture
def tampered(tiny_export, tmp_path):
    def make(edit) -> Path:
        (tmp_path / OUTSIDE).write_bytes(b"secret outside the export")
        folder = tmp_path / "exp"
        shutil.copytree(tiny_export, folder)
        m = json.loads((folder / "manifest.json").read_text())
        resealed = edit(folder, m) != "no reseal"
        (folder / "manifest.json").write_text(json.dumps(seal(m) if resealed else m))
        return folder

    return make


def one_line(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("edit,text", CASES, ids=[c[0].__name__ for c in CASES])
def test_run_refuses_a_tampered_export(tampered, capsys, edit, text):
    folder = tampered(edit)
    err = one_line(capsys, cli.main(["run", str(folder), "--prompt", "hi", "--max-new-tokens", "2"]))
    assert text in err


@pytest.mark.parametrize("edit,text", [c for c in CASES if c[0] in (external_data_absolute, listed_symlink_out,
                                                                     weights_swapped_for_symlink, graph_outside)],
                         ids=lambda c: getattr(c, "__name__", ""))
def test_triton_repo_copies_nothing_from_outside(tampered, tmp_path, capsys, edit, text):
    folder = tampered(edit)
    out = tmp_path / "repo"
    err = one_line(capsys, cli.main(["triton-repo", str(folder), "--out", str(out)]))
    assert text in err and not out.exists()


def test_graph_files_is_the_checked_list(tiny_export):
    m = read_manifest(tiny_export)
    files = graph_files(tiny_export, m, "prefill")
    assert [p.name for p in files] == ["prefill.onnx", "weights.onnx.data"]
    assert all(p.is_absolute() and tiny_export.resolve() in p.parents for p in files)


# ---- plugin libraries: only the user's, or one inside the folder matching its sha256 --------------
def _with_engines(tiny_export, tmp_path, lib_path: str, lib_sha: str, inside: bytes | None = None) -> Path:
    folder = tmp_path / "exp"
    shutil.copytree(tiny_export, folder)
    m = json.loads((folder / "manifest.json").read_text())
    for g in ("prefill", "decode"):
        (folder / f"{g}.engine").write_bytes(b"not a real engine")
        _listed(m, f"{g}.engine", b"not a real engine")
        m["engines"].append({"file": f"{g}.engine", "graph": g, "precision": "fp32",
                             "plugin_library": {"path": lib_path, "sha256": lib_sha}})
    if inside is not None:
        (folder / lib_path).write_bytes(inside)
        _listed(m, lib_path, inside)
    (folder / "manifest.json").write_text(json.dumps(seal(m)))
    return folder


PLUGIN_CASES = [
    # (where the manifest's library is, what it records, the one-line error)
    ("outside", "right sha256", "is loaded from the manifest only when it lies inside the export folder"),
    ("inside", "wrong sha256", "does not match its recorded sha256"),
]


@pytest.mark.parametrize("where,sha,text", PLUGIN_CASES)
def test_run_tensorrt_never_loads_a_library_on_the_manifests_word(tiny_export, tmp_path, capsys, where, sha, text):
    evil = tmp_path / "libevil.so"
    evil.write_bytes(b"\x7fELF a library whose constructor would run")
    good = _sha(evil.read_bytes())
    if where == "outside":
        folder = _with_engines(tiny_export, tmp_path, str(evil), good)
    else:
        folder = _with_engines(tiny_export, tmp_path, "libqtale.so", "0" * 64, inside=evil.read_bytes())
    err = one_line(capsys, cli.main(["run", str(folder), "--prompt", "hi", "--backend", "tensorrt"]))
    assert text in err and "--plugin-lib" in err  # refused before TensorRT is even imported


def test_plugin_library_rule(tiny_export, tmp_path):
    data = b"\x7fELF plugins"
    folder = _with_engines(tiny_export, tmp_path, "plugins/libqtale.so", _sha(data), inside=None)
    (folder / "plugins").mkdir()
    (folder / "plugins" / "libqtale.so").write_bytes(data)
    m = json.loads((folder / "manifest.json").read_text())
    _listed(m, "plugins/libqtale.so", data)
    (folder / "manifest.json").write_text(json.dumps(seal(m)))
    m = read_manifest(folder)
    entry = m["engines"][0]
    assert plugin_library(folder, m, entry) == (folder / "plugins" / "libqtale.so").resolve()
    named = tmp_path / "mine.so"
    named.write_bytes(b"the user's")
    assert plugin_library(folder, m, entry, named) == named  # the user's word wins
    assert plugin_library(folder, m, {"file": "prefill.engine", "plugin_library": None}) is None
    with pytest.raises(QtaleError, match="not found"):
        plugin_library(folder, m, entry, tmp_path / "missing.so")
    (folder / "plugins" / "libqtale.so").write_bytes(b"\x7fELF swapped after the seal")
    with pytest.raises(QtaleError, match="does not match its recorded sha256"):
        plugin_library(folder, m, entry)


def test_manifest_itself_may_not_be_a_symlink_out(tiny_export, tmp_path):
    folder = tmp_path / "exp"
    shutil.copytree(tiny_export, folder)
    shutil.move(folder / "manifest.json", tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", folder / "manifest.json")
    with pytest.raises(QtaleError, match="leads out of"):
        read_manifest(folder)
