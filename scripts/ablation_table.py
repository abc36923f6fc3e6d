#!/usr/bin/env python
"""docs/ablations.md's table from the JSON files scripts/heldout_kl.py wrote (docs/ablations/*.json)."""
import json
import sys
from pathlib import Path

rows = []
for f in sorted(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/ablations").glob("*.json")):
    d = json.loads(f.read_text())
    for r in d["rows"]:
        rows.append((f.name, d["command"], r))
print("| source file | model | target ratio | realized | FLOPs frac. | KL to dense (nats/token) | ppl |")
print("|---|---|---|---|---|---|---|")
seen = set()
for name, _, r in rows:
    key = (r["model"], r["target_ratio"])
    if key in seen:  # the dense base row is in every file
        continue
    seen.add(key)
    flops = r.get("ppl_flops_fraction")
    print(f"| `{name}` | {r['model']} | {r['target_ratio']:g} | {r['ppl_realized_ratio']:.3f} | "
          f"{flops:.3f} | {r['kl']:.4f} | {r['ppl']:.2f} |" if flops is not None else "")
print()
for name, cmd in sorted({(n, c) for n, c, _ in rows}):
    print(f"- `{name}`: `{cmd}`")
