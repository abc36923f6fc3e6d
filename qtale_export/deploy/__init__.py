"""The deployment side: everything that runs an export folder, without PyTorch.

`graph_io` (the graph contract and the prefill/decode loop). Nothing here imports torch,
transformers, peft or modelopt (tests/unit/test_torch_boundary.py).
"""
