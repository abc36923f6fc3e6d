"""The graph contract: names, shapes and dtypes of the prefill/decode graphs' inputs and outputs,
and the prefill-then-decode loop every consumer runs on them.

The exporter (`export/graphs.py`) declares its graph I/O from `inputs` / `outputs`; the runtime,
the benchmark, the verifiers and the Triton router model feed the graphs through `Loop`:

    loop = Loop(backend.run, num_layers, theta=np.full((batch,), theta, np.float32))
    out = loop.prefill(input_ids, attention_mask)        # logits, present.{i}.*, exec_mask
    out = loop.step(greedy(out))                         # present.* -> past.*, exec_mask -> past_exec

Prefill: input_ids / attention_mask [batch, seq] int64 (left padding allowed), theta [batch] fp32,
and (`optional_inputs`, the ONNX Runtime forms) logits_to_keep, an int64 scalar with a default:
logits for the last N positions only, as transformers' `logits_to_keep` (0, the default: every
position, for scoring; a generation loop asks for 1 and skips the LM head on the rest of the prompt).
Decode: one new token per row, attention_mask over every position so far, the previous step's
present.{i}.key/value as past.{i}.key/value and its exec_mask as past_exec. exec_mask and
past_exec are [num_layers, batch, positions]: the batch is their second axis (`batch_axis`).
K/V at padding positions are unspecified (the attention mask hides them; the ort-cpu form writes
zeros there, PyTorch the pad tokens' K/V).

numpy only and no package imports: `qtale triton-repo` copies this file next to the Triton router
model, which runs in tritonserver's own Python.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

GRAPHS = ("prefill", "decode")
INPUT_IDS, ATTENTION_MASK, THETA = "input_ids", "attention_mask", "theta"
PAST_EXEC = "past_exec"
LOGITS_TO_KEEP = "logits_to_keep"
LOGITS, EXEC_MASK = "logits", "exec_mask"
KV = ("key", "value")


def past(layer: int, kind: str) -> str:
    """Decode input: the cached key or value of `layer`."""
    return f"past.{layer}.{kind}"


def present(layer: int, kind: str) -> str:
    """Output of both graphs: the key or value of `layer` over every position so far."""
    return f"present.{layer}.{kind}"


def past_names(num_layers: int) -> list[str]:
    return [past(i, kind) for i in range(num_layers) for kind in KV]


def present_names(num_layers: int) -> list[str]:
    return [present(i, kind) for i in range(num_layers) for kind in KV]


def output_names(num_layers: int) -> list[str]:
    """The outputs of either graph, in graph order."""
    return [LOGITS] + present_names(num_layers) + [EXEC_MASK]


def batch_axis(name: str) -> int:
    """The batch axis of a graph input or output."""
    return 1 if name in (PAST_EXEC, EXEC_MASK) else 0


def inputs(graph: str, num_layers: int, kv_heads: int, head_dim: int, act: str = "float32") -> dict:
    """{name: (dtype, shape)} of a graph's inputs in graph order; str dims are symbolic."""
    seq = "seq" if graph == "prefill" else "one"
    spec = {INPUT_IDS: ("int64", ["batch", seq]),
            ATTENTION_MASK: ("int64", ["batch", "seq" if graph == "prefill" else "total"]),
            THETA: ("float32", ["batch"])}
    if graph == "decode":
        spec.update({name: (act, ["batch", kv_heads, "past", head_dim]) for name in past_names(num_layers)})
        spec[PAST_EXEC] = ("bool", [num_layers, "batch", "past"])
    return spec


def optional_inputs(graph: str) -> dict:
    """{name: (dtype, shape, default)} of the inputs a graph may declare with a default value (an
    initializer of the same name, so a consumer that does not feed it gets the default). The
    tensorrt form declares none: TensorRT reads such an input as a constant."""
    return {LOGITS_TO_KEEP: ("int64", [], 0)} if graph == "prefill" else {}


def outputs(graph: str, num_layers: int, kv_heads: int, head_dim: int, vocab: int, act: str = "float32") -> dict:
    """{name: (dtype, shape)} of a graph's outputs in graph order (logits of the new positions,
    K/V and exec mask over every position so far)."""
    new, total = ("kept", "seq") if graph == "prefill" else (1, "total")  # kept: logits_to_keep or seq
    spec = {LOGITS: ("float32", ["batch", new, vocab])}
    spec.update({name: (act, ["batch", kv_heads, total, head_dim]) for name in present_names(num_layers)})
    spec[EXEC_MASK] = ("bool", [num_layers, "batch", total])
    return spec


