"""`qtale bench EXPORT_DIR... [--seq 128,512] [--ratios 1.0,0.8,0.6,0.5] [--repeats N] [--out DIR]`
(arguments: cli/bench.py).

ONNX Runtime on CPU, every variant in one process, repeats interleaved (repeat r runs every
(export, seq, ratio) once before repeat r + 1), medians reported. See docs/benchmarks.md.

* prefill latency per sequence length and ratio (theta from the theta table; 1.0 = theta 0 =
  dense), and its ratio to dense of the same export and length; realized ratio from exec_mask;
* decode tokens/s per ratio (a 32-token prompt, then --decode-tokens steps with the KV cache);
* router overhead: the dense prefill (theta 0, routers evaluated, every token executed) against the
  same graph with the router subgraphs cut out (each gate replaced by "execute", dead nodes
  removed): (with - without) / without. The token compaction ops stay in both, so this is the cost
  of the routers alone;
* peak RSS of the process (ru_maxrss) after each export; bytes of each .onnx / .onnx.data file.
No PyTorch.
"""
from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from . import graph_io
from ..errors import QtaleError

DEFAULT_SEQ = [128, 512]
DEFAULT_RATIOS = [1.0, 0.8, 0.6, 0.5]
TEXT = Path(__file__).parents[1] / "data" / "heldout.txt"


def _prompt_ids(rt, n: int) -> np.ndarray:
    text = TEXT.read_text() if TEXT.is_file() else "The quick brown fox jumps over the lazy dog. "
    ids = rt.tokenizer.encode(text)
    while len(ids) < n:
        ids = ids + ids
    return np.asarray([ids[:n]], np.int64)


def _without_routers(path: Path, threads):
    """(ORT session of the prefill graph at `path` with its routers cut out, gates cut): `graphs.cut_routers`."""
    import onnx

    from .routers import cut_routers
    from . import ort_ops

    m = onnx.load(str(path), load_external_data=False)
    cut = cut_routers(m)
    return ort_ops.session(path, threads=threads, model=m), cut


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _entry(vi: int, variant: dict, seqs, ratios, times: dict) -> dict:
    """One export's report: median prefill / decode times per length and ratio, router overhead."""
    med = statistics.median
    prefill_t, realized, decode_t, router_t = times["prefill"], times["realized"], times["decode"], times["router"]
    m = variant["rt"].manifest
    entry = {"dir": variant["dir"], "precision": m.precision, "ops": m.ops, "weights": m.model.weights,
             "files": variant["files"],
             "weight_bytes": sum(size for name, size in variant["files"].items() if name.endswith((".onnx", ".data"))),
             "peak_rss_mb_after_load": round(variant["rss_mb"], 1), "prefill": [], "decode": [],
             "router_overhead": []}
    for seq in seqs:
        dense = med(prefill_t[(vi, seq, 1.0)])
        for ratio in ratios:
            seconds = med(prefill_t[(vi, seq, ratio)])
            entry["prefill"].append({"seq": seq, "ratio": ratio, "theta": variant["sels"][ratio]["theta"],
                                     "selection": variant["sels"][ratio]["mode"], "ms": round(seconds * 1e3, 3),
                                     "vs_dense": round(seconds / dense, 4),
                                     "realized_ratio": round(realized[(vi, seq, ratio)], 4)})
        with_routers, without_routers = med(router_t[(vi, seq, "with")]), med(router_t[(vi, seq, "without")])
        entry["router_overhead"].append({"seq": seq, "dense_ms": round(with_routers * 1e3, 3),
                                         "no_router_ms": round(without_routers * 1e3, 3),
                                         "overhead": round((with_routers - without_routers) / without_routers, 4),
                                         "routers_cut": variant["cut"]})
    for ratio in ratios:
        seconds = med(decode_t[(vi, ratio)])
        entry["decode"].append({"ratio": ratio, "ms_per_token": round(seconds * 1e3, 3),
                                "tokens_per_s": round(1.0 / seconds, 2)})
    return entry


