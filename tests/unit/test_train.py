"""Training mechanics on a tiny model: losses move, QTALE raises router entropy, resume is exact."""
import json
import os
import subprocess
import sys

import pytest
import torch

import qtale_export
from qtale_export import checkpoint, train as train_mod
from qtale_export.train import TrainConfig, train


def cfg_for(tiny_dir, text_file, out, **kw) -> TrainConfig:
    base = dict(model=str(tiny_dir), data=[str(text_file)], out=str(out), steps=12, batch_size=2,
                seq_len=64, lr=1e-2, target_ratio=0.3, lambda2=0.5, save_every=4, seed=1, router_hidden=16)
    base.update(kw)
    return TrainConfig(**base)


def log(out):
    return [json.loads(line) for line in (out / train_mod.LOG).read_text().splitlines()]


def test_training_lowers_loss_and_moves_ratio(tiny_dir, text_file, tmp_path):
    out = train(cfg_for(tiny_dir, text_file, tmp_path / "run", steps=16), progress=False)
    rows = log(out)
    assert len(rows) == 16
    first, last = rows[:3], rows[-3:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    assert mean(last, "loss") < mean(first, "loss")
    assert abs(mean(last, "realized_ratio") - 0.3) < abs(mean(first, "realized_ratio") - 0.3)
    meta = checkpoint.read_meta(out)
    assert meta["training"]["steps_done"] == 16
    assert meta["training"]["config"]["method"] == "qtale"
    assert qtale_export.load(out).routers.state_dict().keys()


def test_qtale_has_higher_router_entropy_than_dllm(tiny_dir, text_file, tmp_path):
    ent = {}
    for method in ("qtale", "dllm"):
        out = train(cfg_for(tiny_dir, text_file, tmp_path / method, method=method, steps=12), progress=False)
        ent[method] = sum(r["entropy"] for r in log(out)[-4:]) / 4
    assert ent["qtale"] > ent["dllm"]


def test_full_every_steps_run_every_layer_and_train_only_the_adapter(tiny_dir, text_file, tmp_path):
    """full_every N: every Nth step executes every layer on distillation alone (logged as
    all_layers, realized ratio 1, left out of ratio_reached); with N = 1 the routers get no gradient
    at all and stay as initialised while the LoRA factors move."""
    out = train(cfg_for(tiny_dir, text_file, tmp_path / "mix", steps=6, full_every=3, loss="distill", lora_rank=4),
                progress=False)
    rows = log(out)
    assert [r.get("all_layers", False) for r in rows] == [False, False, True, False, False, True]
    assert all(r["realized_ratio"] == 1.0 for r in rows if r.get("all_layers"))
    routed = [r["realized_ratio"] for r in rows if not r.get("all_layers")]
    reached = train_mod.ratio_reached(out / train_mod.LOG, 0.3, tail=0.5)
    assert reached["mean_last"] == pytest.approx(sum(routed[-2:]) / 2, abs=1e-4)

    out1 = train(cfg_for(tiny_dir, text_file, tmp_path / "all", steps=3, full_every=1, loss="distill", lora_rank=4,
                         weight_decay=0.0), progress=False)
    init = train(cfg_for(tiny_dir, text_file, tmp_path / "init", steps=0, loss="distill", lora_rank=4), progress=False)
    a, b = qtale_export.load(out1), qtale_export.load(init)
    for (name, pa), pb in zip(a.routers.state_dict().items(), b.routers.state_dict().values()):
        assert torch.equal(pa, pb), name
    lora = [(n, p) for n, p in a.base.named_parameters() if "lora_B" in n]
    lora0 = dict((n, p) for n, p in b.base.named_parameters() if "lora_B" in n)
    assert lora and any(not torch.equal(p, lora0[n]) for n, p in lora)


def test_resume_continues_from_saved_step(tiny_dir, text_file, tmp_path, monkeypatch):
    ref = train(cfg_for(tiny_dir, text_file, tmp_path / "ref", steps=10), progress=False)
    real_batch = train_mod.batch_for

    def dying(examples, step, *a, **k):
        if step == 6:
            raise KeyboardInterrupt  # killed after the step-4 checkpoint, mid-way to step 8
        return real_batch(examples, step, *a, **k)

    monkeypatch.setattr(train_mod, "batch_for", dying)
    cfg = cfg_for(tiny_dir, text_file, tmp_path / "cut", steps=10)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    assert json.loads((tmp_path / "cut" / train_mod.STATE).read_text())["step"] == 4
    monkeypatch.setattr(train_mod, "batch_for", real_batch)
    out = train(cfg, resume=True, progress=False)
    assert [r["step"] for r in log(out)] == list(range(1, 11))
    a, b = checkpoint.load_routers(ref), checkpoint.load_routers(out)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_teacher_cache_is_shared_by_methods_and_exact(tiny_dir, text_file, tmp_path, monkeypatch):
    """The second method on the same data runs no teacher forward and trains exactly as without the cache."""
    from qtale_export import teacher as teacher_mod

    calls = []
    real = teacher_mod.teacher_hidden
    monkeypatch.setattr(teacher_mod, "teacher_hidden", lambda m, b: calls.append(1) or real(m, b))
    cache = tmp_path / "teacher"
    kw = dict(steps=4, lora_rank=4, save_every=2)
    train(cfg_for(tiny_dir, text_file, tmp_path / "qtale", teacher_cache=str(cache), **kw), progress=False)
    assert len(calls) == 4
    [folder] = [d for d in cache.iterdir() if d.is_dir()]
    assert len(list(folder.glob("step*.pt"))) == 4 and (folder / "key.json").is_file()
    calls.clear()
    cached = train(cfg_for(tiny_dir, text_file, tmp_path / "dllm", method="dllm", teacher_cache=str(cache), **kw),
                   progress=False)
    assert calls == []  # every teacher output came from the cache
    plain = train(cfg_for(tiny_dir, text_file, tmp_path / "plain", method="dllm", **kw), progress=False)
    assert len(calls) == 4
    for a, b in zip(log(cached), log(plain)):
        assert a["distill_loss"] == b["distill_loss"] and a["realized_ratio"] == b["realized_ratio"]
    ra, rb = checkpoint.load_routers(cached), checkpoint.load_routers(plain)
    assert all(torch.equal(ra[k], rb[k]) for k in ra)
    calls.clear()  # another seed means other batches: another folder, computed afresh
    train(cfg_for(tiny_dir, text_file, tmp_path / "seed2", seed=2, teacher_cache=str(cache), **kw), progress=False)
    assert len(calls) == 4 and len([d for d in cache.iterdir() if d.is_dir()]) == 2


def test_instruction_data_task_loss_with_lora(tiny_dir, tmp_path):
    data = tmp_path / "tiny.json"
    data.write_text(json.dumps([{"instruction": f"Is {i} even? Answer format: true/false", "input": "",
                                 "output": f"the correct answer is {str(i % 2 == 0).lower()}"} for i in range(8)]))
    out = train(cfg_for(tiny_dir, data, tmp_path / "lora", steps=3, lora_rank=4, seq_len=256), progress=False)
    assert (out / checkpoint.ADAPTER / "adapter_model.safetensors").is_file()
    assert "task_loss" in log(out)[0]
    m = qtale_export.load(out)
    assert hasattr(m.base, "peft_config")


def test_output_folder_is_not_clobbered(tiny_dir, text_file, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(qtale_export.QtaleError, match="exists"):
        train(cfg_for(tiny_dir, text_file, tmp_path / "exists"), progress=False)
    with pytest.raises(qtale_export.QtaleError, match="cannot resume"):
        train(cfg_for(tiny_dir, text_file, tmp_path / "exists"), resume=True, progress=False)


def torchrun(tiny_dir, text_file, out, port, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "qtale_export.cli", "train", "--model", str(tiny_dir), "--data", str(text_file),
           "--out", str(out), "--batch-size", "1", "--seq-len", "64", "--router-hidden", "16", "--json",
           *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_torchrun_two_gloo_processes_ddp(tiny_dir, text_file, tmp_path):
    out = tmp_path / "ddp"
    assert torchrun(tiny_dir, text_file, out, 29517, "--steps", "3")["steps"] == 3
    assert [row["step"] for row in log(out)] == [1, 2, 3]


def test_torchrun_fsdp_with_resume(tiny_dir, text_file, tmp_path):
    out = tmp_path / "fsdp"
    assert torchrun(tiny_dir, text_file, out, 29518, "--steps", "2", "--fsdp")["steps"] == 2
    assert torchrun(tiny_dir, text_file, out, 29519, "--steps", "3", "--fsdp", "--resume")["steps"] == 3
    assert [row["step"] for row in log(out)] == [1, 2, 3]
    model = qtale_export.load(out)  # full (unsharded) router tensors that load strictly
    assert model.router_config.router_hidden == 16
    assert model.routers["2"].down.weight.shape == (16, model.hf_config.hidden_size)
