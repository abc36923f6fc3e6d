"""`qtale experiment`: the whole pipeline on a tiny model and a tiny recipe, resume, the results
schema, and bad recipes (one-line QtaleError)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
import yaml

import qtale_export

from qtale_export import checkpoint
from qtale_export import evaluate as E
from qtale_export import experiment as X
from qtale_export.experiment.layout import ADDED_LATER
from qtale_export.experiment.layout import read_json as read_eval_json
from qtale_export.cli import experiment as cli_experiment
from qtale_export import tasks as T
from qtale_export.errors import QtaleError
from qtale_testing import REPO

pytest.importorskip("modelopt")  # quantize.py imports it for the modelopt formats; int3 is our own

DOCS = {
    "arc_e": [{"question": q, "choices": {"text": list(ch), "label": ["A", "B", "C"][:len(ch)]}, "answerKey": k}
              for q, ch, k in [("What boils water?", ("heat", "ice"), "A"),
                               ("Which is a planet?", ("Mars", "Moon", "Sun"), "A"),
                               ("Plants need", ("light", "rocks"), "A"),
                               ("The capital of France is", ("Rome", "Paris"), "B")]],
    "boolq": [{"question": q, "passage": p, "answer": a}
              for q, p, a in [("is the sky blue", "The sky is blue.", True),
                              ("does water boil at ten degrees", "Water boils at one hundred degrees.", False),
                              ("is paris in france", "The capital of France is Paris.", True),
                              ("do foxes fly", "The quick brown fox jumps over the lazy dog.", False)]],
}
RECORDS = [
    {"instruction": "Please answer the following question with true or false, question: is the sky blue?\n\n"
                    "Answer format: true/false", "input": "", "output": "the correct answer is true"},
    {"instruction": "Please choose the correct answer to the question: What boils water?\n\nAnswer1: heat "
                    "Answer2: ice\n\nAnswer format: answer1/answer2", "input": "",
     "output": "the correct answer is answer1"},
] * 4


def tiny_recipe(tiny_dir, folder, **over) -> dict:
    data = folder / "train.json"
    data.write_text(json.dumps(RECORDS))
    recipe = {
        "name": "tiny",
        "model": str(tiny_dir),
        "seed": 0,
        "methods": ["qtale", "dllm"],
        "train": {"data": ["train.json"], "steps": 2, "batch_size": 2, "seq_len": 256, "lr": 1e-2,
                  "target_ratio": 0.6, "lambda1": 1.0, "lambda2": 0.1, "loss": "distill", "router_hidden": 16,
                  "save_every": 1},
        "ratios": [0.6, 1.0],
        "calibration": {"seq_len": 64, "max_tokens": 256, "tol": 0.1},
        "quantization": {"formats": ["int3"]},
        "eval": {"tasks": ["arc_e", "boolq"], "style": "harness", "limit": None, "batch_size": 4},
    }
    for k, v in over.items():
        recipe[k] = v
    return recipe


def write_recipe(folder, recipe) -> str:
    p = folder / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe))
    return str(p)


def args_for(recipe_path, tmp_path, *extra):
    p = argparse.ArgumentParser()
    cli_experiment.add_arguments(p)
    return p.parse_args([recipe_path, "--out", str(tmp_path / "run"), "--docs", str(tmp_path / "docs"),
                         "--no-progress", *extra])


@pytest.fixture
def fake_docs(monkeypatch):
    monkeypatch.setattr(E, "load_docs", lambda task, limit=None: DOCS[task][:limit] if limit else DOCS[task])
    monkeypatch.setattr(T, "validation_size", lambda task: len(DOCS[task]))


def test_pipeline_end_to_end_then_resume(tiny_dir, tmp_path, fake_docs, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_dir, tmp_path))
    t0 = time.time()
    summary = cli_experiment.run(args_for(recipe, tmp_path, "--limit", "3"))
    first = time.time() - t0
    docs = tmp_path / "docs"
    assert summary["results"] == str(docs / "results.json")
    res = json.loads((docs / "results.json").read_text())

    # --- schema
    assert res["schema"] == X.SCHEMA and res["subset"] is True and res["limit"] == 3
    assert res["validation_sizes"] == {"arc_e": 4, "boolq": 4}
    assert res["tasks"] == ["arc_e", "boolq"] and res["primary_metric"] == {"arc_e": "acc_norm", "boolq": "acc"}
    assert {"command", "recipe", "machine", "timings", "training", "calibration", "quantization", "configs",
            "headline", "reference", "created", "run_dir", "style"} <= set(res)
    assert "qtale experiment" in res["command"] and "--limit 3" in res["command"]
    assert set(res["training"]) == {"qtale", "dllm"} and res["training"]["qtale"]["steps_done"] == 2
    assert {"train.qtale", "train.dllm", "calibrate", "quantize", "recalibrate", "eval"} <= set(res["timings"])
    ids = [c["id"] for c in res["configs"]]
    assert ids == ["dense/fp", "quant-only/int3", "qtale/int3/0.6", "qtale/int3/1.0", "dllm/int3/0.6",
                   "dllm/int3/1.0"]
    by = {c["id"]: c for c in res["configs"]}
    for c in res["configs"]:
        assert set(c["tasks"]) == {"arc_e", "boolq"}
        for t in c["tasks"].values():
            assert {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"} <= set(t) and t["n"] == 3
        assert 0.0 <= c["avg"] <= 1.0 and c["avg_tasks"] == 2 and "avg7" not in c
        assert {"realized_ratio", "flops_fraction", "ppl", "kl", "theta"} <= set(c)
    assert by["dense/fp"]["realized_ratio"] == 1.0 and by["dense/fp"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert by["quant-only/int3"]["kl"] > 0.0  # vs the unquantized dense model
    assert by["quant-only/int3"]["vs_dense"]["reference"] == "dense/fp"
    q = by["qtale/int3/0.6"]
    assert q["realized_ratio"] < 1.0 and q["flops_fraction"] < 1.0 and q["theta"] > 0.0
    vs = q["vs_quant_only"]
    assert vs["reference"] == "quant-only/int3"
    assert set(vs["tasks"]) == {"arc_e", "boolq"} and vs["tasks"]["arc_e"]["n"] == 3
    assert {"diff", "stderr"} <= set(vs["avg"])
    # the paired mean difference equals the difference of the means (same items)
    for t, metric in res["primary_metric"].items():
        want = q["tasks"][t][metric] - by["quant-only/int3"]["tasks"][t][metric]
        assert vs["tasks"][t]["diff"] == pytest.approx(want)
    assert q["vs_dllm"]["reference"] == "dllm/int3/0.6"
    # the prior-robust gap: with arc_e the only other task, it is arc_e's paired difference
    assert vs["avg_without_boolq"]["diff"] == pytest.approx(vs["tasks"]["arc_e"]["diff"])
    assert 0.0 <= q["boolq_yes_rate"] <= 1.0 and res["boolq_gold_yes_rate"] is not None
    # ratio 1.0 is theta 0: every layer, the quant-only model itself (no LoRA)
    assert by["qtale/int3/1.0"]["same_as"] == "quant-only/int3"
    assert by["qtale/int3/1.0"]["vs_quant_only"]["avg"]["diff"] == 0.0
    cal = res["calibration"]["qtale"]
    assert set(cal) == {"fp", "int3"} and "0.6" in cal["int3"]["drift"]
    assert {"theta_fp", "realized_at_theta_fp"} <= set(cal["int3"]["drift"]["0.6"])
    assert "qtale_int3_gap_closes_at_ratio" in res["headline"]
    assert res["headline"]["qtale_int3_gap_closes_at_ratio"] in (0.6, 1.0)
    md = (docs / "results.md").read_text()
    assert "| qtale/int3/0.6 |" in md and res["command"] in md and "## Machine" in md and "Subset run" in md and "boolq 4" in md
    assert (docs / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = tmp_path / "run"
    assert (run / "train" / "qtale" / "qtale.json").is_file() and (run / "quant" / "base-int3" / "qtale.json").is_file()
    theta_q = json.loads((run / "quant" / "qtale-int3" / "qtale.json").read_text())["theta_table"]["0.6"]["theta"]
    assert theta_q == q["theta"]  # re-calibrated table stored in the quantized checkpoint

    # --- ship: the QTALE routers + fp theta table, with provenance tied to results.json
    shipped = tmp_path / "shipped"
    out = cli_experiment.run(args_for(recipe, tmp_path, "--only", "ship", "--ship-dir", str(shipped)))
    assert out["shipped"] == str(shipped)
    assert sorted(p.name for p in shipped.iterdir()) == ["provenance.json", "qtale.json", "routers.safetensors"]
    assert (shipped / "routers.safetensors").read_bytes() == (run / "train" / "qtale" / "routers.safetensors").read_bytes()
    prov = json.loads((shipped / "provenance.json").read_text())
    assert prov["results"]["sha256"] == checkpoint.file_sha256(docs / "results.json")
    assert prov["results"]["subset"] is True and prov["theta_table_fp"]["0.6"]["theta"] > 0.0
    assert set(prov["theta_tables_after_quantization"]) == {"int3"} and prov["train"]["steps_done"] == 2
    import qtale_export

    m = qtale_export.load(shipped)
    assert m.theta_table == prov["theta_table_fp"] and m.training_info["steps_done"] == 2
    block = X.render_readme_block(res, prov["results"]["sha256"])
    assert block.startswith(X.README_BEGIN) and block.endswith(X.README_END)
    assert "| qtale/int3/0.6 |" in block and "qtale/int3/1.0" not in block  # same_as rows are not repeated
    assert f"{100 * by['qtale/int3/0.6']['avg']:.2f}" in block and "first 3 validation items" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{X.README_BEGIN}\nold\n{X.README_END}\noutro\n")
    assert X.update_readme(readme, block) and readme.read_text() == f"intro\n{block}\noutro\n"
    assert not X.update_readme(tmp_path / "docs" / "results.md", block)  # no markers: left alone
    with pytest.raises(QtaleError, match="--ship-dir goes with --only ship"):
        cli_experiment.run(args_for(recipe, tmp_path, "--resume", "--ship-dir", str(shipped)))
    with pytest.raises(QtaleError, match="not an embedded model"):
        cli_experiment.run(args_for(recipe, tmp_path, "--only", "ship"))

    # --- an existing run folder needs --resume
    with pytest.raises(QtaleError, match="--resume"):
        cli_experiment.run(args_for(recipe, tmp_path, "--limit", "3"))

    # --- resume: nothing is recomputed
    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    import qtale_export.train as train_mod
    import qtale_export.calibrate as calib_mod
    import qtale_export.ptq as quant_mod

    monkeypatch.setattr(train_mod, "train", boom)
    monkeypatch.setattr(calib_mod, "calibrate", boom)
    monkeypatch.setattr(quant_mod, "quantize_checkpoint", boom)
    monkeypatch.setattr(E, "evaluate_tasks", boom)
    (docs / "results.json").unlink()
    t0 = time.time()
    cli_experiment.run(args_for(recipe, tmp_path, "--limit", "3", "--resume"))
    again = time.time() - t0
    assert json.loads((docs / "results.json").read_text())["configs"] == res["configs"]
    assert again < first
    # a different recipe (training changed) is refused on that run folder
    changed = tiny_recipe(tiny_dir, tmp_path)
    changed["train"]["steps"] = 3
    with pytest.raises(QtaleError, match="'train' differs"):
        cli_experiment.run(args_for(write_recipe(tmp_path, changed), tmp_path, "--resume"))


def test_only_stage_needs_its_inputs(tiny_dir, tmp_path, fake_docs):
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_dir, tmp_path))
    with pytest.raises(QtaleError, match="run the 'train' stage first"):
        cli_experiment.run(args_for(recipe, tmp_path, "--only", "calibrate"))


class Killed(Exception):
    pass


def test_interrupted_training_resumes(tiny_dir, tmp_path, fake_docs, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_dir, tmp_path, methods=["qtale"]))
    import qtale_export.train as train_mod

    real = train_mod.batch_for
    calls, killed = [], []

    def dying(examples, step, *a, **k):
        calls.append(step)
        if step == 1 and not killed:
            killed.append(step)
            raise Killed  # killed after the step-1 checkpoint
        return real(examples, step, *a, **k)

    monkeypatch.setattr(train_mod, "batch_for", dying)
    with pytest.raises(Killed):
        cli_experiment.run(args_for(recipe, tmp_path, "--only", "train"))
    state = json.loads((tmp_path / "run" / "train" / "qtale" / "train_state.json").read_text())
    assert state["step"] == 1
    calls.clear()
    cli_experiment.run(args_for(recipe, tmp_path, "--only", "train", "--resume"))
    assert calls == [1]  # only the missing step ran
    state = json.loads((tmp_path / "run" / "train" / "qtale" / "train_state.json").read_text())
    assert state["step"] == 2


def test_interrupted_eval_resumes_from_its_finished_tasks(tiny_dir, tmp_path, fake_docs, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_dir, tmp_path, methods=["qtale"]))
    cli_experiment.run(args_for(recipe, tmp_path, "--limit", "3", "--only", "train"))
    for stage in ("calibrate", "quantize", "recalibrate"):
        cli_experiment.run(args_for(recipe, tmp_path, "--limit", "3", "--only", stage, "--resume"))
    real, scored, killed = E.loglikelihood, [], []

    def dying(m, tok, reqs, *a, desc="score", **k):
        if desc == "boolq" and not killed:
            killed.append(desc)
            raise Killed  # stopped inside the second task of the first configuration
        scored.append(desc)
        return real(m, tok, reqs, *a, desc=desc, **k)

    monkeypatch.setattr(E, "loglikelihood", dying)
    args = ("--limit", "3", "--only", "eval", "--resume", "--configs", "qtale/int3/0.6")
    with pytest.raises(Killed):
        cli_experiment.run(args_for(recipe, tmp_path, *args))
    docs_eval = tmp_path / "docs" / "eval" / "tiny" / "harness-limit3"
    assert [f.name for f in (docs_eval / "partial" / "qtale__int3__0.6").iterdir()] == ["arc_e.json.gz"]
    assert scored == ["arc_e"] and killed == ["boolq"]
    scored.clear()
    cli_experiment.run(args_for(recipe, tmp_path, *args))
    assert scored == ["boolq"]  # arc_e came from its saved part
    assert not (docs_eval / "partial" / "qtale__int3__0.6").exists()
    resumed = read_eval_json(docs_eval / "qtale__int3__0.6.json.gz")
    (docs_eval / "qtale__int3__0.6.json.gz").unlink()
    scored.clear()
    cli_experiment.run(args_for(recipe, tmp_path, *args))
    assert scored == ["arc_e", "boolq"]
    fresh = read_eval_json(docs_eval / "qtale__int3__0.6.json.gz")
    for key in ("tasks", "items", "tokens", "realized_ratio", "theta"):
        assert resumed[key] == fresh[key], key


def test_configs_are_evaluated_in_the_order_asked(tiny_dir, tmp_path, fake_docs, capsys):
    """--configs order wins over sharing a model load: interleaved sources are loaded again."""
    r = tiny_recipe(tiny_dir, tmp_path, methods=["qtale"])
    r["eval"]["baselines"] = ["layer-drop"]  # on the same quantized base as quant-only
    recipe = write_recipe(tmp_path, r)
    for stage in ("train", "calibrate", "quantize", "recalibrate"):
        cli_experiment.run(args_for(recipe, tmp_path, "--limit", "2", "--only", stage,
                                  *(["--resume"] if stage != "train" else [])))
    capsys.readouterr()
    order = ["quant-only/int3", "qtale/int3/0.6", "layer-drop/int3/0.6"]
    cli_experiment.run(args_for(recipe, tmp_path, "--limit", "2", "--only", "eval", "--resume",
                              "--configs", ",".join(order)))
    said = [ln.split()[1] for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("eval ")]
    assert said == order


def test_paired_difference_by_hand():
    a = {"arc_e": [{"idx": i, "acc_norm": v} for i, v in enumerate([1, 1, 0, 1])]}
    b = {"arc_e": [{"idx": i, "acc_norm": v} for i, v in enumerate([1, 0, 0, 0])]}
    p = X.paired(a, b, ["arc_e"])
    d = p["tasks"]["arc_e"]
    assert d["diff"] == 0.5 and d["n"] == 4
    assert d["stderr"] == pytest.approx((1 / 3) ** 0.5 / 2)  # diffs 0,1,0,1: sample sd sqrt(1/3)
    assert p["avg"] == {"diff": 0.5, "stderr": pytest.approx(d["stderr"])}


def test_boolq_yes_rate_and_the_gap_without_it():
    """A model that only flips BoolQ to "yes" gains there; without BoolQ its gap is 0."""
    def res(boolq, arc):
        return {"boolq": [{"idx": i, "acc": float(p == 1), "pred": p, "gold": 1} for i, p in enumerate(boolq)],
                "arc_e": [{"idx": i, "acc_norm": v} for i, v in enumerate(arc)]}
    flipped, base = res([1, 1, 1, 1], [1, 0, 1, 0]), res([0, 0, 1, 0], [1, 0, 1, 0])
    assert X.yes_rate(flipped) == 1.0 and X.yes_rate(base) == 0.25 and X.yes_rate({"arc_e": []}) is None
    assert X.gold_yes_rate({"a": base}) == 1.0
    p = X.paired_robust(flipped, base, ["boolq", "arc_e"])
    assert p["avg"]["diff"] == pytest.approx(0.375) and p["avg_without_boolq"]["diff"] == 0.0
    assert "avg_without_boolq" not in X.paired_robust(flipped, base, ["boolq"])


def test_pooled_difference_averages_each_item_over_the_pairs():
    """One test over two ratios: the items' mean differences (0, 1, 0.5, 0.5), not the two
    comparisons' standard errors combined as if independent."""
    def res(v):
        return {"arc_e": [{"idx": i, "acc_norm": x} for i, x in enumerate(v)]}
    pairs = [(res([1, 1, 0, 1]), res([1, 0, 0, 0])), (res([0, 1, 1, 0]), res([0, 0, 0, 0]))]
    p = X.pooled(pairs, ["arc_e"])["tasks"]["arc_e"]
    assert p["n"] == 4 and p["diff"] == pytest.approx(0.5)
    assert p["stderr"] == pytest.approx((1 / 6) ** 0.5 / 2)  # item means 0, 1, .5, .5: sample var 1/6
    assert X.pooled(pairs[:1], ["arc_e"]) == X.paired(*pairs[0], ["arc_e"])


