#!/usr/bin/env python
"""Where decode time goes: ONNX Runtime's profiler on an export's decode graph, per-op totals.

    python benchmarks/profile_decode.py EXPORT_DIR [--ratio 1.0] [--prompt-tokens 512] [--tokens 64]

Runs the export's own runtime (`qtale_export.deploy.runtime.Runtime`, greedy, one sequence) with ORT
profiling switched on for the decode session, then prints the profiled kernel time per op type
(nodes inside `If` branches counted as themselves, the `If` wrapper apart) as a share of all node
time, and the node time against the wall time per token. Profiling adds a fixed cost per node, so
graphs with many small nodes read slower than they run; compare shares, not absolute times. No PyTorch.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qtale_export.deploy.bench import _prompt_ids  # noqa: E402
from qtale_export.deploy.runtime import Runtime  # noqa: E402


def profiled_runtime(folder: str, threads: int) -> tuple[Runtime, object]:
    """A Runtime whose decode session writes an ORT profile."""
    import onnxruntime as ort

    rt = Runtime.open(folder, threads=threads)
    be = rt.backend
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = str(Path("/tmp") / f"qtale_decode_{Path(folder).name}")
    so.log_severity_level = 3
    path = rt.manifest.graph_file("decode")
    be.sessions["decode"] = sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    be.outputs["decode"] = [o.name for o in sess.get_outputs()]
    return rt, sess


def branch_node_names(graph_file: Path) -> set[str]:
    """Names of the nodes inside If branches (at any depth) of a graph."""
    import onnx

    names: set[str] = set()

    def walk(g):
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    names.update(x.name for x in a.g.node)
                    walk(a.g)
    walk(onnx.load(str(graph_file), load_external_data=False).graph)
    return names


def op_totals(profile: str, in_branches: set[str] = frozenset()) -> tuple[dict[str, float], int, float]:
    """{op type: microseconds} over every node run in the profile, the number of graph runs, and
    the microseconds of the nodes named in `in_branches` (what the top-level Ifs' times include)."""
    events = json.loads(Path(profile).read_text())
    per_op: dict[str, float] = collections.Counter()
    runs, branch_us = 0, 0.0
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"].get("op_name", "?")] += e["dur"]
            if e["name"][:-len("_kernel_time")] in in_branches:
                branch_us += e["dur"]
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            runs += 1
    return dict(per_op), runs, branch_us


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir")
    ap.add_argument("--ratio", type=float, default=1.0)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=16)
    args = ap.parse_args(argv)
    rt, sess = profiled_runtime(args.export_dir, args.threads)
    text = rt.tokenizer.decode(_prompt_ids(rt, args.prompt_tokens)[0])
    t0 = time.perf_counter()
    res = rt.generate(text, ratio=args.ratio, max_new_tokens=args.tokens, ignore_eos=True)
    wall = time.perf_counter() - t0
    graph_file = rt.manifest.graph_file("decode")
    per_op, runs, branch_us = op_totals(sess.end_profiling(), branch_node_names(graph_file))
    nodes = per_op.pop("If", 0.0)  # an If's time includes its branch's nodes, listed on their own
    total = sum(per_op.values())
    steps = max(res.new_tokens - 1, 1)
    print(f"{args.export_dir}: ratio {args.ratio} (realized {res.realized_ratio:.3f}), prompt "
          f"{res.prompt_tokens} tokens, {res.new_tokens} new, decode {res.decode_tokens_per_s:.1f} tok/s "
          f"(profiling on), wall {wall:.2f} s")
    print(f"decode: {runs} runs, node time {total / 1e3 / steps:.2f} ms/token of "
          f"{res.decode_s * 1e3 / steps:.2f} ms/token wall")
    # nested Ifs count as branch nodes: what is left is the top-level Ifs' own dispatch (subgraph
    # execution frames, output hand-over), which no op of the layer accounts for
    print(f"(If nodes: {nodes / 1e3 / steps:.2f} ms/token including their branches' nodes; "
          f"the Ifs' own time, without those nodes: {(nodes - branch_us) / 1e3 / steps:.2f} ms/token)")
    print("| op | ms/token | share of node time |")
    print("|---|---|---|")
    for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {op} | {us / 1e3 / steps:.3f} | {us / total:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
