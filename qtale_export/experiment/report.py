"""The results: paired statistics, the headline, and their renderings (results.md, results.png,
the console table and the README block). Reads the eval stage's files; writes nothing but the plot
and the README it is given."""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

from .. import safe_write
from ..errors import QtaleError
from ..deploy.theta import ratio_key
from ..stats import mean_stderr
from .layout import Run, configurations, read_json, write_text

SCHEMA = "qtale-results/1"
CLOSE_POINTS = 0.5  # "gap closed": within 0.5 accuracy points of the quant-only all-layers model
HEADLINE_MAX_RATIO = 0.7  # the claim: QTALE+INT4 within CLOSE_POINTS of INT4 all-layers at ratio <= 0.7
# BoolQ's two answers are "no"/"yes" (choice 1 = yes). A 135M model's accuracy there follows its
# answer prior (the dense model says "no" to 96% of the items and scores below the 62% majority),
# so a routed or quantized model that flips to "yes" gains 10-20 points on one task without
# answering better. Every gap is therefore also given without BoolQ, and each configuration's
# "yes" rate is reported, so such a flip is visible instead of hidden in avg7.
PRIOR_TASK = "boolq"


# ---- statistics ------------------------------------------------------------------------------
def paired(items_a: dict, items_b: dict, tasks: list[str]) -> dict:
    """Paired difference a - b of the primary metric on the same items, per task and averaged."""
    return pooled([(items_a, items_b)], tasks)


def pooled(pairs: list[tuple[dict, dict]], tasks: list[str]) -> dict:
    """The paired difference a - b averaged over several comparisons on the same items (one test
    over ratios): each item's mean difference across the pairs, then its mean and standard error
    per task and the task average, so the correlation between comparisons on one item is kept."""
    from ..tasks import PRIMARY

    per = {}
    for t in tasks:
        metric = PRIMARY[t]
        sums: dict | None = None
        for items_a, items_b in pairs:
            a = {it["idx"]: it[metric] for it in items_a.get(t, [])}
            b = {it["idx"]: it[metric] for it in items_b.get(t, [])}
            d = {i: a[i] - b[i] for i in a.keys() & b.keys()}
            sums = d if sums is None else {i: sums[i] + d[i] for i in sums.keys() & d.keys()}
        common = sorted(sums or {})
        diff, stderr = mean_stderr([sums[i] / len(pairs) for i in common])
        per[t] = {"diff": diff, "stderr": stderr, "n": len(common), "metric": metric}
    diffs = [per[t]["diff"] for t in tasks]
    avg = {"diff": sum(diffs) / len(diffs), "stderr": math.sqrt(sum(per[t]["stderr"] ** 2 for t in tasks)) / len(tasks)}
    return {"tasks": per, "avg": avg}


def _without_prior(tasks: list[str]) -> list[str] | None:
    """The tasks other than PRIOR_TASK, or None when it is not one of several tasks."""
    rest = [t for t in tasks if t != PRIOR_TASK]
    return rest if rest and len(rest) < len(tasks) else None


def paired_robust(a: dict, b: dict, tasks: list[str]) -> dict:
    """paired(a, b) plus the task average without PRIOR_TASK (when it is one of several tasks)."""
    p = paired(a, b, tasks)
    if rest := _without_prior(tasks):
        p["avg_without_" + PRIOR_TASK] = paired(a, b, rest)["avg"]
    return p


def pooled_robust(pairs: list[tuple[dict, dict]], tasks: list[str]) -> dict:
    """pooled(pairs)'s task average, plus the same without PRIOR_TASK (when it is one of several tasks)."""
    p = dict(pooled(pairs, tasks)["avg"])
    if rest := _without_prior(tasks):
        p["without_" + PRIOR_TASK] = pooled(pairs, rest)["avg"]
    return p


def _shows_prior(res: dict) -> bool:
    """Whether a results document gets the PRIOR_TASK columns (older results lack their fields)."""
    return PRIOR_TASK in res["tasks"] and len(res["tasks"]) > 1 and PRIOR_TASK + "_gold_yes_rate" in res


def yes_rate(items: dict) -> float | None:
    """The fraction of PRIOR_TASK items answered "yes" (choice 1); None when it was not evaluated."""
    preds = [it["pred"] for it in items.get(PRIOR_TASK, [])]
    return sum(1 for p in preds if p == 1) / len(preds) if preds else None


