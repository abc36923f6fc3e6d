"""Model extraction (export/graphs/extraction.py): what the graphs are built from."""
from __future__ import annotations

import numpy as np
import torch

from qtale_export.export.graphs import extract
from qtale_export.export.precision import checkpoint_grid
from qtale_export.quantize import quantize

from qtale_testing import spread_routed_model


def test_quantized_weights_at_rounding_ties(tiny_dir):
    """Weights on a lattice (as weights dequantized from a GGUF are) put many values exactly on a
    rounding tie of the int4 grid, where modelopt's arithmetic and the exporter's may round apart;
    the extracted weight is the fake-quantized one, so the lowered grid is modelopt's to an ulp."""
    model = spread_routed_model(tiny_dir)
    step = 0.0123  # not a power of two: the grid's multiplier qmax / amax is inexact
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.causal_lm.named_parameters():
            if name.endswith("_proj.weight"):
                lattice = torch.randint(-7, 7, p.shape, generator=g) + 0.5  # half steps: ties
                lattice[:, ::64] = 7.0  # every group's amax is 7 steps
                p.copy_(lattice * step)
    quantize(model, "int4", [], model.tokenizer, max_length=64)
    w = extract(model)
    for i, layer in enumerate(model.causal_lm.model.layers):
        for proj, mod in (("q_proj", layer.self_attn.q_proj), ("down_proj", layer.mlp.down_proj)):
            name = f"layers.{i}.{proj}"
            grid = checkpoint_grid(w.tensors[f"{name}.weight"], w.quantized[name])
            c = grid["codes"].astype(np.float32)
            deq = (c.reshape(c.shape[0], -1, grid["block"]) * grid["scale"][..., None]).reshape(c.shape)
            with torch.no_grad():
                fq = mod.weight_quantizer(mod.weight).float().numpy()
            np.testing.assert_allclose(deq, fq, rtol=1e-6, atol=1e-7, err_msg=name)
