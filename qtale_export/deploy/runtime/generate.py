"""`Runtime`: text generation and scoring on an export folder, with a KV cache, no PyTorch.

    rt = Runtime.open("exports/smollm2-fp32")           # checks every file's sha256 first
    res = rt.generate("The capital of France is", ratio=0.6, max_new_tokens=32)
    res.text, res.realized_ratio, res.tokens_per_s
    for piece in rt.stream("Tell me", ratio=0.6): print(piece, end="")
    rt.score(["Q: 2+2? A:"], [" 4"], ratio=0.6)          # log-likelihoods

The prompt runs through prefill.onnx once; every new token through decode.onnx with the cache
(present.* -> past.*, exec_mask -> past_exec). Theta comes from the manifest's theta table
(`select.select_theta`); the realized execution ratio is read back from the exec masks over the
routed layers and every token that went through the model.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ...errors import QtaleError
from .. import theta as policy
from .. import graph_io
from ..manifest import Manifest, load
from .backends import make_backend
from .sampling import Sampler, StopText

DEFAULT_MAX_LENGTH = 2048
UNKNOWN_POSITIONS = 4096  # the RoPE table export/graphs.py builds when the model's config gives no maximum


# ---------------------------------------------------------------------------------------------
# tokenizer (transformers' AutoTokenizer when importable, else the `tokenizers` library)
# ---------------------------------------------------------------------------------------------
class Tokenizer:
    def __init__(self, folder: Path):
        self.hf = None
        self.tk = None
        try:
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(str(folder))
        except ImportError:
            pass
        except (OSError, ValueError) as exc:
            raise QtaleError(f"cannot load the tokenizer of {folder}: {str(exc).splitlines()[0]}") from None
        # transformers' decode only forwards to the fast tokenizer when no clean-up is configured:
        # call that one directly (decode runs once per generated token, over everything so far)
        self.fast = (getattr(self.hf, "backend_tokenizer", None)
                     if self.hf is not None and not getattr(self.hf, "clean_up_tokenization_spaces", True) else None)
        if self.hf is None:
            path = folder / "tokenizer.json"
            if not path.is_file():
                raise QtaleError(f"export {folder} has no tokenizer.json")
            from tokenizers import Tokenizer as _T

            self.tk = _T.from_file(str(path))

    def encode(self, text: str, special: bool = True) -> list[int]:
        if self.hf is not None:
            return list(self.hf(text, add_special_tokens=special)["input_ids"])
        return list(self.tk.encode(text, add_special_tokens=special).ids)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.fast is not None:
            return self.fast.decode(ids, skip_special_tokens=True)
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=True)
        return self.tk.decode(ids, skip_special_tokens=True)

    def chat(self, prompt: str) -> list[int]:
        if self.hf is None or not getattr(self.hf, "chat_template", None):
            raise QtaleError("this export's tokenizer has no chat template; run without --chat")
        text = self.hf.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        return self.encode(text, special=False)

    @property
    def eos_ids(self) -> set[int]:
        if self.hf is not None and self.hf.eos_token_id is not None:
            return {int(self.hf.eos_token_id)}
        return set()

    @property
    def pad_id(self) -> int:
        if self.hf is not None and self.hf.pad_token_id is not None:
            return int(self.hf.pad_token_id)
        return 0

    @property
    def max_length(self) -> int | None:
        m = getattr(self.hf, "model_max_length", None) if self.hf is not None else None
        return int(m) if m and m < 10_000_000 else None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    realized_ratio: float  # executed (routed layer, token) pairs / all, over prompt + fed tokens
    prefill_ratio: float  # the same over the prompt only
    decode_ratio: float  # the same over the fed generated tokens only (what decode speed follows); 1.0 if none
    tokens_per_s: float  # new tokens / (prefill + decode) wall time
    decode_tokens_per_s: float  # (new tokens - 1) / decode wall time
    prefill_s: float
    decode_s: float
    stop_reason: str  # eos | stop | length | max_length
    engine: str
    theta: float
    selection: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class Runtime:
    def __init__(self, folder: Path, manifest: Manifest, backend, tokenizer: Tokenizer, max_length: int,
                 ratio_mode: str = "interpolate"):
        self.folder, self.manifest, self.backend, self.tokenizer = folder, manifest, backend, tokenizer
        self.max_length = int(max_length)
        self.ratio_mode = ratio_mode
        m = manifest.model
        self.num_layers = m.num_layers
        self.routed = list(m.routed_layers)
        self.eos_ids = set(tokenizer.eos_ids) | set(m.eos_ids)
        self.kv_dtype = np.dtype(m.activation_dtype)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def open(cls, export_dir: str | os.PathLike, backend: str = "ort", device: str = "cpu",
             threads: int | None = None, verify: bool = True, max_length: int | None = None,
             ratio_mode: str = "interpolate", precision: str | None = None,
             plugin_library: str | None = None, exact: bool = False, spin: bool = True) -> "Runtime":
        """Open an export folder: manifest (+ every file's sha256 unless verify=False), backend, tokenizer.
        spin=False: ONNX Runtime's idle threads sleep instead of busy-waiting (a shared CPU)."""
        from ...validate import cpus

        folder = Path(export_dir)
        manifest = load(folder, verify=verify)
        policy.check_mode(ratio_mode)
        if threads is not None and not 1 <= int(threads) <= cpus():
            raise QtaleError(f"threads must be in [1, {cpus()}] (the CPUs this process may use), got {threads}")
        # the graphs' positions (their RoPE table): the model's maximum, else the exporter's default
        positions = manifest.model.max_positions or UNKNOWN_POSITIONS
        if max_length is not None and not 1 <= int(max_length) <= positions:
            raise QtaleError(f"max length {max_length} is more than this model's {positions} positions")
        be = make_backend(manifest, backend=backend, device=device, threads=threads,
                          precision=precision, plugin_library=plugin_library, exact=exact, spin=spin)
        tok = Tokenizer(folder)
        limit = max_length or manifest.model.max_positions or tok.max_length or DEFAULT_MAX_LENGTH
        return cls(folder, manifest, be, tok, min(int(limit), positions), ratio_mode)

    @property
    def engine(self) -> str:
        return self.backend.name

    # ---- theta ----------------------------------------------------------------------------------
    def select(self, ratio: float | None = None, theta: float | None = None) -> dict:
        """{"theta", "ratio", "mode", ...}: theta given, else from `ratio`, else the export's default."""
        if theta is not None:
            return {"theta": policy.check_theta(theta), "ratio": None, "mode": "theta"}
        if ratio is None:
            return {"theta": self.manifest.theta, "ratio": self.manifest.ratio, "mode": "export default"}
        return policy.select(self.manifest.theta_table, ratio, self.ratio_mode)

    # ---- inputs -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise QtaleError("empty prompt")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 on the command line (surrogate escapes)
            raise QtaleError("the prompt is not valid UTF-8 text") from None
        ids = self.tokenizer.chat(prompt) if chat else self.tokenizer.encode(prompt)
        if not ids:
            raise QtaleError("the prompt encodes to no tokens")
        if len(ids) >= self.max_length:
            raise QtaleError(f"prompt is {len(ids)} tokens; the maximum is {self.max_length - 1} "
                             f"(max length {self.max_length})")
        return ids

    def loop(self, theta: float, batch: int = 1) -> graph_io.Loop:
        """A prefill/decode loop on this export's backend at `theta` for every row."""
        return graph_io.Loop(self.backend.run, self.num_layers, np.full((batch,), theta, np.float32))

    def _exec_ratio(self, exec_mask: np.ndarray) -> float:
        return graph_io.realized_ratio(exec_mask, self.routed)

    # ---- generation -------------------------------------------------------------------------------
    def stream(self, prompt: str, ratio: float | None = None, theta: float | None = None,
               max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop: list[str] | None = None, chat: bool = False,
               result: list | None = None, ignore_eos: bool = False) -> Iterator[str]:
        """Yield the generated text piece by piece; the GenerationResult is appended to `result`
        (a list) at the end, and kept as `self.last_result`. ignore_eos: keep generating past an
        end-of-sequence token (benchmarks: a fixed number of new tokens, as a peer's min_length)."""
        if int(max_new_tokens) < 1:
            raise QtaleError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        selection = self.select(ratio, theta)
        theta_value = float(selection["theta"])
        try:
            sampler = Sampler(temperature, top_p, seed)
        except ValueError as exc:
            raise QtaleError(str(exc)) from None
        text = StopText(self.tokenizer.decode, stop)
        ids = self.encode_prompt(prompt, chat)
        n_prompt = len(ids)
        t0 = time.perf_counter()
        loop = self.loop(theta_value)
        # only the last position's logits: the LM head skips the rest of the prompt where the graph can
        keep = 1 if self.backend.accepts("prefill", graph_io.LOGITS_TO_KEEP) else None
        out = loop.prefill([ids], np.ones((1, n_prompt), np.int64), logits_to_keep=keep)
        t_prefill = time.perf_counter() - t0
        prefill_ratio = self._exec_ratio(out[graph_io.EXEC_MASK])
        exec_mask = out[graph_io.EXEC_MASK]
        logits = out[graph_io.LOGITS][0, -1]
        if hasattr(self.backend, "decoder") and max_new_tokens > 1:
            # an in-place KV decoder where the backend has one (no cache copy per step)
            loop.decoder = self.backend.decoder(out, self.num_layers,
                                                min(self.max_length, n_prompt + int(max_new_tokens)))
        gen = text.tokens
        reason = "length"
        t1 = time.perf_counter()
        while True:
            token = sampler(logits)
            if token in self.eos_ids and not ignore_eos:
                reason = "eos"
                break
            piece = text.add(token)
            if text.stopped:
                reason = "stop"
                break
            if piece:
                yield piece
            if len(gen) >= int(max_new_tokens):
                reason = "length"
                break
            if n_prompt + len(gen) >= self.max_length:
                reason = "max_length"
                break
            out = loop.step([token])
            exec_mask = out[graph_io.EXEC_MASK]
            logits = out[graph_io.LOGITS][0, -1]
        t_end = time.perf_counter()
        rest = text.finish()
        if rest:
            yield rest
        decode_s = t_end - t1
        res = GenerationResult(
            text=text.text, token_ids=gen, prompt_tokens=n_prompt, new_tokens=len(gen),
            realized_ratio=self._exec_ratio(exec_mask), prefill_ratio=prefill_ratio,
            decode_ratio=self._exec_ratio(exec_mask[:, :, n_prompt:]),  # 1.0 when no token was fed
            tokens_per_s=len(gen) / max(t_end - t0, 1e-9),
            decode_tokens_per_s=max(len(gen) - 1, 0) / max(decode_s, 1e-9) if len(gen) > 1 else 0.0,
            prefill_s=t_prefill, decode_s=decode_s, stop_reason=reason, engine=self.engine,
            theta=theta_value, selection=selection)
        self.last_result = res
        if result is not None:
            result.append(res)

    def generate(self, prompt: str, ratio: float | None = None, theta: float | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[str] | None = None, chat: bool = False,
                 callback: Callable[[str], None] | None = None, ignore_eos: bool = False) -> GenerationResult:
        """Generate a continuation; `callback(piece)` gets the text as it is produced."""
        box: list = []
        for piece in self.stream(prompt, ratio, theta, max_new_tokens, temperature, top_p, seed, stop, chat, box,
                                 ignore_eos):
            if callback is not None:
                callback(piece)
        return box[0]

    # ---- scoring ----------------------------------------------------------------------------------
    def score(self, contexts: list[str], continuations: list[str], ratio: float | None = None,
              theta: float | None = None, batch_size: int = 8, return_greedy: bool = False):
        """Log-likelihood of each continuation given its context (sum over its tokens).

        Tokenization as lm-eval: the continuation's tokens are those of context + continuation
        after the context's own tokens. With return_greedy, (loglik, is_greedy) pairs.
        """
        if len(contexts) != len(continuations):
            raise QtaleError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        theta_value = float(self.select(ratio, theta)["theta"])
        items = []
        for context, continuation in zip(contexts, continuations):
            if not context:
                raise QtaleError("empty context")
            if not continuation:
                raise QtaleError("empty continuation")
            ctx = self.tokenizer.encode(context)
            whole = self.tokenizer.encode(context + continuation)
            n_ctx = len(ctx)
            if whole[:n_ctx] != ctx:  # a merge across the boundary: encode the parts separately
                whole = ctx + self.tokenizer.encode(continuation, special=False)
            if len(whole) <= n_ctx:
                raise QtaleError(f"continuation {continuation!r} adds no tokens")
            if len(whole) > self.max_length:
                raise QtaleError(f"context + continuation is {len(whole)} tokens; the maximum is {self.max_length}")
            items.append((whole, n_ctx))
        results = []
        for start in range(0, len(items), max(int(batch_size), 1)):
            chunk = items[start:start + batch_size]
            longest = max(len(tokens) for tokens, _ in chunk)
            ids = np.full((len(chunk), longest), self.tokenizer.pad_id, np.int64)
            mask = np.zeros((len(chunk), longest), np.int64)
            for row, (tokens, _) in enumerate(chunk):  # left padding
                ids[row, longest - len(tokens):] = tokens
                mask[row, longest - len(tokens):] = 1
            logits = self.loop(theta_value, len(chunk)).prefill(ids, mask)[graph_io.LOGITS]
            for row, (tokens, n_ctx) in enumerate(chunk):
                off = longest - len(tokens)
                lp = _log_softmax(logits[row, off + n_ctx - 1: off + len(tokens) - 1])
                tgt = np.asarray(tokens[n_ctx:])
                ll = float(lp[np.arange(len(tgt)), tgt].sum())
                greedy = bool((lp.argmax(-1) == tgt).all())
                results.append((ll, greedy) if return_greedy else ll)
        return results
