#!/usr/bin/env python
"""Held-out KL and perplexity of routed checkpoints against the dense base, at calibrated ratios,
next to the static layer-drop baseline at the same executed fraction (docs/ablations.md).

    python scripts/heldout_kl.py runs/v2/qtale qtale_export/pretrained/smollm2-135m \
        --ratios 0.5,0.6,0.7,0.8 --tokens 8192 --dtype bfloat16 --out docs/ablations/heldout_kl.json

theta for each ratio is calibrated here on the package's calibration text (not the held-out text),
the KL reference is the base model with every layer executed (no LoRA), the text is the SciQ
validation support paragraphs (not trained on, not an evaluated task).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qtale_export.errors import QtaleError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="heldout_kl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--ratios", default="0.5,0.6,0.7,0.8")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--no-layer-drop", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import qtale_export
    from qtale_export import evaluate as E
    from qtale_export.calibrate import calibrate
    from qtale_export.data import CALIBRATION_TEXT, text_batches
    from qtale_export.layer_drop import block_influence, layers_to_drop
    from qtale_export.deploy.theta import ratio_key
    from qtale_export.tasks import heldout_text

    ratios = [float(r) for r in args.ratios.split(",")]
    text, source = heldout_text("sciq")
    base = qtale_export.load("smollm2-135m", fresh=True, dtype=args.dtype)
    batches = text_batches(CALIBRATION_TEXT, base.tokenizer, 256, 4, 4096)
    rows = []

    def measure(name, model, theta, ratio, extra=None):
        t0 = time.time()
        pk = E.perplexity_and_kl(model, text, theta=theta, reference=base, max_tokens=args.tokens)
        row = {"model": name, "target_ratio": ratio, "theta": theta, **{k: pk[k] for k in (
            "kl", "ppl", "ppl_realized_ratio", "ppl_flops_fraction", "ppl_tokens")}, **(extra or {}),
            "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{name:<44} r={ratio:<4} realized={row['ppl_realized_ratio']:.3f} KL={row['kl']:.4f} "
              f"ppl={row['ppl']:.2f}", flush=True)

    measure("dense base", base, 0.0, 1.0)
    if not args.no_layer_drop:
        infl = block_influence(base, batches)
        for r in ratios:
            drop = layers_to_drop(infl, r)
            base.static_skip = frozenset(drop)
            measure("static layer drop (block influence)", base, 0.0, r, {"dropped": drop})
        base.static_skip = None
    for ck in args.checkpoints:
        model = qtale_export.load(ck, dtype=args.dtype, fold=True)
        cal_batches = text_batches(CALIBRATION_TEXT, model.tokenizer, 256, 4, 4096)
        model.theta_table = {}
        table = calibrate(model, cal_batches, ratios, tol=0.01, progress=False)
        for r in ratios:
            entry = table[ratio_key(r)]
            measure(ck, model, entry["theta"], r, {"calibrated_realized": entry["realized"]})
        measure(ck + " (all layers)", model, 0.0, 1.0)
        del model
    out = {"text": source, "tokens": args.tokens, "dtype": args.dtype, "reference": "dense base, all layers",
           "rows": rows, "command": "python scripts/heldout_kl.py " + " ".join(argv or sys.argv[1:])}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except QtaleError as exc:
        print(f"heldout_kl: error: {exc}", file=sys.stderr)
        sys.exit(2)
