"""Fault tests: `qtale-export`, `qtale quantize`, `qtale calibrate` and `qtale train` are SIGKILLed at
chosen points (a wrapper replaces one function so that its n-th call kills the process); what is on
disk afterwards is the old state or the complete new one, and it loads. The next run removes the
killed run's temporaries and says so. Concurrent calibrations both land."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

import qtale_export
from qtale_export import checkpoint, safe_write
from qtale_export.deploy.manifest import read_manifest
from qtale_testing import spread_checkpoint

KILLER = textwrap.dedent("""
    import importlib, os, signal, sys
    from qtale_export import cli

    where, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    module, name = where.rsplit(".", 1)
    module = importlib.import_module(module)
    real, calls = getattr(module, name), [0]

    def dying(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)

    setattr(module, name, dying)
    if argv[0] == "qtale-export":
        sys.exit(cli.export_main(argv[1:]))
    sys.exit(cli.main(argv))
""")


def qtale(*argv, kill_at=None, nth=1, timeout=600):
    """Run the CLI in a fresh process; with kill_at="module.function", SIGKILL at its nth call."""
    cmd = [sys.executable, "-c", KILLER, kill_at or "os.getpid", str(nth if kill_at else 0), *map(str, argv)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def tree(folder):
    """{relative path: bytes} of the files under `folder`, leaving out a killed run's temporaries."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(safe_write.is_ours(part) for part in p.relative_to(folder).parts)}


def ours(folder):
    return sorted(p.name for p in folder.iterdir() if ".qtale-tmp-" in p.name or ".qtale-old-" in p.name)


def old_or_complete_new(out, before, load):
    """`out` holds exactly the old files, or a complete new result that passes its checks and loads."""
    assert out.is_dir(), f"{out} is gone"
    if tree(out) == before:
        return "old"
    load(out)
    return "new"


@pytest.fixture(scope="module")
def ck(tiny_dir, tmp_path_factory):
    return spread_checkpoint(tiny_dir, tmp_path_factory.mktemp("faults") / "ck")[1]


def load_checkpoint(folder):
    checkpoint.verify_files(folder, checkpoint.read_meta(folder))
    qtale_export.load(folder)


