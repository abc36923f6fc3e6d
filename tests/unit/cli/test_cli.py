"""Command line: bad input gives one line on stderr and a non-zero exit, never a traceback."""
import json
import subprocess
import sys

import pytest

from qtale_export.cli import main


def run(*args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "qtale_export.cli", *map(str, args)], capture_output=True,
                       text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def one_line_error(rc, err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc != 0
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tiny_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ck"
    rc, stdout, err = run("train", "--model", tiny_dir, "--data", text_file, "--out", out, "--steps", "2",
                          "--seq-len", "64", "--router-hidden", "16", "--json")
    assert rc == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["steps"] == 2
    return out


def test_calibrate_json(trained):
    rc, stdout, err = run("calibrate", trained, "--ratios", "0.6,1.0", "--json")
    assert rc == 0, err
    table = json.loads(stdout)["ratios"]
    assert set(table) == {"0.6", "1.0"} and table["1.0"]["theta"] == 0.0
    assert json.loads((trained / "qtale.json").read_text())["theta_table"]["0.6"] == table["0.6"]


@pytest.mark.parametrize("bad", ["1.5", "0", "-1", "abc"])
def test_bad_ratios(trained, bad):
    rc, _, err = run("calibrate", trained, "--ratios", bad)
    assert "invalid ratio" in one_line_error(rc, err)


def test_missing_model(tmp_path, text_file):
    rc, _, err = run("train", "--model", tmp_path / "nope", "--data", text_file, "--out", tmp_path / "o")
    assert "model not found" in one_line_error(rc, err)
    assert not (tmp_path / "o").exists()


def test_non_llama_model(tmp_path, text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    rc, _, err = run("train", "--model", tmp_path / "gpt2", "--data", text_file, "--out", tmp_path / "o")
    assert "unsupported model type 'gpt2'" in one_line_error(rc, err)


def test_empty_data_file(tmp_path, tiny_dir):
    (tmp_path / "empty.txt").write_text("  \n")
    rc, _, err = run("train", "--model", tiny_dir, "--data", tmp_path / "empty.txt", "--out", tmp_path / "o")
    assert "data file is empty" in one_line_error(rc, err)
    assert not (tmp_path / "o").exists()


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "qtale.json").write_text("[1, 2")
    rc, _, err = run("calibrate", tmp_path / "ck", "--ratios", "0.6")
    assert "corrupt" in one_line_error(rc, err)


def test_help_lists_only_registered_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "train" in capsys.readouterr().out


def test_without_the_train_extra_help_lists_the_deployment_commands(monkeypatch, capsys):
    """As on a host without torch: only the commands whose extra is installed are listed, the
    others refuse in one line naming the extra, and no subcommand's module is imported for --help."""
    import importlib.util
    import sys

    from qtale_export import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    for mod in ("qtale_export.deploy.bench", "qtale_export.deploy.triton"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    listed = capsys.readouterr().out.split("{", 1)[1].split("}", 1)[0].split(",")
    assert listed == [c.name for c in cli.COMMANDS if c.extra is None] == ["verify", "build", "run", "triton-repo", "bench"]
    assert "qtale_export.deploy.bench" not in sys.modules and "qtale_export.deploy.triton" not in sys.modules
    for argv in (["train", "--data", "x", "--out", "y"], ["quantize", "--help"], ["experiment"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"qtale {argv[0]} needs the [train] extra" in err
        assert "pip install 'qtale-export[train]'" in err
    assert cli.export_main(["ck", "--out", "x"]) == 2
    assert "qtale-export: error: qtale export needs the [train] extra" in capsys.readouterr().err
