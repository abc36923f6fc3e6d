"""TensorRT engines of the default model, built without a GPU: sizes against the quantized weight
bytes, and what the engines keep in which data type (issue 23's size target).

    python benchmarks/bench_trt_engines.py [--precisions int4,fp8] [--work DIR] [--json OUT]
        [--compute-capability 8.6,8.9] [--max-tokens 2048]

For each precision: `qtale-export smollm2-135m --ratio 0.6 --precision P --target tensorrt` (reused
when --work already holds it), then `qtale build` of prefill and decode with TensorRT-RTX (CPU-only
ahead-of-time; the default profile: batch 1, 1/256/--max-tokens tokens). Reported per engine: its
bytes; the export's quantized bytes (DequantizeLinear codes + scales of the decoder projections, and
of the embedding table, which the tied LM head shares); the limit 1.3 x projections + table; the
constant bytes per data type from the builder's layer report; the conditional jumps of the decode;
and the text the plan carries beside the weights (engine_info.plan_text: TensorRT-RTX's CUDA C
kernel sources for its on-device JIT, and the compiler's descriptions), with the engine's bytes less
that text against the same limit.
Needs the [train] and [tensorrt-rtx] extras; no GPU. The engines are not run here (that needs an
Ampere-or-later RTX-class GPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qtale_export.deploy import tensorrt as qtrt  # noqa: E402
from qtale_export.deploy.onnx_graphs import initializers  # noqa: E402
from qtale_export.export.main import export_checkpoint  # noqa: E402

BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.INT8: 8, onnx.TensorProto.FLOAT8E4M3FN: 8}
LIMIT = 1.3  # the target: engine <= 1.3 x quantized projection bytes + the table


def quantized_bytes(onnx_path: Path) -> dict[str, int]:
    """{"projections": codes + scales of the decoder projections, "table": of the embedding table}."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    out = {"projections": 0, "table": 0}
    seen = set()
    for t in initializers(model.graph):  # If branches hold their own
        if t.name in seen or not t.name.endswith((".weight_q", ".weight_scale")):
            continue
        seen.add(t.name)
        n = int(np.prod(t.dims))
        size = n * BITS.get(t.data_type, 32) // 8
        out["table" if t.name.startswith("embed.") else "projections"] += size
    return out


def run(precision: str, work: Path, sms: tuple[str, ...], max_tokens: int) -> list[dict]:
    export = work / f"smollm2-135m-{precision}-tensorrt"
    if not (export / "manifest.json").is_file():
        t0 = time.time()
        export_checkpoint("smollm2-135m", export, ratio=0.6, precision=precision, target="tensorrt")
        print(f"exported {export} in {time.time() - t0:.0f} s", flush=True)
    rows = []
    for graph in ("prefill", "decode"):
        t0 = time.time()
        entry = qtrt.build(qtrt.BuildOptions(export_dir=export, graph=graph, max_tokens=max_tokens,
                                             builder="tensorrt-rtx", compute_capabilities=sms))
        seconds = time.time() - t0
        summary = entry["layers"]["summary"]
        q = quantized_bytes(export / f"{graph}.onnx")
        limit = LIMIT * q["projections"] + q["table"]
        form = json.loads((export / "manifest.json").read_text())["graphs"]["decode"].get("form")
        text = summary["plan_text"]
        without_text = summary["engine_bytes"] - text["kernel_source_bytes"] - text["other_text_bytes"]
        rows.append({"precision": precision, "graph": graph, "decode_form": form,
                     "engine_bytes": summary["engine_bytes"], "quantized_projection_bytes": q["projections"],
                     "table_bytes": q["table"], "limit_bytes": int(limit),
                     "within_limit": summary["engine_bytes"] <= limit, "plan_text": text,
                     "engine_bytes_without_text": without_text, "without_text_within_limit": without_text <= limit,
                     "constant_bytes": summary["constant_bytes"], "weights_bytes": summary["weights_bytes"],
                     "conditional_jumps": summary["conditional_jumps"], "branch_gemms": summary["branch_gemms"],
                     "compute_capabilities": entry["compute_capabilities"], "builder": entry["builder"],
                     "tensorrt_version": entry["tensorrt_version"], "build_seconds": round(seconds, 1),
                     "weights_file_bytes": (export / "weights.onnx.data").stat().st_size})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", default="int4,fp8")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qtale" / "bench-trt")
    p.add_argument("--compute-capability", default="", help="TensorRT-RTX targets (default: its own set)")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "trt_engines.json")
    args = p.parse_args(argv)
    sms = tuple(s for s in args.compute_capability.split(",") if s)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [r for precision in args.precisions.split(",") for r in run(precision, args.work, sms, args.max_tokens)]
    mb = 1e6
    print(f"\n{'engine':<16}{'MB':>8}{'weights':>9}{'src MB':>8}{'sources':>8}{'text MB':>8}{'rest MB':>8}"
          f"{'limit MB':>9}  within  w/o text  constants (MB by dtype)")
    for r in rows:
        consts = ", ".join(f"{k} {v / mb:.1f}" for k, v in r["constant_bytes"].items())
        t = r["plan_text"]
        print(f"{r['precision'] + ' ' + r['graph']:<16}{r['engine_bytes'] / mb:>8.1f}{r['weights_bytes'] / mb:>9.1f}"
              f"{t['kernel_source_bytes'] / mb:>8.1f}{t['kernel_sources']:>8}{t['other_text_bytes'] / mb:>8.1f}"
              f"{(r['engine_bytes_without_text'] - r['weights_bytes']) / mb:>8.1f}{r['limit_bytes'] / mb:>9.1f}"
              f"  {'yes' if r['within_limit'] else 'NO':<6}  {'yes' if r['without_text_within_limit'] else 'NO':<8}"
              f"  {consts}; jumps {r['conditional_jumps']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
