"""The shared output rule (qtale_export.safe_write) and the listing checks of checkpoints/exports."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import qtale_export
from qtale_export import checkpoint, safe_write
from qtale_export.errors import QtaleError
from qtale_testing import spread_routers


def tree(folder):
    """{relative path: bytes} of every file under `folder` (a filesystem snapshot)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def ckpt(tiny_dir, tmp_path):
    m = qtale_export.load(tiny_dir)
    spread_routers(m)
    m.theta_table = {"0.6": {"theta": 0.55, "realized": 0.6}}
    return checkpoint.save(m, tmp_path / "ck")


# ---- the output rule ----------------------------------------------------------------------------
def test_existing_output_refused_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(QtaleError, match="already exists; pass --force"):
        safe_write.check_output(tmp_path / "out", force=False)
    with pytest.raises(QtaleError, match="already exists"):
        safe_write.check_output(tmp_path / "file", force=False)
    with pytest.raises(QtaleError, match="not a folder"):
        safe_write.check_output(tmp_path / "file", force=True)
    assert safe_write.check_output(tmp_path / "out", force=True) == tmp_path / "out"


@pytest.mark.parametrize("out", ["src", "src/inner", "."])
def test_output_overlapping_the_source_refused(tmp_path, out):
    (tmp_path / "src" / "inner").mkdir(parents=True)
    with pytest.raises(QtaleError, match="source"):
        safe_write.check_output(tmp_path / out, force=True, sources=[tmp_path / "src"])