def bench(export_dirs, seqs=None, ratios=None, repeats: int = 5, decode_tokens: int = 16, threads=None,
          out=None, record: bool = False) -> dict:
    from .runtime.generate import Runtime

    seqs = list(seqs or DEFAULT_SEQ)
    ratios = list(ratios or DEFAULT_RATIOS)
    ratios = ratios if 1.0 in ratios else [1.0] + ratios  # the dense reference
    if repeats < 1 or decode_tokens < 1:
        raise QtaleError("--repeats and --decode-tokens must be >= 1")
    rss0 = _rss_mb()
    variants = []
    for folder in export_dirs:
        rt = Runtime.open(folder, threads=threads)
        sels = {ratio: rt.select(ratio=ratio) for ratio in ratios}
        nocut, cut = _without_routers(rt.manifest.graph_file("prefill"), threads)
        files = {p.name: p.stat().st_size for p in sorted(Path(folder).iterdir())
                 if p.suffix in (".onnx", ".data", ".engine")}
        variants.append({"dir": str(folder), "rt": rt, "sels": sels, "nocut": nocut, "cut": cut, "files": files,
                         "rss_mb": _rss_mb()})
    inputs = {seq: None for seq in seqs}
    prefill_t: dict = {}
    realized: dict = {}
    decode_t: dict = {}
    router_t: dict = {}
    for rep in range(repeats):
        for vi, variant in enumerate(variants):
            rt = variant["rt"]
            for seq in seqs:
                if inputs[seq] is None or inputs[seq].shape[1] != seq:
                    inputs[seq] = _prompt_ids(rt, seq)
                ids = inputs[seq]
                mask = np.ones_like(ids)
                for ratio in ratios:
                    theta = np.full((1,), variant["sels"][ratio]["theta"], np.float32)
                    t0 = time.perf_counter()
                    outs = rt.backend.run("prefill", graph_io.prefill_feeds(ids, mask, theta))
                    prefill_t.setdefault((vi, seq, ratio), []).append(time.perf_counter() - t0)
                    realized[(vi, seq, ratio)] = graph_io.realized_ratio(outs[graph_io.EXEC_MASK], rt.routed)
                # router overhead at this length: dense with routers vs routers cut out
                dense = graph_io.prefill_feeds(ids, mask, np.zeros((1,), np.float32))
                for kind, sess in (("with", None), ("without", variant["nocut"])):
                    t0 = time.perf_counter()
                    if sess is None:
                        rt.backend.run("prefill", dense)
                    else:
                        sess.run(None, dense)
                    router_t.setdefault((vi, seq, kind), []).append(time.perf_counter() - t0)
            prompt = _prompt_ids(rt, 32)
            for ratio in ratios:
                theta = np.full((1,), variant["sels"][ratio]["theta"], np.float32)
                loop = graph_io.Loop(rt.backend.run, rt.num_layers, theta)
                token = graph_io.greedy(loop.prefill(prompt, np.ones_like(prompt)))
                t0 = time.perf_counter()
                for _ in range(decode_tokens):
                    token = graph_io.greedy(loop.step(token))
                decode_t.setdefault((vi, ratio), []).append((time.perf_counter() - t0) / decode_tokens)
    report = {"method": "onnxruntime CPU, interleaved repeats, medians (docs/benchmarks.md)",
              "repeats": repeats, "decode_tokens": decode_tokens, "threads": threads,
              "onnxruntime": __import__("onnxruntime").__version__, "rss_start_mb": round(rss0, 1),
              "exports": []}
    for vi, variant in enumerate(variants):
        entry = _entry(vi, variant, seqs, ratios, {"prefill": prefill_t, "realized": realized, "decode": decode_t,
                                                   "router": router_t})
        report["exports"].append(entry)
        if record:
            from .manifest import read_manifest, write_manifest

            data = read_manifest(variant["dir"], verify=False)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            data["benchmarks"] = [b for b in data.get("benchmarks") or [] if b.get("backend") != "ort-cpu"] + [
                {"backend": "ort-cpu", "ratio": point["ratio"], "ms_per_token": point["ms_per_token"],
                 "threads": threads, "date": stamp} for point in entry["decode"]]
            write_manifest(variant["dir"], data)
    report["peak_rss_mb"] = round(_rss_mb(), 1)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
        report["plot"] = plot(report, out / "bench.png")
    return report


def plot(report: dict, path: Path) -> str | None:
    """Prefill time / dense against execution ratio, one line per export and length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for entry in report["exports"]:
        for seq in sorted({point["seq"] for point in entry["prefill"]}):
            pts = sorted((point["ratio"], point["vs_dense"]) for point in entry["prefill"] if point["seq"] == seq)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{entry['precision']} seq {seq}")
    ax.plot([0.4, 1.0], [0.4, 1.0], "k:", lw=1, label="ideal (time = ratio)")
    ax.set_xlabel("execution ratio")
    ax.set_ylabel("prefill time / dense")
    ax.set_title("QTALE prefill, ONNX Runtime CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for entry in report["exports"]:
        table = Table(title=f"{entry['dir']} ({entry['precision']}, {entry['weight_bytes'] / 2**20:.1f} MiB weights)")
        for column in ("seq", "ratio", "theta", "realized", "prefill ms", "vs dense"):
            table.add_column(column)
        for point in entry["prefill"]:
            table.add_row(str(point["seq"]), f"{point['ratio']:.2f}", f"{point['theta']:.4f}",
                          f"{point['realized_ratio']:.3f}", f"{point['ms']:.2f}", f"{point['vs_dense']:.3f}")
        con.print(table)
        decode = Table(title="decode")
        for column in ("ratio", "ms/token", "tokens/s"):
            decode.add_column(column)
        for point in entry["decode"]:
            decode.add_row(f"{point['ratio']:.2f}", f"{point['ms_per_token']:.2f}", f"{point['tokens_per_s']:.1f}")
        con.print(decode)
        for overhead in entry["router_overhead"]:
            con.print(f"router overhead at seq {overhead['seq']}: {100 * overhead['overhead']:+.1f}% "
                      f"({overhead['dense_ms']:.2f} ms dense vs {overhead['no_router_ms']:.2f} ms without routers)")
    con.print(f"peak RSS {report['peak_rss_mb']:.0f} MB" + (f"; plot {report['plot']}" if report.get("plot") else ""))
