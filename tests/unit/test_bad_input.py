"""Bad input, table-driven: each probe exits non-zero with one line naming the problem, no
traceback, and leaves the filesystem exactly as it was."""
import json
import shutil
import signal
import subprocess
import sys

import pytest

from qtale_export import cli
from qtale_testing import spread_checkpoint

# (command line, expected exit code, text the one-line error must contain)
CASES = [
    # writing commands: never over an existing output without --force, never into the source
    ("quantize {ck} --format int3 --out {ck}", 2, "is the source"),
    ("quantize {ck} --format int3 --out {ck} --force", 2, "is the source"),
    ("quantize {ck} --format int3 --out {ck}/inner --force", 2, "is the source"),
    ("quantize {ck} --format int3 --out {existing}", 2, "already exists; pass --force"),
    ("quantize {ck} --format int3 --out {file}", 2, "already exists; pass --force"),
    ("quantize {ck} --format int3 --out {file} --force", 2, "not a folder"),
    ("quantize {ck} --format int3 --out {new} --group-size 0", 2, "--group-size"),
    ("train --model {tiny} --data {data} --out {ck} --force --lr nan", 2, "--lr must be a finite number, got 'nan'"),
    ("train --model {tiny} --data {data} --out {new} --lr -1", 2, "--lr must be > 0, got -1"),
    ("train --model {tiny} --data {data} --out {new} --lr inf", 2, "--lr"),
    ("train --model {tiny} --data {data} --out {new} --save-every 0", 2, "--save-every"),
    ("train --model {tiny} --data {data} --out {new} --steps -1", 2, "--steps"),
    ("train --model {tiny} --data {data} --out {new} --target-ratio 0", 2, "invalid ratio"),
    ("train --model {tiny} --data {data} --out {data} --force", 2, "is the source"),
    ("train --model {tiny} --data {data} --out {file} --force", 2, "not a folder"),
    ("train --model {tiny} --data {data} --out {tiny} --force", 2, "is the source"),
    ("calibrate {ck} --seq-len 0", 2, "--seq-len"),
    ("calibrate {ck} --ratios 0.5,,0.6", 2, "empty item"),
    ("calibrate {ck} --ratios ,", 2, "no ratios given"),
    ("calibrate {ck} --tol nan", 2, "--tol"),
    ("calibrate {ck_noid} --ratios 0.6", 2, "'base_model' has no 'id'"),
    ("calibrate {ck_nofiles} --ratios 0.6", 2, "no 'files' list"),
    ("calibrate {ck_unlisted} --ratios 0.6", 2, "notes.txt is not listed in qtale.json"),
    ("export {ck} --out {existing}", 2, "already exists; pass --force"),
    ("export {ck} --out {ck} --force", 2, "is the source"),
    ("export {ck} --out {new} --ratio nan", 2, "invalid ratio"),
    ("export {ck} --out {new} --theta 2", 2, "--theta must be in [0, 1], got 2"),
    ("export {ck} --out {new} --decode-steps -1", 2, "--decode-steps"),
    ("verify {exp} --theta 5", 2, "--theta must be in [0, 1], got 5"),
    ("verify {exp} --theta nan", 2, "--theta"),
    ("verify {exp} --decode-steps -1", 2, "--decode-steps"),
    ("verify {exp} --decode-steps 0", 2, "--decode-steps"),
    ("run {exp} --prompt hi --max-length 0", 2, "--max-length"),
    ("run {exp} --prompt hi --max-length -5", 2, "--max-length"),
    ("run {exp} --prompt hi --threads -1", 2, "--threads"),
    ("run {exp} --prompt hi --temperature nan", 2, "--temperature must be a finite number, got 'nan'"),
    ("run {exp} --prompt hi --temperature inf", 2, "--temperature"),
    ("run {exp} --prompt hi --temperature -1", 2, "--temperature"),
    ("run {exp} --prompt hi --top-p 0", 2, "--top-p"),
    ("run {exp} --prompt hi --ratio 1.5", 2, "invalid ratio"),
    ("run {exp} --prompt hi --theta -0.1", 2, "--theta"),
    ("eval {ck} --items {existing}", 2, "is a folder"),
    ("eval {ck} --items {new}/sub/items.json", 2, "does not exist"),
    ("eval {ck} --items {file}", 2, "already exists; pass --force"),
    ("eval {ck} --ratio nan", 2, "invalid ratio"),
    ("eval {ck} --threshold 2", 2, "--threshold"),
    ("eval {noman}", 2, "no manifest.json"),
    ("triton-repo {exp} --out {exp} --force", 2, "is the source"),
    ("triton-repo {exp} --out {new} --ratios 0.5,,0.6", 2, "empty item"),
    ("triton-repo {exp} --out {new} --max-batch 0", 2, "--max-batch"),
    ("bench {exp} --ratios 0.5,,0.6", 2, "empty item"),
    ("bench {exp} --repeats 0", 2, "--repeats"),
]


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} | {
        p.relative_to(folder).as_posix() + "/": b"" for p in folder.rglob("*") if p.is_dir()}


