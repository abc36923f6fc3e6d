"""The experiment's stages, each `stage(run)`; `STAGES` runs in its order, `ON_REQUEST` only with --only.

Every stage writes its artifacts atomically under the run folder and skips what exists. The
library modules that import PyTorch are imported inside the stages, so the recipe, the report
helpers and `qtale experiment --help` load without it.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from ..errors import QtaleError
from ..deploy import theta as theta_policy
from ..deploy.theta import lookup, ratio_key
from . import report
from .layout import Run, configurations, need, read_json, train_done, write_gz_json, write_json, write_text
from .ship import stage_keep, stage_ship


def stage_train(run: Run) -> None:
    from .. import train as training

    spec = run.r["train"]
    for method in run.trained():
        out = run.train_dir(method)
        kept = run.kept_dir(method)
        if not out.exists() and train_done(kept, spec["steps"]):
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(kept, out)
            run.say(f"  train {method}: from the committed run {kept}")
        if train_done(out, spec["steps"]):
            run.say(f"  train {method}: done ({out})")
            continue
        kw = dict(spec)
        trained_as = method
        if method == "reference":  # LoRA fine-tuned the same way, every layer wanted: no ratio/entropy pull
            trained_as, kw["target_ratio"], kw["lambda1"], kw["lambda2"] = "dllm", 1.0, 0.0, 0.0
        cfg = training.TrainConfig(model=run.r["model"], out=str(out), method=trained_as, seed=run.r["seed"],
                                   teacher_cache=str(run.root / "teacher"), **kw)  # both methods see the same batches
        resume = (out / training.STATE).is_file()
        run.say(f"  train {method}: {'resuming' if resume else 'starting'} ({spec['steps']} steps) -> {out}")
        t0 = time.time()
        training.train(cfg, resume=resume, force=out.exists() and not resume, progress=run.progress)
        run.timed(f"train.{method}", time.time() - t0)


def _calib_batches(run: Run, tokenizer):
    from ..calibrate import TextCalibration, text_batches_for

    spec = run.r["calibration"]
    return text_batches_for(tokenizer, TextCalibration(data=spec["data"] or None, seq_len=spec["seq_len"],
                                                       max_tokens=spec["max_tokens"], tol=spec["tol"]))


def stage_calibrate(run: Run) -> None:
    from .. import calibrate as calibration, checkpoint
    from ..api import load_checkpoint

    batches = None
    tol = run.r["calibration"]["tol"]
    for method in run.r["methods"]:
        marker = run.calib_file(method, "fp")
        if marker.is_file():
            run.say(f"  calibrate {method} (fp): done")
            continue
        folder = run.train_dir(method)
        need(folder / checkpoint.META, "train")
        t0 = time.time()
        model = load_checkpoint(folder)
        if batches is None:
            batches, data, tokens = _calib_batches(run, model.tokenizer)
        table = calibration.calibrate(model, batches, run.r["ratios"], tol=tol, progress=run.progress)
        checkpoint.update_meta(folder, theta_table=model.theta_table,
                               calibration={"data": data.name, "tokens": tokens, "tol": tol})
        write_json(marker, {"method": method, "format": "fp", "table": table, "data": str(data), "tokens": tokens,
                            "seconds": round(time.time() - t0, 2)})
        run.say(f"  calibrate {method} (fp): " + ", ".join(f"{k}: theta {v['theta']:.4f}" for k, v in table.items()))
        run.timed("calibrate", time.time() - t0)


def stage_quantize(run: Run) -> None:
    from .. import checkpoint, ptq

    spec = run.r["quantization"]
    for name, src in run.quant_sources():
        if name != "base":
            need(Path(src) / checkpoint.META, "train")
        for fmt in spec["formats"]:
            out = run.quant_dir(name, fmt)
            if (out / checkpoint.META).is_file() and (checkpoint.read_meta(out).get("quantization") or {}).get("format") == fmt:
                run.say(f"  quantize {name} -> {fmt}: done")
                continue
            t0 = time.time()
            run.say(f"  quantize {name} -> {fmt}")
            config = ptq.QuantizeConfig(format=fmt, group_size=spec["group_size"],
                                        calib_data=spec["calib_data"] or None,
                                        calib_samples=spec["calib_samples"], calib_length=spec["calib_length"])
            # force: the run folder's own stale result (another format) is replaced
            ptq.quantize_checkpoint(src, out, config, force=True)
            run.timed("quantize", time.time() - t0)


def stage_recalibrate(run: Run) -> None:
    from .. import calibrate as calibration, checkpoint
    from ..api import load_checkpoint

    batches = None
    tol = run.r["calibration"]["tol"]
    for method in run.r["methods"]:
        fp = run.calib_file(method, "fp")
        need(fp, "calibrate")
        fp_table = read_json(fp)["table"]
        for fmt in run.r["quantization"]["formats"]:
            marker = run.calib_file(method, fmt)
            if marker.is_file():
                run.say(f"  recalibrate {method} ({fmt}): done")
                continue
            folder = run.quant_dir(method, fmt)
            need(folder / checkpoint.META, "quantize")
            t0 = time.time()
            model = load_checkpoint(folder)
            if batches is None:
                batches, data, tokens = _calib_batches(run, model.tokenizer)
            drift = {}
            for ratio in run.r["ratios"]:
                entry = lookup(fp_table, ratio)
                if ratio < 1.0 and entry is not None:
                    at_fp_theta = calibration.realized_ratio(model, batches, entry["theta"])
                    drift[ratio_key(ratio)] = {"theta_fp": entry["theta"], "realized_fp": entry["realized"],
                                               "realized_at_theta_fp": round(at_fp_theta, 6)}
            model.theta_table = {}
            table = calibration.calibrate(model, batches, run.r["ratios"], tol=tol, progress=run.progress)
            checkpoint.update_meta(folder, theta_table=model.theta_table,
                                   calibration={"data": data.name, "tokens": tokens, "tol": tol,
                                                "after_quantization": True})
            write_json(marker, {"method": method, "format": fmt, "table": table, "drift": drift, "data": str(data),
                                "tokens": tokens, "seconds": round(time.time() - t0, 2)})
            run.say(f"  recalibrate {method} ({fmt}): " + ", ".join(
                f"{k}: theta {v['theta']:.4f}" + (f" (fp theta gave {drift[k]['realized_at_theta_fp']:.3f})"
                                                  if k in drift else "") for k, v in table.items()))
            run.timed("recalibrate", time.time() - t0)


# ---- eval ------------------------------------------------------------------------------------
def _theta(run: Run, c: dict) -> float:
    if c["kind"] == "routed-fixed":
        return 0.5
    if c["kind"] != "routed" or c["target_ratio"] >= 1.0:
        return 0.0
    path = Path(c["theta_from"])
    need(path, "recalibrate" if c["format"] != "fp" else "calibrate")
    try:
        return theta_policy.theta_for(read_json(path)["table"], c["target_ratio"], "exact")
    except QtaleError as exc:
        raise QtaleError(f"{path}: {exc}; delete it and re-run calibration") from None


def _load_model(source: str, dtype: str = "float32"):
    from ..api import load

    return load(source, fresh=True, dtype=dtype, fold=True)


def _dropped_layers(run: Run, ratio: float) -> list[int]:
    """The static baseline's removed layers at `ratio`: block influence of the dense fp base on the
    calibration text, computed once per run (layer_drop.json)."""
    from ..layer_drop import block_influence, layers_to_drop

    path = run.root / "layer_drop.json"
    if not path.is_file():
        base = _load_model(run.ref_source())
        batches, data, tokens = _calib_batches(run, base.tokenizer)
        influence = block_influence(base, batches)
        write_json(path, {"influence": {str(k): v for k, v in influence.items()}, "data": str(data),
                          "tokens": tokens, "measure": "mean 1 - cos(layer input, layer output), all layers executed"})
    influence = {int(k): v for k, v in read_json(path)["influence"].items()}
    return layers_to_drop(influence, ratio)


def _to_evaluate(run: Run) -> list[dict]:
    """The selected configurations without a result for the recipe's tasks, in the order asked for."""
    tasks = run.r["eval"]["tasks"]
    selected = [c for c in configurations(run) if not c.get("same_as") and run.selected(c["id"])]
    todo = [c for c in selected
            if not (run.eval_file(c["id"]).is_file()
                    and read_json(run.eval_file(c["id"])).get("tasks_requested") == tasks)]
    if len(selected) > len(todo):
        run.say(f"  eval: {len(selected) - len(todo)} configuration(s) done")
    if run.only_configs:  # the order the user asked for: the most wanted results land first
        todo.sort(key=lambda c: run.rank(c["id"]))
    return todo