@pytest.mark.parametrize("edit,match", [
    (lambda r: r.pop("ratios"), "missing required key 'ratios'"),
    (lambda r: r.pop("model"), "missing required key 'model'"),
    (lambda r: r["train"].pop("steps"), "missing required key 'train.steps'"),
    (lambda r: r["quantization"].update(formats=["int2"]), "unknown quantization format 'int2'"),
    (lambda r: r.update(ratios=[0.5, 1.5]), "invalid ratio '1.5'"),
    (lambda r: r.update(ratios=[0.0]), "invalid ratio"),
    (lambda r: r.update(ratios=["half"]), "invalid ratio 'half'"),
    (lambda r: r.update(methods=["moe"]), "unknown method 'moe'"),
    (lambda r: r["eval"].update(tasks=["boolq", "nope"]), "unknown task 'nope'"),
    (lambda r: r["eval"].update(style="chat"), "unknown eval.style"),
    (lambda r: r["eval"].update(limit=0), "eval.limit"),
    (lambda r: r["train"].update(data=["missing.json"]), "training data 'missing.json' not found"),
    (lambda r: r["train"].update(stepz=3), "unknown key 'train.stepz'"),
    (lambda r: r["train"].update(save_every=0), "train.save_every' must be an integer >= 1"),
    (lambda r: r.update(colour="red"), "unknown key 'colour'"),
])
def test_bad_recipes(tiny_dir, tmp_path, edit, match):
    recipe = tiny_recipe(tiny_dir, tmp_path)
    edit(recipe)
    path = write_recipe(tmp_path, recipe)
    with pytest.raises(QtaleError, match=match) as exc:
        cli_experiment.run(args_for(path, tmp_path))
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "run").exists()  # nothing started


