"""Pure-numpy reference for the two QTALE custom ops (domain "qtale", version 1).

The semantics are specified in docs/ops.md; the CUDA kernels (plugins/kernels) and the
ONNX Runtime custom ops must match these functions bit for bit (they only move data).
No torch import on purpose: this module is the ground truth used by tests and by ORT.
"""

from __future__ import annotations

import numpy as np


INDEX_DTYPE = np.int32  # gate, index, count and n: int32, a type TensorRT 10 allows for plugin I/O


def token_compact(hidden: np.ndarray, gate: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """TokenCompact(hidden [B,T,H], gate [B,T] int32) -> (compact [B,N,H], index [B,N], count [B], n []).

    gate: nonzero = execute (int32 in the op contract; bool is accepted here too). index[b] is the
    stable partition of 0..T-1 (executed positions ascending, then skipped ones ascending)
    truncated to N = max(1, max_b count[b]) columns; index, count and n are int32.
    """
    hidden = np.asarray(hidden)
    gate = np.asarray(gate)
    if hidden.ndim != 3 or gate.ndim != 2 or hidden.shape[:2] != gate.shape:
        raise ValueError(f"TokenCompact: need hidden [B,T,H] and gate [B,T], got {hidden.shape} and {gate.shape}")
    if gate.shape[1] == 0:
        raise ValueError("TokenCompact: T must be >= 1 (N is at least 1 and at most T)")
    gate = gate != 0
    count = gate.sum(axis=1, dtype=INDEX_DTYPE)
    n = max(1, int(count.max(initial=0)))
    # Sorting the key (not gate) stably puts executed tokens (key False) first, each group in
    # ascending position order: exactly the stable partition.
    order = np.argsort(~gate, axis=1, kind="stable").astype(INDEX_DTYPE)
    index = np.ascontiguousarray(order[:, :n])
    compact = np.take_along_axis(hidden, index[:, :, None], axis=1)
    return compact, index, count, np.array(n, dtype=INDEX_DTYPE)


def token_scatter(residual: np.ndarray, update: np.ndarray, index: np.ndarray, count: np.ndarray) -> np.ndarray:
    """TokenScatter(residual [B,T,H], update [B,N,H], index [B,N], count [B]) -> out [B,T,H].

    out = residual with out[b, index[b,i]] = update[b,i] for i < count[b]; other rows of
    update are ignored. Raises ValueError for a used index outside [0, T).
    """
    residual = np.asarray(residual)
    update = np.asarray(update)
    index = np.asarray(index, dtype=np.int64)
    count = np.asarray(count, dtype=np.int64)
    if residual.ndim != 3 or update.ndim != 3 or index.ndim != 2 or count.ndim != 1:
        raise ValueError("TokenScatter: need residual [B,T,H], update [B,N,H], index [B,N], count [B]")
    batch, tokens, width = residual.shape
    if update.shape != (batch, index.shape[1], width) or index.shape[0] != batch or count.shape[0] != batch:
        raise ValueError(
            f"TokenScatter: inconsistent shapes residual {residual.shape}, update {update.shape}, "
            f"index {index.shape}, count {count.shape}"
        )
    if update.dtype != residual.dtype:
        raise ValueError(f"TokenScatter: update dtype {update.dtype} != residual dtype {residual.dtype}")
    used = np.arange(index.shape[1])[None, :] < count[:, None]  # [B, N]
    rows = np.broadcast_to(np.arange(batch)[:, None], index.shape)
    dst = index[used]
    if dst.size and (dst.min() < 0 or dst.max() >= tokens):
        raise ValueError(f"TokenScatter: index out of range [0, {tokens})")
    out = residual.copy()
    out[rows[used], dst] = update[used]
    return out
