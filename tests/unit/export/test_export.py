"""ONNX export: every precision x op set against PyTorch, decode, manifest, bad input."""
from __future__ import annotations

import argparse
import json
import shutil
import time

import numpy as np
import onnx
import pytest
import torch

import qtale_export
from qtale_export.cli import export as cli_export, verify as cli_verify
from qtale_export.errors import QtaleError
from qtale_export.export import main as export_main
from qtale_export.deploy import ort_ops
from qtale_export.deploy.manifest import read_manifest, view

from qtale_testing import make_tiny, random_batch, spread_checkpoint, spread_routed_model, spread_routers

CASES = [("fp32", "standard", None), ("fp32", "plugin", None), ("fp16", "standard", None), ("fp16", "plugin", None),
         ("int4", "standard", "ort-cpu"), ("int4", "plugin", "ort-cpu"), ("int4", "standard", "tensorrt"),
         ("int4", "plugin", "tensorrt"), ("int8", "standard", None), ("int8", "plugin", None),
         ("fp8", "standard", "tensorrt"), ("fp8", "plugin", "tensorrt")]


@pytest.fixture(scope="session")
def spread_ckpt(tiny_dir, tmp_path_factory):
    return spread_checkpoint(tiny_dir, tmp_path_factory.mktemp("ckpt") / "routed")[1]


@pytest.fixture(scope="session")
def spread_model(spread_ckpt):
    return qtale_export.load(spread_ckpt)


@pytest.fixture(scope="session")
def exported(spread_model, spread_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(precision, ops, target=None):
        key = (precision, ops, target)
        if key not in cache:
            out = root / f"{precision}-{ops}-{target}"
            export_main.export(spread_model, out, checkpoint=str(spread_ckpt), ratio=0.6, precision=precision,
                               ops=ops, target=target)
            cache[key] = out
        return cache[key]
    return get


@pytest.mark.parametrize("precision,ops,target", CASES)
def test_export_matches_pytorch(exported, spread_model, precision, ops, target):
    out = exported(precision, ops, target)
    manifest = read_manifest(out)
    assert manifest["verification"]["ok"], manifest["verification"]
    for kind in ("prefill", "decode"):
        onnx.checker.check_model(str(out / f"{kind}.onnx"))
    prefill = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    types = {n.op_type for n in prefill.graph.node}
    assert ("TokenCompact" in types) == (ops == "plugin")
    if precision == "int4":
        assert ("MatMulNBits" in types) == (manifest["target"] == "ort-cpu")
    if precision in ("int8", "fp8") or (precision == "int4" and manifest["target"] == "tensorrt"):
        assert "DequantizeLinear" in types
    # routers stay fp32 and unquantized
    inits = {i.name: i for i in prefill.graph.initializer}
    assert inits["router.2.down.weight.T"].data_type == onnx.TensorProto.FLOAT
    # explicit check of all/none executed, batch with padding, several thetas
    from qtale_export.export.verify import reference_model
    ref = reference_model(manifest, out, spread_model)
    sess = ort_ops.session(out / "prefill.onnx", exact=True)
    ids, mask = random_batch(ref)
    valid = mask.bool().numpy()
    atol = {"fp16": 5e-3}.get(precision, 1e-4)
    for th in (0.0, 0.3, 0.7, 1.0):
        theta = torch.full((3,), th)
        with torch.no_grad():
            r = ref(ids, mask, theta=theta, use_cache=True)
        got = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "theta": theta.numpy()})))
        want_exec = np.stack([p[2].numpy() for p in r.past_key_values])
        np.testing.assert_array_equal(got["exec_mask"], want_exec)
        if th == 0.0:
            assert got["exec_mask"][:, valid].all()  # every real token runs every layer
        if th == 1.0:
            assert not got["exec_mask"][2:, valid].sum() > (3 * 2 * len(ref.layer_ids))  # only keep_initial
        assert np.abs(got["logits"] - r.logits.numpy())[valid].max() <= atol * max(1.0, np.abs(r.logits.numpy()).max())
        for i in (0, 3):
            _assert_kv_close(got[f"present.{i}.key"], r.past_key_values[i][0].numpy(), valid, atol * 10)


