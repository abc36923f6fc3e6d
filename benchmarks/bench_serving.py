"""Serving benchmark (issue 25): bounded open-loop load on 127.0.0.1 against a real tritonserver.

    python benchmarks/bench_serving.py --export EXPORT_DIR [--rates 0.5,1,2] [--duration 15]

Poisson arrivals at each rate (fixed seed, fixed prompt set) for `--duration` seconds, then the
outstanding requests drain (at most `--drain` seconds). Four setups, side by side in one run:
today's router (`qtale_router`, whole answers), the in-flight model `qtale_llm_<precision>` at
ratio 1.0 and at 0.6 (streaming), and the in-flight model with the elastic policy (tpot, floor 0.6)
asked for 1.0. Reported per setup and rate: output tokens/s, p50/p95 time to first token (the
router streams nothing: its first token arrives with the whole answer), p50/p95 time per output
token, the realized ratio served, requests answered / refused. Results: benchmarks/results/
serving.json (+ serving.png). Not a test: the numbers depend on the machine and its load.

The server comes from nvidia-pytriton in the Triton venv of tests/unit/deploy/conftest.py
(~/.cache/qtale/triton-venv); that module's start-up is reused.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "unit" / "deploy"))
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "Water boils at",
           "The best way to learn a new language is", "In 1969, the first humans", "A healthy breakfast includes",
           "The quick brown fox", "Photosynthesis is the process by which"]


def _grpc_inputs(options: dict, types: dict, batched: bool):
    """Input tensors of one request; `batched`: with the leading batch dimension (the router)."""
    import tritonclient.grpc as grpcclient

    out = []
    for name, value in options.items():
        kind = types[name]
        arr = np.asarray([value.encode() if kind == "BYTES" else value],
                         dtype={"BYTES": np.object_, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_}[kind])
        arr = arr.reshape(1, 1) if batched else arr
        t = grpcclient.InferInput(name, list(arr.shape), kind)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


LLM_TYPES = {"text_input": "BYTES", "max_tokens": "INT32", "execution_ratio": "FP32", "stream": "BOOL",
             "ignore_eos": "BOOL"}
ROUTER_TYPES = {"text": "BYTES", "max_new_tokens": "INT32", "execution_ratio": "FP32"}


def llm_request(addr: str, model: str, prompt: str, ratio: float, tokens: int) -> dict:
    """One streamed request: arrival-relative first-token time, per-token time, tokens, realized ratio."""
    import tritonclient.grpc as grpcclient

    t0, stamps, box, done = time.perf_counter(), [], {}, threading.Event()

    def callback(result, error):
        if error is not None:
            box["error"] = str(error)
            done.set()
            return
        stamps.append((time.perf_counter(), len(result.as_numpy("output_ids"))))
        if result.get_response().parameters["triton_final_response"].bool_param:
            box["realized"] = float(result.as_numpy("realized_ratio")[0])
            done.set()

    client = grpcclient.InferenceServerClient(addr)
    try:
        client.start_stream(callback=callback)
        client.async_stream_infer(model, _grpc_inputs({"text_input": prompt, "max_tokens": tokens, "execution_ratio": ratio,
                                                       "stream": True, "ignore_eos": True}, LLM_TYPES, False),
                                  enable_empty_final_response=True)
        done.wait(600)
        client.stop_stream()
    finally:
        client.close()
    if "error" in box or not stamps:
        return {"error": box.get("error", "no answer")}
    n = sum(k for _, k in stamps)
    first, last = stamps[0][0] - t0, stamps[-1][0] - t0
    return {"ttft": first, "tpot": (last - first) / max(n - 1, 1), "tokens": n, "realized": box["realized"]}


def router_request(addr: str, prompt: str, ratio: float, tokens: int) -> dict:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(addr)
    t0 = time.perf_counter()
    try:
        res = client.infer("qtale_router", _grpc_inputs({"text": prompt, "max_new_tokens": tokens,
                                                         "execution_ratio": ratio}, ROUTER_TYPES, True), client_timeout=600)
    except InferenceServerException as exc:
        return {"error": str(exc)}
    finally:
        client.close()
    latency = time.perf_counter() - t0
    n = int((res.as_numpy("output_ids")[0] >= 0).sum())
    return {"ttft": latency, "tpot": latency / max(n, 1), "tokens": n,
            "realized": float(res.as_numpy("realized_ratio")[0, 0])}


def open_loop(send, rate: float, duration: float, drain: float, seed: int) -> dict:
    """Poisson arrivals at `rate` per second for `duration` seconds; each arrival runs `send(prompt)`
    in its own thread; waits up to `drain` seconds for the last answers."""
    rng = np.random.default_rng(seed)
    results, threads = [], []
    t0 = time.perf_counter()
    at, k = rng.exponential(1 / rate), 0
    while at < duration:
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        prompt = PROMPTS[k % len(PROMPTS)]
        t = threading.Thread(target=lambda p=prompt: results.append(send(p)), daemon=True)
        t.start()
        threads.append(t)
        at, k = at + rng.exponential(1 / rate), k + 1
    end = time.perf_counter() + drain
    for t in threads:
        t.join(max(0.0, end - time.perf_counter()))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    pct = lambda key, q: float(np.percentile([r[key] for r in ok], q)) if ok else None
    return {"rate": rate, "sent": len(threads), "answered": len(ok), "refused": len(results) - len(ok),
            "unfinished": len(threads) - len(results), "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50": pct("ttft", 50), "ttft_p95": pct("ttft", 95), "tpot_p50": pct("tpot", 50),
            "tpot_p95": pct("tpot", 95), "realized_ratio": float(np.mean([r["realized"] for r in ok])) if ok else None}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, rows in results["setups"].items():
        rates = [r["rate"] for r in rows]
        axes[0].plot(rates, [r["tokens_per_s"] for r in rows], "o-", label=name)
        axes[1].plot(rates, [r["ttft_p95"] for r in rows], "o-", label=name)
        axes[2].plot(rates, [r["tpot_p95"] for r in rows], "o-", label=name)
    axes[2].axhline(results["tpot_target"], color="gray", ls=":", label="elastic target")
    for ax, title in zip(axes, ("output tokens/s", "p95 time to first token (s)", "p95 time per output token (s)")):
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", help="export folder (e.g. the shipped model at int4)")
    ap.add_argument("--rates", default="1,2,4,6", help="arrival rates, requests/s")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per rate")
    ap.add_argument("--drain", type=float, default=240.0,
                    help="seconds to wait for the last answers (so one run's backlog does not load the next)")
    ap.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    ap.add_argument("--tpot-target", type=float, default=None,
                    help="elastic target (s per output token; default 4x the unloaded TPOT at ratio 1.0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    ap.add_argument("--replot", action="store_true", help="only redraw the plot of --out's results")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    if not args.export:
        ap.error("--export is required")
    from conftest import VENV, run_tritonserver  # the tests' server start-up

    from qtale_export.deploy.triton import build_repository
    from qtale_export.deploy.manifest import read_manifest

    precision = read_manifest(args.export, verify=False)["precision"]
    llm = f"qtale_llm_{precision}"
    rates = [float(r) for r in args.rates.split(",")]
    results = {"export": str(args.export), "precision": precision, "tokens": args.tokens, "duration_s": args.duration,
               "seed": args.seed, "setups": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_repository([args.export], tmp / "repo", threads=1, max_batch=16, max_queue=256, max_new_tokens_cap=512,
                         deadline_s=600, router_instances=2)
        with run_tritonserver(VENV, tmp / "repo", tmp / "w1") as (_, addr):
            unloaded = [llm_request(addr, llm, PROMPTS[0], 1.0, args.tokens) for _ in range(3)]
            tpot = float(np.median([u["tpot"] for u in unloaded]))
            target = args.tpot_target or 4 * tpot
            results["tpot_unloaded_s"], results["tpot_target"] = tpot, target
            setups = {"router 1.0": lambda p: router_request(addr, p, 1.0, args.tokens),
                      "in-flight 1.0": lambda p: llm_request(addr, llm, p, 1.0, args.tokens),
                      "in-flight 0.6": lambda p: llm_request(addr, llm, p, 0.6, args.tokens)}
            for name, send in setups.items():
                results["setups"][name] = [open_loop(send, r, args.duration, args.drain, args.seed) for r in rates]
                print(name, json.dumps(results["setups"][name]), flush=True)
        build_repository([args.export], tmp / "elastic", threads=1, max_batch=16, max_queue=256, max_new_tokens_cap=512,
                         deadline_s=600, elastic="tpot", elastic_target=target, elastic_floor=0.6, elastic_interval=0.5)
        with run_tritonserver(VENV, tmp / "elastic", tmp / "w2") as (_, addr):
            llm_request(addr, llm, PROMPTS[0], 1.0, 4)  # warm
            send = lambda p: llm_request(addr, llm, p, 1.0, args.tokens)
            name = "in-flight elastic (1.0, floor 0.6)"
            results["setups"][name] = [open_loop(send, r, args.duration, args.drain, args.seed) for r in rates]
            print(name, json.dumps(results["setups"][name]), flush=True)
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
