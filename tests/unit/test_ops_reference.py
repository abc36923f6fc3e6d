"""The numpy reference ops against golden vectors and an independent naive loop version."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from qtale_export.ops_reference import token_compact, token_scatter
from qtale_testing import REPO

DATA = REPO / "tests" / "data" / "ops_vectors.npz"


def naive_compact(hidden, gate):
    """Loop-by-loop restatement of docs/ops.md (deliberately shares no code with the reference)."""
    batch, tokens, _ = hidden.shape
    counts = [int(sum(1 for t in range(tokens) if gate[b][t])) for b in range(batch)]
    n = max([1] + counts)
    index = np.zeros((batch, n), dtype=np.int32)
    compact = np.zeros((batch, n, hidden.shape[2]), dtype=hidden.dtype)
    for b in range(batch):
        order = [t for t in range(tokens) if gate[b][t]] + [t for t in range(tokens) if not gate[b][t]]
        for i in range(n):
            index[b, i] = order[i]
            compact[b, i] = hidden[b, order[i]]
    return compact, index, np.array(counts, dtype=np.int32), np.array(n, dtype=np.int32)


def naive_scatter(residual, update, index, count):
    out = residual.copy()
    for b in range(residual.shape[0]):
        for i in range(index.shape[1]):
            if i < count[b]:
                out[b, index[b, i]] = update[b, i]
    return out


def load_cases():
    data = np.load(DATA)
    return {name: {k.split("__", 1)[1]: data[k] for k in data.files if k.startswith(name + "__")}
            for name in data["cases"]}


CASES = load_cases()


def test_vectors_cover_the_required_cases():
    names = set(CASES)
    assert {"none_fp32", "some_fp32", "all_fp32", "some_fp16", "all_fp16", "none_fp16"} <= names
    assert any(c["hidden"].dtype == np.float16 for c in CASES.values())
    assert any(c["hidden"].dtype == np.float32 for c in CASES.values())
    # at least one batch with different per-row counts, including a zero row
    assert any(len(set(c["count"].tolist())) > 1 and 0 in c["count"] for c in CASES.values())
    assert DATA.stat().st_size < 200_000


@pytest.mark.parametrize("name", sorted(CASES))
def test_compact_matches_vectors_and_naive(name):
    c = CASES[name]
    got = token_compact(c["hidden"], c["gate"])
    naive = naive_compact(c["hidden"], c["gate"])
    for got_a, want, loop, field in zip(got, (c["compact"], c["index"], c["count"], c["n"]), naive,
                                        ("compact", "index", "count", "n")):
        assert got_a.dtype == want.dtype, field
        assert got_a.shape == want.shape, field
        np.testing.assert_array_equal(got_a, want, err_msg=field)
        np.testing.assert_array_equal(got_a, loop, err_msg=field)
    # gate, index, count, n: int32 (TensorRT plugins take no BOOL; size tensors are INT32)
    assert c["gate"].dtype == np.int32 and all(a.dtype == np.int32 for a in got[1:])
    assert got[3].ndim == 0
    assert 1 <= int(got[3]) <= c["gate"].shape[1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_scatter_matches_vectors_and_naive(name):
    c = CASES[name]
    got = token_scatter(c["residual"], c["update"], c["index"], c["count"])
    assert got.dtype == c["residual"].dtype
    np.testing.assert_array_equal(got, c["out"])
    np.testing.assert_array_equal(got, naive_scatter(c["residual"], c["update"], c["index"], c["count"]))


def test_scatter_inverts_compact_on_executed_rows():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 11, 4)).astype(np.float32)
    gate = rng.random((3, 11)) < 0.5
    compact, index, count, _ = token_compact(hidden, gate)
    out = token_scatter(np.zeros_like(hidden), compact, index, count)
    np.testing.assert_array_equal(out[gate], hidden[gate])
    assert not out[~gate].any()


def test_scatter_does_not_modify_residual_and_rejects_bad_index():
    residual = np.zeros((1, 3, 2), np.float32)
    update = np.ones((1, 2, 2), np.float32)
    token_scatter(residual, update, np.array([[2, 0]]), np.array([2]))
    assert not residual.any()
    with pytest.raises(ValueError, match="out of range"):
        token_scatter(residual, update, np.array([[3, 0]]), np.array([1]))
    # the out-of-range entry is ignored when it lies past count
    token_scatter(residual, update, np.array([[1, 7]]), np.array([1]))


def test_compact_rejects_bad_shapes():
    with pytest.raises(ValueError):
        token_compact(np.zeros((2, 3, 4)), np.zeros((2, 4), bool))
    with pytest.raises(ValueError):
        token_compact(np.zeros((2, 0, 4)), np.zeros((2, 0), bool))


def test_generator_reproduces_the_stored_vectors():
    spec = importlib.util.spec_from_file_location("make_ops_vectors", REPO / "tests" / "make_ops_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.build()
    stored = np.load(DATA)
    assert sorted(fresh) == sorted(stored.files)
    for key, value in fresh.items():
        assert value.dtype == stored[key].dtype, key
        np.testing.assert_array_equal(value, stored[key], err_msg=key)
