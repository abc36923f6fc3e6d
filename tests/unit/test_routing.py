"""Routed model semantics: identity at ratio 1, compaction == masked reference, KV cache, stats."""
import pytest
import torch

import qtale_export
from qtale_testing import make_tiny, spread_routers
from qtale_export.routing import RoutedModel, RouterConfig


@pytest.fixture(scope="module")
def model(tiny_dir):
    m = qtale_export.load(tiny_dir)
    spread_routers(m)
    return m


def batch(vocab: int, pad: str = "right", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    if pad == "right":
        mask[1, 17:] = 0
        mask[2, 9:] = 0
    else:
        mask[1, :7] = 0
        mask[2, :15] = 0
    return ids, mask


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_ratio_one_equals_hf_model(tmp_path, model_type):
    m = qtale_export.load(make_tiny(tmp_path / model_type, layers=4, model_type=model_type))
    spread_routers(m)
    ids, mask = batch(m.hf_config.vocab_size)
    mask[:] = 1
    with torch.no_grad():
        ref = m.causal_lm(ids, attention_mask=mask).logits
        m.set_ratio(1.0)
        out = m(ids, attention_mask=mask).logits
        stats = m.execution_stats()
    assert (out - ref).abs().max().item() < 1e-5
    assert stats["execution_ratio"] == 1.0


def test_right_padding_matches_hf_on_real_tokens(model):
    ids, mask = batch(model.hf_config.vocab_size)
    with torch.no_grad():
        ref = model.causal_lm(ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask, theta=0.0).logits
    assert (out - ref)[mask.bool()].abs().max().item() < 1e-5


@pytest.mark.parametrize("pad", ["right", "left"])
@pytest.mark.parametrize("theta", [0.0, 0.3, 0.6, 0.9, 1.0])
def test_compacted_equals_masked_reference(model, pad, theta):
    ids, mask = batch(model.hf_config.vocab_size, pad)
    with torch.no_grad():
        model.reset_stats()
        fast = model(ids, attention_mask=mask, theta=theta).logits
        ratio = model.execution_stats()["execution_ratio"]
        ref = model(ids, attention_mask=mask, theta=theta, dense=True).logits
    valid = mask.bool()
    assert (fast - ref)[valid].abs().max().item() < 1e-5
    if theta == 0.0:
        assert ratio == 1.0
    if theta == 1.0:
        assert ratio < 0.2  # only the always-executed first tokens run


def test_nothing_executed_is_identity_per_routed_layer(tiny_dir):
    m = qtale_export.load(tiny_dir)
    m2 = RoutedModel(m.base, RouterConfig(first_routed_layer=0, keep_initial=0)).eval()
    ids, mask = batch(m.hf_config.vocab_size)
    with torch.no_grad():
        out = m2(ids, attention_mask=mask, theta=1.0)
        direct = m2.causal_lm.lm_head(m2.decoder.norm(m2.decoder.embed_tokens(ids)))
        dense = m2(ids, attention_mask=mask, theta=1.0, dense=True).logits
    assert m2.execution_stats()["execution_ratio"] == 0.0
    assert torch.allclose(out.logits, direct, atol=1e-6)
    assert torch.allclose(dense, direct, atol=1e-6)


def test_theta_per_sequence(model):
    ids, mask = batch(model.hf_config.vocab_size)
    with torch.no_grad():
        mixed = model(ids, attention_mask=mask, theta=torch.tensor([0.0, 0.6, 1.0])).logits
        for b, th in enumerate([0.0, 0.6, 1.0]):
            single = model(ids[b:b + 1], attention_mask=mask[b:b + 1], theta=th).logits
            n = int(mask[b].sum())
            assert (mixed[b, :n] - single[0, :n]).abs().max().item() < 1e-5


def test_kv_cache_decode_matches_full_forward(model):
    ids, _ = batch(model.hf_config.vocab_size)
    ids = ids[:1]
    with torch.no_grad():
        full = model(ids, theta=0.6, dense=True)
        out = model(ids[:, :6], theta=0.6, use_cache=True)
        steps, past = [out.logits], out.past_key_values
        for t in range(6, ids.shape[1]):
            o = model(ids[:, t:t + 1], attention_mask=torch.ones(1, t + 1, dtype=torch.long),
                      past_key_values=past, use_cache=True, theta=0.6)
            steps.append(o.logits)
            past = o.past_key_values
    assert (torch.cat(steps, 1) - full.logits).abs().max().item() < 1e-5
    # the exec masks in the cache are the gates of the full forward
    for j, layer in enumerate(model.layer_ids):
        assert torch.equal(past[layer][2][0], full.gates[j][0].bool())


def test_compacted_cache_equals_dense_cache(model):
    ids, mask = batch(model.hf_config.vocab_size)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, theta=0.6, use_cache=True).past_key_values
        b = model(ids, attention_mask=mask, theta=0.6, use_cache=True, dense=True).past_key_values
    for (ka, va, ea), (kb, vb, eb) in zip(a, b):
        assert torch.equal(ea, eb)
        assert (ka - kb).abs().max() < 1e-5 and (va - vb).abs().max() < 1e-5


def test_flops_fraction_tracks_execution(model):
    ids, mask = batch(model.hf_config.vocab_size)
    fractions = []
    for theta in (0.0, 0.6, 1.0):
        model.reset_stats()
        with torch.no_grad():
            model(ids, attention_mask=mask, theta=theta)
        s = model.execution_stats()
        fractions.append(s["flops_fraction"])
        assert s["tokens"] == int(mask.sum())
        assert len(s["layer_ratio"]) == len(model.layer_ids)
    assert fractions[0] > 1.0  # the routers themselves cost FLOPs: counted, not hidden
    assert fractions[0] > fractions[1] > fractions[2]


def test_training_gradient_reaches_routers(model):
    ids, mask = batch(model.hf_config.vocab_size)
    model.train()
    try:
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
    finally:
        model.eval()
    grads = [r.out.weight.grad for r in model.routers.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)
