"""Pieces shared by the subcommand modules: argument types, the compute options, result tables."""
from __future__ import annotations

import argparse

from .. import validate
from ..compute import DEVICES, DTYPES
from ..validate import arg

ratio_arg = arg(validate.ratio, "ratio")
ratios_arg = arg(validate.ratios, "--ratios")


def add_compute_arguments(parser: argparse.ArgumentParser, default_dtype: str = "float32") -> None:
    """--dtype / --device of every model-running command (see compute.place)."""
    parser.add_argument("--dtype", choices=DTYPES, default=default_dtype,
                        help=f"base-model weights and matmuls (routers stay float32; default {default_dtype})")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: the GPU when CUDA is available, else the CPU")


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    Console().print(table)


def verification_rows(report: dict) -> list[list]:
    return [[k, v] for k, v in report.items() if isinstance(v, (int, float, str, bool))]
