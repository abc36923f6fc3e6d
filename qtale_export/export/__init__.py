"""ONNX export of routed models: prefill/decode graphs, precisions, ORT custom ops, verification.

Entry points: `main.run_export(args)` / `main.run_verify(args)` (wired into `qtale export`,
`qtale verify` and `qtale-export`); see docs/export.md for the graph and manifest contract.
"""
