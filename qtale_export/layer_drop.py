"""The static baseline that token routing has to beat: remove whole layers, the same ones for every
token, chosen by how little they change their input (ShortGPT's block influence: 1 - cos(x_in, x_out)
averaged over calibration tokens), as many as the target executed fraction of the routed layers
allows. Nothing is trained; the base weights and the routed model's own layers are used as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .routing import RoutedModel


@torch.no_grad()
def block_influence(model: RoutedModel, batches: list[dict]) -> dict[int, float]:
    """Mean 1 - cos(input, output) of every routed layer over the valid tokens of `batches`, with
    every layer executed (the dense model's own residual stream)."""
    scores = {i: 0.0 for i in model.layer_ids}
    count = 0
    hooks = []
    inputs: dict[int, torch.Tensor] = {}

    def pre(i):
        def f(_m, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return f

    # The routed forward calls the layer's submodules, not the layer: measure on the HF decoder.
    decoder = model.decoder
    for i in model.layer_ids:
        hooks.append(decoder.layers[i].register_forward_pre_hook(pre(i), with_kwargs=True))

    def post(i):
        def f(_m, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(inputs[i].float(), out.float(), dim=-1)  # [B, T]
            scores[i] += float(((1 - cos) * post.valid).sum())
        return f

    for i in model.layer_ids:
        hooks.append(decoder.layers[i].register_forward_hook(post(i)))
    try:
        for b in batches:
            post.valid = b["attention_mask"].float()
            model.causal_lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            count += int(b["attention_mask"].sum())
    finally:
        for h in hooks:
            h.remove()
    return {i: v / max(count, 1) for i, v in scores.items()}


def layers_to_drop(influence: dict[int, float], ratio: float) -> list[int]:
    """The least influential routed layers, round((1 - ratio) x routed) of them."""
    n = round((1.0 - ratio) * len(influence))
    return sorted(sorted(influence, key=lambda i: influence[i])[:n])