def gold_yes_rate(items: dict[str, dict]) -> float | None:
    """The fraction of the evaluated PRIOR_TASK items whose gold answer is "yes" (any configuration's)."""
    for per in items.values():
        golds = [it["gold"] for it in per.get(PRIOR_TASK, [])]
        if golds:
            return sum(1 for g in golds if g == 1) / len(golds)
    return None


def eval_pairs(dir_a: Path, dir_b: Path, tasks: list[str]) -> list[tuple[dict, dict]]:
    """The eval files of every configuration in both folders (two recipes, or two runs of one),
    checked to hold the same items: [(file a, file b)], sorted by file name."""
    out = []
    for fa in sorted(Path(dir_a).glob("*.json.gz")):
        fb = Path(dir_b) / fa.name
        if not fb.is_file():
            continue
        a, b = read_json(fa), read_json(fb)
        if a.get("limit") != b.get("limit") or a.get("style") != b.get("style"):
            raise QtaleError(f"{fa.name}: not the same items (limit/style {a.get('limit')}/{a.get('style')} "
                             f"vs {b.get('limit')}/{b.get('style')})")
        missing = [t for t in tasks if t not in a["items"] or t not in b["items"]]
        if missing:
            raise QtaleError(f"{fa.name}: tasks {', '.join(missing)} not in both files")
        out.append((a, b))
    return out


def compare_eval_dirs(dir_a: Path, dir_b: Path, tasks: list[str], pool: str | None = None) -> dict:
    """Paired differences a - b per configuration evaluated in both eval folders, and (with `pool`,
    a shell pattern of configuration ids such as 'qtale/int4-awq/*') one pooled test over the
    matching ones: whether a candidate recipe beats the shipped one, item by item rather than by
    two averages."""
    from fnmatch import fnmatchcase

    pairs = eval_pairs(dir_a, dir_b, tasks)
    rows = [{"id": a["id"], "kl_a": a.get("kl"), "kl_b": b.get("kl"), "realized_a": a.get("realized_ratio"),
             "realized_b": b.get("realized_ratio"), **paired_robust(a["items"], b["items"], tasks)} for a, b in pairs]
    out: dict = {"rows": rows}
    if pool:
        chosen = [(a["items"], b["items"]) for a, b in pairs if fnmatchcase(a["id"], pool)]
        if chosen:
            out["pooled"] = {"pattern": pool, "ids": [a["id"] for a, _ in pairs if fnmatchcase(a["id"], pool)],
                             **pooled_robust(chosen, tasks)}
    return out


def _summary(res: dict, tasks: list[str]) -> dict:
    from ..tasks import AVG7, PRIMARY

    prim = [res["tasks"][t][PRIMARY[t]] for t in tasks]
    ses = [res["tasks"][t][PRIMARY[t] + "_stderr"] for t in tasks]
    out = {"avg": sum(prim) / len(prim), "avg_stderr": math.sqrt(sum(s * s for s in ses)) / len(ses),
           "avg_tasks": len(tasks)}
    if all(t in tasks for t in AVG7):
        out["avg7"] = sum(res["tasks"][t][PRIMARY[t]] for t in AVG7) / len(AVG7)
    return out


RESULT_FIELDS = ("realized_ratio", "flops_fraction", "tokens", "ppl", "nll", "kl", "ppl_tokens",
                 "ppl_realized_ratio", "ppl_flops_fraction", "kl_reference", "seconds", "seconds_total")


