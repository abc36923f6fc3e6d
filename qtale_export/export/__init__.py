"""ONNX export of routed models: prefill/decode graphs, precisions, ORT custom ops, verification.

Entry point: `main.export_checkpoint(...)` (behind `qtale export` and `qtale-export`, cli/); the
export folder's contract (manifest, ORT custom ops, stored reference, `qtale verify`) is deploy/'s.
See docs/export.md.
"""
