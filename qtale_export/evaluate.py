"""Zero-shot evaluation of a RoutedModel: multiple-choice log-likelihood scoring (lm-evaluation-harness
conventions), perplexity on held-out text, KL to the all-layers reference, realized execution ratio.

Scoring follows lm-evaluation-harness `loglikelihood` requests: a context's trailing whitespace moves
to the continuation; the continuation's tokens are those of tokenize(context + continuation) after
the tokens of tokenize(context); an empty context is replaced by the EOS token; no BOS is added;
inputs longer than the model window keep their last tokens. Requests are deduplicated, sorted by
length (longest first), right-padded; by default each distinct context runs once and its
continuations run on its KV cache (the routed model's cache keeps the per-token execution masks,
so routing is the same as in one full forward). An export folder is scored through ONNX Runtime by
the same code (`ExportModel`: the runtime presented as the model; docs/eval.md).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import validate
from .api import load
from .data import pad as pad_tokens
from .deploy.precisions import precision as precision_spec
from .errors import QtaleError
from .optional import require
from .safe_write import write_json
from .stats import ExecutionStats, flop_terms, mean_stderr
from .tasks import (AVG7, PRIMARY, SCIQ, Item, build_items, data_root, heldout_text, load_docs,
                    parse_tasks)


# ---- log-likelihood requests -----------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        return [prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def max_length(model) -> int:
    return int(getattr(model.hf_config, "max_position_embeddings", 2048) or 2048)


# ---- an export folder as a model ---------------------------------------------------------------
def is_export_dir(path) -> bool:
    return (Path(path) / "manifest.json").is_file()


class ExportModel:
    """An export folder's ONNX Runtime (qtale_export.deploy.runtime) presented as the routed model the
    scoring code calls: `model(ids, attention_mask=, theta=, execute_all=).logits` through
    prefill.onnx (no KV cache, so `loglikelihood` scores each request as one forward), the
    tokenizer, and reset_stats()/execution_stats() counted from the graph's exec_mask by the same
    stats.ExecutionStats RoutedModel uses (FLOPs from the manifest's dims; an export written before
    the manifest recorded its MLP width counts none)."""

    backend = "onnxruntime"

    def __init__(self, runtime):
        from types import SimpleNamespace

        self.rt = runtime
        self.manifest = runtime.manifest
        self.tokenizer = runtime.tokenizer.hf
        if self.tokenizer is None:
            raise QtaleError("evaluating an export needs the transformers tokenizer (pip install transformers)")
        self.hf_config = SimpleNamespace(max_position_embeddings=runtime.max_length)
        self.layer_ids = list(self.manifest.model.routed_layers)
        self.theta = self.manifest.theta
        self.precision = self.manifest.precision
        self._terms = self._flop_terms()
        self.reset_stats()

    @classmethod
    def open(cls, folder, **kwargs) -> "ExportModel":
        from .deploy.runtime import Runtime

        return cls(Runtime.open(folder, **kwargs))  # QtaleError on a checksum mismatch

    def theta_for(self, ratio=None, theta=None) -> float:
        """theta of a ratio calibrated in the manifest's theta table (1.0 = theta 0), or --theta."""
        from .deploy import theta as policy

        if theta is not None:
            return policy.check_theta(theta)
        if ratio is None:
            return self.theta
        return policy.theta_for(self.manifest.theta_table, ratio, "exact", " in the export's theta table")

    # -- what the scoring code calls ---------------------------------------------------------------
    def eval(self):
        return self

    def __call__(self, input_ids, attention_mask=None, theta=None, execute_all: bool = False, **_):
        import numpy as np
        from types import SimpleNamespace

        ids = input_ids.cpu().numpy().astype(np.int64)
        mask = (np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy()).astype(np.int64)
        from .deploy import graph_io

        theta_value = 0.0 if execute_all else (self.theta if theta is None else float(theta))
        out = self.rt.loop(theta_value, ids.shape[0]).prefill(ids, mask)
        self.stats.add(mask.astype(bool), [out[graph_io.EXEC_MASK][i] for i in self.layer_ids])
        return SimpleNamespace(logits=torch.from_numpy(np.ascontiguousarray(out[graph_io.LOGITS])))

    # -- statistics ----------------------------------------------------------------------------------
    def _flop_terms(self):
        """FLOP terms of stats.flop_terms from the manifest's dims, or None when a dim is unknown."""
        m = self.manifest.model
        dims = (m.hidden, m.heads, m.kv_heads, m.head_dim, m.mlp_width, m.vocab, self.manifest.router_hidden)
        return None if None in dims else flop_terms(*dims)

    def reset_stats(self) -> None:
        self.stats = ExecutionStats(self.layer_ids, self.manifest.model.num_layers, self._terms)

    def execution_stats(self) -> dict:
        return self.stats.summary()


