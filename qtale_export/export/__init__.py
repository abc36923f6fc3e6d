"""ONNX export of routed models: prefill/decode graphs, precisions, ORT custom ops, verification.

Entry points: `main.export_checkpoint(...)` / `main.verify(...)` (behind `qtale export`,
`qtale verify` and `qtale-export`, cli/); see docs/export.md for the graph and manifest contract.
"""
