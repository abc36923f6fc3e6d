"""Helpers shared by the tests: a tiny random Llama with a real byte-level BPE tokenizer, routers with
a wide spread of P(execute). Imported as `qtale_testing` (a unique name: several conftest.py exist)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]  # the repository root, wherever a test file sits
# a fixed theta table for the tiny export (calibration on this random model takes a minute on a busy CPU)
THETAS = {"1.0": 0.0, "0.8": 0.02, "0.6": 0.31, "0.5": 0.59}

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single "
    "step. Water boils at one hundred degrees Celsius at sea level. The capital of France is Paris. "
    "Plants convert sunlight into chemical energy through photosynthesis. " * 4
)


# per model type, what its tiny config sets beyond the common shape: Gemma 3 gets a head_dim that
# fits hidden 64 (its default is 256), a small sliding window so test sequences run past it, tied
# embeddings as the real model has, and a global (full-attention, own RoPE base) layer every third
# instead of every sixth, so that even 4 layers have one and 6 have two sharing a table
TINY_CONFIG = {"gemma3_text": {"head_dim": 16, "sliding_window": 8, "tie_word_embeddings": True,
                               "sliding_window_pattern": 3}}
# model types whose norm weights start at zero (RMSNorm by (1 + w)): randomized so the offset matters
ZERO_NORMS = ("gemma3_text",)


def make_tiny(folder: Path, layers: int = 6, model_type: str = "llama", seed: int = 0, **config) -> Path:
    """A tiny random model of `model_type` (hidden 64, 4 heads, 2 KV heads) with a real BPE tokenizer;
    `config` overrides its config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    shape = dict(vocab_size=fast.vocab_size if hasattr(fast, "vocab_size") else 300,
                 hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg = AutoConfig.for_model(model_type, **{**shape, **TINY_CONFIG.get(model_type, {}), **config})
    cfg.vocab_size = len(fast)
    model = AutoModelForCausalLM.from_config(cfg)
    if model_type in ZERO_NORMS:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def spread_routers(model, std: float = 1.0, seed: int = 0) -> None:
    """Random routers with a wide spread of P(execute), so theta has something to cut."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in model.routers.values():
            r.down.weight.copy_(torch.randn(r.down.weight.shape, generator=g) * std)
            r.down.bias.copy_(torch.randn(r.down.bias.shape, generator=g) * std)
            r.out.weight.copy_(torch.randn(r.out.weight.shape, generator=g) * std)


def random_batch(model, n: int = 3, t: int = 14, seed: int = 0, left_pad: tuple[int, ...] = (5, 9)):
    """Random token ids [n, t] and an attention mask whose rows 1, 2, ... are left-padded by
    `left_pad` tokens (row 0 is full)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.hf_config.vocab_size, (n, t), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(left_pad[:n - 1], start=1):
        mask[row, :pad] = 0
    return ids, mask


def build_tiny_model(tiny_dir: Path):
    """The tiny routed model with spread routers and the fixed THETAS table."""
    import qtale_export

    model = qtale_export.load(str(tiny_dir))
    spread_routers(model)
    model.theta_table = {k: {"theta": t, "realized": None} for k, t in THETAS.items()}
    return model.eval()


def spread_routed_model(model_dir: Path):
    """The routed model of `model_dir` with spread routers and theta 0.5 for ratio 0.6."""
    import qtale_export

    model = qtale_export.load(model_dir)
    spread_routers(model)
    model.theta_table = {"0.6": {"theta": 0.5, "realized": 0.6}}
    return model


def spread_checkpoint(tiny_dir: Path, folder: Path):
    """(model, checkpoint folder): `spread_routed_model` of the tiny model, saved."""
    from qtale_export import checkpoint

    model = spread_routed_model(tiny_dir)
    return model, checkpoint.save(model, folder)


def load_script(name: str):
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_concurrently(work: Callable[[int], None], n: int, timeout: float = 300) -> list[str]:
    """work(k) for k in range(n), each on its own thread, all at once; returns what went wrong: the
    exceptions they raised (repr) and one line per thread still running after `timeout` s."""
    errors: list[str] = []

    def guarded(k: int) -> None:
        try:
            work(k)
        except Exception as exc:  # reported to the test; a thread must not hang it
            errors.append(repr(exc))

    threads = [threading.Thread(target=guarded, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return errors + [f"thread {k} still running after {timeout} s" for k, t in enumerate(threads) if t.is_alive()]
