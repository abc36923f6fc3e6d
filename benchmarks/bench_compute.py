#!/usr/bin/env python
"""Training step time and evaluation items/s, before and after the compute work of issue #10,
measured side by side in one run (rounds interleaved, so machine noise hits both alike).

  train  before: float32 base weights          after: bfloat16 base weights (routers float32)
         (same step: LoRA + routers, self-distillation with the teacher forward, B x T tokens)
         after_cached: bfloat16, the teacher's hidden states read from teacher.TeacherCache (what
         the second method of an experiment and any rerun on the same batches get)
  eval   before: float32, fake-quant INT4 weights re-quantized every forward, LM head on every
                 position, fixed batches of 16 sequences
         after:  the INT4 weights folded once, LM head only at the scored positions, batches by
                 a token budget, longest first; in float32 (exact) and in bfloat16 (approximate)
         (the same items of a few tasks; the scores and predictions are compared, not only timed)

    python benchmarks/bench_compute.py --items 64 --tasks hellaswag,boolq --steps 3 --out benchmarks/results

Prints a table of ratios and writes bench_compute.json; absolute times on a shared machine are not
comparable across runs, the ratios are the result.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qtale_export.errors import QtaleError  # noqa: E402


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f")))


def train_step_seconds(model, batch: dict, dtype: torch.dtype, cache=None) -> float:
    """One distillation step; with `cache` (a warm teacher.TeacherCache) the teacher's output is
    read from disk and only the LM head runs on it, as for the second method of an experiment."""
    from qtale_export.teacher import adapters_off
    from qtale_export.train import distill_loss, ratio_loss

    model.base.to(dtype)
    model.train()
    t0 = time.perf_counter()
    vf = batch["attention_mask"].float()
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    if cache is not None:
        teacher = model.head(cache.hidden(model, batch, step=0))
    else:
        with torch.no_grad(), adapters_off(model):
            teacher = model(batch["input_ids"], attention_mask=batch["attention_mask"], execute_all=True).logits
    loss = distill_loss(out.logits, teacher, vf) + ratio_loss(out.gates, vf, 0.6)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def bench_train(args, rounds: list[dict]) -> dict:
    import tempfile

    from qtale_export.teacher import TeacherCache
    from qtale_export.train import TrainConfig, build_model

    model = build_model(TrainConfig(model=args.model, data=["-"], lora_rank=args.lora_rank))
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(3, model.hf_config.vocab_size, (args.batch, args.seq_len), generator=g)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    times = {"before": [], "after": [], "after_cached": []}
    with tempfile.TemporaryDirectory() as tmp:
        model.base.to(torch.bfloat16)
        cache = TeacherCache(tmp, {"bench": "bf16"})
        cache.hidden(model, batch, step=0)  # stored once, as the first method of an experiment does
        paths = (("before", torch.float32, None), ("after", torch.bfloat16, None),
                 ("after_cached", torch.bfloat16, cache))
        for _, dt, c in paths:  # warm-up: first calls allocate and pick kernels
            train_step_seconds(model, batch, dt, c)
        for r in range(args.steps):
            for name, dt, c in paths:
                s = train_step_seconds(model, batch, dt, c)
                times[name].append(s)
                rounds.append({"bench": "train", "round": r, "path": name, "seconds": round(s, 4)})
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tokens_per_step": args.batch * args.seq_len, "before_s": med["before"], "after_s": med["after"],
            "after_cached_s": med["after_cached"], "speedup": med["before"] / med["after"],
            "speedup_cached": med["before"] / med["after_cached"]}


def bench_eval(args, rounds: list[dict]) -> dict:
    """Three paths on the same requests: the old one, the new one in float32 (exact: same scores),
    and the new one in bfloat16 (faster, approximate: its scores and predictions are compared)."""
    import qtale_export
    from qtale_export import evaluate as E
    from qtale_export import quantize as Q
    from qtale_export.compute import place
    from qtale_export.tasks import build_items, load_docs

    models = {}
    for name in ("before", "after_fp32", "after_bf16"):
        m = qtale_export.load(args.model)
        Q.quantize(m, "int4", None, m.tokenizer)  # RTN grid: no calibration time in the benchmark
        if name == "after_fp32":
            Q.fold(m)
        if name == "after_bf16":
            place(m, "bfloat16", "cpu")  # folds the fake-quant weights, then casts
        m.set_theta(args.theta)
        models[name] = m
    items, reqs = [], []
    for t in args.tasks.split(","):
        its = build_items(t, load_docs(t, args.items))
        items += its
        reqs += [(c, x) for it in its for c, x in zip(it.contexts, it.continuations)]

    def run(name):
        m = models[name]
        if name == "before":
            return E.loglikelihood(m, m.tokenizer, reqs, batch_size=16, progress=False, batch_tokens=10**9,
                                   head_at_scored=False)
        return E.loglikelihood(m, m.tokenizer, reqs, batch_size=64, progress=False, batch_tokens=args.batch_tokens)

    times = {k: [] for k in models}
    scores = {}
    for r in range(args.eval_rounds):
        for name in models:
            t0 = time.perf_counter()
            scores[name] = [ll for ll, _ in run(name)]
            s = time.perf_counter() - t0
            times[name].append(s)
            rounds.append({"bench": "eval", "round": r, "path": name, "seconds": round(s, 3)})
    med = {k: statistics.median(v) for k, v in times.items()}
    preds = {k: [p["pred"] for p in E.score_items(items, v)] for k, v in scores.items()}
    out = {"items": len(items), "requests": len(reqs)}
    for name in models:
        diff = [abs(a - b) for a, b in zip(scores["before"], scores[name])]
        out[name] = {"items_per_s": len(items) / med[name], "speedup": med["before"] / med[name],
                     "loglik_abs_diff_median": statistics.median(diff), "loglik_abs_diff_max": max(diff),
                     "same_prediction": sum(a == b for a, b in zip(preds["before"], preds[name])) / len(items)}
    out["full_set_minutes_bf16"] = 9698 / out["after_bf16"]["items_per_s"] / 60
    out["full_set_minutes_fp32"] = 9698 / out["after_fp32"]["items_per_s"] / 60
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_compute", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per path")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--tasks", default="hellaswag,boolq")
    p.add_argument("--items", type=int, default=64, help="first N items per task (a subset: timing only)")
    p.add_argument("--eval-rounds", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--theta", type=float, default=0.5)
    p.add_argument("--only", choices=["train", "eval"], default=None)
    p.add_argument("--out", default=None, help="folder for bench_compute.json")
    args = p.parse_args(argv)
    rounds: list[dict] = []
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__}}
    try:
        if args.only in (None, "train"):
            report["train"] = bench_train(args, rounds)
        if args.only in (None, "eval"):
            report["eval"] = bench_eval(args, rounds)
    except QtaleError as exc:
        print(f"bench_compute: error: {exc}", file=sys.stderr)
        return 2
    report["rounds"] = rounds
    from rich.console import Console
    from rich.table import Table

    table = Table(title="compute before/after (medians of interleaved rounds)")
    for c in ("bench", "before", "after", "speedup"):
        table.add_column(c)
    if "train" in report:
        t = report["train"]
        table.add_row(f"train step ({t['tokens_per_step']} tok)", f"{t['before_s']:.2f} s", f"{t['after_s']:.2f} s",
                      f"{t['speedup']:.2f}x")
        table.add_row("train step, teacher from the cache (2nd method)", f"{t['before_s']:.2f} s",
                      f"{t['after_cached_s']:.2f} s", f"{t['speedup_cached']:.2f}x")
    if "eval" in report:
        e = report["eval"]
        for name in ("after_fp32", "after_bf16"):
            table.add_row(f"eval, {name} ({e['items']} items, subset)", f"{e['before']['items_per_s']:.2f} items/s",
                          f"{e[name]['items_per_s']:.2f} items/s", f"{e[name]['speedup']:.2f}x")
    Console().print(table)
    if "eval" in report:
        e = report["eval"]
        for name in ("after_fp32", "after_bf16"):
            d = e[name]
            print(f"{name}: log-likelihood |before - {name}| median {d['loglik_abs_diff_median']:.2e}, max "
                  f"{d['loglik_abs_diff_max']:.2e}; same prediction on {100 * d['same_prediction']:.1f}% of items")
        print(f"full 9,698-item set at these rates: fp32 {e['full_set_minutes_fp32']:.1f} min, "
              f"bf16 {e['full_set_minutes_bf16']:.1f} min")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = f"bench_compute_{args.only}.json" if args.only else "bench_compute.json"  # a part keeps the whole
        (Path(args.out) / name).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