def test_bad_recipe_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(QtaleError, match="not valid YAML"):
        X.load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(QtaleError, match="mapping"):
        X.load_recipe(bad)
    with pytest.raises(QtaleError, match="recipe not found"):
        X.load_recipe(tmp_path / "nope.yaml")


def test_extends_merges_sections_key_by_key(tiny_dir, tmp_path):
    base = write_recipe(tmp_path, tiny_recipe(tiny_dir, tmp_path))
    variant = tmp_path / "variant.yaml"
    variant.write_text(yaml.safe_dump({"extends": Path(base).name, "name": "tiny-v2",
                                       "train": {"full_every": 4, "steps": 3}, "ratios": [0.7]}))
    r, b = X.load_recipe(variant), X.load_recipe(base)
    assert r["name"] == "tiny-v2" and r["ratios"] == [0.7] and r["extends"] == [base] and b["extends"] == []
    assert r["train"]["full_every"] == 4 and r["train"]["steps"] == 3
    assert {k: v for k, v in r["train"].items() if k not in ("full_every", "steps")} == \
        {k: v for k, v in b["train"].items() if k not in ("full_every", "steps")}
    assert r["eval"] == b["eval"] and r["quantization"] == b["quantization"]


@pytest.mark.parametrize("doc,match", [
    ({"extends": "recipe.yaml", "train": {"steps": 3}}, "must give its own 'name'"),
    ({"extends": "nope.yaml", "name": "x"}, "recipe not found"),
    ({"extends": "variant.yaml", "name": "x"}, "loops back"),
    ({"extends": ["recipe.yaml"], "name": "x"}, "must name one recipe file"),
])
def test_bad_extends(tiny_dir, tmp_path, doc, match):
    write_recipe(tmp_path, tiny_recipe(tiny_dir, tmp_path))
    variant = tmp_path / "variant.yaml"
    variant.write_text(yaml.safe_dump(doc))
    with pytest.raises(QtaleError, match=match) as exc:
        X.load_recipe(variant)
    assert "\n" not in str(exc.value)


