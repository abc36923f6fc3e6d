"""`qtale run EXPORT_DIR --ratio 0.6 --prompt "..."`: generate text with the runtime (no PyTorch)."""
from __future__ import annotations

import argparse
import signal
import sys

from .. import validate
from ..errors import QtaleError
from ..deploy.theta import MODES, check_ratio
from ..validate import arg


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("export_dir", help="export folder (with manifest.json)")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--ratio", type=arg(validate.ratio, "--ratio"), default=None,
                        help="execution ratio in (0, 1] (default: the export's ratio)")
    parser.add_argument("--theta", type=arg(validate.theta, "--theta"), default=None,
                        help="use this theta in [0, 1] instead of --ratio")
    parser.add_argument("--ratio-mode", choices=MODES, default="interpolate",
                        help="uncalibrated ratios: interpolate theta (default), use the nearest calibrated "
                             "one, or refuse them (exact); see qtale_export/deploy/theta.py")
    parser.add_argument("--max-new-tokens", type=arg(validate.positive_int, "--max-new-tokens"), default=64)
    parser.add_argument("--temperature", type=arg(validate.temperature, "--temperature"), default=0.0,
                        help="0 = greedy (default)")
    parser.add_argument("--top-p", type=arg(validate.probability, "--top-p"), default=1.0)
    parser.add_argument("--seed", type=arg(validate.nonnegative_int, "--seed"), default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--backend", choices=["ort", "tensorrt"], default="ort")
    parser.add_argument("--device", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                        help="ONNX Runtime execution provider (backend ort)")
    parser.add_argument("--threads", type=arg(validate.threads, "--threads"), default=None,
                        help="ONNX Runtime intra-op threads (at most the CPUs this process may use)")
    parser.add_argument("--plugin-lib", type=arg(validate.path, "--plugin-lib"), default=None,
                        help="TensorRT plugin library to load (backend tensorrt); without it only a library "
                             "inside the export folder matching its recorded sha256 is loaded")
    parser.add_argument("--max-length", type=arg(validate.positive_int, "--max-length"), default=None,
                        help="prompt + generated tokens limit (default: the model's)")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    return parser


def run(args: argparse.Namespace) -> dict:
    from ..deploy.runtime import Runtime

    # `qtale run` writes nothing, so SIGTERM may end it at once, even inside a long ONNX Runtime call
    # (the CLI's handler only runs between Python bytecodes)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if args.ratio is not None:
        check_ratio(args.ratio)  # before opening anything
    if not args.prompt or not args.prompt.strip():
        raise QtaleError("empty prompt")
    rt = Runtime.open(args.export_dir, backend=args.backend, device=args.device, threads=args.threads,
                      max_length=args.max_length, ratio_mode=args.ratio_mode, plugin_library=args.plugin_lib)
    kw = dict(ratio=args.ratio, theta=args.theta, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop, chat=args.chat)
    json_out = args.json
    if json_out:
        res = rt.generate(args.prompt, **kw)
    elif args.stream:
        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        res = rt.generate(args.prompt, callback=show, **kw)
        sys.stdout.write("\n")
    else:
        res = rt.generate(args.prompt, **kw)
        print(res.text)
    out = {"text": res.text, "realized_ratio": round(res.realized_ratio, 6),
           "tokens_per_s": round(res.tokens_per_s, 3), "engine": res.engine, "theta": res.theta,
           "requested_ratio": args.ratio, "selection": res.selection.get("mode"),
           "prompt_tokens": res.prompt_tokens, "new_tokens": res.new_tokens, "stop_reason": res.stop_reason,
           "prefill_ratio": round(res.prefill_ratio, 6), "decode_ratio": round(res.decode_ratio, 6),
           "decode_tokens_per_s": round(res.decode_tokens_per_s, 3)}
    if not json_out:
        print(f"[{res.engine}] theta {res.theta:.4f} ({out['selection']}), realized ratio "
              f"{res.realized_ratio:.3f}, {res.new_tokens} tokens, {res.tokens_per_s:.1f} tokens/s, "
              f"stop: {res.stop_reason}", file=sys.stderr)
    return out
