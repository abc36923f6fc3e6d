"""triton-repo generation (configs parsed with tritonclient's ModelConfig) and the bench JSON schema."""
from __future__ import annotations

import argparse
import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from qtale_export.errors import QtaleError
from qtale_export.cli.triton_repo import add_arguments as add_triton_arguments, run as run_triton
from qtale_export.deploy.triton import validate_config


def triton(*argv):
    return run_triton(add_triton_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in argv]))


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_triton_repo(tiny_export, tmp_path, backend, capsys):
    out = tmp_path / "repo"
    res = triton(tiny_export, "--out", out, "--backend", backend, "--ratios", "0.5,0.7,1.0", "--instances", "2")
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert (out / ".qtale-triton-repository").is_file()  # what --force looks for
    # one model per graph (onnxruntime) or one for both (python), whatever the number of ratios
    graphs = ["qtale_fp32_decode", "qtale_fp32_prefill"] if backend == "onnxruntime" else ["qtale_fp32", "qtale_llm_fp32"]
    assert names == sorted(res["models"]) == sorted(graphs + ["qtale_router"])
    assert [(r["ratio"], r["mode"]) for r in res["ratios"]] == [(0.5, "exact"), (0.7, "interpolated"), (1.0, "exact")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    for name in names:
        cfg = model_config_pb2.ModelConfig()
        text_format.Parse((out / name / "config.pbtxt").read_text(), cfg)
        assert cfg.name == name
        if name == "qtale_router":
            assert cfg.backend == "python" and cfg.max_batch_size == 8 and cfg.HasField("dynamic_batching")
            ver = out / name / "1"
            assert all((ver / f).is_file() for f in ("model.py", "tokenizer.json", "theta_policy.py"))
            exports = json.loads(cfg.parameters["exports"].string_value)
            assert exports["fp32"]["theta_table"] == json.loads((tiny_export / "manifest.json").read_text())["theta_table"]
            assert cfg.parameters["ratio_mode"].string_value == "interpolate"
            assert [i.name for i in cfg.input if i.name == "precision"] == ["precision"]
            continue
        if name.startswith("qtale_llm_"):  # one instance: its scheduler owns the running batch (test_triton_repo.py)
            assert cfg.model_transaction_policy.decoupled and cfg.instance_group[0].count == 1
            continue
        assert cfg.instance_group[0].count == 2 and len(cfg.model_warmup) == 1
        inputs = {i.name: i for i in cfg.input}
        assert "theta" in inputs and -1 in list(cfg.input[0].dims) and "theta" not in cfg.parameters
        ver = out / name / "1"
        assert (ver / "weights.onnx.data").is_file()
        if backend == "onnxruntime":
            graph = name.rsplit("_", 1)[1]
            assert cfg.platform == "onnxruntime_onnx" and cfg.default_model_filename == f"{graph}.onnx"
            assert sorted(p.name for p in ver.iterdir()) == sorted([f"{graph}.onnx", "weights.onnx.data"])
        else:  # both graphs and the weights they share, once
            assert cfg.backend == "python" and (ver / "model.py").is_file()
            assert sorted(p.name for p in ver.iterdir()) == ["decode.onnx", "graph_io.py", "model.py", "model_files.py",
                                                             "prefill.onnx", "weights.onnx.data"]
            assert inputs["past_exec"].optional and not inputs["input_ids"].optional
    sizes = {}
    for ratios in ("0.6", "0.5,0.6,0.7,0.8,1.0"):  # the repository does not grow with the ratios
        r = tmp_path / f"size-{len(ratios)}"
        triton(tiny_export, "--out", r, "--backend", backend, "--ratios", ratios)
        sizes[ratios] = sum(p.stat().st_size for p in r.rglob("*") if p.is_file())
    assert len(set(sizes.values())) == 1
    with pytest.raises(QtaleError, match="already exists"):
        triton(tiny_export, "--out", out)
    triton(tiny_export, "--out", out, "--force", "--ratios", "0.6")


def test_triton_repo_errors(tiny_export, tmp_path):
    with pytest.raises(QtaleError, match="no TensorRT engine"):
        triton(tiny_export, "--out", tmp_path / "r", "--backend", "tensorrt")
    with pytest.raises(QtaleError, match=r"\(0, 1\]"):
        triton(tiny_export, "--out", tmp_path / "r", "--ratios", "0.6,1.5")
    with pytest.raises(QtaleError, match="below the lowest"):
        triton(tiny_export, "--out", tmp_path / "r", "--ratios", "0.2")
    assert not (tmp_path / "r").exists()
    with pytest.raises(QtaleError, match="invalid"):
        validate_config('name: "x"\nplatform: "onnxruntime_onnx"\nmax_batch_size: "eight"\n')


def test_bench_schema(tiny_export, tmp_path, capsys):
    from qtale_export.cli.bench import add_arguments as add_bench_arguments, run as run_bench

    args = add_bench_arguments(argparse.ArgumentParser()).parse_args(
        [str(tiny_export), "--seq", "16,32", "--ratios", "1.0,0.6,0.5", "--repeats", "2", "--decode-tokens", "2",
         "--out", str(tmp_path / "b"), "--record"])
    rep = run_bench(args)
    assert "prefill ms" in capsys.readouterr().out
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert (tmp_path / "b" / "bench.png").is_file()
    for r in (rep, saved):
        assert r["repeats"] == 2 and r["peak_rss_mb"] > 0
        (e,) = r["exports"]
        assert {"prefill.onnx", "decode.onnx", "weights.onnx.data"} <= set(e["files"])
        assert len(e["prefill"]) == 6 and {p["seq"] for p in e["prefill"]} == {16, 32}
        for p in e["prefill"]:
            assert {"ratio", "theta", "ms", "vs_dense", "realized_ratio"} <= set(p) and p["ms"] > 0
            if p["ratio"] == 1.0:
                assert p["vs_dense"] == 1.0 and p["realized_ratio"] == 1.0
        assert [d["ratio"] for d in e["decode"]] == [1.0, 0.6, 0.5]
        assert all(d["tokens_per_s"] > 0 for d in e["decode"])
        assert [o["seq"] for o in e["router_overhead"]] == [16, 32] and e["router_overhead"][0]["routers_cut"] == 4
    # --record wrote the decode latencies (one per ratio), and the checksums still hold
    from qtale_export.deploy.manifest import read_manifest

    m = read_manifest(tiny_export, verify=True)
    assert len([b for b in m["benchmarks"] if b["backend"] == "ort-cpu"]) == 3
    assert len({b["ratio"] for b in m["benchmarks"] if b.get("ms_per_token") is not None}) == 3
