"""`qtale bench EXPORT_DIR...`: ONNX Runtime CPU benchmark of export(s) (bench.py; no PyTorch)."""
from __future__ import annotations

import argparse

from .. import validate
from ..deploy.bench import bench, print_report
from ..validate import arg


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("export_dirs", nargs="+", metavar="EXPORT_DIR", help="export folder(s), e.g. fp32 and int4")
    parser.add_argument("--seq", type=arg(validate.positive_ints, "--seq"), default="128,512",
                        help="prefill lengths (comma-separated)")
    parser.add_argument("--ratios", type=arg(validate.ratios, "--ratios"), default="1.0,0.8,0.6,0.5",
                        help="execution ratios (comma-separated)")
    parser.add_argument("--repeats", type=arg(validate.positive_int, "--repeats"), default=5,
                        help="interleaved repeats (median reported)")
    parser.add_argument("--decode-tokens", type=arg(validate.positive_int, "--decode-tokens"), default=16,
                        help="decode steps per repeat")
    parser.add_argument("--threads", type=arg(validate.threads, "--threads"), default=None,
                        help="ONNX Runtime intra-op threads")
    parser.add_argument("--out", type=arg(validate.output_folder, "--out"), default=None,
                        help="folder for bench.json and bench.png")
    parser.add_argument("--record", action="store_true",
                        help="append the decode ms/token per ratio to each manifest's \"benchmarks\"")
    parser.add_argument("--json", action="store_true")
    return parser


def run(args: argparse.Namespace) -> dict:
    seqs = validate.positive_ints(args.seq, "--seq") if isinstance(args.seq, str) else args.seq  # the default is a string
    ratios = validate.ratios(args.ratios) if isinstance(args.ratios, str) else args.ratios  # the default is a string
    report = bench(args.export_dirs, seqs, ratios, repeats=args.repeats, decode_tokens=args.decode_tokens,
                   threads=args.threads, out=args.out, record=args.record)
    if not args.json:
        print_report(report)
    return report
