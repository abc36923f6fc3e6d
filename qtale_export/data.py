"""Training/calibration data: LLM-Adapters instruction JSON or plain text, tokenized into batches."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import corpus
from .errors import QtaleError

PACKAGE_DATA = Path(__file__).parent / "data"
CALIBRATION_TEXT = PACKAGE_DATA / "calibration.txt"
HELDOUT_TEXT = PACKAGE_DATA / "heldout.txt"

# The LLM-Adapters / D-LLM instruction template the commonsense train splits were written for.
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                     "further context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def format_prompt(instruction: str, inp: str = "") -> str:
    if inp:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=inp)
    return PROMPT.format(instruction=instruction)


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # -100 where no loss is taken


def read_source(path: str | Path) -> list[dict] | str:
    """Instruction records from a .json file (LLM-Adapters format), the text of any other file, or
    the text of a named offline corpus (`corpus:mmlu`, see corpus.py)."""
    if corpus.is_corpus(path):
        return corpus.corpus_text(str(path))
    p = Path(path)
    if not p.is_file():
        raise QtaleError(f"data file not found: {p}")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if not raw.strip():
        raise QtaleError(f"data file is empty: {p}")
    if p.suffix.lower() not in (".json", ".jsonl"):
        return raw
    try:
        if p.suffix.lower() == ".jsonl":
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            records = json.loads(raw)
    except ValueError as exc:
        raise QtaleError(f"data file {p} is not valid JSON: {exc}") from None
    if not isinstance(records, list) or not records:
        raise QtaleError(f"data file {p} holds no records (expected a JSON list)")
    for r in records[:5]:
        if not isinstance(r, dict) or "instruction" not in r or "output" not in r:
            raise QtaleError(f"data file {p}: records need 'instruction' and 'output' (LLM-Adapters format)")
    return records


def load_examples(paths: list[str | Path], tokenizer, seq_len: int, *, labels: str = "answer",
                  limit: int | None = None) -> list[Example]:
    """Tokenized examples from every path. Instruction data takes loss on the response tokens only;
    text is cut into seq_len windows with loss on every token."""
    examples: list[Example] = []
    for path in paths:
        src = read_source(path)
        if isinstance(src, str):
            examples += text_examples(src, tokenizer, seq_len)
        else:
            examples += instruction_examples(src, tokenizer, seq_len)
    if limit:
        g = torch.Generator().manual_seed(0)
        examples = [examples[i] for i in torch.randperm(len(examples), generator=g)[:limit].tolist()]
    if not examples:
        raise QtaleError(f"no usable examples in {', '.join(map(str, paths))} at seq_len {seq_len}")
    return examples


def instruction_examples(records: list[dict], tokenizer, seq_len: int) -> list[Example]:
    eos = tokenizer.eos_token_id
    out = []
    for r in records:
        prompt = tokenizer(format_prompt(r["instruction"], r.get("input", "")), add_special_tokens=False)["input_ids"]
        answer = tokenizer(str(r["output"]), add_special_tokens=False)["input_ids"] + [eos]
        if len(prompt) + 2 > seq_len:
            continue  # the answer would be cut off entirely: nothing to learn from
        ids = (prompt + answer)[:seq_len]
        out.append(Example(ids, [-100] * len(prompt) + ids[len(prompt):]))
    return out


def text_examples(text: str, tokenizer, seq_len: int) -> list[Example]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    return [Example(c, list(c)) for c in chunks if len(c) >= 8]


def pad(seqs: list[list[int]], pad_id: int, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [len(seqs), longest] token tensor (padding `fill`, default pad_id) + attention mask."""
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad_id if fill is None else fill, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids, mask


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels."""
    ids, mask = pad([e.ids for e in examples], pad_id)
    labels, _ = pad([e.labels for e in examples], pad_id, fill=-100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def text_batches(path: str | Path, tokenizer, seq_len: int = 256, batch_size: int = 4,
                 max_tokens: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Batches of plain token windows (calibration, perplexity): the text of a file, or the
    prompts + answers of an instruction JSON file."""
    examples = load_examples([path], tokenizer, seq_len)
    if max_tokens:
        kept, total = [], 0
        for e in examples:
            if total >= max_tokens:
                break
            kept.append(e)
            total += len(e.ids)
        examples = kept
    return [collate(examples[i:i + batch_size], tokenizer.pad_token_id)
            for i in range(0, len(examples), batch_size)]