def collect(run: Run) -> tuple[list[dict], dict[str, dict]]:
    """Every configuration's result (without per-item scores) and the per-item scores by id."""
    tasks = run.r["eval"]["tasks"]
    results, items = [], {}
    cfgs = configurations(run)
    raw = {}
    for c in cfgs:
        if c.get("same_as"):
            continue
        path = run.eval_file(c["id"])
        if path.is_file():
            raw[c["id"]] = read_json(path)
    if not raw:
        raise QtaleError(f"no evaluation results in {run.eval_dir()}: run the 'eval' stage first")
    run.pending = [c["id"] for c in cfgs if (c.get("same_as") or c["id"]) not in raw]
    for c in cfgs:
        if (c.get("same_as") or c["id"]) not in raw:
            continue
        src = raw[c.get("same_as") or c["id"]]
        items[c["id"]] = src["items"]
        entry = {k: c[k] for k in ("id", "kind", "method", "format", "target_ratio")}
        entry["theta"] = 0.0 if c.get("same_as") else src["theta"]
        entry["same_as"] = c.get("same_as")
        entry["tasks"] = src["tasks"]
        entry.update(_summary(src, tasks))
        entry.update({k: src[k] for k in RESULT_FIELDS if k in src})
        entry["layer_ratio"] = src.get("layer_ratio")
        entry[PRIOR_TASK + "_yes_rate"] = yes_rate(src["items"])
        results.append(entry)
    ids = {e["id"]: e for e in results}
    for e in results:
        if e["kind"] == "quant-only" and "dense/fp" in items:
            e["vs_dense"] = paired_robust(items[e["id"]], items["dense/fp"], tasks)
        if e["kind"] in ("routed", "routed-fixed", "layer-drop"):
            ref = "dense/fp" if e["format"] == "fp" else f"quant-only/{e['format']}"
            if ref in items:
                e["vs_quant_only" if e["format"] != "fp" else "vs_dense"] = {
                    "reference": ref, **paired_robust(items[e["id"]], items[ref], tasks)}
            other = f"dllm/{e['format']}/{ratio_key(e['target_ratio'])}" if e["target_ratio"] else None
            if e["method"] == "qtale" and other in ids:
                e["vs_dllm"] = {"reference": other, **paired_robust(items[e["id"]], items[other], tasks)}
        if "vs_dense" in e and "reference" not in e["vs_dense"]:
            e["vs_dense"] = {"reference": "dense/fp", **e["vs_dense"]}
    return results, items


def headline(run: Run, results: list[dict], items: dict[str, dict]) -> dict:
    ids = {e["id"]: e for e in results}
    fmts = run.r["quantization"]["formats"]
    out: dict = {"units": "accuracy fractions (x100 = points); gap = paired difference in the task average"}
    int4 = next((f for f in fmts if f.startswith("int4")), None)
    if int4 and "qtale" in run.r["methods"]:
        rows = []
        for r in run.r["ratios"]:
            if r > HEADLINE_MAX_RATIO:
                continue
            q = ids.get(f"qtale/{int4}/{ratio_key(r)}")
            if not q or "vs_quant_only" not in q:
                continue
            row = {"ratio": r, "realized_ratio": q.get("realized_ratio"), "avg": q["avg"],
                   "gap_vs_quant_only": q["vs_quant_only"]["avg"]}
            if "avg_without_" + PRIOR_TASK in q["vs_quant_only"]:
                row["gap_vs_quant_only_without_" + PRIOR_TASK] = q["vs_quant_only"]["avg_without_" + PRIOR_TASK]
            if "vs_dllm" in q:
                row["gap_vs_dllm"] = q["vs_dllm"]["avg"]
            rows.append(row)
        out[f"qtale_{int4}_at_ratio_le_{HEADLINE_MAX_RATIO:g}"] = rows
    for f in fmts:
        if not (f.startswith("int3") or f == int4):
            continue
        for m in run.r["methods"]:
            if not any("vs_quant_only" in ids.get(f"{m}/{f}/{ratio_key(r)}", {}) for r in run.r["ratios"]):
                continue  # not evaluated yet, or its all-layers reference is not: no claim either way
            for key, gap in (("avg", f"{m}_{f}_gap_closes_at_ratio"),
                             ("avg_without_" + PRIOR_TASK, f"{m}_{f}_gap_closes_at_ratio_without_{PRIOR_TASK}")):
                evaluated = [ids.get(f"{m}/{f}/{ratio_key(r)}", {}).get("vs_quant_only") for r in run.r["ratios"]]
                if key != "avg" and not any(e and key in e for e in evaluated):
                    continue
                out[gap] = next((r for r, e in zip(run.r["ratios"], evaluated)
                                 if e and key in e and e[key]["diff"] >= -CLOSE_POINTS / 100), None)
    if "qtale" in run.r["methods"] and "dllm" in run.r["methods"]:
        tasks = run.r["eval"]["tasks"]
        for f in fmts:  # does the entropy term pay? one test over every ratio both methods were evaluated at
            both = [r for r in run.r["ratios"] if r < 1 and all(
                f"{m}/{f}/{ratio_key(r)}" in items for m in ("qtale", "dllm"))]
            if len(both) > 1:
                pairs = [(items[f"qtale/{f}/{ratio_key(r)}"], items[f"dllm/{f}/{ratio_key(r)}"]) for r in both]
                out[f"qtale_vs_dllm_{f}_pooled"] = {"ratios": both, **pooled_robust(pairs, tasks)}
    out["close_threshold_points"] = CLOSE_POINTS
    return out


