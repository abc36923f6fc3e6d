"""Resource caps and one-line errors of the command lines (issue 24): each probe is one row that
must exit 2 with one line naming the problem, no traceback; recipes are read with size, alias and
depth limits; SIGTERM ends `qtale run` even inside a long native call."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from qtale_export import cli, validate
from qtale_export.errors import QtaleError
from qtale_export.experiment.recipe import MAX_EXTENDS, load_recipe

# (command line, text of the one-line error); {exp} the tiny export (512 positions), {file} a file
CASES = [
    ("run {exp} --prompt hi --threads 100000", "CPUs this process may use"),
    ("run {exp} --prompt hi --max-length 2000000000", "more than this model's 512 positions"),
    ("run {exp} --prompt \udcff\udcfe", "not valid UTF-8"),  # bytes ff fe on the command line
    ("run {exp} --prompt {long}", "the maximum is 511"),  # longer than the RoPE table
    ("bench {exp} --seq 8,,16", "empty item"),
    ("bench {exp} --out {file}", "is a file, not a folder"),
    ("bench {exp} --threads 100000", "CPUs this process may use"),
    ("pipeline --out {file}", "is a file, not a folder"),
]


@pytest.mark.parametrize("line,text", CASES)
def test_cli_probe_is_one_line(tiny_export, tmp_path, capsys, line, text):
    (tmp_path / "file.txt").write_text("the user's file")
    argv = line.format(exp=tiny_export, file=tmp_path / "file.txt", long="LONG").split()
    argv = [" ".join(["word"] * 600) if a == "LONG" else a for a in argv]
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1 and text in err, err
    assert (tmp_path / "file.txt").read_text() == "the user's file"


def test_threads_cap_follows_the_affinity_mask():
    assert validate.threads(validate.cpus()) == validate.cpus()
    with pytest.raises(QtaleError, match="CPUs"):
        validate.threads(validate.cpus() + 1)


# ---- recipes --------------------------------------------------------------------------------------
def alias_bomb(d):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    (d / "r.yaml").write_text("\n".join(lines) + "\nname: *a8\n")


def not_utf8(d):
    (d / "r.yaml").write_bytes(b"name: caf\xe9\n")


def deep_extends(d):
    for i in range(1500):
        (d / f"r{i}.yaml" if i else d / "r.yaml").write_text(f"name: r{i}\nextends: r{i + 1}.yaml\n")
    (d / "r1500.yaml").write_text("name: last\n")


def huge(d):
    (d / "r.yaml").write_text("name: x\ndescription: " + "y" * (2 << 20) + "\n")


RECIPES = [
    (alias_bomb, "aliases"),
    (not_utf8, "is not UTF-8 text"),
    (deep_extends, f"more than {MAX_EXTENDS} recipes"),
    (huge, "a recipe is at most"),
]


@pytest.mark.parametrize("make,text", RECIPES, ids=[r[0].__name__ for r in RECIPES])
def test_recipe_limits(tmp_path, make, text):
    make(tmp_path)
    with pytest.raises(QtaleError) as info:
        load_recipe(tmp_path / "r.yaml")
    assert text in str(info.value) and "\n" not in str(info.value)


# ---- SIGTERM ---------------------------------------------------------------------------------------
def test_sigterm_ends_qtale_run_inside_a_native_call(tiny_export):
    # generation replaced by a C sleep: a Python-level handler would only run after it returns
    script = textwrap.dedent(f"""
        import ctypes, sys
        from qtale_export.deploy.runtime import Runtime
        def blocked(self, *a, **k):
            print("ready", file=sys.stderr, flush=True)
            ctypes.CDLL(None).sleep(60)
        Runtime.generate = blocked
        from qtale_export import cli
        sys.exit(cli.main(["run", {str(tiny_export)!r}, "--prompt", "hi"]))
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert p.stderr.readline().strip() == "ready"
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=20)
        assert p.returncode == -signal.SIGTERM and time.monotonic() - t0 < 20
    finally:
        if p.poll() is None:
            p.kill()
