"""What the Python-backend models open from their folder: an ONNX Runtime session for a graph and
the tokenizer. numpy / onnxruntime / tokenizers only: `qtale triton-repo` copies this file next to
each model.py (as it copies graph_io.py), which runs in tritonserver's own Python."""
from __future__ import annotations

import os


def session(path: str, threads: int, plugin_ops: bool):
    """An ONNX Runtime CPU session of `path` (with the qtale custom ops when the graph uses them)."""
    if plugin_ops:
        from qtale_export.deploy import ort_ops

        return ort_ops.session(path, threads=threads or None)
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def tokenizer(folder: str):
    """The folder's tokenizer.json as a `tokenizers.Tokenizer`, or None (no file, or no tokenizers)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(path)