def machine() -> dict:
    """The machine the report was made on (versions, CPU, GPU)."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _pct(x, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def _diff(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{100 * d['diff']:+.2f} ± {100 * d['stderr']:.2f}"


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def render_headline(res: dict) -> list[str]:
    """The headline section's bullet lines (results.md, the console report, the README block)."""
    h = res["headline"]
    lines = []
    for key, value in h.items():
        if isinstance(value, list):
            for row in value:
                line = (f"- QTALE+{key.split('_')[1]} at ratio {row['ratio']:g} (realized {_fmt(row['realized_ratio'], '.3f')}): "
                     f"{_pct(row['avg'])} points; gap vs quant-only all-layers {_diff(row['gap_vs_quant_only'])}")
                if "gap_vs_quant_only_without_" + PRIOR_TASK in row:
                    line += f" (without {PRIOR_TASK}: {_diff(row['gap_vs_quant_only_without_' + PRIOR_TASK])})"
                if "gap_vs_dllm" in row:
                    line += f"; vs D-LLM at the same ratio {_diff(row['gap_vs_dllm'])}"
                lines.append(line)
        elif key.startswith("qtale_vs_dllm_") and key.endswith("_pooled"):
            fmt = key[len("qtale_vs_dllm_"):-len("_pooled")]
            lines.append(f"- QTALE - D-LLM ({fmt}), pooled over ratios {', '.join(f'{r:g}' for r in value['ratios'])} "
                         f"(each item's mean difference): {_diff(value)}"
                         + (f" (without {PRIOR_TASK}: {_diff(value['without_' + PRIOR_TASK])})"
                            if "without_" + PRIOR_TASK in value else ""))
        elif key.endswith("_gap_closes_at_ratio"):
            method, fmt = key.split("_")[:2]
            lines.append(f"- {method.upper() if method == 'qtale' else 'D-LLM'}+{fmt}: gap to quant-only all-layers within "
                         f"{h['close_threshold_points']} points from ratio "
                         + (f"{value:g}" if value is not None else "— never (at the ratios evaluated)")
                         + (f" (without {PRIOR_TASK}: " + (f"from ratio {h[key + '_without_' + PRIOR_TASK]:g})"
                                                           if h[key + "_without_" + PRIOR_TASK] is not None else "never)")
                            if key + "_without_" + PRIOR_TASK in h else ""))
    return lines


def _sizes(res: dict) -> str:
    return ", ".join(f"{task} {size}" for task, size in (res.get("validation_sizes") or {}).items())


