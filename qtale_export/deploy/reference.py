"""Reference inputs and PyTorch outputs stored in an export (`reference.npz`), so that `qtale verify`
checks ONNX Runtime or a TensorRT engine on a host without PyTorch.

A reference set is a list of cases, one per theta; a case is a list of runs: the prefill of a few
left-padded prompts, then `steps` greedy decode steps. Every run holds the graph's feeds (decode
feeds are PyTorch's own past K/V and exec mask, so each step stands alone) and PyTorch's outputs
`logits` and `exec_mask`, plus `prob` (P(execute) per routed layer, [L_routed, B, T]) to tell
legitimate ties at theta from errors. `save`/`load` are numpy (the deployment side reads the file);
the PyTorch side computes the cases (export/verify.py `compute_reference`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import QtaleError

FILE = "reference.npz"
FORMAT = "qtale-reference"
FORMAT_VERSION = 1
PROMPTS = 2  # the first prompts of export/verify.py PROMPTS: two lengths, so left padding is exercised
STEPS = 2  # decode steps per theta


def save(folder: str | os.PathLike, cases: list[dict], prompts) -> Path:
    """Write FILE into `folder` (the export's temporary folder: the manifest lists its sha256)."""
    arrays = {}
    layout = []
    for c, case in enumerate(cases):
        runs = []
        for r, run in enumerate(case["runs"]):
            key = f"c{c}.r{r}"
            for part in ("feeds", "outputs"):
                for name, value in run[part].items():
                    arrays[f"{key}.{part}.{name}"] = np.ascontiguousarray(value)
            arrays[f"{key}.prob"] = run["prob"]
            runs.append({"graph": run["graph"], "feeds": list(run["feeds"]), "outputs": list(run["outputs"])})
        layout.append({"theta": case["theta"], "runs": runs})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "prompts": list(prompts), "cases": layout}
    path = Path(folder) / FILE
    np.savez_compressed(path, __meta__=np.array(json.dumps(meta)), **arrays)
    return path


def load(folder: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(meta, cases) of an export's FILE; QtaleError if it is missing or not this format."""
    path = Path(folder) / FILE
    if not path.is_file():
        raise QtaleError(f"{path} not found: the export has no stored reference outputs (re-export it, or "
                         "verify against PyTorch with --pytorch)")
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["__meta__"]))
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise QtaleError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} file")
        cases = []
        for c, case in enumerate(meta["cases"]):
            runs = []
            for r, run in enumerate(case["runs"]):
                key = f"c{c}.r{r}"
                runs.append({"graph": run["graph"], "prob": data[f"{key}.prob"],
                             "feeds": {n: data[f"{key}.feeds.{n}"] for n in run["feeds"]},
                             "outputs": {n: data[f"{key}.outputs.{n}"] for n in run["outputs"]}})
            cases.append({"theta": case["theta"], "runs": runs})
    return meta, cases
