"""`qtale verify` through Polygraphy against the reference outputs stored in the export."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from qtale_export.checkpoint import file_sha256
from qtale_export.errors import QtaleError
from qtale_export.export import main as export_main
from qtale_export.deploy import reference
from qtale_export.deploy.manifest import read_manifest, write_manifest
from qtale_export.export.verify import verify_with_polygraphy

from qtale_testing import REPO, spread_checkpoint

ROOT = REPO


@pytest.fixture(scope="module")
def exports(tiny_dir, tmp_path_factory):
    model, ckpt = spread_checkpoint(tiny_dir, tmp_path_factory.mktemp("ckpt") / "routed")
    root = tmp_path_factory.mktemp("pg-exports")
    out = {}
    for precision, ops, target in (("fp16", "plugin", "ort-cpu"), ("int4", "plugin", "tensorrt")):
        out[precision] = root / precision
        export_main.export(model, out[precision], checkpoint=str(ckpt), ratio=0.6, precision=precision, ops=ops,
                           target=target, decode_steps=2)
    return out


def test_export_stores_reference(exports):
    m = read_manifest(exports["int4"])
    assert m["reference"] == {"file": "reference.npz", "thetas": [0.0, 0.5], "prompts": 2,
                              "decode_steps": reference.STEPS}
    assert "reference.npz" in m["files"]  # checksummed like every other file
    meta, cases = reference.load(exports["int4"])
    assert [c["theta"] for c in cases] == [0.0, 0.5]
    assert [r["graph"] for r in cases[0]["runs"]] == ["prefill"] + ["decode"] * reference.STEPS
    pre = cases[0]["runs"][0]
    assert pre["feeds"]["attention_mask"].shape[0] == 2 and not pre["feeds"]["attention_mask"].all()  # padded
    assert pre["outputs"]["exec_mask"].dtype == bool and pre["prob"].shape[0] == len(m["model"]["routed_layers"])
    assert (exports["int4"] / "reference.npz").stat().st_size < 2_000_000
    # fp16 exports feed fp16 past K/V, as the decode graph takes them
    dec = reference.load(exports["fp16"])[1][0]["runs"][1]["feeds"]
    assert dec["past.0.key"].dtype == np.float16


@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_verify_with_polygraphy_on_stored_reference(exports, precision):
    report = verify_with_polygraphy(exports[precision])
    assert report["ok"], report
    assert report["reference"].startswith("stored reference.npz")
    assert report["verifier"]["tool"] == "polygraphy"
    assert report["verifier"]["runners"] == ["onnxrt:prefill", "onnxrt:decode"]
    assert [c["theta"] for c in report["cases"]] == [0.0, 0.5]
    assert all(c["decode"]["steps"] == reference.STEPS or c["decode"].get("stopped") == "tie"
               for c in report["cases"])
    for key in ("max_abs_diff", "top1_agreement", "exec_mask_agreement", "tolerance", "tie_cases", "prompts"):
        assert key in report


def test_verify_fails_against_a_wrong_reference(exports, tmp_path):
    """Polygraphy's comparator is what decides: perturbed reference logits make verify fail (exit 1)."""
    out = tmp_path / "copy"
    shutil.copytree(exports["int4"], out)
    meta, cases = reference.load(out)
    logits = cases[1]["runs"][0]["outputs"]["logits"]
    logits[0, -1, 3] += 1.0  # a real token (row 0 is the longest prompt): far beyond int4's bound
    reference.save(out, cases, meta["prompts"])
    m = read_manifest(out, verify=False)
    m["files"]["reference.npz"] = file_sha256(out / "reference.npz")
    write_manifest(out, m)
    report = verify_with_polygraphy(out)
    assert not report["ok"]
    bad = report["cases"][1]
    assert not bad["ok"] and bad["max_abs_diff"] > bad["bound"]
    assert report["cases"][0]["ok"]
    from qtale_export.cli import main

    assert main(["verify", str(out), "--json"]) == 1


def test_verify_is_torch_free(exports):
    """The verify subcommand on a host without PyTorch (torch and transformers made unimportable). Its
    parser is built alone: the full `qtale` parser is not torch-free yet (issue 11)."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from qtale_export import cli\n"
            "from qtale_export.cli import verify; p = cli.Parser(prog='qtale verify'); verify.add_arguments(p); p.set_defaults(_run=verify.run)\n"
            f"sys.exit(cli.dispatch(p.parse_args([{str(exports['int4'])!r}, '--json']), 'qtale verify'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)  # Polygraphy's logging stays off stdout
    assert report["ok"] and report["verifier"]["tool"] == "polygraphy"
    # a theta the file does not hold needs PyTorch: one line naming the extra
    done = subprocess.run([sys.executable, "-c", code.replace("'--json'", "'--theta', '0.3'")], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "PyTorch is not installed" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_verify_live_pytorch_for_other_thetas(exports):
    report = verify_with_polygraphy(exports["int4"], thetas=[0.3], decode_steps=1)
    assert report["ok"] and report["reference"].startswith("live pytorch")
    assert [c["theta"] for c in report["cases"]] == [0.3] and report["decode_steps"] == 1


def test_verify_tensorrt_needs_tensorrt(exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(QtaleError, match="(?i)tensorrt is not installed"):
        verify_with_polygraphy(exports["int4"], backend="tensorrt")