@pytest.fixture(scope="module")
def world(tiny_dir, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    ck = spread_checkpoint(tiny_dir, root / "ck")[1]
    (ck / "inner").mkdir()

    def variant(name, change):
        folder = root / name
        shutil.copytree(ck, folder)
        meta = json.loads((folder / "qtale.json").read_text())
        change(meta, folder)
        (folder / "qtale.json").write_text(json.dumps(meta))
        return folder

    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("the user's")
    (root / "file.txt").write_text("the user's file")
    (root / "exp").mkdir()
    (root / "exp" / "manifest.json").write_text("{}")
    (root / "noman").mkdir()
    (root / "noman" / "prefill.onnx").write_bytes(b"onnx")
    shutil.copy(text_file, root / "data.txt")
    paths = dict(ck=ck, existing=root / "existing", file=root / "file.txt", exp=root / "exp",
                 noman=root / "noman", new=root / "new", data=root / "data.txt", tiny=tiny_dir,
                 ck_noid=variant("ck_noid", lambda meta, f: meta["base_model"].pop("id")),
                 ck_nofiles=variant("ck_nofiles", lambda meta, f: meta.pop("files")),
                 ck_unlisted=variant("ck_unlisted", lambda meta, f: (f / "notes.txt").write_text("x")))
    return root, paths


def run_in_process(argv, capsys):
    """cli.main(argv) -> (exit code, stderr); restores the SIGTERM handler cli installs."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("line,code,text", CASES, ids=[c[0].replace("{", "").replace("}", "") for c in CASES])
def test_bad_input(world, capsys, line, code, text):
    root, paths = world
    argv = [a.format(**paths) for a in line.split()]
    before = tree(root) | tree(paths["tiny"])
    rc, err = run_in_process(argv, capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == code, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert text in lines[0], lines[0]
    assert tree(root) | tree(paths["tiny"]) == before, "the filesystem changed"


@pytest.mark.parametrize("args,text", [
    (["run", "EXP", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["calibrate", "CK", "--seq-len", "0"], "--seq-len"),
])
def test_real_process_prints_one_line(args, text):
    r = subprocess.run([sys.executable, "-m", "qtale_export.cli", *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and text in r.stderr


def test_qtale_export_program_refuses_the_source(world, capsys):
    root, paths = world
    before = tree(root)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        rc = cli.export_main([str(paths["ck"]), "--out", str(paths["ck"]), "--force"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    err = capsys.readouterr().err
    assert rc == 2 and "is the source" in err and tree(root) == before


def test_eval_items_folder_is_refused_before_the_evaluation(world, capsys, monkeypatch):
    from qtale_export import evaluate

    root, paths = world
    monkeypatch.setattr(evaluate, "evaluate_tasks", lambda *a, **k: pytest.fail("evaluated before checking --items"))
    rc, err = run_in_process(["eval", str(paths["ck"]), "--items", str(paths["existing"])], capsys)
    assert rc == 2 and "--items" in err
