"""Runtime on a tiny export: greedy == PyTorch token by token, score == PyTorch, errors, sampling."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from qtale_export.errors import QtaleError
from qtale_export.deploy.runtime import Runtime

from qtale_testing import THETAS
from runtime_equivalence import (PROMPT, check_greedy_matches_pytorch, check_realized_ratio_matches_pytorch,
                                 check_score_matches_pytorch)

@pytest.fixture(scope="module")
def rt(tiny_export):
    return Runtime.open(tiny_export)


@pytest.mark.parametrize("ratio", [1.0, 0.6, 0.5])
def test_greedy_matches_pytorch(rt, tiny_model, ratio):
    check_greedy_matches_pytorch(rt, tiny_model, ratio, engine_prefix="onnxruntime:cpu")


def test_realized_ratio_matches_pytorch_exec_masks(rt, tiny_model):
    check_realized_ratio_matches_pytorch(rt, tiny_model)


def test_score_matches_pytorch(rt, tiny_model):
    check_score_matches_pytorch(rt, tiny_model)


def test_sampling_seeded_and_stop_strings(rt):
    a = rt.generate(PROMPT, ratio=0.6, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    b = rt.generate(PROMPT, ratio=0.6, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    assert a.token_ids == b.token_ids
    full = rt.generate(PROMPT, ratio=0.6, max_new_tokens=12)
    stop = full.text[3:5]
    if stop and stop.strip():
        cut = rt.generate(PROMPT, ratio=0.6, max_new_tokens=12, stop=[stop])
        assert cut.stop_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    pieces = list(rt.stream(PROMPT, ratio=0.6, max_new_tokens=12))
    assert "".join(pieces) == full.text


def test_interpolated_ratio(rt):
    res = rt.generate(PROMPT, ratio=0.7, max_new_tokens=2)
    assert res.selection["mode"] == "interpolated"
    assert THETAS["0.8"] < res.theta < THETAS["0.6"]


@pytest.mark.parametrize("kw, msg", [
    (dict(prompt="", ratio=0.6), "empty prompt"),
    (dict(prompt="   ", ratio=0.6), "empty prompt"),
    (dict(prompt="hi there", ratio=0.0), "(0, 1]"),
    (dict(prompt="hi there", ratio=1.5), "(0, 1]"),
    (dict(prompt="hi there", ratio=0.3), "below the lowest calibrated"),
    (dict(prompt="hi there", ratio=0.6, chat=True), "chat template"),
])
def test_bad_input(rt, kw, msg):
    prompt = kw.pop("prompt")
    with pytest.raises(QtaleError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        rt.generate(prompt, **kw)


def test_prompt_too_long(tiny_export):
    rt = Runtime.open(tiny_export, max_length=16)
    with pytest.raises(QtaleError, match="maximum is 15"):
        rt.generate(PROMPT * 3, ratio=0.6)
    res = rt.generate("The quick", ratio=0.6, max_new_tokens=100)
    assert res.stop_reason in ("max_length", "eos") and res.prompt_tokens + res.new_tokens <= 16


def test_tampered_export(tiny_export, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_export, bad)
    data = bad / "weights.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(QtaleError, match="sha256"):
        Runtime.open(bad)


def test_missing_engine(tiny_export):
    with pytest.raises(QtaleError, match="no TensorRT engine"):
        Runtime.open(tiny_export, backend="tensorrt")
    with pytest.raises(QtaleError, match="unknown backend"):
        Runtime.open(tiny_export, backend="vllm")


def run_cli(*argv):
    import argparse

    from qtale_export.cli.run import add_arguments, run

    return run(add_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in argv]))


def test_run_cli_json_and_stream(tiny_export, capsys):
    out = run_cli(tiny_export, "--ratio", "0.6", "--prompt", PROMPT, "--max-new-tokens", "5", "--json")
    assert {"text", "realized_ratio", "tokens_per_s", "engine"} <= set(out)
    assert capsys.readouterr().out == ""  # the CLI prints the returned dict with --json
    out = run_cli(tiny_export, "--ratio", "1.0", "--prompt", PROMPT, "--max-new-tokens", "5", "--stream")
    cap = capsys.readouterr()
    assert cap.out == out["text"] + "\n" and "realized ratio 1.000" in cap.err
    with pytest.raises(QtaleError, match=r"\(0, 1\]"):
        run_cli(tiny_export, "--ratio", "1.2", "--prompt", PROMPT)
    with pytest.raises(QtaleError, match="empty prompt"):
        run_cli(tiny_export, "--ratio", "0.6", "--prompt", "")


def test_runtime_imports_without_torch(tiny_export):
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import qtale_export.deploy.runtime as r, qtale_export.deploy.triton, qtale_export.deploy.bench\n"
        "rt = r.Runtime.open(sys.argv[1])\n"
        "res = rt.generate('The quick brown', ratio=0.6, max_new_tokens=3)\n"
        "rt.score(['The quick'], [' brown'], ratio=0.6)\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m, v in sys.modules.items() if v is not None)\n"
        "print('ok', res.new_tokens)\n")
    p = subprocess.run([sys.executable, "-c", code, str(tiny_export)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("ok")


def test_the_export_declares_the_graph_contract(tiny_export):
    """The exporter's graph I/O is the contract's (deploy/graph_io.py), names, order, shapes and dtypes."""
    from qtale_export.deploy import graph_io
    from qtale_export.deploy.manifest import read_manifest

    manifest = read_manifest(tiny_export, verify=False)
    m = manifest["model"]
    dims = (m["num_layers"], m["kv_heads"], m["head_dim"])
    for graph in graph_io.GRAPHS:
        described = manifest["graphs"][graph]
        want_in = graph_io.inputs(graph, *dims, m["activation_dtype"])
        want_out = graph_io.outputs(graph, *dims, m["vocab"], m["activation_dtype"])
        want_opt = {n: (dtype, shape) for n, (dtype, shape, _) in graph_io.optional_inputs(graph).items()}
        for got, want in ((described["inputs"], want_in), (described["outputs"], want_out),
                          (described["optional_inputs"], want_opt)):
            assert list(got) == list(want)
            assert {n: (v["dtype"], v["shape"]) for n, v in got.items()} == want


def test_tokenizer_decode_equals_transformers(tiny_export):
    """The runtime's decode (the fast tokenizer directly where transformers would only forward to
    it) gives transformers' own text, special tokens included in the ids."""
    import random

    from qtale_export.deploy.runtime.generate import Tokenizer

    tok = Tokenizer(tiny_export)
    if tok.hf is None:
        pytest.skip("transformers is not installed")
    rng = random.Random(0)
    vocab = len(tok.hf)
    special = list(tok.hf.all_special_ids)
    for n in (1, 7, 64):
        ids = [rng.randrange(vocab) for _ in range(n)] + special
        rng.shuffle(ids)
        assert tok.decode(ids) == tok.hf.decode(ids, skip_special_tokens=True)
