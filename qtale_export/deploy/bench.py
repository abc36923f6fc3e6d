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


def _without_routers(folder: Path, graph_file: str, threads):
    """(ORT session of the prefill graph with its routers cut out, gates cut): `graphs.cut_routers`."""
    import onnx

    from ..export import ort_ops
    from ..export.graphs import cut_routers

    m = onnx.load(str(folder / graph_file), load_external_data=False)
    cut = cut_routers(m)
    return ort_ops.session(folder / graph_file, threads=threads, model=m), cut


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def bench(export_dirs, seqs=None, ratios=None, repeats: int = 5, decode_tokens: int = 16, threads=None,
          out=None, record: bool = False) -> dict:
    from .runtime.generate import Runtime

    seqs = list(seqs or DEFAULT_SEQ)
    ratios = list(ratios or DEFAULT_RATIOS)
    if 1.0 not in ratios:
        ratios = [1.0] + ratios  # the dense reference
    if repeats < 1 or decode_tokens < 1:
        raise QtaleError("--repeats and --decode-tokens must be >= 1")
    rss0 = _rss_mb()
    variants = []
    for d in export_dirs:
        rt = Runtime.open(d, threads=threads)
        sels = {r: rt.select(ratio=r) for r in ratios}
        nocut, cut = _without_routers(rt.folder, rt.manifest["graphs"]["prefill"]["file"], threads)
        files = {p.name: p.stat().st_size for p in sorted(Path(d).iterdir())
                 if p.suffix in (".onnx", ".data", ".engine")}
        variants.append({"dir": str(d), "rt": rt, "sels": sels, "nocut": nocut, "cut": cut, "files": files,
                         "rss_mb": _rss_mb()})
    inputs = {s: None for s in seqs}
    prefill_t: dict = {}
    realized: dict = {}
    decode_t: dict = {}
    router_t: dict = {}
    for rep in range(repeats):
        for vi, v in enumerate(variants):
            rt = v["rt"]
            for s in seqs:
                if inputs[s] is None or inputs[s].shape[1] != s:
                    inputs[s] = _prompt_ids(rt, s)
                ids = inputs[s]
                mask = np.ones_like(ids)
                for r in ratios:
                    theta = np.full((1,), v["sels"][r]["theta"], np.float32)
                    t0 = time.perf_counter()
                    o = rt.backend.run("prefill", graph_io.prefill_feeds(ids, mask, theta))
                    prefill_t.setdefault((vi, s, r), []).append(time.perf_counter() - t0)
                    realized[(vi, s, r)] = graph_io.realized_ratio(o[graph_io.EXEC_MASK], rt.routed)
                # router overhead at this length: dense with routers vs routers cut out
                dense = graph_io.prefill_feeds(ids, mask, np.zeros((1,), np.float32))
                for kind, sess in (("with", None), ("without", v["nocut"])):
                    t0 = time.perf_counter()
                    if sess is None:
                        rt.backend.run("prefill", dense)
                    else:
                        sess.run(None, dense)
                    router_t.setdefault((vi, s, kind), []).append(time.perf_counter() - t0)
            prompt = _prompt_ids(rt, 32)
            for r in ratios:
                loop = graph_io.Loop(rt.backend.run, rt.num_layers, np.full((1,), v["sels"][r]["theta"], np.float32))
                token = graph_io.greedy(loop.prefill(prompt, np.ones_like(prompt)))
                t0 = time.perf_counter()
                for _ in range(decode_tokens):
                    token = graph_io.greedy(loop.step(token))
                decode_t.setdefault((vi, r), []).append((time.perf_counter() - t0) / decode_tokens)
    med = statistics.median
    report = {"method": "onnxruntime CPU, interleaved repeats, medians (docs/benchmarks.md)",
              "repeats": repeats, "decode_tokens": decode_tokens, "threads": threads,
              "onnxruntime": __import__("onnxruntime").__version__, "rss_start_mb": round(rss0, 1),
              "exports": []}
    for vi, v in enumerate(variants):
        m = v["rt"].manifest
        e = {"dir": v["dir"], "precision": m.get("precision"), "ops": m.get("ops"),
             "weights": m["model"].get("weights"), "files": v["files"],
             "weight_bytes": sum(b for n, b in v["files"].items() if n.endswith((".onnx", ".data"))),
             "peak_rss_mb_after_load": round(v["rss_mb"], 1), "prefill": [], "decode": [], "router_overhead": []}
        for s in seqs:
            dense = med(prefill_t[(vi, s, 1.0)])
            for r in ratios:
                t = med(prefill_t[(vi, s, r)])
                e["prefill"].append({"seq": s, "ratio": r, "theta": v["sels"][r]["theta"],
                                     "selection": v["sels"][r]["mode"], "ms": round(t * 1e3, 3),
                                     "vs_dense": round(t / dense, 4), "realized_ratio": round(realized[(vi, s, r)], 4)})
            w, wo = med(router_t[(vi, s, "with")]), med(router_t[(vi, s, "without")])
            e["router_overhead"].append({"seq": s, "dense_ms": round(w * 1e3, 3), "no_router_ms": round(wo * 1e3, 3),
                                         "overhead": round((w - wo) / wo, 4), "routers_cut": v["cut"]})
        for r in ratios:
            t = med(decode_t[(vi, r)])
            e["decode"].append({"ratio": r, "ms_per_token": round(t * 1e3, 3), "tokens_per_s": round(1.0 / t, 2)})
        report["exports"].append(e)
        if record:
            from ..export.manifest import read_manifest, write_manifest

            data = read_manifest(v["dir"], verify=False)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            data["benchmarks"] = [b for b in data.get("benchmarks") or [] if b.get("backend") != "ort-cpu"] + [
                {"backend": "ort-cpu", "ratio": d["ratio"], "ms_per_token": d["ms_per_token"],
                 "threads": threads, "date": stamp} for d in e["decode"]]
            write_manifest(v["dir"], data)
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
    for e in report["exports"]:
        for s in sorted({p["seq"] for p in e["prefill"]}):
            pts = sorted((p["ratio"], p["vs_dense"]) for p in e["prefill"] if p["seq"] == s)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{e['precision']} seq {s}")
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
    for e in report["exports"]:
        t = Table(title=f"{e['dir']} ({e['precision']}, {e['weight_bytes'] / 2**20:.1f} MiB weights)")
        for c in ("seq", "ratio", "theta", "realized", "prefill ms", "vs dense"):
            t.add_column(c)
        for p in e["prefill"]:
            t.add_row(str(p["seq"]), f"{p['ratio']:.2f}", f"{p['theta']:.4f}", f"{p['realized_ratio']:.3f}",
                      f"{p['ms']:.2f}", f"{p['vs_dense']:.3f}")
        con.print(t)
        d = Table(title="decode")
        for c in ("ratio", "ms/token", "tokens/s"):
            d.add_column(c)
        for p in e["decode"]:
            d.add_row(f"{p['ratio']:.2f}", f"{p['ms_per_token']:.2f}", f"{p['tokens_per_s']:.1f}")
        con.print(d)
        for r in e["router_overhead"]:
            con.print(f"router overhead at seq {r['seq']}: {100 * r['overhead']:+.1f}% "
                      f"({r['dense_ms']:.2f} ms dense vs {r['no_router_ms']:.2f} ms without routers)")
    con.print(f"peak RSS {report['peak_rss_mb']:.0f} MB" + (f"; plot {report['plot']}" if report.get("plot") else ""))
