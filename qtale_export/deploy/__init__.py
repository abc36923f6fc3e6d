"""The deployment side: everything that runs an export folder, without PyTorch.

`graph_io` (the graph contract and the prefill/decode loop), `theta` (the theta policy),
`runtime/` (`qtale run`, the `Runtime` API), `bench` (`qtale bench`), `triton` and
`triton_models/` (`qtale triton-repo`). Nothing here imports torch, transformers, peft or
modelopt (tests/unit/test_torch_boundary.py).
"""