def test_staged_keeps_the_old_folder_when_the_new_one_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("old")  # a QTALE output: --force may replace it
    with pytest.raises(RuntimeError):
        with safe_write.staged(out, force=True) as tmp:
            (tmp / "manifest.json").write_text("new")
            raise RuntimeError("failed half-way")
    assert tree(out) == {"manifest.json": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left
    with safe_write.staged(out, force=True) as tmp:
        (tmp / "b").write_text("new")
    assert tree(out) == {"b": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staged_refuses_an_output_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(QtaleError, match="already exists"):
        with safe_write.staged(out) as tmp:
            (tmp / "a").write_text("new")
            out.mkdir()  # another process got there first
    assert list(out.iterdir()) == []


def test_temporaries_carry_the_pid_and_stale_ones_are_swept(tmp_path):
    tmp = safe_write.staging_dir(tmp_path / "out")
    assert f"qtale-tmp-{os.getpid()}-" in tmp.name and safe_write.is_ours(tmp.name)
    pid = dead_pid()
    stale = tmp_path / f".out.qtale-tmp-{pid}-abc"
    stale.mkdir()
    (stale / "big.onnx").write_bytes(b"x" * 100)
    stale_file = tmp_path / f".qtale.json.qtale-tmp-{pid}-xyz"
    stale_file.write_text("{")
    live = tmp_path / f".out.qtale-tmp-{os.getppid()}-def"  # a running process: left alone
    live.mkdir()
    lines = []
    removed = safe_write.sweep(tmp_path, say=lines.append)
    assert sorted(removed) == sorted([stale, stale_file])
    assert not stale.exists() and not stale_file.exists() and live.exists() and tmp.exists()
    assert len(lines) == 2 and all(f"process {pid} is no longer running" in ln for ln in lines)


def test_sweep_never_restores_an_old_copy_over_a_missing_target(tmp_path):
    # issue 24: the target may have been deleted by the user since; the old copy was being replaced
    # on the user's request (--force), so it is removed like any stale temporary
    pid = dead_pid()
    old = tmp_path / f".out.qtale-old-{pid}"
    old.mkdir()
    (old / "a").write_text("old")
    lines = []
    safe_write.sweep(tmp_path, say=lines.append)
    assert not (tmp_path / "out").exists() and not old.exists() and "removed stale" in lines[0]


def test_publish_swaps_in_one_step(tmp_path, monkeypatch):
    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    seen = []
    real = os.replace

    def watch(src, dst):  # every rename after the swap: `out` must always exist
        seen.append(out.is_dir())
        return real(src, dst)

    monkeypatch.setattr(os, "replace", watch)
    safe_write.publish(new, out)
    assert tree(out) == {"b": b"new"} and all(seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigterm_unwinds_like_ctrl_c(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from qtale_export import safe_write
        safe_write.handle_sigterm()
        try:
            with safe_write.staged({str(tmp_path / 'out')!r}) as tmp:
                print(tmp, flush=True)
                time.sleep(60)
        except safe_write.Terminated:
            sys.exit(143)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    tmp = p.stdout.readline().strip()
    assert os.path.isdir(tmp)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 143
    assert not os.path.exists(tmp) and list(tmp_path.iterdir()) == []


def test_concurrent_updates_all_land(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("{}")
    code = textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        from qtale_export import safe_write
        def add(d):
            time.sleep(0.05)  # widen the read-modify-write window
            d[sys.argv[1]] = 1
            return d
        for i in range(5):
            safe_write.update_json(Path({str(path)!r}), add, lambda p: json.loads(p.read_text()), say=lambda s: None)
            sys.argv[1] += "+"
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, name]) for name in "abc"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert len(json.loads(path.read_text())) == 15


# ---- listing checks -----------------------------------------------------------------------------
def edit_meta(folder, change):
    meta = json.loads((folder / "qtale.json").read_text())
    change(meta)
    (folder / "qtale.json").write_text(json.dumps(meta))


def test_saved_checkpoint_lists_and_seals_every_file(ckpt):
    meta = checkpoint.read_meta(ckpt)
    assert meta["files_sha256"] == checkpoint.listing_sha256(meta)
    checkpoint.verify_files(ckpt, meta)


def test_missing_files_list_is_an_error(ckpt):
    edit_meta(ckpt, lambda m: m.pop("files"))
    with pytest.raises(QtaleError, match="no 'files' list"):
        qtale_export.load(ckpt)


def test_flipped_byte_caught_even_with_the_listing_dropped(ckpt):
    data = bytearray((ckpt / "routers.safetensors").read_bytes())
    data[-1] ^= 1
    (ckpt / "routers.safetensors").write_bytes(bytes(data))
    edit_meta(ckpt, lambda m: m.pop("files"))
    with pytest.raises(QtaleError, match="files"):
        qtale_export.load(ckpt)
    edit_meta(ckpt, lambda m: m.update(files={}))
    with pytest.raises(QtaleError, match="routers.safetensors is not listed"):
        qtale_export.load(ckpt)


def test_unlisted_file_is_an_error(ckpt):
    (ckpt / "extra.bin").write_bytes(b"x")
    with pytest.raises(QtaleError, match="extra.bin is not listed in qtale.json"):
        qtale_export.load(ckpt)


def test_listing_is_covered_by_its_checksum(ckpt):
    edit_meta(ckpt, lambda m: m.update(unchecked=["routers.safetensors"]))  # "skip the routers' check"
    with pytest.raises(QtaleError, match="does not match 'files_sha256'"):
        qtale_export.load(ckpt)
    edit_meta(ckpt, lambda m: m.pop("files_sha256"))
    with pytest.raises(QtaleError, match="no 'files_sha256'"):
        qtale_export.load(ckpt)


def test_base_model_without_id_is_a_clear_error(ckpt):
    edit_meta(ckpt, lambda m: m["base_model"].pop("id"))
    with pytest.raises(QtaleError, match="'base_model' has no 'id'"):
        qtale_export.load(ckpt)


def test_shipped_checkpoint_passes_the_strict_checks():
    from qtale_export.api import shipped_checkpoint

    folder = shipped_checkpoint("smollm2-135m")
    meta = checkpoint.read_meta(folder)
    checkpoint.verify_files(folder, meta)
    assert meta["unchecked"] == ["provenance.json"]


def test_update_meta_keeps_the_seal_and_merges(ckpt):
    checkpoint.update_meta(ckpt, lambda m: m["theta_table"].update({"0.7": {"theta": 0.4, "realized": 0.7}}))
    meta = checkpoint.read_meta(ckpt)
    checkpoint.verify_files(ckpt, meta)
    assert set(meta["theta_table"]) == {"0.6", "0.7"}


def test_upgrade_seals_a_checkpoint_written_before(ckpt):
    (ckpt / "train_log.jsonl").write_text('{"step": 1}\n')
    edit_meta(ckpt, lambda m: [m.pop("files_sha256"), m.pop("unchecked")])  # as the old writer left it
    with pytest.raises(QtaleError, match="qtale_export.checkpoint upgrade"):
        qtale_export.load(ckpt)
    r = subprocess.run([sys.executable, "-m", "qtale_export.checkpoint", "upgrade", str(ckpt)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = checkpoint.read_meta(ckpt)
    assert meta["unchecked"] == ["train_log.jsonl"]
    checkpoint.verify_files(ckpt, meta)
    with pytest.raises(QtaleError, match="nothing to upgrade"):
        checkpoint.upgrade(ckpt)


def test_upgrade_refuses_a_damaged_or_unlisted_folder(ckpt):
    edit_meta(ckpt, lambda m: m.pop("files_sha256"))
    (ckpt / "stray.bin").write_bytes(b"x")
    with pytest.raises(QtaleError, match="stray.bin is not listed"):
        checkpoint.upgrade(ckpt)
    (ckpt / "stray.bin").unlink()
    (ckpt / "routers.safetensors").write_bytes(b"damaged")
    with pytest.raises(QtaleError, match="does not match its sha256"):
        checkpoint.upgrade(ckpt)
    assert "files_sha256" not in json.loads((ckpt / "qtale.json").read_text())
