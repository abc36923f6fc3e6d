"""The checkpoint contract: round trip, corruption and mismatch detection, atomic writes."""
import json

import pytest
import torch

import qtale_export
from qtale_testing import make_tiny, spread_routers
from qtale_export import checkpoint
from qtale_export.errors import QtaleError


@pytest.fixture
def ckpt(tiny_dir, tmp_path):
    m = qtale_export.load(tiny_dir)
    spread_routers(m)
    m.theta_table = {"0.6": {"theta": 0.55, "realized": 0.6}}
    return checkpoint.save(m, tmp_path / "ck"), m


def test_round_trip(ckpt):
    folder, m = ckpt
    meta = json.loads((folder / "qtale.json").read_text())
    assert meta["format"] == "qtale-checkpoint" and meta["format_version"] == 1
    assert meta["base_model"]["sha256"] == m.base_info["sha256"]
    assert set(meta["files"]) == {"routers.safetensors"}
    m2 = qtale_export.load(folder)
    assert m2.theta_table == m.theta_table
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        assert torch.equal(m(ids, theta=0.6).logits, m2(ids, theta=0.6).logits)
    assert not list(folder.parent.glob(".ck.*"))  # no temporary folders left behind


def test_corrupt_meta(ckpt):
    folder, _ = ckpt
    (folder / "qtale.json").write_text("{not json")
    with pytest.raises(QtaleError, match="corrupt"):
        qtale_export.load(folder)


def test_other_format_version(ckpt):
    folder, _ = ckpt
    meta = json.loads((folder / "qtale.json").read_text())
    meta["format_version"] = 99
    (folder / "qtale.json").write_text(json.dumps(meta))
    with pytest.raises(QtaleError, match="format version 99"):
        qtale_export.load(folder)


def test_corrupt_routers(ckpt):
    folder, _ = ckpt
    (folder / "routers.safetensors").write_bytes(b"garbage")
    with pytest.raises(QtaleError, match="routers.safetensors"):
        qtale_export.load(folder)


def test_truncated_routers_without_checksum(ckpt):
    folder, _ = ckpt
    meta = json.loads((folder / "qtale.json").read_text())
    meta["files"] = {}
    (folder / "qtale.json").write_text(json.dumps(meta))
    (folder / "routers.safetensors").write_bytes((folder / "routers.safetensors").read_bytes()[:100])
    with pytest.raises(QtaleError, match="corrupt .*routers.safetensors"):
        qtale_export.load(folder)


def test_other_base_weights_refused(ckpt, tmp_path):
    folder, _ = ckpt
    meta = json.loads((folder / "qtale.json").read_text())
    meta["base_model"]["id"] = str(make_tiny(tmp_path / "other", seed=7))
    (folder / "qtale.json").write_text(json.dumps(checkpoint.seal(meta)))  # resealed, as an editor would
    with pytest.raises(QtaleError, match="sha256 differs"):
        qtale_export.load(folder)


def test_failed_write_leaves_old_checkpoint(ckpt, monkeypatch):
    folder, m = ckpt
    before = (folder / "qtale.json").read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "file_sha256", boom)
    with pytest.raises(OSError):
        checkpoint.save(m, folder)
    assert (folder / "qtale.json").read_text() == before
    assert not list(folder.parent.glob(".ck.*"))