def render_markdown(res: dict) -> str:
    from ..tasks import PRIMARY

    tasks = res["tasks"]
    avg_name = "avg7" if len(tasks) == 7 and res["configs"] and "avg7" in res["configs"][0] else f"avg{len(tasks)}"
    prior = _shows_prior(res)
    lines = [f"# QTALE experiment results: {res['recipe']['name']}", "",
             "Generated by `qtale experiment` from `docs/results.json`; do not edit by hand.", ""]
    if res.get("subset"):
        lines += [f"**Subset run: every task limited to its first {res['limit']} validation items "
                  f"(full validation sets: {_sizes(res)}).** Standard errors and paired differences are those of "
                  "the subset.", ""]
    lines += ["Command:", "", "```bash", res["command"], "```", "",
              f"Model `{res['recipe']['model']}`; methods {', '.join(res['recipe']['methods'])}; "
              f"ratios {', '.join(str(r) for r in res['recipe']['ratios'])}; formats "
              f"{', '.join(res['recipe']['quantization']['formats'])}; prompt style `{res['style']}`; "
              f"tasks {', '.join(tasks)} (primary metric: " + ", ".join(f"{task} {PRIMARY[task]}" for task in tasks) + ").",
              "", f"All-layers reference: {res['reference']}", "",
              "Accuracies in points (%). Δ = paired difference on the same items vs the all-layers model of the "
              "same format (quant-only; dense fp for fp rows), ± its standard error. theta re-calibrated after "
              "quantization for both routed methods."
              + (f" Δ without {PRIOR_TASK} and the {PRIOR_TASK} \"yes\" rate (the share of its items answered "
                 f"\"yes\"; {_pct(res.get(PRIOR_TASK + '_gold_yes_rate'), 1)}% of the gold answers are \"yes\" where known): "
                 f"at this model size {PRIOR_TASK} accuracy follows the answer prior, so a flip of that prior "
                 "moves avg7 without better answers." if prior else ""), "",
              "| configuration | target ratio | realized ratio | FLOPs frac. | " + " | ".join(tasks)
              + f" | {avg_name} | Δ vs all-layers |" + (f" Δ without {PRIOR_TASK} |" if prior else "")
              + " Δ vs D-LLM | ppl | KL |" + (f" {PRIOR_TASK} yes |" if prior else ""),
              "|" + "---|" * (len(tasks) + 9 + 2 * prior)]
    for config in res["configs"]:
        delta = config.get("vs_quant_only") or config.get("vs_dense")
        cells = [config["id"] + (f" (= {config['same_as']})" if config.get("same_as") else ""),
                 "—" if config["target_ratio"] is None else f"{config['target_ratio']:g}",
                 _fmt(config.get("realized_ratio")), _fmt(config.get("flops_fraction"))]
        cells += [_pct(config["tasks"][task][PRIMARY[task]], 1) for task in tasks]
        cells += [_pct(config.get("avg7", config["avg"])), _diff(delta["avg"] if delta else None)]
        if prior:
            cells.append(_diff(delta.get("avg_without_" + PRIOR_TASK) if delta else None))
        cells += [_diff(config["vs_dllm"]["avg"] if config.get("vs_dllm") else None),
                  _fmt(config.get("ppl"), ".3f"), _fmt(config.get("kl"), ".4f")]
        if prior:
            cells.append(_pct(config.get(PRIOR_TASK + "_yes_rate"), 1))
        lines.append("| " + " | ".join(cells) + " |")
    if res.get("pending"):
        lines += [f"**Not evaluated yet ({len(res['pending'])} configurations):** "
                  + ", ".join(f"`{p}`" for p in res["pending"]) + ". `qtale experiment RECIPE --resume "
                  "--only eval` adds them (per-configuration files under `docs/eval/`).", ""]
    lines += ["", "## Headline", ""] + [f"- **{x}**" for x in res.get("training_ratio_failures") or []]
    lines += render_headline(res)
    lines += ["", "## Calibration after quantization", "",
              "| method | format | ratio | theta (fp) | realized (fp) | realized on the quantized model at theta (fp) "
              "| theta (re-calibrated) | realized |", "|---|---|---|---|---|---|---|---|"]
    for method, per in res["calibration"].items():
        for fmt, calib in per.items():
            if fmt == "fp":
                continue
            for ratio, entry in sorted(calib["table"].items(), key=lambda item: float(item[0])):
                drift = calib.get("drift", {}).get(ratio, {})
                lines.append(f"| {method} | {fmt} | {ratio} | {_fmt(drift.get('theta_fp'))} | {_fmt(drift.get('realized_fp'))} | "
                             f"{_fmt(drift.get('realized_at_theta_fp'))} | {entry['theta']:.4f} | {entry['realized']:.4f} |")
    lines += ["", "## Training", "", "| run | steps | seconds | final losses |", "|---|---|---|---|"]
    for method, run in res["training"].items():
        lines.append(f"| {method} | {run.get('steps_done')} | {_fmt(run.get('seconds'), '.0f')} | "
                     + ", ".join(f"{name} {value:.4g}" for name, value in (run.get("final_losses") or {}).items()) + " |")
    lines += ["", "## Recipe", "", "```json", json.dumps(res["recipe"], indent=2), "```", "",
              "## Timings (seconds, this machine)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in res["timings"].items()]
    lines += ["", "## Machine", ""] + [f"- {key}: {value}" for key, value in res["machine"].items()]
    lines += ["", f"Created {res['created']}. Plot: `results.png`. Every number: `results.json`.", ""]
    return "\n".join(lines)


def render_plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = res["configs"]
    fmts = res["recipe"]["quantization"]["formats"]
    colors = {fmt: color for fmt, color in zip(["fp"] + fmts, ["black", "tab:blue", "tab:red", "tab:green", "tab:purple",
                                                   "tab:orange"])}
    n = len(res["tasks"])
    label = "avg7" if n == 7 else f"average of {n} tasks"
    # accuracy (left) and KL to the dense model (right): at a few hundred items per task accuracy
    # differences are noisy, KL on the same held-out tokens is the sensitive measure
    fig, (ax, kx) = plt.subplots(1, 2, figsize=(13, 5))
    has_kl = any(config.get("kl") is not None for config in cfgs)
    for config in cfgs:
        if config["kind"] == "dense":
            ax.axhline(100 * config["avg"], color="black", lw=1.2, label="dense all-layers (fp)")
        elif config["kind"] == "quant-only":
            color = colors.get(config["format"], "gray")
            ax.axhline(100 * config["avg"], color=color, lw=1, ls=":", label=f"{config['format']} all-layers (quant-only)")
            ax.plot([config.get("realized_ratio") or 1.0], [100 * config["avg"]], marker="*", color=color, ms=10, ls="none")
            if config.get("kl") is not None:
                kx.axhline(config["kl"], color=color, lw=1, ls=":", label=f"{config['format']} all-layers (quant-only)")
    def xpos(config):  # the compute the configuration spends, relative to the dense model
        return config.get("flops_fraction") or config.get("realized_ratio") or config["target_ratio"] or 1.0

    series = [(f"{'QTALE' if method == 'qtale' else 'D-LLM'} + {{fmt}}", marker, ls,
               lambda config, method=method: config["kind"] == "routed" and config["method"] == method)
              for method, marker, ls in (("qtale", "o", "-"), ("dllm", "s", "--"))]
    series += [("D-LLM + {fmt}, theta 0.5 (own operating point)", "D", "none", lambda config: config["kind"] == "routed-fixed"),
               ("static layer drop + {fmt}", "x", ":", lambda config: config["kind"] == "layer-drop")]
    for name_t, marker, ls, pick in series:
        for fmt in ["fp"] + fmts:
            rows = sorted(((xpos(config), config) for config in cfgs if pick(config) and config["format"] == fmt), key=lambda item: item[0])
            if not rows:
                continue
            name = name_t.format(fmt=fmt)
            xs = [x for x, _ in rows]
            ax.errorbar(xs, [100 * config["avg"] for _, config in rows], yerr=[100 * config.get("avg_stderr", 0.0) for _, config in rows],
                        marker=marker, ls=ls, color=colors.get(fmt, "gray"), capsize=2, lw=1.4, elinewidth=0.7,
                        label=name)
            kl = [(x, config["kl"]) for x, config in rows if config.get("kl") is not None and config["kl"] > 0]
            if kl:
                kx.plot([x for x, _ in kl], [k for _, k in kl], marker=marker, ls=ls, color=colors.get(fmt, "gray"),
                        lw=1.4, label=name)
    ax.set_xlabel("FLOPs fraction of the dense model (on the evaluation tokens)")
    ax.set_ylabel(f"{label} accuracy (%)")
    title = f"{res['recipe']['name']}: {label} vs FLOPs"
    if res.get("subset"):
        title += f" (first {res['limit']} items/task)"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    kx.set_xlabel("FLOPs fraction of the dense model (on the evaluation tokens)")
    kx.set_ylabel("KL(dense || model) per token, nats")
    kx.set_title("KL to the dense all-layers model on the held-out text", fontsize=10)
    if has_kl:
        kx.set_yscale("log")
        kx.legend(fontsize=7, loc="upper right")
    kx.grid(alpha=0.3, which="both")
    fig.tight_layout()
    try:
        with safe_write.temporary(path, suffix=".png") as tmp:  # savefig picks the format by suffix
            fig.savefig(tmp, dpi=120)
            os.replace(tmp, path)
    finally:
        plt.close(fig)


def ratio_failures(training: dict) -> list[str]:
    """One line per trained method whose realized training ratio missed its target Omega."""
    out = []
    for method, info in training.items():
        reached = info.get("ratio_reached")
        if method != "reference" and reached and not reached["within"]:
            out.append(f"TRAINING MISSED ITS RATIO: {method} ended at {reached['mean_last']:.3f} (mean of the last "
                       f"{reached['steps']} steps), target {reached['target']:g} ± {reached['tolerance']:g}")
    return out


def print_report(run: Run, res: dict) -> None:
    from rich.table import Table

    tasks = res["tasks"]
    table = Table(title=f"{res['recipe']['name']}: {'avg7' if len(tasks) == 7 else f'avg of {len(tasks)} tasks'}"
                  + (f" (first {res['limit']} items/task)" if res["subset"] else "") + ", points; per task: results.md")
    prior = _shows_prior(res)
    columns = ["configuration", "ratio", "realized", "FLOPs", "avg", "Δ all-layers"]
    columns += [f"Δ w/o {PRIOR_TASK}"] * prior + ["Δ D-LLM", "ppl", "KL"] + [f"{PRIOR_TASK} yes"] * prior
    for column in columns:
        table.add_column(column, no_wrap=column == "configuration")
    for config in res["configs"]:
        delta = config.get("vs_quant_only") or config.get("vs_dense")
        cells = [config["id"], "—" if config["target_ratio"] is None else f"{config['target_ratio']:g}",
                 _fmt(config.get("realized_ratio"), ".3f"), _fmt(config.get("flops_fraction"), ".3f"), _pct(config["avg"]),
                 _diff(delta["avg"] if delta else None)]
        cells += [_diff(delta.get("avg_without_" + PRIOR_TASK) if delta else None)] * prior
        cells += [_diff(config["vs_dllm"]["avg"] if config.get("vs_dllm") else None), _fmt(config.get("ppl"), ".2f"),
                  _fmt(config.get("kl"), ".4f")]
        cells += [_pct(config.get(PRIOR_TASK + "_yes_rate"), 1)] * prior
        table.add_row(*cells)
    run.console.print(table)
    for line in res.get("training_ratio_failures") or []:
        run.console.print(f"[bold red]{line}[/]")
    for line in render_headline(res):
        run.console.print(line, markup=False)


# ---- the README's results block -------------------------------------------------------------
README_BEGIN = "<!-- results:begin (generated by qtale experiment --only ship from docs/results.json) -->"
README_END = "<!-- results:end -->"


def render_readme_block(res: dict, results_sha256: str) -> str:
    """The README's summary of docs/results.json: every number in it is a field of that file."""
    tasks = res["tasks"]
    avg_name = "avg7" if len(tasks) == 7 else f"avg{len(tasks)}"
    scope = (f"first {res['limit']} validation items of every task ({_sizes(res)} in the full sets)"
             if res.get("subset") else "full validation sets")
    prior = _shows_prior(res)
    lines = [README_BEGIN,
             f"Source: `docs/results.json` (sha256 `{results_sha256[:16]}`), created {res['created']} by "
             f"`{res['command']}`; {scope}; prompt style `{res['style']}`. Accuracy in points; Δ is the "
             "paired difference on the same items ± its standard error.", "",
             f"| configuration | realized ratio | FLOPs frac. | {avg_name} | Δ vs all-layers (same format) "
             + (f"| Δ without {PRIOR_TASK} " if prior else "") + "| Δ vs D-LLM | KL to dense |"
             + (f" {PRIOR_TASK} yes |" if prior else ""), "|---|---|---|---|---|---|---|" + "---|" * (2 * prior)]
    for config in res["configs"]:
        if config.get("same_as"):
            continue
        delta = config.get("vs_quant_only") or config.get("vs_dense")
        without = f"| {_diff(delta.get('avg_without_' + PRIOR_TASK) if delta else None)} " if prior else ""
        yes = f" {_pct(config.get(PRIOR_TASK + '_yes_rate'), 1)} |" if prior else ""
        lines.append(f"| {config['id']} | {_fmt(config.get('realized_ratio'), '.3f')} | {_fmt(config.get('flops_fraction'), '.3f')} "
                     f"| {_pct(config.get('avg7', config['avg']))} | {_diff(delta['avg'] if delta else None)} {without}"
                     f"| {_diff(config['vs_dllm']['avg'] if config.get('vs_dllm') else None)} | {_fmt(config.get('kl'), '.4f')} |{yes}")
    lines += [""] + [f"- **{x}**" for x in res.get("training_ratio_failures") or []] + render_headline(res)
    if res.get("pending"):
        lines += [f"- Not evaluated yet ({len(res['pending'])} configurations): "
                  + ", ".join(res["pending"])]
    lines += [README_END]
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> bool:
    """Replace the README's results block (between the markers); False when it has no markers."""
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    write_text(readme, head + block + tail)
    return True


