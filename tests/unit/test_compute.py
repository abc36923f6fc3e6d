"""The fast paths of issue #10 against their float32 references: folded fake-quant weights, the LM
head at scored positions only, token-budget batches, bfloat16 placement, LoRA merged before
quantization."""
from __future__ import annotations

import pytest
import torch

from qtale_testing import random_batch, spread_routers

import qtale_export
from qtale_export import evaluate as E
from qtale_export.compute import place, resolve_device, resolve_dtype
from qtale_export.errors import QtaleError


def test_token_batches_budget_and_order():
    lengths = [5, 40, 12, 40, 3, 100, 7]
    batches = E.token_batches(lengths, budget=80, max_batch=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 80
    assert batches[0] == [5]  # longer than the budget: alone


def test_hidden_only_head_equals_logits(tiny_dir):
    model = qtale_export.load(tiny_dir)
    spread_routers(model)
    ids, mask = random_batch(model)
    full = model(ids, attention_mask=mask, theta=0.5).logits
    out = model(ids, attention_mask=mask, theta=0.5, hidden_only=True)
    assert out.logits is None
    torch.testing.assert_close(model.head(out.hidden), full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("share", [True, False])
def test_scored_head_and_budget_do_not_change_scores(tiny_dir, share):
    model = qtale_export.load(tiny_dir)
    spread_routers(model)
    reqs = [("The quick brown fox", " jumps over"), ("Water boils at", " one hundred degrees"),
            ("The capital of France is", " Paris."), ("The capital of France is", " the lazy dog")]
    old = E.loglikelihood(model, model.tokenizer, reqs, batch_size=16, theta=0.5, progress=False,
                          share_context=share, batch_tokens=10**9, head_at_scored=False)
    new = E.loglikelihood(model, model.tokenizer, reqs, batch_size=2, theta=0.5, progress=False,
                          share_context=share, batch_tokens=12)
    for (a, ga), (b, gb) in zip(old, new):
        assert abs(a - b) < 1e-4 and ga == gb


def test_fold_keeps_logits(tiny_dir):
    pytest.importorskip("modelopt")
    from qtale_export import quantize as Q

    model = qtale_export.load(tiny_dir)
    Q.quantize(model, "int4", None, model.tokenizer)
    ids, mask = random_batch(model)
    before = model(ids, attention_mask=mask, execute_all=True).logits
    Q.fold(model)
    assert all(not lin.weight_quantizer.is_enabled for lin in Q.decoder_linears(model).values())
    torch.testing.assert_close(model(ids, attention_mask=mask, execute_all=True).logits, before,
                               rtol=0, atol=1e-5)


def test_bfloat16_place_close_to_float32(tiny_dir):
    model = qtale_export.load(tiny_dir)
    ids, mask = random_batch(model)
    ref = model(ids, attention_mask=mask, execute_all=True).logits
    place(model, "bfloat16", "cpu")
    assert next(model.base.parameters()).dtype == torch.bfloat16
    assert next(model.routers.parameters()).dtype == torch.float32
    got = model(ids, attention_mask=mask, execute_all=True).logits.float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_compute_names_are_checked():
    with pytest.raises(QtaleError, match="unknown dtype"):
        resolve_dtype("float16x")
    with pytest.raises(QtaleError, match="unknown device"):
        resolve_device("tpu")
    assert resolve_device("cpu").type == "cpu"


def test_lora_is_merged_before_quantization_and_restored(tiny_dir, tmp_path):
    pytest.importorskip("modelopt")
    from peft import LoraConfig, get_peft_model

    from qtale_export import checkpoint
    from qtale_export import quantize as Q

    model = qtale_export.load(tiny_dir)
    model.base = get_peft_model(model.base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in model.base.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a non-zero update, so merging matters
    checkpoint.save(model, tmp_path / "lora")
    loaded = qtale_export.load(tmp_path / "lora")
    Q.quantize(loaded, "int4", None, loaded.tokenizer)
    assert not hasattr(loaded.base, "peft_config")  # merged
    checkpoint.save(loaded, tmp_path / "q", quantization=loaded.quantization_info,
                    extra_tensors=Q.quantizer_tensors(loaded))
    assert (tmp_path / "q" / checkpoint.ADAPTER).is_dir()
    ids, mask = random_batch(loaded)
    again = qtale_export.load(tmp_path / "q")
    torch.testing.assert_close(again(ids, attention_mask=mask, execute_all=True).logits,
                               loaded(ids, attention_mask=mask, execute_all=True).logits, rtol=0, atol=1e-6)
