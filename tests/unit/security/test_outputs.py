"""What a writing command may replace or leave behind (issue 24): --force replaces only a QTALE
output of the same kind, a stale old copy is never restored over a missing target, a full disk
is one line with the old output intact, and published outputs follow the user's umask."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from types import SimpleNamespace

import pytest

from qtale_export import cli, safe_write
from qtale_export.errors import QtaleError


def decoy(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("two years of work")
    return folder


# (command line, what the decoy must be refused as); {decoy} is a folder of the user's own files
FORCE_CASES = [
    ("triton-repo {exp} --out {decoy} --force", "not a QTALE triton"),
    ("export {ck} --out {decoy} --force", "not a QTALE output"),
    ("quantize {ck} --format int3 --out {decoy} --force", "not a QTALE checkpoint"),
    ("quantize {ck} --format int3 --out {exp} --force", "not a QTALE checkpoint"),  # another kind
]


@pytest.fixture(scope="module")
def ck(tiny_dir, tmp_path_factory):
    from qtale_testing import spread_checkpoint

    return spread_checkpoint(tiny_dir, tmp_path_factory.mktemp("force") / "ck")[1]


@pytest.mark.parametrize("line,text", FORCE_CASES)
def test_force_never_replaces_what_qtale_did_not_write(tiny_export, ck, tmp_path, capsys, line, text):
    d = decoy(tmp_path)
    before = {p.name: p.read_bytes() for p in list(d.iterdir()) + list(tiny_export.iterdir()) if p.is_file()}
    rc = cli.main(line.format(exp=tiny_export, ck=ck, decoy=d).split())
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and text in err, err
    assert (d / "thesis.tex").read_text() == "two years of work"
    assert {p.name: p.read_bytes() for p in list(d.iterdir()) + list(tiny_export.iterdir()) if p.is_file()} == before


@pytest.mark.parametrize("kind,marker", [("checkpoint", "qtale.json"), ("export", "manifest.json"),
                                         ("triton", "model/config.pbtxt"), (None, "manifest.json")])
def test_force_replaces_a_qtale_output_of_its_kind_or_an_empty_folder(tmp_path, kind, marker):
    out = tmp_path / "out"
    (out / marker).parent.mkdir(parents=True)
    (out / marker).write_text("{}")
    assert safe_write.check_output(out, force=True, kind=kind) == out
    (tmp_path / "empty").mkdir()
    assert safe_write.check_output(tmp_path / "empty", force=True, kind=kind) == tmp_path / "empty"
    other = {"checkpoint": "export", "export": "checkpoint", "triton": "checkpoint", None: None}[kind]
    if other:
        with pytest.raises(QtaleError, match=f"not a QTALE {other}"):
            safe_write.check_output(out, force=True, kind=other)


def test_stale_old_copy_is_never_restored_over_a_deleted_target(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    old = tmp_path / f".out.qtale-old-{p.pid}"
    old.mkdir()
    (old / "manifest.json").write_text("the output the user deleted")
    safe_write.sweep(tmp_path, say=lambda line: None)
    assert sorted(q.name for q in tmp_path.iterdir()) == []


def test_full_disk_is_one_line_and_the_old_output_stays(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("old")

    def fill_up(args):
        with safe_write.staged(out, force=True) as tmp:
            (tmp / "manifest.json").write_text("new, half-written")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "weights.onnx.data"))

    assert cli.dispatch(SimpleNamespace(_run=fill_up), "qtale") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no space left on the device" in err and "Traceback" not in err
    assert (out / "manifest.json").read_text() == "old"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out"]


def test_published_outputs_follow_the_umask(tmp_path):
    old_mask = os.umask(0o022)
    try:
        with safe_write.staged(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            fd = os.open(tmp / "weights.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)  # as mkstemp leaves it
            os.close(fd)
        safe_write.write_bytes(tmp_path / "out" / "manifest.json", b"{}")
    finally:
        os.umask(old_mask)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "out") == 0o755 and mode(tmp_path / "out" / "sub") == 0o755
    assert mode(tmp_path / "out" / "weights.safetensors") == 0o644
    assert mode(tmp_path / "out" / "manifest.json") == 0o644
