"""Regenerate tests/data/ops_vectors.npz: golden TokenCompact/TokenScatter cases.

Run from the repo root: `python tests/make_ops_vectors.py`. The content is a pure function of
the fixed seed and the case table below (npz zip timestamps aside), so a re-run reproduces the
same arrays; tests/test_ops_reference.py checks that.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qtale_export.ops_reference import token_compact, token_scatter  # noqa: E402

OUT = ROOT / "tests" / "data" / "ops_vectors.npz"
SEED = 20240611

# name: (B, T, H, dtype, gate rule). Rules: "none", "all", or a list of per-row counts
# whose executed positions are drawn at random (so rows get different counts).
CASES: dict[str, tuple[int, int, int, str, object]] = {
    "none_fp32": (2, 5, 3, "float32", "none"),
    "some_fp32": (3, 7, 4, "float32", [3, 0, 5]),
    "all_fp32": (1, 6, 2, "float32", "all"),
    "single_token_fp32": (2, 1, 4, "float32", [1, 0]),
    "some_fp16": (4, 16, 8, "float16", [5, 16, 0, 9]),
    "all_fp16": (2, 9, 5, "float16", "all"),
    "none_fp16": (3, 4, 6, "float16", "none"),
    "long_fp16": (2, 300, 16, "float16", [180, 37]),
}


def make_gate(rng: np.random.Generator, batch: int, tokens: int, rule: object) -> np.ndarray:
    if rule == "none":
        return np.zeros((batch, tokens), dtype=bool)
    if rule == "all":
        return np.ones((batch, tokens), dtype=bool)
    gate = np.zeros((batch, tokens), dtype=bool)
    for b, k in enumerate(rule):  # type: ignore[arg-type]
        gate[b, rng.choice(tokens, size=k, replace=False)] = True
    return gate


def build() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {"cases": np.array(sorted(CASES))}
    for name in sorted(CASES):
        batch, tokens, width, dtype, rule = CASES[name]
        gate = make_gate(rng, batch, tokens, rule).astype(np.int32)  # the op contract: int32 gate
        hidden = rng.standard_normal((batch, tokens, width)).astype(dtype)
        compact, index, count, n = token_compact(hidden, gate)
        residual = rng.standard_normal((batch, tokens, width)).astype(dtype)
        update = rng.standard_normal(compact.shape).astype(dtype)
        out = token_scatter(residual, update, index, count)
        fields = dict(hidden=hidden, gate=gate, compact=compact, index=index, count=count, n=n,
                      residual=residual, update=update, out=out)
        for key, value in fields.items():
            arrays[f"{name}__{key}"] = value
    return arrays


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **build())
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
