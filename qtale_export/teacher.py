"""The self-distillation teacher's outputs, computed once per training batch and kept on disk.

The teacher is the base model with every layer executed and LoRA off: it does not change while the
routers and adapters train, and the batch of a step is a function of (seed, step). So its output for
a batch can be stored once and reused: by the other method trained on the same data (QTALE and D-LLM
see the same batches), by a resumed run, and by a rerun with other loss weights. What is stored is
the final-normed hidden state (576 numbers per token for SmolLM2-135M instead of 49,152 logits);
the LM head applied to it gives the teacher's logits exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from . import safe_write
from .routing import RoutedModel


class adapters_off:
    """Context: LoRA adapters disabled (the teacher is the untouched base), a no-op without LoRA."""

    def __init__(self, model: RoutedModel):
        self.ctx = model.base.disable_adapter() if hasattr(model.base, "disable_adapter") else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else None


def teacher_hidden(model: RoutedModel, batch: dict) -> torch.Tensor:
    """Final-normed hidden states [B, T, H] of the all-layers base model (no gradient)."""
    with torch.no_grad(), adapters_off(model), model.stats.paused():
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], execute_all=True,
                     hidden_only=True).hidden


class TeacherCache:
    """Teacher hidden states of training batches under `root/<key digest>/`, one file per
    (step, micro-batch, rank). `key` names everything the batches and the teacher depend on (base
    weights, dtype, data, batch shape, seed, world size); another key gets another folder, so a
    stale entry is never read. root None: nothing is stored, every call computes."""

    def __init__(self, root: str | Path | None, key: dict):
        self.key = key
        self.dir = None if root is None else Path(root) / hashlib.sha256(
            json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.hits = self.misses = 0
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not (self.dir / "key.json").is_file():
                safe_write.write_json(self.dir / "key.json", json.loads(json.dumps(key, default=str)))

    def hidden(self, model: RoutedModel, batch: dict, step: int, micro: int = 0, rank: int = 0) -> torch.Tensor:
        """The teacher's hidden states for this batch: read when stored, else computed and stored."""
        f = None if self.dir is None else self.dir / f"step{step:06d}-m{micro}-r{rank}.pt"
        if f is not None and f.is_file():
            h = torch.load(f, weights_only=True, map_location=batch["input_ids"].device)
            if tuple(h.shape[:2]) == tuple(batch["input_ids"].shape):
                self.hits += 1
                return h
        h = teacher_hidden(model, batch)
        self.misses += 1
        if f is not None:
            _atomic(f, lambda p: torch.save(h.detach().cpu(), p))
        return h


def _atomic(path: Path, write) -> None:
    """Write through a temporary file beside `path` (named so that safe_write.sweep knows it),
    renamed into place: a reader sees the whole file or none."""
    fd, tmp = tempfile.mkstemp(prefix=safe_write.tmp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
