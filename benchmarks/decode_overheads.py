#!/usr/bin/env python
"""What the routers and the per-layer `If`s cost in decode: an ort-cpu export against copies of its
own decode graph with parts taken out, interleaved in one run.

    python benchmarks/decode_overheads.py EXPORT_DIR [--repeats 8] [--prompt-tokens 512] [--tokens 64]

Variants (decode.onnx only; prefill, weights and runtime are the export's):
* as exported, at theta 0 (every layer runs) and theta 1 (every routed layer skipped: what a token
  costs with no routed layer, i.e. the LM head, the unrouted layers, the routers and the Ifs);
* routers cut (`graphs.cut_routers`: every gate "execute", the router subgraphs dropped), theta 0;
* routers cut and every If replaced by its run branch: the layers alone, as a dense graph.
The cut variants are benchmark-only graphs (they ignore theta); they need an in-place KV export
(the runtime's default for ort-cpu). Prints decode ms/token (medians, wall time of the runtime's
loop) and each against the export at theta 0. No PyTorch.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qtale_export.deploy.bench import _prompt_ids  # noqa: E402
from qtale_export.deploy.runtime import Runtime  # noqa: E402
from qtale_export.export.graphs import cut_routers  # noqa: E402


def inline_run_branches(m: onnx.ModelProto) -> int:
    """Replace every top-level If by its then-branch (the layer run), outputs renamed to the If's;
    returns how many. Only meaningful once every gate is "execute" (cut_routers)."""
    nodes, count = [], 0
    for n in m.graph.node:
        if n.op_type != "If":
            nodes.append(n)
            continue
        then = next(a.g for a in n.attribute if a.name == "then_branch")
        rename = {o.name: out for o, out in zip(then.output, n.output)}
        for x in then.node:
            y = onnx.NodeProto()
            y.CopyFrom(x)
            for k, o in enumerate(y.output):
                y.output[k] = rename.get(o, o)
            nodes.append(y)
        m.graph.initializer.extend(then.initializer)
        count += 1
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return count


def variant(export: Path, work: Path, name: str, edit) -> Path:
    """A copy of `export` (ONNX Runtime wants the external data next to the graph; copied, not
    linked: ONNX's checker refuses hard-linked data files) with decode.onnx edited by `edit(model)`."""
    folder = work / name
    folder.mkdir()
    for f in export.iterdir():
        if f.is_file() and f.name != "decode.onnx":
            shutil.copy2(f, folder / f.name)
    m = onnx.load(str(export / "decode.onnx"), load_external_data=False)
    edit(m)
    onnx.save(m, str(folder / "decode.onnx"))
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    export = Path(args.export)
    if not (export / "decode.onnx").is_file():
        sys.exit(f"decode_overheads: {export} holds no decode.onnx")
    work = Path(tempfile.mkdtemp(prefix=".overheads-", dir=export.parent))
    try:
        cut = variant(export, work, "routers-cut", cut_routers)
        dense = variant(export, work, "routers-cut-no-if", lambda m: (cut_routers(m), inline_run_branches(m)))
        rts = {"as exported": Runtime.open(export, threads=args.threads),
               "routers cut": Runtime.open(cut, threads=args.threads, verify=False),
               "routers cut, no If": Runtime.open(dense, threads=args.threads, verify=False)}
        if not rts["as exported"].backend.in_place:
            sys.exit("decode_overheads: the export's decode graph is not the in-place ort-cpu form")
        ref = rts["as exported"]
        ids = [int(i) for i in _prompt_ids(ref, args.prompt_tokens)[0]]
        text = ref.tokenizer.decode(ids)
        cases = [("as exported", 0.0), ("as exported", 1.0), ("routers cut", 0.0), ("routers cut, no If", 0.0)]
        for rt in rts.values():  # warm-up
            rt.generate(text, theta=0.0, max_new_tokens=4)
        ms: dict = {c: [] for c in cases}
        tokens: dict = {}
        for rep in range(args.repeats):
            for name, theta in cases:
                res = rts[name].generate(text, theta=theta, max_new_tokens=args.tokens, ignore_eos=True)
                ms[(name, theta)].append(1000.0 / res.decode_tokens_per_s)
                tokens[(name, theta)] = res.token_ids
            print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
        # the theta-0 variants must do the same work: every layer for every token
        if len({tuple(t) for (name, theta), t in tokens.items() if theta == 0.0}) != 1:
            sys.exit("decode_overheads: the cut graphs generate other tokens than the export at theta 0")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {c: statistics.median(v) for c, v in ms.items()}
    base = med[("as exported", 0.0)]
    print(f"\n{export}: prompt {len(ids)} tokens, {args.tokens} new, {args.threads} threads, "
          f"{args.repeats} interleaved repeats (medians)\n")
    print("| decode graph | theta | ms/token | vs as exported at theta 0 |")
    print("|---|---|---|---|")
    for (name, theta), v in med.items():
        print(f"| {name} | {theta:g} | {v:.2f} | {v / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
