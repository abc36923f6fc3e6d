#!/usr/bin/env python
"""Paired differences between two recipes' eval folders, configuration by configuration.

    python scripts/compare_eval.py docs/v3/eval/smollm2-135m-v3/harness-limitall \
        docs/eval/smollm2-135m/harness-limitall [--pool 'qtale/int4-awq/*'] [--json out.json]

Prints a - b in avg7 and without BoolQ (points, ± standard error) and both KLs; see
docs/experiment.md ("BoolQ measures the answer prior")."""
import argparse
import json
import sys

from qtale_export.errors import QtaleError
from qtale_export.experiment.report import compare_eval_dirs
from qtale_export.tasks import AVG7


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--pool", help="also one pooled test over the configuration ids matching this pattern")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    try:
        res = compare_eval_dirs(args.a, args.b, AVG7, pool=args.pool)
    except QtaleError as exc:
        print(f"compare_eval: error: {exc}", file=sys.stderr)
        return 2
    rows = res["rows"]
    if not rows:
        print(f"compare_eval: error: no configuration is in both {args.a} and {args.b}", file=sys.stderr)
        return 2
    print(f"a = {args.a}\nb = {args.b}\n")
    print("| configuration | avg7 a - b | without boolq a - b | KL a | KL b | realized a | realized b |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        d, w = r["avg"], r["avg_without_boolq"]
        print(f"| {r['id']} | {100 * d['diff']:+.2f} ± {100 * d['stderr']:.2f} | {100 * w['diff']:+.2f} ± "
              f"{100 * w['stderr']:.2f} | {r['kl_a']:.3f} | {r['kl_b']:.3f} | {r['realized_a']:.3f} | {r['realized_b']:.3f} |")
    if "pooled" in res:
        p, w = res["pooled"], res["pooled"]["without_boolq"]
        print(f"\npooled over {', '.join(p['ids'])} (each item's mean difference): avg7 {100 * p['diff']:+.2f} ± "
              f"{100 * p['stderr']:.2f}, without boolq {100 * w['diff']:+.2f} ± {100 * w['stderr']:.2f}")
    elif args.pool:
        print(f"\nno configuration in both folders matches {args.pool}: nothing pooled")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"a": args.a, "b": args.b, **res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