def _assert_kv_close(got, want, valid, atol):
    """K/V [B, kv, T, hd] equal within atol at the valid positions ([B, T]); at padding positions they
    are unspecified (graph_io)."""
    real = valid[:, None, :, None]
    np.testing.assert_allclose(np.where(real, got.astype(np.float32), 0.0), np.where(real, want, 0.0), atol=atol, rtol=0)


def _decode_pairs(m, pre, dec, ids, mask, theta, steps):
    """Prefill then `steps` greedy decode steps in ONNX Runtime and PyTorch side by side; yields
    (ORT outputs by name, PyTorch RoutedOutput) for every decode step."""
    with torch.no_grad():
        r = m(ids, mask, theta=theta, use_cache=True)
    got = dict(zip([o.name for o in pre.get_outputs()], pre.run(None, {
        "input_ids": ids.numpy(), "attention_mask": mask.numpy(), "theta": theta.numpy()})))
    L = m.hf_config.num_hidden_layers
    past, nxt = r.past_key_values, r.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        feeds = {f"past.{i}.{kv}": got[f"present.{i}.{kv}"] for i in range(L) for kv in ("key", "value")}
        feeds.update(past_exec=got["exec_mask"], input_ids=nxt.numpy(), attention_mask=mask.numpy(),
                     theta=theta.numpy())
        got = dict(zip([o.name for o in dec.get_outputs()], dec.run(None, feeds)))
        with torch.no_grad():
            r = m(nxt, mask, past_key_values=past, use_cache=True, theta=theta)
        yield got, r
        past, nxt = r.past_key_values, r.logits[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("ops", ["standard", "plugin"])
def test_decode_16_steps(exported, spread_model, ops):
    out = exported("fp32", ops)
    pre = ort_ops.session(out / "prefill.onnx")
    dec = ort_ops.session(out / "decode.onnx")
    m = spread_model
    ids, mask = random_batch(m, n=2, t=9, seed=1)
    theta = torch.tensor([0.4, 0.6])
    L = m.hf_config.num_hidden_layers
    skipped = 0
    for got, r in _decode_pairs(m, pre, dec, ids, mask, theta, 16):
        np.testing.assert_array_equal(got["exec_mask"], np.stack([p[2].numpy() for p in r.past_key_values]))
        np.testing.assert_allclose(got["logits"], r.logits.numpy(), atol=1e-4, rtol=0)
        for i in (2, L - 1):
            np.testing.assert_allclose(got[f"present.{i}.key"], r.past_key_values[i][0].numpy(), atol=1e-4, rtol=0)
        skipped += int((~got["exec_mask"][2:, :, -1]).sum())
    assert skipped > 0  # the decode path did skip layers


@pytest.mark.parametrize("precision,target", [("fp32", None), ("int4", "ort-cpu")])
def test_in_place_decode_batched_paths(exported, spread_model, precision, target):
    """The runtime's in-place KV decoder (past.* and present.* one bound buffer): a batch of two rows
    on different execution paths (one row skips routed layers the other runs) equals PyTorch step by
    step, and the buffers hold PyTorch's cache (zeros where a row skipped)."""
    from qtale_export.export.verify import reference_model
    from qtale_export.deploy.runtime.backends import OrtBackend

    out = exported(precision, "standard", target)
    manifest = read_manifest(out)
    m = reference_model(manifest, out, spread_model)
    be = OrtBackend(view(out, manifest), exact=True)
    assert be.in_place
    ids, mask = random_batch(m, n=2, t=9, seed=3)
    theta = torch.tensor([0.0, 0.6])
    L = m.hf_config.num_hidden_layers
    with torch.no_grad():
        r = m(ids, mask, theta=theta, use_cache=True)
    got = be.run("prefill", {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "theta": theta.numpy()})
    dec = be.decoder(got, L, capacity=ids.shape[1] + 12)
    past, nxt, exec_mask = r.past_key_values, r.logits[:, -1].argmax(-1, keepdim=True), got["exec_mask"]
    differ = 0
    for _ in range(10):
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        got = dec.step({"input_ids": nxt.numpy(), "attention_mask": mask.numpy(), "theta": theta.numpy(),
                        "past_exec": exec_mask})
        with torch.no_grad():
            r = m(nxt, mask, past_key_values=past, use_cache=True, theta=theta)
        exec_mask = got["exec_mask"]
        np.testing.assert_array_equal(exec_mask, np.stack([p[2].numpy() for p in r.past_key_values]))
        np.testing.assert_allclose(got["logits"], r.logits.numpy(), atol=1e-4 * max(1.0, float(r.logits.abs().max())),
                                   rtol=0)
        n = mask.shape[1]
        for (name, buf, _), i in zip(dec.buffers[::2], range(L)):
            _assert_kv_close(buf[:, :, :n], r.past_key_values[i][0].numpy(), mask.bool().numpy(), 1e-3)
        new = exec_mask[m.layer_ids, :, -1]
        differ += int((new[:, 0] != new[:, 1]).sum())
        past, nxt = r.past_key_values, r.logits[:, -1].argmax(-1, keepdim=True)
    assert differ > 0  # the rows did take different paths


@pytest.mark.parametrize("precision,ops,target", [("fp32", "standard", None), ("int4", "standard", "ort-cpu"),
                                                  ("int4", "standard", "tensorrt")])
def test_prefill_logits_to_keep(exported, precision, ops, target):
    """logits_to_keep N gives the last N positions' logits of the full prefill (0 or none: every
    position; N above the length: every position), K/V and exec mask unchanged; the tensorrt form
    does not declare it (TensorRT would read an input with a default as a constant)."""
    from qtale_export.deploy import graph_io

    out = exported(precision, ops, target)
    sess = ort_ops.session(out / "prefill.onnx", exact=True)
    declared = {i.name for i in sess.get_overridable_initializers()}
    assert (graph_io.LOGITS_TO_KEEP in declared) == (target != "tensorrt")
    if target == "tensorrt":
        return
    m = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    ids = np.array([[5, 7, 9, 11, 13, 2, 4], [0, 0, 3, 8, 6, 1, 9]], np.int64)
    mask = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]], np.int64)
    names = [o.name for o in m.graph.output]
    base = graph_io.prefill_feeds(ids, mask, np.array([0.0, 0.6], np.float32))
    full = dict(zip(names, sess.run(None, base)))
    assert full["logits"].shape[1] == 7
    for keep, want in ((0, 7), (1, 1), (3, 3), (50, 7)):
        got = dict(zip(names, sess.run(None, graph_io.prefill_feeds(ids, mask, base["theta"], keep))))
        assert got["logits"].shape[1] == want
        np.testing.assert_allclose(got["logits"], full["logits"][:, 7 - want:], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got["exec_mask"], full["exec_mask"])
        np.testing.assert_array_equal(got["present.0.key"], full["present.0.key"])


