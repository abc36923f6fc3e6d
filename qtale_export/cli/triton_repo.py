"""`qtale triton-repo EXPORT_DIR... --out REPO`: a Triton model repository (triton.py; no PyTorch)."""
from __future__ import annotations

import argparse

from .. import validate
from ..deploy.theta import MODES
from ..deploy.triton import BACKENDS, ELASTIC, ROUTER, build_repository
from ..validate import arg


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("export_dirs", nargs="+", metavar="EXPORT_DIR",
                        help="export folder(s); one per precision")
    parser.add_argument("--out", required=True, help="model repository folder to create")
    parser.add_argument("--backend", choices=BACKENDS, default="python",
                        help="graph models: the Python backend running ONNX Runtime (default: one model per "
                             "precision holding both graphs and their weights once), or onnxruntime_onnx / "
                             "tensorrt_plan (engines from `qtale build`), one model per graph")
    parser.add_argument("--ratios", type=arg(validate.ratios, "--ratios"), default=None,
                        help="comma-separated execution ratios to check and list (every ratio the theta "
                             "policy accepts is served by the same models)")
    parser.add_argument("--ratio-mode", choices=MODES, default="interpolate",
                        help="ratio -> theta rule of the router (default interpolate, as qtale run)")
    parser.add_argument("--max-batch", type=arg(validate.positive_int, "--max-batch"), default=8,
                        help="router max_batch_size (dynamic batching)")
    parser.add_argument("--instances", type=arg(validate.positive_int, "--instances"), default=1,
                        help="instances per model")
    parser.add_argument("--kind", choices=["cpu", "gpu"], default=None,
                        help="instance kind (default gpu for tensorrt, else cpu)")
    parser.add_argument("--threads", type=arg(validate.nonnegative_int, "--threads"), default=0,
                        help="ONNX Runtime intra-op threads (0 = default)")
    parser.add_argument("--max-new-tokens", type=arg(validate.positive_int, "--max-new-tokens"), default=32,
                        help="router default when a request has none")
    parser.add_argument("--max-new-tokens-cap", type=arg(validate.positive_int, "--max-new-tokens-cap"), default=512,
                        help="a request asking for more new tokens gets an error response (default 512)")
    parser.add_argument("--max-prompt-tokens", type=arg(validate.positive_int, "--max-prompt-tokens"), default=None,
                        help="longest prompt a request may send (default and at most: the model's maximum length - 1)")
    parser.add_argument("--deadline", type=arg(validate.positive, "--deadline"), default=60.0,
                        help="seconds a request may wait in the router's queue, and then generate: past it a "
                             "waiting request is rejected and a generating one returns its tokens so far with "
                             "stop_reason 'deadline' (default 60)")
    parser.add_argument("--max-queue", type=arg(validate.positive_int, "--max-queue"), default=64,
                        help="requests waiting for the router at most; more are rejected at once (default 64)")
    parser.add_argument("--router-instances", type=arg(validate.positive_int, "--router-instances"), default=2,
                        help="router instances (default 2: one long request does not hold the only one)")
    parser.add_argument("--elastic", choices=ELASTIC, default="off",
                        help="in-flight model: lower the ratio of its rows toward --elastic-floor while the server "
                             "falls behind (tpot: a decode round over --elastic-target seconds; queue: more than "
                             "--elastic-target requests waiting), restore it once it catches up (default off)")
    parser.add_argument("--elastic-target", type=arg(validate.positive, "--elastic-target"), default=None,
                        help="seconds per output token (tpot) or requests waiting (queue)")
    parser.add_argument("--elastic-floor", type=arg(validate.ratio, "--elastic-floor"), default=0.6,
                        help="lowest ratio the elastic policy serves (default 0.6; must be servable)")
    parser.add_argument("--elastic-interval", type=arg(validate.nonnegative, "--elastic-interval"), default=0.5,
                        help="seconds between two 0.1 steps of the elastic ratio (default 0.5)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--json", action="store_true")
    return parser


def run(args: argparse.Namespace) -> dict:
    res = build_repository(args.export_dirs, args.out, backend=args.backend, ratios=args.ratios,
                           max_batch=args.max_batch, instances=args.instances, kind=args.kind,
                           threads=args.threads, force=args.force, max_new_tokens=args.max_new_tokens,
                           ratio_mode=args.ratio_mode, max_new_tokens_cap=args.max_new_tokens_cap,
                           max_prompt_tokens=args.max_prompt_tokens, deadline_s=args.deadline,
                           max_queue=args.max_queue, router_instances=args.router_instances, elastic=args.elastic,
                           elastic_target=args.elastic_target, elastic_floor=args.elastic_floor,
                           elastic_interval=args.elastic_interval)
    if not args.json:
        print(f"wrote {len(res['models'])} models to {res['out']} ({args.backend}): {', '.join(res['models'])}")
        for v in res["ratios"]:
            print(f"  {v['precision']} ratio {v['ratio']}: theta {v['theta']:.4f} ({v['mode']})")
        print(f"  {ROUTER}: execution_ratio -> theta ({res['ratio_mode']}, as qtale run); see docs/triton.md")
        for name in (n for n in res["models"] if n.startswith("qtale_llm_")):
            print(f"  {name}: in-flight batching, streaming, generate extension (elastic {res['elastic']})")
    return res
