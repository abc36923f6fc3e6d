"""`qtale triton-repo` (deploy/triton.py) without a server: the serving limits it writes into the
configs, what it copies (only checked files inside the export folder) and what --force may replace."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from qtale_export.deploy import triton
from qtale_export.errors import QtaleError


def _config(repo: Path, model: str):
    return triton.validate_config((repo / model / "config.pbtxt").read_text())


def _params(cfg) -> dict:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def test_configs_carry_the_limits_queue_and_deadline(tiny_export, tmp_path):
    from tritonclient.grpc import model_config_pb2

    repo = tmp_path / "repo"
    triton.build_repository([tiny_export], repo, max_new_tokens=8, max_new_tokens_cap=100, max_prompt_tokens=50,
                            deadline_s=2.5, max_queue=7, router_instances=3)
    router = _config(repo, triton.ROUTER)
    policy = router.dynamic_batching.default_queue_policy
    assert policy.max_queue_size == 7 and policy.default_timeout_microseconds == 2_500_000
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert router.instance_group[0].count == 3
    assert "stop_reason" in [o.name for o in router.output]
    p = _params(router)
    assert (p["max_new_tokens_cap"], p["max_prompt_tokens"], p["deadline_s"], p["vocab"]) == ("100", "50", "2.5", "300")
    graph = _params(_config(repo, "qtale_fp32"))
    assert (graph["vocab"], graph["max_length"]) == ("300", "512")
    # the prompt cap never exceeds the model's maximum length - 1
    triton.build_repository([tiny_export], tmp_path / "r2", max_prompt_tokens=10**9)
    assert _params(_config(tmp_path / "r2", triton.ROUTER))["max_prompt_tokens"] == "511"
    assert (repo / triton.MARKER).is_file()


def test_in_flight_model_config(tiny_export, tmp_path):
    """qtale_llm_<precision>: decoupled, the generate extension's names, the shared files copied next
    to it, its graphs the graph model's (held once), the elastic parameters."""
    repo = tmp_path / "repo"
    res = triton.build_repository([tiny_export], repo, max_batch=5, max_queue=9, max_new_tokens=8,
                                  elastic="tpot", elastic_target=0.05, elastic_floor=0.7)
    assert "qtale_llm_fp32" in res["models"]
    cfg = _config(repo, "qtale_llm_fp32")
    assert cfg.model_transaction_policy.decoupled and cfg.max_batch_size == 0
    assert {"text_input", "max_tokens", "execution_ratio", "stream", "elastic"} <= {i.name for i in cfg.input}
    assert all(i.optional for i in cfg.input)
    assert {"text_output", "requested_ratio", "realized_ratio"} <= {o.name for o in cfg.output}
    p = _params(cfg)
    assert (p["graph_model"], p["max_rows"], p["max_queue"], p["elastic"], p["elastic_target"], p["elastic_floor"]) == \
        ("qtale_fp32", "5", "9", "tpot", "0.05", "0.7")
    ver = repo / "qtale_llm_fp32" / "1"
    assert sorted(f.name for f in ver.iterdir()) == ["graph_io.py", "kv.py", "model.py", "model_files.py", "sampling.py",
                                                      "theta_policy.py", "tokenizer.json"]
    assert not list(ver.glob("*.onnx*"))  # the weights live once, in the graph model's folder
    assert all((repo / "qtale_fp32" / "1" / f).is_file() for f in json.loads(p["graphs"]).values())
    off = triton.build_repository([tiny_export], tmp_path / "off")
    assert _params(_config(tmp_path / "off", "qtale_llm_fp32"))["elastic"] == "off" and off["elastic"] == "off"
    onnx = triton.build_repository([tiny_export], tmp_path / "ort", backend="onnxruntime")
    assert not any(n.startswith("qtale_llm_") for n in onnx["models"])  # the in-flight model runs ORT in-process