def test_cut_routers_keeps_what_if_branches_read(exported, spread_model):
    """graphs.cut_routers on the int4 ort-cpu decode graph, whose If branches read outer-scope
    values: no router MatMul is left, the graph still runs, and at theta 0 (every layer executes
    either way) it gives the original's logits and exec mask."""
    from qtale_export.export.graphs import cut_routers
    from qtale_export.export.verify import reference_model

    out = exported("int4", "standard", "ort-cpu")
    manifest = read_manifest(out)
    m = reference_model(manifest, out, spread_model)
    g = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    assert cut_routers(g) == len(m.layer_ids)
    assert not any(n.op_type == "MatMul" and n.name.startswith("router.") for n in g.graph.node)
    cut_file = out.parent / "decode-cut" / "decode.onnx"
    cut_file.parent.mkdir(exist_ok=True)
    for f in out.iterdir():  # the external weights next to the graph, as ONNX Runtime wants them
        if f.suffix == ".data" and not (cut_file.parent / f.name).exists():
            shutil.copy2(f, cut_file.parent / f.name)  # a hard link would fail onnx's checker elsewhere
    onnx.save(g, str(cut_file))
    pre = ort_ops.session(out / "prefill.onnx", exact=True)
    sessions = [ort_ops.session(out / "decode.onnx", exact=True), ort_ops.session(cut_file, exact=True)]
    ids, mask = random_batch(m, n=1, t=6, seed=2, left_pad=())
    theta = torch.zeros(1)
    got = [list(_decode_pairs(m, pre, dec, ids, mask, theta, steps=2))[-1][0] for dec in sessions]
    np.testing.assert_allclose(got[1]["logits"], got[0]["logits"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(got[1]["exec_mask"], got[0]["exec_mask"])


def _if_nodes(path):
    m = onnx.load(str(path), load_external_data=False)
    ifs = {n.name: n for n in m.graph.node if n.op_type == "If"}
    return m, ifs, {name: {a.name: a.g for a in n.attribute} for name, n in ifs.items()}


@pytest.mark.parametrize("precision,ops,target", [("fp32", "standard", None), ("fp32", "plugin", None),
                                                  ("int4", "standard", "ort-cpu"), ("fp16", "standard", None)])
def test_decode_skips_layers_with_if(exported, spread_model, precision, ops, target):
    """Every routed layer of decode.onnx is an If on "some row executes it" (the ort-cpu form: the
    whole layer with its GroupQueryAttention, else the cache kept in place or padded by a nested If);
    at theta 1.0 only the forced (keep_initial) tokens execute, so decode takes the else-branches
    and still equals PyTorch."""
    from qtale_export.export.verify import reference_model

    out = exported(precision, ops, target)
    manifest = read_manifest(out)
    m = reference_model(manifest, out, spread_model)
    model, ifs, branches = _if_nodes(out / "decode.onnx")
    onnx.checker.check_model(str(out / "decode.onnx"), full_check=True)
    in_place = manifest["graphs"]["decode"].get("kv_cache") == "in-place"
    assert in_place == (precision != "fp16")  # fp16 activations keep the plain form
    assert sorted(ifs) == sorted(f"layers.{i}/If" for i in m.layer_ids)
    routed_names = tuple(f"layers.{i}." for i in m.layer_ids)
    assert not any(n.op_type in ("MatMul", "MatMulNBits") and n.name.startswith(routed_names) for n in model.graph.node)
    mm = "MatMulNBits" if precision == "int4" else "MatMul"
    for name, g in branches.items():
        run = [n.op_type for n in g["then_branch"].node]
        if not in_place:
            assert [n.op_type for n in g["else_branch"].node] == ["Identity"] * 3
            assert run.count("MatMul") == 9
            continue
        assert [n.op_type for n in g["else_branch"].node] == ["Identity", "If"]  # x; the cache
        nested = {a.name: a.g for a in g["else_branch"].node[1].attribute}
        assert [n.op_type for n in nested["then_branch"].node] == ["Identity"] * 2  # in place: untouched
        assert [n.op_type for n in nested["else_branch"].node] == ["Pad"] * 2  # exact length: a zero slot
        # fused q/k/v and gate/up; ORT's quantizer reached the projections inside the branches
        assert run.count(mm) == 4 and run.count("GroupQueryAttention") == 1, (name, run)
        assert not any(n.op_type == "MatMul" and n.name.endswith("_proj/MatMul") for n in g["then_branch"].node) \
            or precision != "int4"
    if in_place:
        attn = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]  # the unrouted layers
        assert len(attn) == m.hf_config.num_hidden_layers - len(m.layer_ids)
    cond = next(iter(ifs.values())).input[0]
    # "some row executes": a bool ReduceMax of the gates (opset >= 20), else through int64 casts
    assert any(n.op_type in ("ReduceMax", "Cast") and n.output[0] == cond for n in model.graph.node)
    pre = ort_ops.session(out / "prefill.onnx", exact=True)
    dec = ort_ops.session(out / "decode.onnx", exact=True)
    atol = {"fp16": 5e-3 * 20}.get(precision, 1e-4)
    for theta in (torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])):
        ids, mask = random_batch(m, n=2, t=9, seed=2)
        for got, r in _decode_pairs(m, pre, dec, ids, mask, theta, 6):
            new = got["exec_mask"][m.layer_ids, :, -1]
            if theta[0] == 1.0:
                assert not new.any()  # past keep_initial: no row runs a routed layer, every If skips
            else:
                assert new[:, 0].all() and not new[:, 1].any()
            np.testing.assert_array_equal(got["exec_mask"], np.stack([p[2].numpy() for p in r.past_key_values]))
            np.testing.assert_allclose(got["logits"], r.logits.numpy(), atol=atol * max(1.0, float(r.logits.abs().max())), rtol=0)
            for i in m.layer_ids:
                np.testing.assert_allclose(got[f"present.{i}.key"].astype(np.float32), r.past_key_values[i][0].numpy(),
                                           atol=atol * 10, rtol=0)