# ---- qtale quantize ---------------------------------------------------------------------------
@pytest.mark.parametrize("kill_at,nth,rerun", [
    ("qtale_export.checkpoint.seal", 1, True),  # the new checkpoint half written: files, no qtale.json yet
    ("os.replace", 3, False),  # just after the swap: the old folder is still beside it
])
def test_quantize_killed_keeps_old_or_new(ck, tmp_path, kill_at, nth, rerun):
    out = shutil.copytree(ck, tmp_path / "out")  # the user's existing folder, replaced with --force
    before = tree(out)
    r = qtale("quantize", ck, "--format", "int3", "--out", out, "--force", kill_at=kill_at, nth=nth)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    state = old_or_complete_new(out, before, load_checkpoint)
    assert state == ("new" if kill_at == "os.replace" else "old")
    assert ours(tmp_path), "the killed run left its temporaries (removed by the next run)"
    if not rerun:
        return
    r = qtale("quantize", ck, "--format", "int3", "--out", out, "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "removed stale temporary" in r.stderr
    assert ours(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert checkpoint.read_meta(out)["quantization"]["format"] == "int3"
    load_checkpoint(out)


# ---- qtale calibrate --------------------------------------------------------------------------
@pytest.mark.parametrize("kill_at", ["os.replace"])  # the new qtale.json written, not yet renamed
def test_calibrate_killed_keeps_old_qtale_json(ck, tmp_path, kill_at):
    folder = shutil.copytree(ck, tmp_path / "ck")
    before = tree(folder)
    r = qtale("calibrate", folder, "--ratios", "0.7", "--seq-len", "32", "--max-tokens", "256", kill_at=kill_at)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert old_or_complete_new(folder, before, load_checkpoint) == "old"
    load_checkpoint(folder)  # a leftover temporary file in the folder does not break loading
    r = qtale("calibrate", folder, "--ratios", "0.7", "--seq-len", "32", "--max-tokens", "256", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ours(folder) == []
    assert set(checkpoint.read_meta(folder)["theta_table"]) == {"0.6", "0.7"}
    load_checkpoint(folder)


def test_concurrent_calibrations_both_land(ck, tmp_path):
    folder = shutil.copytree(ck, tmp_path / "ck")
    cmd = [sys.executable, "-m", "qtale_export.cli", "calibrate", str(folder), "--seq-len", "32",
           "--max-tokens", "256", "--json", "--ratios"]
    procs = [subprocess.Popen(cmd + [r], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in ("0.55", "0.65")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in outs]
    table = checkpoint.read_meta(folder)["theta_table"]
    assert {"0.55", "0.65", "0.6"} <= set(table)
    load_checkpoint(folder)


# ---- qtale train --------------------------------------------------------------------------------
TRAIN = ["--steps", "4", "--save-every", "2", "--seq-len", "64", "--router-hidden", "16", "--batch-size", "2"]


@pytest.mark.parametrize("kill_at,nth", [
    ("qtale_export.safe_write.publish", 3),  # finished, not yet swapped in (two saves came first)
])
def test_train_force_killed_keeps_the_old_checkpoint(ck, tiny_dir, text_file, tmp_path, kill_at, nth):
    out = shutil.copytree(ck, tmp_path / "out")
    before = tree(out)
    r = qtale("train", "--model", tiny_dir, "--data", text_file, "--out", out, "--force", *TRAIN,
              kill_at=kill_at, nth=nth)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert old_or_complete_new(out, before, load_checkpoint) == "old"
    r = qtale("train", "--model", tiny_dir, "--data", text_file, "--out", out, "--force", *TRAIN)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "removed stale temporary" in r.stderr and ours(tmp_path) == []
    assert checkpoint.read_meta(out)["training"]["steps_done"] == 4
    load_checkpoint(out)


def test_train_force_that_fails_keeps_the_old_checkpoint(ck, tiny_dir, text_file, tmp_path, monkeypatch):
    from qtale_export import train as train_mod
    from qtale_export.errors import QtaleError
    from qtale_export.train import TrainConfig, train

    out = shutil.copytree(ck, tmp_path / "out")
    before = tree(out)
    cfg = TrainConfig(model=str(tiny_dir), data=[str(text_file)], out=str(out), steps=4, save_every=1,
                      seq_len=64, router_hidden=16, lr=float("nan"))
    with pytest.raises(QtaleError, match="--lr"):
        train(cfg, force=True, progress=False)
    real = train_mod.batch_for

    def diverging(examples, step, *a, **k):
        if step == 2:  # after two saved steps of the new run
            raise QtaleError("training diverged at step 2 (non-finite loss); lower --lr")
        return real(examples, step, *a, **k)

    monkeypatch.setattr(train_mod, "batch_for", diverging)
    cfg.lr = 1e-2
    with pytest.raises(QtaleError, match="diverged"):
        train(cfg, force=True, progress=False)
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fresh_train_killed_between_checkpoints_resumes(tiny_dir, text_file, tmp_path):
    out = tmp_path / "run"
    r = qtale("train", "--model", tiny_dir, "--data", text_file, "--out", out, *TRAIN,
              kill_at="qtale_export.train.save_state", nth=2)
    assert r.returncode == -signal.SIGKILL
    load_checkpoint(out)  # the step-2 checkpoint is complete
    assert checkpoint.read_meta(out)["training"]["steps_done"] == 2
    r = qtale("train", "--model", tiny_dir, "--data", text_file, "--out", out, "--resume", *TRAIN)
    assert r.returncode == 0, r.stderr[-2000:]
    assert checkpoint.read_meta(out)["training"]["steps_done"] == 4
    load_checkpoint(out)


# ---- qtale-export -------------------------------------------------------------------------------
def load_export(folder):
    read_manifest(folder)  # every file listed and matching, the listing sealed


@pytest.fixture(scope="module")
def exported(ck, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "exp"
    r = qtale("qtale-export", ck, "--out", out, "--decode-steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("kill_at,nth,rerun", [
    ("qtale_export.safe_write.publish", 1, True),  # built and verified, not yet swapped in
])
def test_export_killed_keeps_old_or_new(ck, exported, tmp_path, kill_at, nth, rerun):
    out = shutil.copytree(exported, tmp_path / "exp")
    before = tree(out)
    r = qtale("qtale-export", ck, "--out", out, "--force", "--decode-steps", "1", "--ratio", "1.0",
              kill_at=kill_at, nth=nth)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert old_or_complete_new(out, before, load_export) == "old"
    assert ours(tmp_path), "the killed export left its (large) temporary folder"
    if not rerun:
        return
    r = qtale("qtale-export", ck, "--out", out, "--force", "--decode-steps", "1", "--ratio", "1.0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "removed stale temporary" in r.stderr and ours(tmp_path) == []
    assert json.loads((out / "manifest.json").read_text())["ratio"] == 1.0
    load_export(out)


def test_export_sigterm_removes_its_temporary(ck, tmp_path):
    """SIGTERM mid-export (at the verification) unwinds like Ctrl-C: no temporary is left."""
    code = KILLER.replace("os.kill(os.getpid(), signal.SIGKILL)", "os.kill(os.getpid(), signal.SIGTERM)")
    cmd = [sys.executable, "-c", code, "qtale_export.export.verify.verify_export", "1", "qtale-export", str(ck),
           "--out", str(tmp_path / "exp"), "--decode-steps", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 143 and "terminated" in r.stderr, r.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