def test_v3_recipe_is_v2_plus_all_layers_steps():
    v2, v3 = _repo_recipe("smollm2-135m"), _repo_recipe("smollm2-135m-v3")
    assert v3["extends"] == [str(REPO / "recipes" / "smollm2-135m.yaml")]
    assert v3["train"] == {**v2["train"], "full_every": 4}
    assert {k: v3[k] for k in ("model", "seed", "methods", "ratios", "calibration", "quantization", "eval")} == \
        {k: v2[k] for k in ("model", "seed", "methods", "ratios", "calibration", "quantization", "eval")}


def test_cli_one_line_error(tmp_path, capsys):
    from qtale_export.cli import main

    bad = tmp_path / "r.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "model": "m"}))
    assert main(["experiment", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing required key" in err[0]


def _repo_recipe(name: str) -> dict:
    """recipes/NAME.yaml loaded, or the test skipped where its training data is not here."""
    try:
        return X.load_recipe(REPO / "recipes" / f"{name}.yaml")
    except QtaleError as exc:
        if "training data" in str(exc):
            pytest.skip(f"commonsense train splits not here: {exc}")
        raise


def test_shipped_recipe_is_valid():
    r = _repo_recipe("smollm2-135m")
    assert r["ratios"] == [0.5, 0.6, 0.7, 0.8, 1.0] and r["quantization"]["formats"] == ["int4-awq", "int3"]
    assert r["eval"]["limit"] is None and len(r["eval"]["tasks"]) == 7 and r["methods"] == ["qtale", "dllm"]


@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-135m-v3"])
def test_kept_training_runs_match_their_recipe(name):
    """`--only train` takes a kept run as this recipe's training: its config must be the recipe's."""
    r = _repo_recipe(name)
    for method in r["methods"]:
        cfg = json.loads((REPO / "recipes" / "trained" / name / method / "qtale.json").read_text())
        cfg = cfg["training"]["config"]
        assert cfg["method"] == method and cfg["seed"] == r["seed"] and cfg["model"] == r["model"]
        for key, value in r["train"].items():
            if key == "data":  # stored as given (relative or resolved): same files by name
                assert [Path(d).name for d in cfg["data"]] == [Path(d).name for d in value]
            else:
                assert cfg.get(key, ADDED_LATER["train"].get(key)) == value, (method, key)


def test_lora_recipe_trains_an_all_layers_reference(tiny_dir, tmp_path, fake_docs):
    pytest.importorskip("peft")
    r = tiny_recipe(tiny_dir, tmp_path, methods=["qtale"])
    r["train"]["lora_rank"] = 2
    r["train"]["loss"] = "task"  # a task loss moves the all-layers model too: it needs its own fine-tune
    recipe = write_recipe(tmp_path, r)
    cli_experiment.run(args_for(recipe, tmp_path, "--limit", "2"))
    res = json.loads((tmp_path / "docs" / "results.json").read_text())
    ref = json.loads((tmp_path / "run" / "train" / "reference" / "qtale.json").read_text())
    cfg = ref["training"]["config"]
    assert cfg["target_ratio"] == 1.0 and cfg["lambda1"] == 0.0 and cfg["lambda2"] == 0.0 and cfg["lora_rank"] == 2
    assert (tmp_path / "run" / "quant" / "reference-int3" / "adapter").is_dir()
    by = {c["id"]: c for c in res["configs"]}
    assert by["qtale/int3/1.0"]["same_as"] is None  # LoRA differs per run: evaluated on its own
    assert by["qtale/int3/1.0"]["realized_ratio"] == 1.0
    assert "LoRA" in res["reference"] and set(res["training"]) == {"qtale", "reference"}


def test_distill_lora_recipe_compares_against_the_base_and_baselines(tiny_dir, tmp_path, fake_docs):
    """Self-distillation's teacher is the base: no reference run; the LoRA routed models at ratio 1.0
    are evaluated on their own; D-LLM at theta 0.5 and static layer drop are evaluated alongside;
    per-item results land compressed under docs/eval/."""
    pytest.importorskip("peft")
    r = tiny_recipe(tiny_dir, tmp_path)
    r["train"]["lora_rank"] = 2
    r["train"]["lora_lr"] = 1e-3
    r["eval"]["baselines"] = ["dllm-fixed-theta", "layer-drop"]
    recipe = write_recipe(tmp_path, r)
    cli_experiment.run(args_for(recipe, tmp_path, "--limit", "2"))
    res = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert not (tmp_path / "run" / "train" / "reference").exists()
    assert (tmp_path / "run" / "quant" / "base-int3").is_dir()
    by = {c["id"]: c for c in res["configs"]}
    assert by["qtale/int3/1.0"]["same_as"] is None
    assert by["dllm/int3/theta0.5"]["theta"] == 0.5 and "vs_quant_only" in by["dllm/int3/theta0.5"]
    drop = by["layer-drop/int3/0.6"]
    assert drop["realized_ratio"] < 1.0 and "vs_quant_only" in drop
    files = sorted(p.name for p in (tmp_path / "docs" / "eval" / "tiny").rglob("*.json.gz"))
    assert "layer-drop__int3__0.6.json.gz" in files and len(files) == len([c for c in res["configs"]
                                                                            if not c["same_as"]])
    with pytest.raises(Exception):
        X.load_recipe(write_recipe(tmp_path, {**r, "eval": {**r["eval"], "baselines": ["nope"]}}))
    # two steps from P(execute) ~ 0.88 cannot reach Omega 0.6: the report says so, loudly
    assert res["training"]["qtale"]["ratio_reached"]["within"] is False
    assert any(line.startswith("TRAINING MISSED ITS RATIO: qtale") for line in res["training_ratio_failures"])
    assert "TRAINING MISSED ITS RATIO" in (tmp_path / "docs" / "results.md").read_text()


def test_configs_subset_reports_the_rest_as_pending(tiny_dir, tmp_path, fake_docs):
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_dir, tmp_path))
    cli_experiment.run(args_for(recipe, tmp_path, "--limit", "2", "--configs", "quant-only/*,dllm/int3/0.6"))
    res = json.loads((tmp_path / "docs" / "results.json").read_text())
    ids = {c["id"] for c in res["configs"]}
    assert {"quant-only/int3", "dllm/int3/0.6"} <= ids and "dense/fp" not in ids and "qtale/int3/0.6" not in ids
    assert "dense/fp" in res["pending"] and "qtale/int3/0.6" in res["pending"]
    assert "vs_quant_only" in {c["id"]: c for c in res["configs"]}["dllm/int3/0.6"]
    assert "Not evaluated yet" in (tmp_path / "docs" / "results.md").read_text()