def test_manifest_and_files(exported, spread_ckpt):
    out = exported("fp32", "standard")
    data = read_manifest(out)
    assert data["format"] == "qtale-export" and data["format_version"] == 1
    assert data["theta"] == 0.5 and data["ratio"] == 0.6 and data["checkpoint"] == str(spread_ckpt.resolve())
    for f in ("prefill.onnx", "decode.onnx", "weights.onnx.data", "tokenizer.json"):
        assert f in data["files"], f
    assert not any(f.endswith(".onnx.data") and f != "weights.onnx.data" for f in data["files"])
    g = data["graphs"]["prefill"]
    assert g["inputs"]["theta"] == {"dtype": "float32", "shape": ["batch"]}
    assert g["outputs"]["exec_mask"]["shape"] == [6, "batch", "seq"]
    assert data["graphs"]["decode"]["inputs"]["past_exec"]["shape"] == [6, "batch", "past"]
    assert data["model"]["kv_heads"] == 2 and data["model"]["head_dim"] == 16


@pytest.mark.parametrize("precision,target", [("fp32", None), ("int4", "ort-cpu"), ("int8", None)])
def test_graphs_share_one_weights_file(exported, precision, target):
    import onnx

    from qtale_export.export.weights import graph_tensors

    def external_files(model_path) -> list[str]:
        """The external data files an ONNX file refers to (names relative to its folder)."""
        m = onnx.load(str(model_path), load_external_data=False)
        return sorted({e.value for t in graph_tensors(m.graph) if t.data_location == onnx.TensorProto.EXTERNAL
                       for e in t.external_data if e.key == "location"})

    out = exported(precision, "standard", target)
    data = read_manifest(out)
    spans = {}
    for g in ("prefill", "decode"):
        assert external_files(out / data["graphs"][g]["file"]) == ["weights.onnx.data"]
        assert data["graphs"][g]["external_data"] == ["weights.onnx.data"]
        m = onnx.load(str(out / f"{g}.onnx"), load_external_data=False)
        spans[g] = {tuple(int(e.value) for e in t.external_data if e.key in ("offset", "length"))
                    for t in graph_tensors(m.graph) if t.external_data}
    assert spans["decode"] <= spans["prefill"]  # the decode graph adds nothing to the file
    size = (out / "weights.onnx.data").stat().st_size
    assert size < sum(n for _, n in spans["prefill"]) + 4096 * len(spans["prefill"])  # one copy (+ alignment)
    if precision in ("int4", "int8"):  # the embedding and the LM head: one table of that precision (untied here: two)
        p = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
        nodes = {n.name: n for n in p.graph.node}
        bits = {"int4": 4, "int8": 8}[precision]
        for name in ("embed/GatherBlockQuantized", "lm_head/MatMulNBits"):
            assert {a.name: a.i for a in nodes[name].attribute}["bits"] == bits, name
        assert not any(n.op_type == "Gather" and n.input[0] == "embed" for n in p.graph.node)  # no fp32 table
    # onnx reads the tensors back at their offsets, equal for both graphs
    p = onnx.load(str(out / "prefill.onnx"))
    d = onnx.load(str(out / "decode.onnx"))
    pi = {t.name: t for t in p.graph.initializer}
    shared = [t for t in d.graph.initializer if t.name in pi and len(t.raw_data) >= 1024]
    assert shared and all(t.raw_data == pi[t.name].raw_data for t in shared)


