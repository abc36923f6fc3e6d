#!/usr/bin/env python
"""This project's INT4 ort-cpu export against onnxruntime-genai's own INT4 CPU build of the same model.

    python benchmarks/peer_bench.py [--export DIR] [--also DIR2,...] [--ratios 1.0,0.8,0.6] [--repeats 3]
                                    [--threads 2] [--no-spin] [--prepare-only] [--json OUT]

Same prompt (--prompt-tokens of held-out text, the same token ids for both), then --new-tokens
greedy tokens, --threads intra-op threads each. Our export runs in this process (the torch-free
`qtale_export.deploy.runtime`); onnxruntime-genai runs in a worker process in its own virtual environment
(benchmarks/.venv-peer, created and filled with `pip install onnxruntime-genai` and what its model
builder needs on first use), so neither package touches the other's environment. Repeats are
interleaved (every ratio, then the peer, then the next repeat) so load drift on a shared machine hits
both alike; medians are printed, as ratios:

* decode: our tokens/s / the peer's (> 1: we are faster);
* prefill: the peer's prompt time / ours (> 1: we are faster), and ours against our own ratio 1.0;
* folder sizes on disk.

Without --export, the export is made from the shipped smollm2-135m routers
(`qtale-export smollm2-135m --precision int4 --target ort-cpu`); the peer is built from the same
Hugging Face copy of the model (`python -m onnxruntime_genai.models.builder -p int4 -e cpu`).
Work files go to benchmarks/.peer-work (git-ignored). Where the peer cannot be installed or built,
the run says so and stops with exit code 3 (nothing to compare with). See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

TORCH = "torch==2.13.0"  # pinned as scripts/setup.sh pins it: an unpinned torch pulls GBs of CUDA wheels
PEER_PACKAGES = ["onnxruntime-genai", TORCH, "transformers", "onnx", "onnx_ir", "tqdm"]

# runs inside the peer's venv: one JSON command per line on stdin, one JSON answer per line on stdout
WORKER = r"""
import json, sys, time
import numpy as np
import onnxruntime_genai as og
model = og.Model(og.Config(sys.argv[1]))
print(json.dumps({"ready": og.__version__ if hasattr(og, "__version__") else "?"}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    ids = np.asarray(cmd["ids"], np.int32)
    params = og.GeneratorParams(model)
    n = cmd["new_tokens"]
    params.set_search_options(do_sample=False, max_length=len(ids) + n, min_length=len(ids) + n)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)  # runs the prompt
    t1 = time.perf_counter()
    out = 0
    while not gen.is_done() and out < n:
        gen.generate_next_token()
        out += 1
    t2 = time.perf_counter()
    toks = [int(t) for t in gen.get_sequence(0)[len(ids):]]
    print(json.dumps({"prefill_s": t1 - t0, "decode_s": t2 - t1, "new_tokens": out, "tokens": toks}), flush=True)
"""


def run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], **kw)


def peer_python(venv: Path) -> Path | None:
    """The peer venv's python with onnxruntime-genai importable, installing it on first use."""
    py = venv / "bin" / "python"
    if py.is_file() and run([py, "-c", "import onnxruntime_genai, torch, transformers"],
                            capture_output=True).returncode == 0:
        return py
    if not py.is_file() and run([sys.executable, "-m", "venv", venv]).returncode != 0:
        return None
    # torch first, so pip takes the CPU build where one is offered (a local wheel, PIP_FIND_LINKS,
    # PIP_INDEX_URL); never an unpinned fallback
    if run([py, "-m", "pip", "install", "-q", TORCH]).returncode != 0:
        return None
    if run([py, "-m", "pip", "install", "-q", *PEER_PACKAGES]).returncode != 0:
        return None
    ok = run([py, "-c", "import onnxruntime_genai, torch, transformers"], capture_output=True).returncode == 0
    return py if ok else None


def hf_folder() -> Path:
    """The Hugging Face copy of the embedded default model (converted from its GGUF once)."""
    from qtale_export.models import resolve

    return Path(resolve("smollm2-135m"))


def build_peer(py: Path, out: Path, threads: int) -> bool:
    if not (out / "genai_config.json").is_file():
        res = run([py, "-m", "onnxruntime_genai.models.builder", "-m", hf_folder(), "-p", "int4", "-e", "cpu",
                   "-o", out, "-c", out.parent / "peer-cache"])
        if res.returncode != 0 or not (out / "genai_config.json").is_file():
            return False
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"] = threads  # the same thread count as ours
    so["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=4))
    return True


def build_export(out: Path) -> None:
    if (out / "manifest.json").is_file():
        return
    res = run([sys.executable, "-m", "qtale_export.cli", "export", "smollm2-135m", "--precision", "int4",
               "--target", "ort-cpu", "--ratio", "0.6", "--out", out, "--decode-steps", "2", "--force"],
              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    if res.returncode != 0:
        sys.exit(f"peer_bench: the export failed (exit {res.returncode})")


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


class Peer:
    def __init__(self, py: Path, folder: Path):
        self.p = subprocess.Popen([str(py), "-c", WORKER, str(folder)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        ready = json.loads(self.p.stdout.readline())
        self.version = ready["ready"]

    def generate(self, ids: list[int], new_tokens: int) -> dict:
        self.p.stdin.write(json.dumps({"ids": ids, "new_tokens": new_tokens}) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", default=None, help="our INT4 ort-cpu export folder (default: made from smollm2-135m)")
    ap.add_argument("--also", default=None,
                    help="comma-separated further export folders of ours (e.g. an older build), measured in the "
                         "same interleaved run")
    ap.add_argument("--peer", default=None, help="onnxruntime-genai model folder (default: built)")
    ap.add_argument("--venv", default=str(HERE / ".venv-peer"), help="the peer's own virtual environment")
    ap.add_argument("--work", default=str(HERE / ".peer-work"))
    ap.add_argument("--ratios", default="1.0,0.8,0.6")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-spin", action="store_true",
                    help="also run ours with ORT's idle-thread spinning off (the peer keeps its default)")
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    ap.add_argument("--prepare-only", action="store_true",
                    help="install the peer, build both models and stop (prepare on a busy machine, time on a quiet one)")
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    py = peer_python(Path(args.venv))
    if py is None:
        print("peer_bench: SKIPPED: onnxruntime-genai (and its model builder's torch/transformers) could not "
              f"be installed into {args.venv}; nothing to compare with")
        return 3
    peer_dir = Path(args.peer) if args.peer else work / "genai-int4"
    if not build_peer(py, peer_dir, args.threads):
        print(f"peer_bench: SKIPPED: onnxruntime-genai's builder could not build {peer_dir}")
        return 3
    export = Path(args.export) if args.export else work / "qtale-int4"
    if not args.export:
        build_export(export)
    if args.prepare_only:
        print(f"peer_bench: prepared {peer_dir} and {export}")
        return 0

    from qtale_export.deploy.bench import _prompt_ids
    from qtale_export.deploy.runtime import Runtime

    variants = {"ours": Runtime.open(export, threads=args.threads)}  # ORT's defaults, as the peer
    if args.no_spin:
        variants["ours, no spin"] = Runtime.open(export, threads=args.threads, spin=False)
    for extra in (args.also.split(",") if args.also else []):
        variants[f"ours: {Path(extra).name}"] = Runtime.open(extra, threads=args.threads)
    rt = variants["ours"]
    ids = [int(i) for i in _prompt_ids(rt, args.prompt_tokens)[0]]
    text = rt.tokenizer.decode(ids)
    ids = rt.encode_prompt(text)  # what our runtime will see; the peer gets the same ids
    peer = Peer(py, peer_dir)
    ours: dict[tuple, list] = {(v, r): [] for v in variants for r in ratios}
    theirs: list = []
    try:
        for v in variants.values():  # warm-up
            v.generate(text, ratio=1.0, max_new_tokens=4)
        peer.generate(ids, 4)
        for rep in range(args.repeats):
            for r in ratios:
                for name, v in variants.items():
                    res = v.generate(text, ratio=r, max_new_tokens=args.new_tokens, ignore_eos=True)  # as the peer's min_length
                    ours[(name, r)].append({"prefill_s": res.prefill_s, "decode_tok_s": res.decode_tokens_per_s,
                                            "new_tokens": res.new_tokens, "realized": res.realized_ratio,
                                            "decode_ratio": res.decode_ratio})
                p = peer.generate(ids, args.new_tokens)
                # the peer's first generate_next_token takes the prompt's token: count the steps after it
                theirs.append({"prefill_s": p["prefill_s"], "new_tokens": p["new_tokens"],
                               "decode_tok_s": max(p["new_tokens"] - 1, 1) / p["decode_s"]})
            print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    finally:
        peer.close()

    med = statistics.median
    peer_decode = med(t["decode_tok_s"] for t in theirs)
    peer_prefill = med(t["prefill_s"] for t in theirs)
    print(f"\nprompt {len(ids)} tokens, {args.new_tokens} greedy new tokens, {args.threads} threads, "
          f"{args.repeats} interleaved repeats (medians); onnxruntime-genai {peer.version}")
    peer_mb, ours_mb = folder_mb(peer_dir), folder_mb(export)
    print(f"peer (onnxruntime-genai INT4 CPU): prefill {peer_prefill:.3f} s, decode {peer_decode:.1f} tok/s, "
          f"folder {peer_mb:.1f} MB")
    ref = export / "reference.npz"  # verification data (qtale-export --no-reference leaves it out)
    deploy_mb = ours_mb - (ref.stat().st_size / 1e6 if ref.is_file() else 0.0)
    print(f"ours ({export}): folder {ours_mb:.1f} MB, {deploy_mb:.1f} MB without reference.npz "
          f"(size ratio ours/peer {ours_mb / peer_mb:.3f} / {deploy_mb / peer_mb:.3f})")
    print("\n| engine | ratio | realized (all) | realized (decode) | new tokens | decode tok/s | decode vs peer | "
          "prefill s | prefill speedup vs peer | prefill time / ratio 1.0 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in variants:
        base = med(o["prefill_s"] for o in ours[(name, 1.0)]) if 1.0 in ratios else None
        for r in ratios:
            runs = ours[(name, r)]
            d, pf = med(o["decode_tok_s"] for o in runs), med(o["prefill_s"] for o in runs)
            row = {"engine": name, "ratio": r, "realized": med(o["realized"] for o in runs),
                   "decode_ratio": med(o["decode_ratio"] for o in runs),
                   "new_tokens": min(o["new_tokens"] for o in runs), "decode_tok_s": d,
                   "decode_vs_peer": d / peer_decode, "prefill_s": pf, "prefill_speedup": peer_prefill / pf,
                   "prefill_vs_dense": pf / base if base else None}
            rows.append(row)
            rel = f"{row['prefill_vs_dense']:.3f}" if base else "-"
            print(f"| {name} | {r} | {row['realized']:.3f} | {row['decode_ratio']:.3f} | {row['new_tokens']} | {d:.1f} | "
                  f"{row['decode_vs_peer']:.3f}x | {pf:.3f} | {row['prefill_speedup']:.3f}x | {rel} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "threads": args.threads,
            "repeats": args.repeats, "peer": {"version": peer.version, "folder_mb": peer_mb,
                                              "prefill_s": peer_prefill, "decode_tok_s": peer_decode, "raw": theirs},
            "ours": {"folder_mb": ours_mb, "folder_mb_without_reference": deploy_mb, "rows": rows, "raw": {f"{k[0]}@{k[1]}": v for k, v in ours.items()}},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
