"""Token sampling and stop strings: the one implementation `qtale run` (generate.py) and the Triton
in-flight model share, so at the same options both give the same tokens and text.

numpy only and no package imports: `qtale triton-repo` copies this file next to the Triton model
(as sampling.py), which runs in tritonserver's own Python. Bad options raise ValueError.
"""
from __future__ import annotations

import numpy as np


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def check_options(temperature: float, top_p: float, seed) -> None:
    """ValueError on options no sampler takes."""
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature}")
    if not (0.0 < top_p <= 1.0):  # NaN fails too
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if seed is not None and not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in 0..2**63-1, got {seed}")


class Sampler:
    """Greedy when temperature == 0; otherwise temperature + top-p (nucleus) with a seeded RNG."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        check_options(temperature, top_p, seed)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.rng = np.random.default_rng(None if seed is None else int(seed))

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        p = _softmax(logits / self.temperature)
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.top_p) + 1)]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self.rng.choice(len(p), p=p))


class StopText:
    """The text of the generated tokens so far, cut at the first stop string, released piece by
    piece: a piece is held back while it could still be the start of a stop string or ends in an
    unfinished multi-byte character.

        text = StopText(tokenizer_decode, ["\\n\\n"])
        piece = text.add(token)    # "" while held back; text.stopped once a stop string appeared
        rest = text.finish()       # whatever is still held back (the final text is text.text)
    """

    def __init__(self, decode, stops=None):
        self.decode = decode
        self.stops = [s for s in (stops or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.text, self.emitted, self.stopped = "", 0, False

    def add(self, token: int) -> str:
        """Append a generated token; the text that may be shown now."""
        self.tokens.append(int(token))
        self.text = self.decode(self.tokens)
        cut = min((self.text.find(s) for s in self.stops if s in self.text), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return ""
        safe = len(self.text) - self.hold
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":  # an unfinished multi-byte char
            safe -= 1
        if safe <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:safe], safe
        return piece

    def finish(self) -> str:
        """The rest of the text (everything not yet shown), once generation ended."""
        if not self.stopped:
            self.text = self.decode(self.tokens) if self.tokens else ""
        piece, self.emitted = self.text[self.emitted:], max(self.emitted, len(self.text))
        return piece