def test_checksum_detects_modified_file(exported, tmp_path):
    import shutil

    src = exported("fp32", "standard")
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    read_manifest(out)
    with open(out / "weights.onnx.data", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(QtaleError, match="weights.onnx.data"):
        read_manifest(out)
    args = cli_verify.add_arguments(argparse.ArgumentParser()).parse_args([str(out)])
    with pytest.raises(QtaleError, match="sha256"):
        cli_verify.verify_of(args)


def test_run_verify_cli(exported):
    out = exported("int4", "plugin")
    args = cli_verify.add_arguments(argparse.ArgumentParser()).parse_args([str(out), "--theta", "0.5",
                                                                            "--decode-steps", "2"])
    report = cli_verify.verify_of(args)
    assert report["ok"] and [c["theta"] for c in report["cases"]] == [0.5]
    json.dumps(report)


def _args(argv):
    return cli_export.add_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.mark.parametrize("argv,match", [
    (["--ratio", "0"], "ratio"), (["--ratio", "1.5"], "ratio"), (["--precision", "int3"], "precision"),
    (["--ops", "magic"], "op set"), (["--precision", "fp8", "--target", "ort-cpu"], "tensorrt"),
    (["--target", "tpu"], "target"), (["--precision", "int4", "--opset", "17"], "opset"),
])
def test_bad_options(spread_ckpt, tmp_path, argv, match):
    out = tmp_path / "out"
    with pytest.raises(QtaleError, match=match):
        cli_export.export_of(_args([str(spread_ckpt), "--out", str(out)] + argv))
    assert not out.exists()


def test_existing_out_and_force(spread_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(QtaleError, match="--force"):
        cli_export.export_of(_args([str(spread_ckpt), "--out", str(out)]))
    # --force replaces only an earlier QTALE export (issue 24): a folder of the user's files is kept
    with pytest.raises(QtaleError, match="is not a QTALE"):
        cli_export.export_of(_args([str(spread_ckpt), "--out", str(out), "--force"]))
    assert (out / "keep.txt").exists()
    (out / "keep.txt").unlink()  # an empty folder may be replaced
    cli_export.export_of(_args([str(spread_ckpt), "--out", str(out), "--force", "--decode-steps", "1"]))
    (out / "stray.log").write_text("x")  # a by-product beside an export, replaced with it
    data = cli_export.export_of(_args([str(spread_ckpt), "--out", str(out), "--force", "--ratio", "1.0",
                                         "--decode-steps", "1"]))
    assert data["theta"] == 0.0 and not (out / "stray.log").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_uncalibrated_ratio_and_format_version(spread_ckpt, tmp_path):
    with pytest.raises(QtaleError, match="calibrate"):
        cli_export.export_of(_args([str(spread_ckpt), "--out", str(tmp_path / "o"), "--ratio", "0.3"]))
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(spread_ckpt, bad)
    meta = json.loads((bad / "qtale.json").read_text())
    meta["format_version"] = 99
    (bad / "qtale.json").write_text(json.dumps(meta))
    with pytest.raises(QtaleError, match="format version"):
        cli_export.export_of(_args([str(bad), "--out", str(tmp_path / "o2")]))
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def _default_model_theta(model, ratio=0.6):
    """Bisection for the theta whose execution ratio on a short text is `ratio` (stands in for calibrate)."""
    from qtale_testing import TEXT

    ids = model.tokenizer(TEXT[:600], return_tensors="pt")["input_ids"]
    lo, hi = 0.0, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        model.reset_stats()
        with torch.no_grad():
            model(ids, theta=mid)
        if model.execution_stats()["execution_ratio"] > ratio:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2, model.execution_stats()["execution_ratio"]


@pytest.mark.slow
def test_default_model_export(tmp_path):
    model = qtale_export.load("smollm2-135m", fresh=True)
    spread_routers(model, std=0.05)
    theta, realized = _default_model_theta(model)
    model.theta_table = {"0.6": {"theta": theta, "realized": realized}}
    timings = {}
    for precision in ("fp32", "int4", "int8"):
        t = time.time()
        data = export_main.export(model, tmp_path / precision, checkpoint="smollm2-135m", ratio=0.6,
                                  precision=precision, decode_steps=2, verify_thetas=[0.0, theta])
        timings[precision] = time.time() - t
        assert data["verification"]["ok"], data["verification"]
        print(precision, round(timings[precision], 1), "s", json.dumps({k: data["verification"][k] for k in (
            "max_abs_diff", "top1_agreement", "exec_mask_agreement", "seconds")}))
    size = lambda p: sum(f.stat().st_size for f in p.iterdir())  # noqa: E731
    # one copy of the weights per export; int4 ort-cpu stores the tied embedding/lm_head as one int4
    # table too (4.5 bits per weight with its scales, like the projections): the whole folder stays
    # under onnxruntime-genai's own INT4 build of this model (86 MB, docs/benchmarks.md); the stored
    # verification reference (reference.npz, PyTorch logits for torch-free `qtale verify`) comes on top
    assert size(tmp_path / "fp32") < 1.1 * sum(p.numel() * 4 for p in model.causal_lm.parameters())
    reference = (tmp_path / "int4" / "reference.npz").stat().st_size
    assert size(tmp_path / "int4") - reference < 86e6
    assert reference < 16e6
    # int8: one byte per weight, the tied table too (an fp32 table would add 113 MB: 0.40 of fp32)
    int8_ref = (tmp_path / "int8" / "reference.npz").stat().st_size
    assert size(tmp_path / "int8") - int8_ref < 0.3 * size(tmp_path / "fp32")


@pytest.mark.parametrize("precision,target", [("fp32", None), ("int4", "ort-cpu"), ("int8", None)])
def test_export_with_lora_adapter(tiny_dir, tmp_path, precision, target):
    """A trained checkpoint carries a LoRA adapter: the export runs W + BA, and its verification
    reference must add BA once (not on top of weights that already hold it)."""
    from peft import LoraConfig, get_peft_model

    model = spread_routed_model(tiny_dir)
    model.base = get_peft_model(model.base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero: make the adapter change the model
        for name, p in model.base.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.eval()
    ids, mask = random_batch(model)
    with torch.no_grad():
        with model.base.disable_adapter():
            plain = model(ids, mask, theta=torch.zeros(ids.shape[0])).logits
        adapted = model(ids, mask, theta=torch.zeros(ids.shape[0])).logits
    assert (adapted - plain).abs().max() > 0.1  # the adapter matters, so a doubled BA would show
    data = export_main.export(model, tmp_path / precision, checkpoint=str(tiny_dir), ratio=0.6,
                              precision=precision, target=target, decode_steps=2)
    assert data["verification"]["ok"], data["verification"]


@pytest.mark.parametrize("target", ["ort-cpu", None])
def test_sliding_window_export(tmp_path, target):
    """A sliding-window model (Mistral, window 8): prompts and decode steps run past the window, and
    both graph forms (the decode mask of the ort-cpu form is made once per step) match PyTorch."""
    folder = make_tiny(tmp_path / "mistral", layers=5, model_type="mistral")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(sliding_window=8, use_sliding_window=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    model = spread_routed_model(folder)
    assert model._window() == 8
    data = export_main.export(model, tmp_path / "out", checkpoint=str(folder), ratio=0.6, precision="fp32",
                              target=target, decode_steps=12)
    assert data["verification"]["ok"], data["verification"]


def test_no_reference_export(spread_ckpt, tmp_path):
    """--no-reference: no reference.npz in the folder or the manifest; `qtale verify` then checks
    against PyTorch run now (the stored path would need the file)."""
    out = tmp_path / "noref"
    cli_export.export_of(_args([str(spread_ckpt), "--precision", "int4", "--target", "ort-cpu", "--out", str(out),
                                "--decode-steps", "2", "--no-reference"]))
    assert not (out / "reference.npz").exists()
    manifest = read_manifest(out)
    assert manifest["reference"] is None and "reference.npz" not in manifest.get("files", {})
    report = cli_verify.verify_of(cli_verify.add_arguments(argparse.ArgumentParser()).parse_args(
        [str(out), "--decode-steps", "2"]))
    assert report["ok"] and report["reference"].startswith("live pytorch")