def token_batches(lengths: list[int], budget: int, max_batch: int) -> list[list[int]]:
    """Indices longest first, cut into batches of at most `max_batch` sequences whose padded size
    (count x longest) stays within `budget` tokens; a single longer sequence gets a batch alone."""
    ranked = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in ranked:
        if batches and len(batches[-1]) < max_batch and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _rows(model, out, spans: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Logits of (sequence, start, stop) spans of one forward: the LM head runs once, on the scored
    rows only (with hidden_only outputs), instead of on every position of the batch."""
    if getattr(out, "logits", None) is not None:
        return [out.logits[b, a:z] for b, a, z in spans]
    if not spans:
        return []
    hid = torch.cat([out.hidden[b, a:z] for b, a, z in spans], 0)
    logits = model.head(hid)
    return list(logits.split([z - a for _, a, z in spans], 0))


@torch.no_grad()
def loglikelihood(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16,
                  theta=None, execute_all: bool = False, progress: bool = True,
                  desc: str = "score", share_context: bool = True,
                  batch_tokens: int = 4096, head_at_scored: bool = True) -> list[tuple[float, bool]]:
    """(sum of log P(continuation | context), continuation is the greedy one) per request.

    share_context: run each distinct context once (KV cache) and all its continuations on top of
    it; otherwise one padded forward of context+continuation per request, exactly the harness's
    inputs. Batches hold at most `batch_size` sequences and `batch_tokens` padded tokens, longest
    first; the LM head runs only at the positions that are scored (head_at_scored=False: on every
    position, the old behaviour, kept for benchmarks/bench_compute.py)."""
    from tqdm import tqdm

    window = max_length(model)
    enc: dict[tuple, int] = {}
    order = []
    for ctx, cont in requests:
        c, t = encode_pair(tokenizer, ctx, cont)
        if not t:
            raise QtaleError(f"empty continuation after tokenization: {cont!r}")
        t = t[-window:]
        c = c[-(window + 1 - len(t)):]  # the harness keeps the last window+1 tokens of context+continuation
        order.append(enc.setdefault((tuple(c), tuple(t)), len(enc)))
    uniq = list(enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    routed = not isinstance(model, ExportModel)
    if not routed:
        share_context = False  # prefill.onnx has no cache input: one forward per request
        device = torch.device("cpu")
    else:
        device = next(model.parameters()).device
    extra = {"hidden_only": True} if routed and head_at_scored else {}
    results: list[tuple[float, bool] | None] = [None] * len(uniq)
    model.eval()

    def padded(seqs):
        ids, mask = pad_tokens(seqs, pad)
        return ids.to(device), mask.to(device)

    def record(i, rows: torch.Tensor):
        target = torch.tensor(uniq[i][1], device=rows.device)
        logp = F.log_softmax(rows.float(), dim=-1)
        results[i] = (float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))

    if not share_context:
        inputs = [list(c + t)[:-1] for c, t in uniq]
        batches = token_batches([len(x) for x in inputs], batch_tokens, batch_size)
        for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
            ids, mask = padded([inputs[i] for i in idx])
            out = model(ids, attention_mask=mask, theta=theta, execute_all=execute_all, **extra)
            spans = [(r, len(inputs[i]) - len(uniq[i][1]), len(inputs[i])) for r, i in enumerate(idx)]
            for i, rows in zip(idx, _rows(model, out, spans)):
                record(i, rows)
        return [results[j] for j in order]

    groups: dict[tuple, list[int]] = {}
    for i, (c, _) in enumerate(uniq):
        groups.setdefault(c, []).append(i)
    ctxs = list(groups)
    span = [len(c) + max(len(uniq[i][1]) for i in groups[c]) for c in ctxs]
    for idx in tqdm(token_batches(span, batch_tokens, batch_size), desc=desc, disable=not progress, leave=False):
        batch = [ctxs[j] for j in idx]
        cids, cmask = padded([list(c) for c in batch])
        out = model(cids, attention_mask=cmask, theta=theta, execute_all=execute_all, use_cache=True, **extra)
        rows = [(b, i) for b, c in enumerate(batch) for i in groups[c]]
        sel = torch.tensor([b for b, _ in rows], device=device)
        past = [tuple(t.index_select(0, sel) for t in layer) for layer in out.past_key_values]
        conts = [list(uniq[i][1])[:-1] for _, i in rows]
        tout = None
        if any(conts):
            tids, tmask = padded([x if x else [pad] for x in conts])
            tmask = tmask * torch.tensor([1 if x else 0 for x in conts], device=device)[:, None]
            tout = model(tids, attention_mask=torch.cat([cmask.index_select(0, sel), tmask], 1),
                         past_key_values=past, theta=theta, execute_all=execute_all, **extra)
        firsts = _rows(model, out, [(b, len(batch[b]) - 1, len(batch[b])) for b, _ in rows])
        rests = _rows(model, tout, [(r, 0, len(uniq[i][1]) - 1) for r, (_, i) in enumerate(rows)]) if tout else []
        for r, (_, i) in enumerate(rows):
            record(i, torch.cat([firsts[r], rests[r]], 0) if len(uniq[i][1]) > 1 else firsts[r])
    return [results[j] for j in order]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda k: values[k])  # first of ties, like numpy


def score_items(items: list[Item], lls: list[float]) -> list[dict]:
    """Per-item predictions from the flattened log-likelihoods (items' choices in order)."""
    out, pos = [], 0
    for it in items:
        ll = lls[pos:pos + it.n_choices]
        pos += it.n_choices
        norm = [v / max(len(t), 1) for v, t in zip(ll, it.norm_text)]
        pred, pred_norm = _argmax(ll), _argmax(norm)
        out.append({"gold": it.gold, "lls": [round(v, 6) for v in ll], "pred": pred, "pred_norm": pred_norm,
                    "acc": float(pred == it.gold), "acc_norm": float(pred_norm == it.gold)})
    return out


def summarize(per_item: list[dict]) -> dict:
    acc, acc_se = mean_stderr([p["acc"] for p in per_item])
    accn, accn_se = mean_stderr([p["acc_norm"] for p in per_item])
    return {"acc": acc, "acc_norm": accn, "acc_stderr": acc_se, "acc_norm_stderr": accn_se, "n": len(per_item)}


def evaluate_tasks(model, tasks: list[str], *, style: str = "harness", limit: int | None = None,
                   batch_size: int = 64, theta=None, progress: bool = True, tokenizer=None,
                   batch_tokens: int = 4096, done: dict[str, dict] | None = None,
                   on_task: Callable[[str, dict], None] | None = None) -> dict:
    """Per-task metrics, per-item scores, avg7 and the execution statistics of these forwards.

    A long run survives being stopped: `on_task(task, part)` gets each task's finished part (metrics,
    items, seconds, raw execution counters) as soon as it is scored, and `done` (task -> such a part)
    skips the tasks a stopped run already finished; the totals are the same as one uninterrupted run."""
    tokenizer = tokenizer or model.tokenizer
    docs = {t: load_docs(t, limit) for t in tasks}  # fail on missing data before any compute
    parts = dict(done or {})
    for t in tasks:
        if t in parts:
            continue
        t0 = time.time()
        model.reset_stats()
        items = build_items(t, docs[t], style)
        reqs = [(c, x) for it in items for c, x in zip(it.contexts, it.continuations)]
        lls = [ll for ll, _ in loglikelihood(model, tokenizer, reqs, batch_size, theta=theta,
                                              progress=progress, desc=t, batch_tokens=batch_tokens)]
        per_item = score_items(items, lls)
        for k, p in enumerate(per_item):
            p["idx"] = k
        parts[t] = {"result": {**summarize(per_item), "primary": PRIMARY[t]}, "items": per_item,
                    "seconds": round(time.time() - t0, 2), "stats": model.stats.state()}
        if on_task is not None:
            on_task(t, parts[t])
    model.reset_stats()
    for t in tasks:
        model.stats.merge(parts[t]["stats"])
    stats = model.execution_stats()
    results = {t: parts[t]["result"] for t in tasks}
    out = {"tasks": results, "style": style, "limit": limit, "items": {t: parts[t]["items"] for t in tasks},
           "seconds": {t: parts[t]["seconds"] for t in tasks},
           "realized_ratio": stats["execution_ratio"], "flops_fraction": stats["flops_fraction"],
           "layer_ratio": stats["layer_ratio"], "tokens": stats["tokens"]}
    if all(t in results for t in AVG7):
        out["avg7"] = sum(results[t][PRIMARY[t]] for t in AVG7) / len(AVG7)
        out["avg7_metric"] = {t: PRIMARY[t] for t in AVG7}
    return out


# ---- perplexity and KL -----------------------------------------------------------------------
def text_windows(text: str, tokenizer, window: int = 512, max_tokens: int | None = None) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) >= 2]