def dim_ranges(graph: str, batch: tuple[int, int, int], tokens: tuple[int, int, int]) -> dict:
    """{symbolic dim: (min, opt, max)} of a graph's inputs for an engine profile (TensorRT's
    optimization profile) serving `batch` rows and sequences of `tokens` positions in all.
    Prefill: seq = tokens. Decode: one new token against `past` cached positions, so
    total = past + 1 and the profile must keep that tie at min, opt and max (a decode row has
    at least one cached position: total >= 2)."""
    if graph == "prefill":
        return {"batch": tuple(batch), "seq": tuple(tokens)}
    total = tuple(max(2, t) for t in tokens)
    return {"batch": tuple(batch), "one": (1, 1, 1), "total": total, "past": tuple(t - 1 for t in total)}


def profile_shapes(graph: str, spec: dict, batch: tuple[int, int, int],
                   tokens: tuple[int, int, int]) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """{input name: (min shape, opt shape, max shape)} for `spec` ({name: (dtype, shape)} as
    `inputs` gives, or a manifest's {name: {"shape": ...}}); fixed dims stay as they are."""
    ranges = dim_ranges(graph, batch, tokens)
    shapes = {}
    for name, entry in spec.items():
        dims = entry["shape"] if isinstance(entry, dict) else entry[1]
        triple: tuple[list[int], list[int], list[int]] = ([], [], [])
        for dim in dims:
            if not isinstance(dim, int) and dim not in ranges:
                raise ValueError(f"input {name}: dimension {dim!r} is not one of the graph contract's "
                                 f"({', '.join(ranges)})")
            for k in range(3):
                triple[k].append(dim if isinstance(dim, int) else ranges[dim][k])
        shapes[name] = triple
    return shapes


# ---- feeds ----------------------------------------------------------------------------------------
def prefill_feeds(input_ids, attention_mask, theta, logits_to_keep: int | None = None) -> dict:
    """Prefill feeds; logits_to_keep only where given (the graph must declare it)."""
    feeds = {INPUT_IDS: np.asarray(input_ids, np.int64), ATTENTION_MASK: np.asarray(attention_mask, np.int64),
             THETA: np.asarray(theta, np.float32)}
    if logits_to_keep is not None:
        feeds[LOGITS_TO_KEEP] = np.asarray(int(logits_to_keep), np.int64)
    return feeds


def decode_feeds(last: dict, token_ids, attention_mask, theta, num_layers: int, cache: bool = True) -> dict:
    """The next decode step's feeds after outputs `last`; cache=False leaves the K/V out (an
    in-place decoder holds them)."""
    feeds = {INPUT_IDS: np.asarray(token_ids, np.int64).reshape(-1, 1),
             ATTENTION_MASK: np.asarray(attention_mask, np.int64), THETA: np.asarray(theta, np.float32)}
    if cache:
        feeds.update({past(i, kind): last[present(i, kind)] for i in range(num_layers) for kind in KV})
    feeds[PAST_EXEC] = last[EXEC_MASK]
    return feeds  # in the decode graph's input order


def greedy(out: dict) -> np.ndarray:
    """[batch] int64: the most likely next token of every row."""
    return np.argmax(out[LOGITS][:, -1], axis=-1).astype(np.int64)


def realized_ratio(exec_mask: np.ndarray, routed: list[int]) -> float:
    """Executed (routed layer, position) pairs / all; 1.0 without routed layers."""
    if not routed:
        return 1.0
    executed = exec_mask[list(routed)]
    return float(executed.mean()) if executed.size else 1.0


class Loop:
    """Prefill once, then one decode call per new token, carrying K/V, exec mask and attention mask.

    run(graph, feeds) -> {output name: array} runs one graph. A `decoder` (set after prefill, with
    `step(feeds)` -> {logits, exec_mask}) keeps the K/V itself, so no cache is fed."""

    def __init__(self, run: Callable[[str, dict], dict], num_layers: int, theta):
        self.run, self.num_layers = run, int(num_layers)
        self.theta = np.asarray(theta, np.float32).reshape(-1)
        self.decoder = None
        self.out: dict = {}
        self.mask: np.ndarray | None = None

    def prefill(self, input_ids, attention_mask, logits_to_keep: int | None = None) -> dict:
        self.mask = np.asarray(attention_mask, np.int64)
        self.out = self.run("prefill", prefill_feeds(input_ids, self.mask, self.theta, logits_to_keep))
        return self.out

    def step(self, token_ids) -> dict:
        """Feed one new token per row; returns the decode outputs."""
        self.mask = np.concatenate([self.mask, np.ones((self.mask.shape[0], 1), np.int64)], axis=1)
        feeds = decode_feeds(self.out, token_ids, self.mask, self.theta, self.num_layers,
                             cache=self.decoder is None)
        self.out = self.decoder.step(feeds) if self.decoder is not None else self.run("decode", feeds)
        return self.out

    def keep(self, rows) -> None:
        """Go on with these rows of the batch only (finished rows dropped)."""
        rows = np.asarray(rows, np.int64)
        self.out = {name: np.take(value, rows, axis=batch_axis(name)) for name, value in self.out.items()}
        self.mask, self.theta = self.mask[rows], self.theta[rows]