@pytest.mark.parametrize("options, message", [
    ({"elastic": "fast"}, "unknown elastic policy"),
    ({"elastic": "tpot"}, "needs --elastic-target"),
    ({"elastic": "queue", "elastic_target": float("nan")}, "needs --elastic-target"),
    ({"elastic": "tpot", "elastic_target": 0.1, "elastic_floor": 1.5}, r"\(0, 1\]"),
    ({"elastic": "tpot", "elastic_target": 0.1, "elastic_floor": 0.2}, "below the lowest calibrated ratio"),
    ({"elastic": "tpot", "elastic_target": 0.1, "backend": "onnxruntime"}, "needs --backend python"),
    ({"max_new_tokens": 600}, "--max-new-tokens-cap"),
    ({"max_new_tokens_cap": 0}, ">= 1"),
    ({"deadline_s": 0.0}, "--deadline"),
    ({"deadline_s": float("nan")}, "--deadline"),
    ({"max_queue": 0}, ">= 1"),
    ({"router_instances": 0}, ">= 1"),
    ({"max_prompt_tokens": 0}, "--max-prompt-tokens"),
])
def test_bad_limits_are_refused(tiny_export, tmp_path, options, message):
    with pytest.raises(QtaleError, match=message):
        triton.build_repository([tiny_export], tmp_path / "repo", **options)
    assert not (tmp_path / "repo").exists()


def test_force_replaces_only_a_triton_repository(tiny_export, tmp_path):
    decoy = tmp_path / "thesis"
    decoy.mkdir()
    (decoy / "thesis.tex").write_text("years of work")
    with pytest.raises(QtaleError, match="is not a QTALE"):
        triton.build_repository([tiny_export], decoy, force=True)
    assert [p.name for p in decoy.iterdir()] == ["thesis.tex"]
    # an export folder is a QTALE output, but not a repository
    other = tmp_path / "other-export"
    shutil.copytree(tiny_export, other)
    with pytest.raises(QtaleError, match="is not a QTALE"):
        triton.build_repository([tiny_export], other, force=True)
    assert (other / "manifest.json").is_file()
    repo = tmp_path / "repo"
    triton.build_repository([tiny_export], repo)
    triton.build_repository([tiny_export], repo, force=True, max_new_tokens=4)  # its own repository: replaced
    assert _params(_config(repo, triton.ROUTER))["default_max_new_tokens"] == "4"
    empty = tmp_path / "empty"
    empty.mkdir()
    triton.build_repository([tiny_export], empty, force=True)
    assert (empty / triton.MARKER).is_file()


def _tamper(export: Path, tmp_path: Path, edit) -> Path:
    """A copy of the export whose manifest `edit(manifest, folder)` changed (not resealed)."""
    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest, folder)
    path.write_text(json.dumps(manifest))
    return folder


def _secret(tmp_path: Path) -> Path:
    s = tmp_path / "secret.txt"
    s.write_text("private key material")
    return s


def _add_external(name_of):
    def edit(m, folder):
        m["graphs"]["prefill"]["external_data"].append(name_of(folder))
    return edit


@pytest.mark.parametrize("probe", ["absolute", "dotdot", "unlisted", "symlink-out", "not-a-list"])
def test_nothing_outside_the_export_is_copied(tiny_export, tmp_path, probe):
    secret = _secret(tmp_path)
    if probe == "absolute":
        folder = _tamper(tiny_export, tmp_path, _add_external(lambda f: str(secret)))
    elif probe == "dotdot":
        folder = _tamper(tiny_export, tmp_path, _add_external(lambda f: "../secret.txt"))
    elif probe == "unlisted":  # inside the folder, but no checksum vouches for it
        folder = _tamper(tiny_export, tmp_path, _add_external(lambda f: "notes.txt"))
        (folder / "notes.txt").write_text("unlisted")
    elif probe == "symlink-out":  # a listed name that is a symlink to an identical file outside
        folder = tmp_path / "export"
        shutil.copytree(tiny_export, folder)
        outside = tmp_path / "weights-elsewhere"
        shutil.copy2(folder / "weights.onnx.data", outside)
        (folder / "weights.onnx.data").unlink()
        os.symlink(outside, folder / "weights.onnx.data")
    else:
        folder = _tamper(tiny_export, tmp_path, lambda m, f: m["graphs"]["prefill"].update(external_data="weights.onnx.data"))
    repo = tmp_path / "repo"
    with pytest.raises(QtaleError):
        triton.build_repository([folder], repo)
    assert not repo.exists()
    assert not any(p.name.startswith(".repo") for p in tmp_path.iterdir())  # no staging left either


def test_tokenizer_symlink_out_of_the_export_is_refused(tiny_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    outside = tmp_path / "tokenizer-elsewhere.json"
    shutil.copy2(folder / "tokenizer.json", outside)
    (folder / "tokenizer.json").unlink()
    os.symlink(outside, folder / "tokenizer.json")
    with pytest.raises(QtaleError, match="outside the export folder|leads out of"):
        triton.build_repository([folder], tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