@torch.no_grad()
def perplexity_and_kl(model, text: str, *, theta=None, reference=None, window: int = 512,
                      batch_size: int = 4, tokenizer=None, max_tokens: int | None = None) -> dict:
    """Perplexity of `text` (its first `max_tokens` tokens, non-overlapping windows) and the mean
    per-token KL(P_ref || P_model) of next-token distributions, the reference being `reference`
    with every layer executed (default: the same model with execute_all=True)."""
    tokenizer = tokenizer or model.tokenizer
    wins = text_windows(text, tokenizer, window, max_tokens)
    if not wins:
        raise QtaleError("perplexity text is too short (needs at least 2 tokens)")
    ref_model = reference if reference is not None else model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device if hasattr(model, "parameters") else torch.device("cpu")
    nll = kl = 0.0
    count = 0
    model.reset_stats()
    for s in range(0, len(wins), batch_size):
        ids, mask = (t.to(device) for t in pad_tokens(wins[s:s + batch_size], pad))
        logp = F.log_softmax(model(ids, attention_mask=mask, theta=theta).logits[:, :-1].float(), -1)
        with model.stats.paused():  # the reference pass is not counted
            ref = F.log_softmax(ref_model(ids, attention_mask=mask, execute_all=True).logits[:, :-1].float(), -1)
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        tgt = ids[:, 1:]
        nll -= float(logp.gather(-1, tgt[..., None])[..., 0][valid].sum())
        kl += float((ref.exp() * (ref - logp)).sum(-1)[valid].sum())
        count += int(valid.sum())
    stats = model.execution_stats()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "kl": kl / count, "ppl_tokens": count,
            "ppl_realized_ratio": stats["execution_ratio"], "ppl_flops_fraction": stats["flops_fraction"]}


