"""Execution statistics of routed forwards: tokens, executed (token, routed layer) pairs, FLOPs.

One counter for the PyTorch model (routing.RoutedModel) and for exported graphs (evaluate.ExportModel,
from their exec masks); numpy only, so the deployment side can use it without PyTorch.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np


def flop_terms(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, vocab: int,
               router_hidden: int) -> tuple[float, float, float, float]:
    """FLOPs per token: (decoder-layer projections + MLP, attention per attended key, one router,
    LM head)."""
    nq, nkv = heads * head_dim, kv_heads * head_dim
    proj = 2 * hidden * (2 * nq + 2 * nkv) + 3 * 2 * hidden * intermediate
    per_key = 2 * 2 * nq  # QK^T and AV per attended key
    router = 2 * (hidden * router_hidden + router_hidden * 2)
    return proj, per_key, router, 2 * hidden * vocab


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error with the sample standard deviation (as the harness reports);
    (nan, nan) for no values."""
    n = len(values)
    if not n:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


class ExecutionStats:
    """Accumulates over forwards until reset(); `terms` None means FLOPs are not counted."""

    def __init__(self, layer_ids: list[int], num_layers: int, terms: tuple | None):
        self.layer_ids, self.num_layers, self.terms = list(layer_ids), num_layers, terms
        self._paused = False
        self.reset()

    def reset(self) -> None:
        self.executed = np.zeros(len(self.layer_ids), dtype=np.float64)
        self.tokens = 0
        self.flops = np.zeros(2, dtype=np.float64)  # routed, dense

    @contextmanager
    def paused(self):
        """Forwards inside are not counted (e.g. an all-layers reference pass)."""
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def add(self, valid: np.ndarray, gates: list[np.ndarray], past_valid: np.ndarray | None = None,
            past_exec: list[np.ndarray] | None = None) -> None:
        """One forward: valid [B, T] real tokens, gates per routed layer [B, T] (executed);
        past_valid [B] real cached tokens, past_exec per routed layer [B] executed cached keys."""
        if self._paused:
            return
        v = np.asarray(valid, dtype=np.float64)
        n_tok = v.sum()
        zero = np.zeros(v.shape[0], dtype=np.float64)
        gates = [np.asarray(g, dtype=np.float64) * v for g in gates]
        for j, g in enumerate(gates):
            self.executed[j] += g.sum()
        self.tokens += int(n_tok)
        if self.terms is None:
            return
        proj, per_key, router, head = self.terms
        pv = zero if past_valid is None else np.asarray(past_valid, dtype=np.float64)
        dense_keys = ((v.cumsum(1) + pv[:, None]) * v).sum()
        dense = self.num_layers * (proj * n_tok + per_key * dense_keys) + head * n_tok
        routed = (self.num_layers - len(gates)) * (proj * n_tok + per_key * dense_keys) + head * n_tok
        for j, g in enumerate(gates):
            pe = zero if past_exec is None else np.asarray(past_exec[j], dtype=np.float64)
            routed += proj * g.sum() + per_key * ((g.cumsum(1) + pe[:, None]) * g).sum() + router * n_tok
        self.flops += (routed, dense)

    def state(self) -> dict:
        """The raw counters, JSON-ready: saved with a finished part of a run and merged on resume."""
        return {"layer_ids": self.layer_ids, "executed": self.executed.tolist(), "tokens": self.tokens,
                "flops": self.flops.tolist()}

    def merge(self, state: dict) -> None:
        """Add the counters of state() (same routed layers) as if its forwards had run here."""
        if list(state["layer_ids"]) != self.layer_ids:
            raise ValueError(f"execution statistics of routed layers {state['layer_ids']} cannot be merged "
                             f"into {self.layer_ids}")
        self.executed += np.asarray(state["executed"], dtype=np.float64)
        self.tokens += int(state["tokens"])
        self.flops += np.asarray(state["flops"], dtype=np.float64)

    def summary(self) -> dict:
        """Per-layer executed fraction, overall execution ratio, and routed / dense FLOPs."""
        tokens = max(self.tokens, 1)
        per_layer = (self.executed / tokens).tolist()
        flops = None
        if self.terms is not None:
            flops = float(self.flops[0] / self.flops[1]) if self.flops[1] > 0 else 1.0
        return {"tokens": self.tokens,
                "layer_ratio": {str(i): round(r, 6) for i, r in zip(self.layer_ids, per_layer)},
                "execution_ratio": float(self.executed.sum() / (tokens * max(len(self.layer_ids), 1))),
                "flops_fraction": flops}
