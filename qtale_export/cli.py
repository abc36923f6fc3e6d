"""`qtale` and `qtale-export` command lines: parse, call one function per subcommand, print, exit."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from . import validate
from .errors import QtaleError
from .validate import arg


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


ratio_arg = arg(validate.ratio, "ratio")
ratios_arg = arg(validate.ratios, "--ratios")


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    Console().print(table)


# ---- train ----------------------------------------------------------------------------------
def add_train(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="embedded name or HF folder (default %(default)s)")
    p.add_argument("--data", nargs="+", required=True, help="LLM-Adapters JSON file(s) or plain text")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--method", choices=["qtale", "dllm"], default=d.method)
    p.add_argument("--loss", choices=["auto", "task", "distill"], default=d.loss)
    for name, kind in validate.TRAIN_KINDS.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=arg(kind, flag), default=getattr(d, name),
                       help="Omega" if name == "target_ratio" else None)
    p.add_argument("--lora-lr", type=arg(validate.positive, "--lora-lr"), default=None,
                   help="LoRA learning rate (default: --lr)")
    p.add_argument("--max-examples", type=arg(validate.positive_int, "--max-examples"), default=None)
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the base model (FSDP2)")
    p.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="keep the distillation teacher's outputs per batch in DIR and reuse them (another "
                        "method or a rerun on the same data, batch shape and seed skips the teacher's forward)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="base weights (bfloat16 for large models on GPUs; routers stay float32)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--json", action="store_true")


def run_train(args) -> int:
    from . import checkpoint
    from .train import TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    out = train(cfg, resume=args.resume, force=args.force)
    from .train import dist_info

    if dist_info()[0] != 0:
        return 0
    meta = checkpoint.read_meta(out)
    summary = {"checkpoint": str(out), "steps": meta["training"]["steps_done"],
               "final": meta["training"]["final_losses"]}
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(f"trained {out}", ["metric", "value"], [[k, v] for k, v in summary["final"].items()])
    return 0


# ---- calibrate ------------------------------------------------------------------------------
def add_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (qtale train --out)")
    p.add_argument("--ratios", type=ratios_arg, default=[0.5, 0.6, 0.7, 0.8, 1.0],
                   help="comma-separated target execution ratios in (0, 1]")
    p.add_argument("--data", default=None, help="calibration text or JSON (default: built-in text)")
    p.add_argument("--seq-len", type=arg(validate.positive_int, "--seq-len"), default=256)
    p.add_argument("--max-tokens", type=arg(validate.positive_int, "--max-tokens"), default=4096)
    p.add_argument("--tol", type=arg(validate.positive, "--tol"), default=0.01)
    from .compute import add_compute_arguments

    add_compute_arguments(p)
    p.add_argument("--json", action="store_true")


def run_calibrate(args) -> int:
    from . import checkpoint
    from .api import load
    from .calibrate import calibrate
    from .data import CALIBRATION_TEXT, text_batches

    folder = Path(args.checkpoint)
    checkpoint.read_meta(folder)  # a clear error before loading the model
    model = load(folder, dtype=args.dtype, device=args.device, fold=True)
    data = Path(args.data) if args.data else CALIBRATION_TEXT
    batches = text_batches(data, model.tokenizer, args.seq_len, 4, args.max_tokens)
    table = calibrate(model, batches, args.ratios, tol=args.tol)
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))

    from . import theta as policy

    def merge(meta: dict) -> None:  # applied to the latest qtale.json under its lock: a concurrent run's ratios stay
        keep = {} if policy.stale_reason(meta) else (meta.get("theta_table") or {})  # stale entries go
        meta["theta_table"] = {**keep, **table}
        meta["calibration"] = policy.calibration_record(
            meta, {"data": data.name, "tokens": tokens, "tol": args.tol, "dtype": args.dtype})

    checkpoint.update_meta(folder, merge)
    if args.json:
        print(json.dumps({"ratios": table}))
    else:
        print_table(f"theta table of {folder} ({tokens} tokens of {data.name})", ["ratio", "theta", "realized"],
                    [[k, v["theta"], v["realized"]] for k, v in table.items()])
    return 0


# ---- export / verify -------------------------------------------------------------------------
def add_export(p: argparse.ArgumentParser) -> None:
    from .export.main import add_export_arguments

    add_export_arguments(p)
    p.add_argument("--json", action="store_true", help="print the manifest's verification as JSON")


def _verification_rows(report: dict) -> list[list]:
    return [[k, v] for k, v in report.items() if isinstance(v, (int, float, str, bool))]


def run_export_cmd(args) -> int:
    from .export.main import run_export

    manifest = run_export(args)
    report = manifest.get("verification", {})
    if args.json:
        print(json.dumps({"out": str(args.out), "verification": report}))
    else:
        print_table(f"exported {args.out} ({manifest.get('precision')}, {manifest.get('ops')} ops)",
                    ["check", "value"], _verification_rows(report))
    return 0


def add_verify(p: argparse.ArgumentParser) -> None:
    from .export.main import add_verify_arguments

    add_verify_arguments(p)
    p.add_argument("--json", action="store_true")


def run_verify_cmd(args) -> int:
    from .export.main import run_verify

    report = run_verify(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(f"verification of {args.dir}", ["check", "value"], _verification_rows(report))
    if not report.get("ok", False):
        print(f"qtale verify: error: {args.dir} does not match PyTorch within tolerance", file=sys.stderr)
        return 1
    return 0


# ---- registry ---------------------------------------------------------------------------------
# The extras beyond the base (deployment) install, and the packages whose presence says one is
# installed (found without importing them, so `qtale --help` stays fast and torch-free).
EXTRAS = {"train": ("torch", "transformers", "peft", "safetensors")}

# (name, module, add-arguments function, run function, help, extra). A subcommand is listed only
# when its extra is installed; its module is imported, and its arguments built, only when it runs.
COMMANDS = [
    ("train", None, add_train, run_train, "train routers (QTALE or the D-LLM baseline)", "train"),
    ("calibrate", None, add_calibrate, run_calibrate, "calibrate theta for target execution ratios", "train"),
    ("quantize", ".quantize", "add_quantize_arguments", "run_quantize",
     "weight-only quantization (int4-awq, int4, int3, int8, fp8)", "train"),
    ("eval", ".evaluate", "add_eval_arguments", "run_eval", "zero-shot commonsense accuracy, perplexity", "train"),
    ("export", None, add_export, run_export_cmd, "ONNX export (same as qtale-export)", "train"),
    ("verify", None, add_verify, run_verify_cmd,
     "check an export against its stored PyTorch outputs (Polygraphy: ONNX Runtime, or TensorRT with --trt)", None),
    ("build", ".tensorrt", "add_build_arguments", "run_build", "TensorRT engine from an export folder", None),
    ("run", ".deploy.runtime.command", "add_run_arguments", "run_run", "generate text from an export folder", None),
    ("triton-repo", ".deploy.triton", "add_triton_arguments", "run_triton", "Triton model repository from export(s)", None),
    ("bench", ".deploy.bench", "add_bench_arguments", "run_bench", "ONNX Runtime CPU benchmark of export(s)", None),
    ("experiment", ".experiment", "add_experiment_arguments", "run_experiment",
     "QTALE vs D-LLM vs quantization-only, from a recipe", "train"),
]


def installed(extra: str | None) -> bool:
    return extra is None or all(importlib.util.find_spec(m) is not None for m in EXTRAS[extra])


def missing_extra(name: str, prog: str = "qtale") -> str | None:
    """The one-line reason subcommand `name` cannot run here, or None when it can (or is unknown)."""
    extra = next((c[5] for c in COMMANDS if c[0] == name), None)
    if installed(extra):
        return None
    return (f"{prog} {name} needs the [{extra}] extra ({', '.join(EXTRAS[extra])}): "
            f"pip install 'qtale-export[{extra}]'")


def _resolve(module: str | None, fn):
    if module is None or callable(fn):
        return fn
    return getattr(importlib.import_module(module, __package__), fn)


def build_parser(prog: str = "qtale", only: str | None = None) -> Parser:
    """The parser of the subcommands that work in this environment; arguments are built for `only`
    (None: every subcommand; "": none, enough for --help)."""
    parser = Parser(prog=prog, description="QTALE: quantization-robust token-adaptive LLMs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, module, add, run, help_text, extra in COMMANDS:
        if not installed(extra):
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            _resolve(module, add)(p)
        p.set_defaults(_run=(module, run))
    return parser


def _run(args) -> int:
    module, run = args._run
    result = _resolve(module, run)(args)
    if isinstance(result, dict):
        if getattr(args, "json", False):
            print(json.dumps(result))
        return 0
    return int(result or 0)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, prog: str):
    """Parsed arguments, or (exit code 2) None after printing a value checker's one-line error."""
    try:
        return parser.parse_args(argv)
    except QtaleError as exc:  # raised by a qtale_export.validate type (argparse lets it through)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None, prog: str = "qtale") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    reason = missing_extra(command, prog)
    if reason:
        print(f"{prog}: error: {reason}", file=sys.stderr)
        return 2
    args = parse(build_parser(prog, only=command), argv, prog)
    return 2 if args is None else dispatch(args, prog)


def dispatch(args, prog: str) -> int:
    from .safe_write import Terminated, handle_sigterm

    handle_sigterm()  # SIGTERM unwinds like Ctrl-C, so temporaries are removed
    try:
        return _run(args)
    except QtaleError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def export_main(argv: list[str] | None = None) -> int:
    """`qtale-export`: the export subcommand as its own program."""
    reason = missing_extra("export", "qtale")
    if reason:
        print(f"qtale-export: error: {reason}", file=sys.stderr)
        return 2
    parser = Parser(prog="qtale-export", description="ONNX export of a routed QTALE model")
    add_export(parser)
    parser.set_defaults(_run=(None, run_export_cmd))
    args = parse(parser, argv, "qtale-export")
    return 2 if args is None else dispatch(args, "qtale-export")


if __name__ == "__main__":
    sys.exit(main())
