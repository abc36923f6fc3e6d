"""`qtale` and `qtale-export` command lines: parse, call one function per subcommand, print, exit.

Each subcommand is a module here (`cli/<name>.py`) with `add_arguments(parser)` and `run(args)`:
the arguments, turned into a call of the library with typed options. No library module parses
arguments. A module is imported only when its subcommand runs, so `qtale --help` stays fast and
torch-free (the deployment commands import no PyTorch at all).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import json
import sys
from typing import NamedTuple

from ..errors import QtaleError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


# ---- registry ---------------------------------------------------------------------------------
# The extras beyond the base (deployment) install, and the packages whose presence says one is
# installed (found without importing them, so `qtale --help` stays fast and torch-free).
EXTRAS = {"train": ("torch", "transformers", "peft", "safetensors")}


class Command(NamedTuple):
    name: str
    module: str  # cli/<module>.py: add_arguments(parser), run(args)
    help: str
    extra: str | None  # the extra it needs beyond the base install (None: the deployment install)


# A subcommand is listed only when its extra is installed; its module is imported, and its
# arguments built, only when it runs.
COMMANDS = [
    Command("train", "train", "train routers (QTALE or the D-LLM baseline)", "train"),
    Command("calibrate", "calibrate", "calibrate theta for target execution ratios", "train"),
    Command("quantize", "quantize", "weight-only quantization (int4-awq, int4, int3, int8, fp8)", "train"),
    Command("eval", "eval", "zero-shot commonsense accuracy, perplexity", "train"),
    Command("export", "export", "ONNX export (same as qtale-export)", "train"),
    Command("verify", "verify",
            "check an export against its stored PyTorch outputs (Polygraphy: ONNX Runtime, or TensorRT with --trt)", None),
    Command("build", "build", "TensorRT engine from an export folder", None),
    Command("run", "run", "generate text from an export folder", None),
    Command("triton-repo", "triton_repo", "Triton model repository from export(s)", None),
    Command("bench", "bench", "ONNX Runtime CPU benchmark of export(s)", None),
    Command("experiment", "experiment", "QTALE vs D-LLM vs quantization-only, from a recipe", "train"),
    Command("pipeline", "pipeline", "a QTALE checkpoint through the deployment path: quantize, calibrate, export, "
            "verify, run, bench, held-out KL (run.sh)", "train"),
]


def installed(extra: str | None) -> bool:
    return extra is None or all(importlib.util.find_spec(m) is not None for m in EXTRAS[extra])


def missing_extra(name: str, prog: str = "qtale") -> str | None:
    """The one-line reason subcommand `name` cannot run here, or None when it can (or is unknown)."""
    extra = next((c.extra for c in COMMANDS if c.name == name), None)
    if installed(extra):
        return None
    return (f"{prog} {name} needs the [{extra}] extra ({', '.join(EXTRAS[extra])}): "
            f"pip install 'qtale-export[{extra}]'")


def command_module(command: Command):
    """cli/<module>.py of a subcommand (imported now, not before it runs)."""
    return importlib.import_module(f".{command.module}", __name__)


def build_parser(prog: str = "qtale", only: str | None = None) -> Parser:
    """The parser of the subcommands that work in this environment; arguments are built for `only`
    (None: every subcommand; "": none, enough for --help)."""
    parser = Parser(prog=prog, description="QTALE: quantization-robust token-adaptive LLMs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        if not installed(command.extra):
            continue
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        if only is None or only == command.name:
            module = command_module(command)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def _run(args) -> int:
    result = args._run(args)
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
    from ..safe_write import Terminated, handle_sigterm

    handle_sigterm()  # SIGTERM unwinds like Ctrl-C, so temporaries are removed
    try:
        return _run(args)
    except QtaleError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # every writer stages beside its target (safe_write), so the previous output is intact
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"{prog}: error: no space left on the device{where}; nothing was replaced (free some space "
              "and run it again)", file=sys.stderr)
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
    from . import export

    parser = Parser(prog="qtale-export", description="ONNX export of a routed QTALE model")
    export.add_arguments(parser)
    parser.set_defaults(_run=export.run)
    args = parse(parser, argv, "qtale-export")
    return 2 if args is None else dispatch(args, "qtale-export")
