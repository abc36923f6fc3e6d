"""A checkpoint folder edited on purpose (and resealed) cannot make `qtale_export.load` read files
outside it or use out-of-range fields; the embedded base's cached copy is checked by its content
(issue 24, docs/threat-model.md). One row per probe."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

import qtale_export
from qtale_export import checkpoint, cli, models
from qtale_export.contract import file_sha256, seal
from qtale_export.errors import QtaleError
from qtale_testing import make_tiny, spread_checkpoint


@pytest.fixture(scope="module")
def ck(tiny_dir, tmp_path_factory) -> Path:
    return spread_checkpoint(tiny_dir, tmp_path_factory.mktemp("sec-ck") / "ck")[1]


def files_traversal(f, m):
    m["files"]["../../../../etc/passwd"] = "0" * 64


def files_absolute(f, m):
    m["files"]["/etc/hostname"] = "0" * 64


def routers_symlink_out(f, m):
    shutil.move(f / "routers.safetensors", f.parent / "routers-elsewhere.safetensors")
    os.symlink(f.parent / "routers-elsewhere.safetensors", f / "routers.safetensors")


def adapter_symlink_out(f, m):
    (f.parent / "adapter-elsewhere").mkdir(exist_ok=True)
    os.symlink(f.parent / "adapter-elsewhere", f / "adapter")


def theta_nan(f, m):
    m["theta"] = math.nan


def theta_7(f, m):
    m["theta_table"]["0.6"]["theta"] = 7.0


def table_string(f, m):
    m["theta_table"] = "0.6"


def base_sha_removed(f, m):
    m["base_model"].pop("sha256")


def keep_initial_negative(f, m):
    m["router"]["keep_initial"] = -5


def router_hidden_huge(f, m):
    m["router"]["router_hidden"] = 10 ** 9


def routers_unchecked(f, m):
    m["files"].pop("routers.safetensors")
    m["unchecked"] = ["routers.safetensors"]


def unsealed_edit(f, m):
    m["theta_table"]["0.6"]["theta"] = 0.1
    return "no reseal"


CASES = [
    (files_traversal, "is not a plain relative name inside the folder"),
    (files_absolute, "is not a plain relative name inside the folder"),
    (routers_symlink_out, "routers.safetensors leads out of"),
    (adapter_symlink_out, "adapter is a symlink leading out of the folder"),
    (theta_nan, "theta must be a number in [0, 1], got nan"),
    (theta_7, "theta of ratio 0.6 must be in [0, 1], got 7.0"),
    (table_string, "theta_table must be a mapping"),
    (base_sha_removed, "'base_model' has no 'sha256'"),
    (keep_initial_negative, "router.keep_initial must be an integer >= 0, got -5"),
    (router_hidden_huge, "router.router_hidden must be an integer in [1, 65536]"),
    (routers_unchecked, "routers.safetensors is read by the loader but not listed"),
    (unsealed_edit, "do not match its 'seal'"),
]


@pytest.mark.parametrize("edit,text", CASES, ids=[c[0].__name__ for c in CASES])
def test_load_refuses_a_tampered_checkpoint(ck, tmp_path, edit, text):
    folder = tmp_path / "ck"
    shutil.copytree(ck, folder)
    m = json.loads((folder / "qtale.json").read_text())
    resealed = edit(folder, m) != "no reseal"
    (folder / "qtale.json").write_text(json.dumps(seal(m) if resealed else m))
    with pytest.raises(QtaleError, match=None) as info:
        qtale_export.load(folder)
    assert text in str(info.value) and "\n" not in str(info.value)


def test_eval_cli_refuses_a_traversal_in_one_line(ck, tmp_path, capsys):
    folder = tmp_path / "ck"
    shutil.copytree(ck, folder)
    m = json.loads((folder / "qtale.json").read_text())
    files_traversal(folder, m)
    (folder / "qtale.json").write_text(json.dumps(seal(m)))
    assert cli.main(["eval", str(folder), "--tasks", "boolq", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a plain relative name" in err and len(err.splitlines()) == 1


def test_upgrade_reseals_an_edit_that_passes_the_checks(ck, tmp_path):
    folder = tmp_path / "ck"
    shutil.copytree(ck, folder)
    m = json.loads((folder / "qtale.json").read_text())
    m.pop("seal")  # as written before whole-document seals: still loads, and upgrade seals it
    (folder / "qtale.json").write_text(json.dumps(m))
    checkpoint.verify_files(folder, checkpoint.read_meta(folder))
    checkpoint.upgrade(folder)
    assert json.loads((folder / "qtale.json").read_text())["seal"] == seal(dict(m))["seal"]
    with pytest.raises(QtaleError, match="nothing to upgrade"):
        checkpoint.upgrade(folder)


# ---- the embedded base's cached copy: verified by content, not by its sidecar ----------------------
@pytest.fixture
def converted(tmp_path):
    """A tiny model folder laid out as the embedded default's converted cache copy (qtale_base.json)."""
    folder = make_tiny(tmp_path / "cache-copy")
    hf, _, _ = models.load_base(folder)
    (folder / "qtale_base.json").write_text(json.dumps({"name": "tiny", "sha256": models.weights_sha256(hf)}))
    return folder


def test_flipped_bytes_in_the_cached_model_are_caught(converted, tmp_path):
    model = qtale_export.load(converted)
    ck = checkpoint.save(model, tmp_path / "ck")  # trained on the cached copy as it was
    qtale_export.load(ck)
    weights = converted / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(4):  # 4 bytes in the last tensor's data
        data[-1 - 97 * i] ^= 0x5A
    weights.write_bytes(bytes(data))
    with pytest.raises(QtaleError, match="sha256 differs"):
        qtale_export.load(ck)


def test_the_sidecar_alone_says_nothing(converted):
    hf, _, _ = models.load_base(converted)
    first = models.base_sha256(converted, hf)
    info = json.loads((converted / "qtale_base.json").read_text())
    info["sha256"] = info["content"]["sha256"] = "f" * 64  # the sidecar edited, its stamp kept
    info["content"]["stamp"] = {}
    (converted / "qtale_base.json").write_text(json.dumps(info))
    assert models.base_sha256(converted, hf) == first  # stamp differs: computed again from the weights
    assert json.loads((converted / "qtale_base.json").read_text())["content"]["stamp"] == models._stamp(converted)
