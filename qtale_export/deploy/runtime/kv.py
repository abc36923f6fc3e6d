"""The in-place KV decoder: decode steps on preallocated KV buffers bound with ONNX Runtime IO
binding, so a step copies no cache. Used by the runtime (backends.OrtBackend.decoder) and, as a copy
named kv.py, by the Triton in-flight model; so numpy + onnxruntime only and no package imports.
"""
from __future__ import annotations

import numpy as np


class InPlaceDecoder:
    """Decode steps on one preallocated KV buffer per layer and K/V, bound as both past.{i}.* and
    present.{i}.* (ONNX Runtime IO binding): GroupQueryAttention writes the new token's K/V into
    its slot, so a step copies no cache. Slots not yet written are zero. The K/V bindings are made
    once; a step binds its inputs and two fresh numpy outputs (logits, the exec mask, which grows),
    so nothing is rebound or wrapped per layer."""

    def __init__(self, sess, prefill_out: dict, num_layers: int, capacity: int):
        import onnxruntime as ort

        self.ort = ort
        self.sess, self.io = sess, sess.io_binding()
        first = prefill_out["present.0.key"]
        b, kv, n, hd = first.shape
        if capacity < n + 1:
            raise ValueError(f"KV capacity {capacity} leaves no room after a {n}-token prompt")
        self.buffers = []  # kept alive: ORT reads and writes them in place
        for i in range(num_layers):
            for name in ("key", "value"):
                buf = np.zeros((b, kv, capacity, hd), first.dtype)
                buf[:, :, :n] = prefill_out[f"present.{i}.{name}"]
                ov = ort.OrtValue.ortvalue_from_numpy(buf)
                self.io.bind_ortvalue_input(f"past.{i}.{name}", ov)
                self.io.bind_ortvalue_output(f"present.{i}.{name}", ov)
                self.buffers.append((f"present.{i}.{name}", buf, ov))
        self.capacity, self.batch, self.num_layers = capacity, b, num_layers
        self.vocab = prefill_out["logits"].shape[-1]

    def step(self, feeds: dict) -> dict:
        """feeds: input_ids [B, 1], attention_mask [B, total], theta [B], past_exec [L, B, total - 1]
        -> {"logits", "exec_mask"}."""
        total = feeds["attention_mask"].shape[1]
        if total > self.capacity:
            raise ValueError(f"the KV buffers hold {self.capacity} tokens")
        for name, value in feeds.items():
            self.io.bind_cpu_input(name, np.ascontiguousarray(value))
        out = {"logits": np.empty((self.batch, 1, self.vocab), np.float32),
               "exec_mask": np.empty((self.num_layers, self.batch, total), np.bool_)}
        for name, arr in out.items():  # binding a name again replaces its binding
            self.io.bind_ortvalue_output(name, self.ort.OrtValue.ortvalue_from_numpy(arr))
        self.sess.run_with_iobinding(self.io)
        return out