# ---- one evaluation of a checkpoint or an export ----------------------------------------------
@dataclass
class EvalConfig:
    """One evaluation (the defaults of `qtale eval`); theta wins over ratio when both are given."""
    tasks: str = ",".join(AVG7)  # comma-separated task names, or avg7
    ratio: float | None = None  # target execution ratio (its calibrated theta)
    theta: float | None = None  # router theta in [0, 1]
    limit: int | None = None  # first N items of every task
    batch_size: int = 64
    batch_tokens: int = 4096
    style: str = "harness"
    ppl: bool = True  # perplexity and KL on held-out text
    ppl_file: str | None = None  # None: the package's held-out paragraphs; "sciq": SciQ support paragraphs
    ppl_tokens: int | None = None
    reference: str | None = None  # all-layers KL reference; None: the model itself, every layer executed
    items: str | None = None  # per-item scores (JSON) written here
    force: bool = False  # replace an existing items file
    dtype: str | None = None  # see compute.place
    device: str | None = None
    progress: bool = True


def check_config(source, config: EvalConfig) -> list[str]:
    """The task names, after refusing bad settings in one line (before any model is loaded)."""
    tasks = parse_tasks(config.tasks)
    if config.limit is not None and config.limit <= 0:
        raise QtaleError(f"--limit must be a positive number of items, got {config.limit}")
    if config.batch_size is None or config.batch_size <= 0:
        raise QtaleError(f"--batch-size must be positive, got {config.batch_size}")
    if config.batch_tokens <= 0:
        raise QtaleError(f"--batch-tokens must be positive, got {config.batch_tokens}")
    if config.theta is not None and not 0.0 <= config.theta <= 1.0:
        raise QtaleError(f"--theta must be in [0, 1], got {config.theta}")
    if config.ratio is not None and not 0.0 < config.ratio <= 1.0:
        raise QtaleError(f"--ratio must be in (0, 1], got {config.ratio}")
    if config.ppl_file and config.ppl_file != SCIQ and not Path(config.ppl_file).is_file():
        raise QtaleError(f"--ppl-file not found: {config.ppl_file}")
    if config.ppl_tokens is not None and config.ppl_tokens < 2:
        raise QtaleError(f"--ppl-tokens must be at least 2, got {config.ppl_tokens}")
    if config.items is not None:  # before the evaluation, so its results are never lost to a bad path
        validate.output_file(config.items, "--items", force=config.force)
    folder = Path(source)
    if folder.is_dir() and not any((folder / n).is_file() for n in ("manifest.json", "qtale.json", "config.json")):
        raise QtaleError(f"{folder} is not an export folder (no manifest.json), a QTALE checkpoint (no "
                         "qtale.json) or a model folder (no config.json)")
    require("datasets", "pip install datasets (evaluation reads the task data with it)", "the 'datasets' package")
    data_root()
    return tasks


