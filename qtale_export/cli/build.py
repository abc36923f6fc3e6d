"""`qtale build EXPORT_DIR`: a TensorRT engine from an export folder, recorded in its manifest
(tensorrt.py). build_engine.sh builds with trtexec instead and calls this command twice: `--plan`
to validate and `--record ENGINE` to add the engine trtexec wrote to the manifest."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..errors import QtaleError

from ..deploy.precisions import PRECISIONS, parse_sm
from ..deploy.tensorrt import (DEFAULT_WORKSPACE_MB, GRAPHS, JETSON_WORKSPACE_MB, BuildOptions, build, plan_build,
                               record_built)
from ..deploy.trt_builder import BUILDERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", type=Path, help="folder written by qtale-export (has manifest.json)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default=None,
                        help="engine precision (default: the export's precision)")
    parser.add_argument("--graph", choices=GRAPHS, default="prefill", help="which exported graph to build")
    parser.add_argument("--min-tokens", type=int, default=1, help="optimization profile: shortest sequence")
    parser.add_argument("--opt-tokens", type=int, default=256, help="optimization profile: tuned sequence length")
    parser.add_argument("--max-tokens", type=int, default=2048, help="optimization profile: longest sequence")
    parser.add_argument("--batch", default="1", help="batch size N or MIN:OPT:MAX (default 1)")
    parser.add_argument("--plugin-lib", type=Path, default=None,
                        help="libqtale_trt_plugins.so (required when the export uses qtale plugin ops)")
    parser.add_argument("--jetson", action="store_true",
                        help="target Jetson Orin (SM 8.7): no FP8, workspace default 2048 MB")
    parser.add_argument("--dry-run", action="store_true", help="print the equivalent trtexec command and exit")
    parser.add_argument("--workspace-mb", type=int, default=None,
                        help=f"builder workspace limit (default {DEFAULT_WORKSPACE_MB}, {JETSON_WORKSPACE_MB} with --jetson)")
    parser.add_argument("--timing-cache", type=Path, default=None, help="timing cache file (read and updated)")
    parser.add_argument("--builder", choices=BUILDERS, default="auto",
                        help="TensorRT on a GPU host, or TensorRT-RTX (builds without a GPU, for Ampere-and-later "
                             "RTX GPUs); auto: TensorRT where installed, else TensorRT-RTX")
    parser.add_argument("--compute-capability", default="",
                        help="TensorRT-RTX: comma-separated target SM versions, e.g. 8.6,8.9 (default: "
                             "TensorRT-RTX's own set; FP8 keeps those >= 8.9)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true",
                      help="only validate; print 'PRECISION strong|weak PLUGIN_LIB|-' (used by build_engine.sh)")
    mode.add_argument("--record", type=Path, default=None, metavar="ENGINE",
                      help="record ENGINE, built by trtexec, in manifest.json instead of building")
    parser.add_argument("--trtexec-log", type=Path, default=None,
                        help="with --record: the trtexec log (its TensorRT version is recorded)")


def options(args: argparse.Namespace) -> BuildOptions:
    return BuildOptions(export_dir=args.export_dir, precision=args.precision, graph=args.graph,
                        min_tokens=args.min_tokens, opt_tokens=args.opt_tokens, max_tokens=args.max_tokens,
                        batch=args.batch, plugin_lib=args.plugin_lib, jetson=args.jetson, dry_run=args.dry_run,
                        workspace_mb=args.workspace_mb, timing_cache=args.timing_cache,
                        engine=getattr(args, "record", None), builder=args.builder,
                        compute_capabilities=_capabilities(args.compute_capability))


def _capabilities(text: str) -> tuple[str, ...]:
    items = [item.strip() for item in str(text or "").split(",")] if str(text or "").strip() else []
    if any(not item for item in items):
        raise QtaleError(f"--compute-capability has an empty item: {text!r}")
    if any(parse_sm(item) is None for item in items):
        raise QtaleError(f"--compute-capability takes SM versions like 8.6,8.9, got {text!r}")
    return tuple(items)


def run(args: argparse.Namespace) -> dict | int:
    opts = options(args)
    if getattr(args, "plan", False):
        plan = plan_build(opts)
        print(plan.precision, "strong" if plan.strongly_typed else "weak", plan.plugin_lib or "-")
        return 0
    if opts.engine is not None:
        record_built(opts, getattr(args, "trtexec_log", None))
        print(f"recorded {opts.engine} in {opts.export_dir / 'manifest.json'}")
        return 0
    result = build(opts)
    if opts.dry_run:
        print(shlex.join(result["trtexec"]))
    return result