def stage_eval(run: Run) -> None:
    from .. import evaluate
    from ..tasks import heldout_text

    ev = run.r["eval"]
    todo = _to_evaluate(run)
    if not todo:
        return
    for task in ev["tasks"]:  # fail on missing data before any compute
        evaluate.load_docs(task, 1)
    ppl_text = None
    if ev["ppl"]:
        ppl_text, ppl_source = heldout_text(ev["ppl_file"])
    reference = None
    runs: list[tuple[str, list[dict]]] = []  # consecutive configurations of one model share its load
    for c in todo:
        if runs and runs[-1][0] == c["source"]:
            runs[-1][1].append(c)
        else:
            runs.append((c["source"], [c]))
    for source, configs in runs:
        if not (Path(source).exists() or source == run.r["model"]):
            raise QtaleError(f"{source} is missing: run the 'quantize' stage first")
        model = _load_model(source, ev["dtype"])
        for c in configs:
            theta = _theta(run, c)
            dropped = _dropped_layers(run, c["target_ratio"]) if c["kind"] == "layer-drop" else None
            model.static_skip = frozenset(dropped) if dropped is not None else None
            run.say(f"  eval {c['id']}  theta={theta:.4f}" + (f"  dropped layers {dropped}" if dropped else ""))
            t0 = time.time()
            key = {"source": c["source"], "theta": theta, "dropped_layers": dropped, "style": ev["style"],
                   "limit": ev["limit"], "dtype": ev["dtype"]}
            done = run.read_partials(c["id"], key)
            if done:
                run.say(f"    continuing: {', '.join(t for t in ev['tasks'] if t in done)} already scored")

            def save_part(task: str, part: dict, cid: str = c["id"], key: dict = key) -> None:
                write_gz_json(run.partial_dir(cid) / f"{task}.json.gz", {**part, "task": task, "key": key})

            res = evaluate.evaluate_tasks(model, ev["tasks"], style=ev["style"], limit=ev["limit"],
                                          batch_size=ev["batch_size"], theta=theta, progress=run.progress,
                                          batch_tokens=ev["batch_tokens"], done=done, on_task=save_part)
            t_rest = time.time()
            out = {**c, "theta": theta, "tasks_requested": ev["tasks"], "style": ev["style"], "limit": ev["limit"],
                   "dtype": ev["dtype"], "dropped_layers": dropped, **res}
            if ppl_text is not None:
                dense = c["id"] == "dense/fp"  # its own all-layers pass is the reference
                if reference is None and not dense:
                    reference = _load_model(run.ref_source(), ev["dtype"])
                out.update(evaluate.perplexity_and_kl(model, ppl_text, theta=theta,
                                                      reference=None if dense else reference,
                                                      max_tokens=ev["ppl_tokens"]))
                out["ppl_file"] = ppl_source
                out["kl_reference"] = "dense/fp (all layers, unquantized)"
            model.static_skip = None
            out["seconds_total"] = round(sum(res["seconds"].values()) + time.time() - t_rest, 2)  # resumed too
            write_gz_json(run.eval_file(c["id"]), out)
            shutil.rmtree(run.partial_dir(c["id"]), ignore_errors=True)  # the whole result replaces its parts
            run.timed("eval", time.time() - t0)
        del model