def evaluate_checkpoint(source, config: EvalConfig) -> dict:
    """Score a checkpoint, model name or export folder (through ONNX Runtime) on the tasks, plus
    perplexity/KL; the per-item scores go to `config.items` when set."""
    tasks = check_config(source, config)
    t0 = time.time()
    if is_export_dir(source):  # an export folder: the same scoring through ONNX Runtime
        model = ExportModel.open(source)  # QtaleError on a tampered file
        theta = model.theta_for(config.ratio, config.theta)  # QtaleError when not calibrated
        info = {"backend": ExportModel.backend, "precision": model.precision,
                "quantization": model.precision if precision_spec(model.precision).quantized else None}
    else:
        model = load(source, dtype=config.dtype, device=config.device, fold=True)
        if config.ratio is not None:
            theta = model.set_ratio(config.ratio)  # QtaleError when the ratio is not calibrated
        elif config.theta is not None:
            model.set_theta(config.theta)
            theta = model.theta
        else:
            theta = model.theta
        info = {"backend": "pytorch", "quantization": (model.quantization_info or {}).get("format"),
                "dtype": config.dtype or "float32"}
    res = evaluate_tasks(model, tasks, style=config.style, limit=config.limit, batch_size=config.batch_size,
                         theta=theta, progress=config.progress, batch_tokens=config.batch_tokens)
    items = res.pop("items")
    out = {"checkpoint": str(source), "theta": theta, "ratio": config.ratio, **info, **res}
    if out.get("flops_fraction") is None:
        out.pop("flops_fraction", None)
        out["flops_fraction_note"] = "not computed: the export's graph does not show the MLP width"
    if config.ppl:
        text, ppl_source = heldout_text(config.ppl_file)
        reference = (load(config.reference, dtype=config.dtype, device=config.device, fold=True)
                     if config.reference else None)
        out.update(perplexity_and_kl(model, text, theta=theta, reference=reference, max_tokens=config.ppl_tokens))
        out["ppl_file"] = ppl_source
        out["kl_reference"] = str(config.reference) if config.reference else "same model, all layers"
    out["seconds_total"] = round(time.time() - t0, 2)
    if config.items:
        write_json(Path(config.items), {"tasks": tasks, "style": config.style, "items": items}, indent=None)
        out["items_file"] = str(config.items)
    return out
