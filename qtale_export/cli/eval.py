"""`qtale eval CHECKPOINT_OR_EXPORT`: zero-shot accuracy, perplexity and KL (evaluate.py)."""
from __future__ import annotations

import argparse

from .. import validate
from ..evaluate import EvalConfig, evaluate_checkpoint
from ..tasks import AVG7, STYLES
from ..validate import arg
from .common import add_compute_arguments


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("checkpoint", help="QTALE checkpoint folder or model name, or an export folder "
                                           "(with manifest.json: scored through ONNX Runtime)")
    parser.add_argument("--tasks", default=",".join(AVG7),
                        help="comma-separated: boolq,piqa,siqa,arc_e,arc_c,winogrande,obqa,hellaswag "
                             "or avg7 (default: the avg7 tasks)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--ratio", type=arg(validate.ratio, "--ratio"), default=None,
                   help="target execution ratio (calibrated theta)")
    g.add_argument("--theta", type=arg(validate.theta, "--theta"), default=None,
                   help="router theta in [0, 1]: a layer runs iff P(execute) >= theta")
    g.add_argument("--threshold", dest="theta", type=arg(validate.theta, "--threshold"), default=None,
                   help=argparse.SUPPRESS)  # the old name of --theta, still accepted
    parser.add_argument("--limit", type=arg(validate.positive_int, "--limit"), default=None,
                        help="first N items of every task")
    parser.add_argument("--batch-size", type=arg(validate.positive_int, "--batch-size"), default=64,
                        help="most sequences per forward")
    parser.add_argument("--batch-tokens", type=arg(validate.positive_int, "--batch-tokens"), default=4096,
                        help="most padded tokens per forward (batches are built longest first)")
    add_compute_arguments(parser)
    parser.add_argument("--style", choices=list(STYLES), default="harness",
                        help="harness: lm-evaluation-harness prompts; instruct: the fine-tuning prompt")
    parser.add_argument("--ppl-file", default=None,
                        help="held-out text for perplexity/KL: a text file, or 'sciq' (the SciQ validation "
                             "support paragraphs); default: the package's short held-out paragraphs")
    parser.add_argument("--ppl-tokens", type=arg(validate.positive_int, "--ppl-tokens"), default=None,
                        help="use only the first N tokens of the perplexity text")
    parser.add_argument("--no-ppl", action="store_true", help="skip perplexity and KL")
    parser.add_argument("--reference", default=None,
                        help="all-layers reference for KL (e.g. the unquantized checkpoint); default: "
                             "the evaluated model with every layer executed")
    parser.add_argument("--items", default=None, help="write per-item scores (JSON) to this file")
    parser.add_argument("--force", action="store_true", help="replace an existing --items file")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def config_of(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(tasks=args.tasks, ratio=args.ratio, theta=args.theta, limit=args.limit,
                      batch_size=args.batch_size, batch_tokens=args.batch_tokens, style=args.style,
                      ppl=not args.no_ppl, ppl_file=args.ppl_file, ppl_tokens=args.ppl_tokens,
                      reference=args.reference, items=args.items, force=args.force, dtype=args.dtype,
                      device=args.device, progress=not args.no_progress)


def run(args: argparse.Namespace) -> dict:
    out = evaluate_checkpoint(args.checkpoint, config_of(args))
    if not args.json:
        flops = f"{out['flops_fraction']:.4f}" if "flops_fraction" in out else "n/a"
        print(f"{args.checkpoint}  [{out['backend']}]  style={args.style}  theta={out['theta']:.4g}  "
              f"realized ratio={out['realized_ratio']:.4f}  flops={flops}")
        for t, r in out["tasks"].items():
            print(f"  {t:<11} acc {r['acc']:.4f} ±{r['acc_stderr']:.4f}  acc_norm {r['acc_norm']:.4f} "
                  f"±{r['acc_norm_stderr']:.4f}  n={r['n']}")
        if "avg7" in out:
            print(f"  avg7        {out['avg7']:.4f}")
        if "ppl" in out:
            print(f"  ppl {out['ppl']:.3f}  KL to all layers {out['kl']:.5f}  ({out['ppl_tokens']} tokens)")
    return out