def test_keep_then_a_new_run_folder_starts_from_the_kept_training(tiny_dir, tmp_path, fake_docs, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_dir, tmp_path))
    monkeypatch.setattr(X.Run, "kept_dir", lambda run, m: tmp_path / "kept" / m)
    cli_experiment.run(args_for(recipe, tmp_path, "--limit", "2", "--only", "train"))
    cli_experiment.run(args_for(recipe, tmp_path, "--only", "keep"))
    kept = tmp_path / "kept" / "qtale"
    assert sorted(p.name for p in kept.iterdir()) == ["qtale.json", "routers.safetensors", "train_log.jsonl",
                                                       "train_state.json"]  # no optimizer state
    import qtale_export.train as T

    monkeypatch.setattr(T, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    p = argparse.ArgumentParser()
    cli_experiment.add_arguments(p)
    args = p.parse_args([recipe, "--out", str(tmp_path / "run2"), "--docs", str(tmp_path / "docs2"),
                         "--only", "train", "--no-progress"])
    cli_experiment.run(args)
    model = qtale_export.load(tmp_path / "run2" / "train" / "qtale")
    import torch

    ref = qtale_export.load(tmp_path / "run" / "train" / "qtale")
    for k, v in model.routers.state_dict().items():
        assert torch.equal(v, ref.routers.state_dict()[k])


def _routed_result(r, d, method="qtale", fmt="int4-awq"):
    """A results.json configuration entry of a routed model at target ratio r, gap d to all-layers."""
    return {"id": f"{method}/{fmt}/{r}", "kind": "routed", "method": method, "format": fmt, "target_ratio": r,
            "vs_quant_only": {"avg": {"diff": d, "stderr": 0.01}}}


def test_recommended_ratio_is_the_lowest_within_half_a_point():
    row = _routed_result
    res = {"configs": [row(0.5, -0.02), row(0.6, -0.004), row(0.7, 0.003)], "subset": True, "limit": 100}
    rec = X.recommended_ratio(res)
    assert rec["ratio"] == 0.6 and rec["within"] and rec["subset"] is True and "0.5 points" in rec["rule"]
    # none within half a point: the smallest gap, and it says so
    rec = X.recommended_ratio({"configs": [row(0.6, -0.013), row(0.7, -0.012)]})
    assert rec["ratio"] == 0.7 and rec["within"] is False
    assert X.recommended_ratio({"configs": []}) is None


def test_recommended_ratio_looks_past_the_headline_ratios():
    """Every evaluated QTALE+INT4 ratio below 1 counts, also above the headline's 0.7, and only
    QTALE+INT4: here only 0.8 is within half a point, so 0.8 is the default."""
    cfg = _routed_result
    res = {"configs": [cfg(0.6, -0.012), cfg(0.7, -0.012), cfg(0.8, -0.0044), cfg(0.5, 0.0, method="dllm"),
                       cfg(0.5, 0.0, fmt="int3")]}
    rec = X.recommended_ratio(res)
    assert rec["ratio"] == 0.8 and rec["within"] is True
    res["configs"][2]["vs_quant_only"]["avg"]["diff"] = -0.02  # none within: the smallest gap
    rec = X.recommended_ratio(res)
    assert rec["ratio"] == 0.6 and rec["within"] is False


def test_compare_eval_dirs_pairs_the_configurations_in_both(tmp_path):
    import gzip

    def write(folder, cid, arc, limit=None):
        folder.mkdir(parents=True, exist_ok=True)
        doc = {"id": cid, "limit": limit, "style": "harness", "kl": 0.5, "realized_ratio": 0.7,
               "items": {"boolq": [{"idx": 0, "acc": 1.0, "pred": 1, "gold": 1}],
                         "arc_e": [{"idx": i, "acc_norm": v} for i, v in enumerate(arc)]}}
        (folder / (cid.replace("/", "__") + ".json.gz")).write_bytes(gzip.compress(json.dumps(doc).encode()))

    a, b = tmp_path / "a", tmp_path / "b"
    write(a, "qtale/int4-awq/0.7", [1, 1, 0, 1])
    write(b, "qtale/int4-awq/0.7", [1, 0, 0, 0])
    write(a, "dllm/int4-awq/0.7", [1, 1, 1, 1])  # only in a: not compared
    res = X.report.compare_eval_dirs(a, b, ["boolq", "arc_e"], pool="qtale/*")
    rows = res["rows"]
    assert [r["id"] for r in rows] == ["qtale/int4-awq/0.7"]
    assert res["pooled"]["ids"] == ["qtale/int4-awq/0.7"] and res["pooled"]["diff"] == rows[0]["avg"]["diff"]
    assert res["pooled"]["without_boolq"]["diff"] == 0.5
    assert rows[0]["avg_without_boolq"]["diff"] == 0.5 and rows[0]["avg"]["diff"] == 0.25
    write(b, "qtale/int4-awq/0.7", [1, 0, 0, 0], limit=4)
    with pytest.raises(QtaleError, match="not the same items"):
        X.report.compare_eval_dirs(a, b, ["boolq", "arc_e"])
