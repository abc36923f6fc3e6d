"""The runtime against PyTorch, written once (ModelOpt's split): tests/unit/deploy/runtime runs these
checks on ONNX Runtime's CPU provider, tests/gpu/deploy/runtime on its CUDA and TensorRT providers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qtale_testing import THETAS

PROMPT = "The quick brown fox jumps over the lazy dog. A journey"


def torch_greedy(model, ids: list[int], theta: float, n: int, eos: set[int]) -> list[int]:
    x = torch.tensor([ids])
    mask = torch.ones_like(x)
    th = torch.tensor([theta])
    out = []
    with torch.no_grad():
        r = model(x, mask, theta=th, use_cache=True)
        for _ in range(n):
            nxt = int(r.logits[0, -1].argmax())
            if nxt in eos:
                break
            out.append(nxt)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
            r = model(torch.tensor([[nxt]]), mask, past_key_values=r.past_key_values, use_cache=True, theta=th)
    return out


def check_greedy_matches_pytorch(rt, model, ratio: float, engine_prefix: str) -> None:
    """Greedy tokens equal PyTorch's token by token at the calibrated theta of `ratio`."""
    res = rt.generate(PROMPT, ratio=ratio, max_new_tokens=12)
    theta = THETAS["1.0" if ratio == 1.0 else str(ratio)]
    assert res.theta == pytest.approx(theta) and res.selection["mode"] == "exact"
    ids = rt.tokenizer.encode(PROMPT)
    ref = torch_greedy(model, ids, theta, 12, rt.eos_ids)
    assert res.token_ids == ref
    assert 0.0 < res.realized_ratio <= 1.0
    if ratio == 1.0:
        assert res.realized_ratio == 1.0
    assert res.tokens_per_s > 0 and res.engine.startswith(engine_prefix)


def check_realized_ratio_matches_pytorch(rt, model) -> None:
    """The prompt's realized ratio is the mean of PyTorch's exec masks."""
    ids = rt.tokenizer.encode(PROMPT)
    res = rt.generate(PROMPT, ratio=0.5, max_new_tokens=1)
    with torch.no_grad():
        r = model(torch.tensor([ids]), theta=torch.tensor([THETAS["0.5"]]), use_cache=True)
    ref = float(torch.stack([r.past_key_values[i][2] for i in model.layer_ids]).float().mean())
    assert res.prefill_ratio == pytest.approx(ref)
    # the decode ratio covers the fed generated tokens only (ignore_eos: exactly max_new_tokens)
    res = rt.generate(PROMPT, ratio=0.5, max_new_tokens=6, ignore_eos=True)
    assert res.new_tokens == 6
    fed = torch.tensor([ids + res.token_ids[:-1]])
    with torch.no_grad():  # routing is per token and causal: one forward gives every step's decisions
        r = model(fed, theta=torch.tensor([THETAS["0.5"]]), use_cache=True)
    ex = torch.stack([r.past_key_values[i][2] for i in model.layer_ids]).float()
    assert res.decode_ratio == pytest.approx(float(ex[..., len(ids):].mean()))
    assert res.realized_ratio == pytest.approx(float(ex.mean()))


def check_score_matches_pytorch(rt, model, atol: float = 1e-4) -> None:
    """Log-likelihoods equal PyTorch's, alone and in a left-padded batch."""
    ctx = ["The quick brown fox", "Water boils at", "The capital of France is"]
    cont = [" jumps over the lazy dog.", " one hundred degrees", " Paris."]
    theta = THETAS["0.6"]
    got = rt.score(ctx, cont, ratio=0.6, batch_size=2)
    for c, x, ll in zip(ctx, cont, got):
        cids, whole = rt.tokenizer.encode(c), rt.tokenizer.encode(c + x)
        with torch.no_grad():
            logits = model(torch.tensor([whole]), theta=torch.tensor([theta])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        ref = float(sum(lp[t - 1, whole[t]] for t in range(len(cids), len(whole))))
        assert abs(ll - ref) < atol, (c, ll, ref)
    single = [rt.score([c], [x], ratio=0.6)[0] for c, x in zip(ctx, cont)]
    np.testing.assert_allclose(got, single, atol=atol)
