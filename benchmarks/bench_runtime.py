#!/usr/bin/env python
"""Runtime benchmark (ONNX Runtime CPU): prefill vs execution ratio, decode tokens/s, router
overhead, peak RSS, weight bytes. Same as `qtale bench`; see docs/benchmarks.md.

    python benchmarks/bench_runtime.py exports/smollm2-fp32 exports/smollm2-int4 --out benchmarks/results
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qtale_export.deploy.bench import add_bench_arguments, run_bench  # noqa: E402
from qtale_export.errors import QtaleError  # noqa: E402


def main(argv=None) -> int:
    parser = add_bench_arguments(argparse.ArgumentParser(prog="bench_runtime", description=__doc__,
                                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        report = run_bench(args)
    except QtaleError as exc:
        print(f"bench_runtime: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