# ---- report ----------------------------------------------------------------------------------
def _reference_note(run: Run) -> str:
    if run.trained_reference:
        return ("the base + LoRA fine-tuned the same way with target ratio 1.0, lambda1 = lambda2 = 0, "
                "evaluated with theta 0 (every layer)")
    if run.lora:
        return ("the base model with every layer executed: the self-distillation teacher that the routed "
                "models (routers + LoRA) were trained to match")
    return ("the base model with every layer executed (routers are the only trained parameters, so the "
            "base is what the same fine-tuning with every layer executed gives)")


def _training_info(run: Run) -> dict:
    from .. import checkpoint
    from ..train import STATE

    out = {}
    for method in run.trained():
        folder = run.train_dir(method)
        if not (folder / checkpoint.META).is_file():
            continue
        info = checkpoint.read_meta(folder).get("training") or {}
        state = read_json(folder / STATE) if (folder / STATE).is_file() else {}
        out[method] = {"steps_done": info.get("steps_done"), "final_losses": info.get("final_losses"),
                       "seconds": state.get("elapsed_s"), "method": (info.get("config") or {}).get("method"),
                       "checkpoint": str(folder), "ratio_reached": info.get("ratio_reached"),
                       "data_sha256": info.get("data_sha256")}
    return out


def stage_report(run: Run) -> dict:
    """docs/results.json, results.md and results.png from the evaluated configurations."""
    from .. import checkpoint
    from ..tasks import PRIMARY, validation_size

    results, items = report.collect(run)
    calib = {}
    for method in run.r["methods"]:
        calib[method] = {}
        for fmt in ["fp"] + run.r["quantization"]["formats"]:
            path = run.calib_file(method, fmt)
            if path.is_file():
                calib[method][fmt] = {k: v for k, v in read_json(path).items()
                                      if k in ("table", "drift", "tokens", "data")}
    quant = {}
    for name, _ in run.quant_sources():
        for fmt in run.r["quantization"]["formats"]:
            folder = run.quant_dir(name, fmt)
            if (folder / checkpoint.META).is_file():
                info = checkpoint.read_meta(folder).get("quantization") or {}
                quant[f"{name}-{fmt}"] = {k: info.get(k) for k in ("format", "quantizer", "algorithm", "bits",
                                                                  "group_size", "weight_bytes", "seconds")}
    ev = run.r["eval"]
    res = {"schema": report.SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": run.command, "run_dir": str(run.root), "recipe": dict(run.r), "limit": ev["limit"],
           "subset": ev["limit"] is not None, "validation_sizes": {t: validation_size(t) for t in ev["tasks"]},
           "style": ev["style"], "tasks": ev["tasks"],
           "primary_metric": {t: PRIMARY[t] for t in ev["tasks"]}, "reference": _reference_note(run),
           "machine": report.machine(), "timings": read_json(run.timings_file) if run.timings_file.is_file() else {},
           "training": _training_info(run), "calibration": calib, "quantization": quant,
           "configs": results}
    res["headline"] = report.headline(run, results, items)
    res[report.PRIOR_TASK + "_gold_yes_rate"] = report.gold_yes_rate(items)
    res["training_ratio_failures"] = report.ratio_failures(res["training"])
    res["pending"] = list(run.pending)
    run.docs.mkdir(parents=True, exist_ok=True)
    write_json(run.docs / "results.json", res)
    write_text(run.docs / "results.md", report.render_markdown(res))
    report.render_plot(res, run.docs / "results.png")
    return res


STAGES: dict[str, Callable[[Run], object]] = {
    "train": stage_train,
    "calibrate": stage_calibrate,
    "quantize": stage_quantize,
    "recalibrate": stage_recalibrate,
    "eval": stage_eval,
    "report": stage_report,
}
ON_REQUEST: dict[str, Callable[[Run], object]] = {"ship": stage_ship, "keep": stage_keep}
