"""Reference inputs and PyTorch outputs stored in an export (`reference.npz`), so that `qtale verify`
checks ONNX Runtime or a TensorRT engine on a host without PyTorch.

A reference set is a list of cases, one per theta; a case is a list of runs: the prefill of a few
left-padded prompts, then `steps` greedy decode steps. Every run holds the graph's feeds (decode
feeds are PyTorch's own past K/V and exec mask, so each step stands alone) and PyTorch's outputs
`logits` and `exec_mask`, plus `prob` (P(execute) per routed layer, [L_routed, B, T]) to tell
legitimate ties at theta from errors. Only `compute` needs torch; `save`/`load` are numpy.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..deploy import graph_io
from ..errors import QtaleError

FILE = "reference.npz"
FORMAT = "qtale-reference"
FORMAT_VERSION = 1
PROMPTS = 2  # the first prompts of verify.PROMPTS: two lengths, so left padding is exercised
STEPS = 2  # decode steps per theta


def compute(ref, tokenizer, thetas, prompts, steps: int, act_dtype) -> list[dict]:
    """Run the PyTorch reference model: [{"theta", "runs": [{"graph", "feeds", "outputs", "prob"}]}]."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=48)
    finally:
        tokenizer.padding_side = side
    ids, mask = enc["input_ids"], enc["attention_mask"].long()
    act = np.dtype(act_dtype)

    def outputs(r):
        return {graph_io.LOGITS: r.logits.float().numpy(), graph_io.EXEC_MASK: exec_mask(r)}

    def exec_mask(r):
        return np.stack([p[2].numpy() for p in r.past_key_values])

    def prob(r):
        return np.stack([rl.softmax(-1)[..., 0].float().numpy() for rl in r.router_logits]).astype(np.float32)

    cases = []
    for th in thetas:
        theta = torch.full((ids.shape[0],), float(th))
        with torch.no_grad():
            r = ref(ids, mask, theta=theta, use_cache=True)
        runs = [{"graph": "prefill", "feeds": graph_io.prefill_feeds(ids.numpy(), mask.numpy(), theta.numpy()),
                 "outputs": outputs(r), "prob": prob(r)}]
        dmask = mask
        for _ in range(steps):
            nxt = r.logits[:, -1].argmax(-1, keepdim=True)
            dmask = torch.cat([dmask, torch.ones_like(nxt)], 1)
            # PyTorch's own cache in the graph's names, so each stored step stands alone
            cache = {graph_io.EXEC_MASK: exec_mask(r)}
            for i, p in enumerate(r.past_key_values):
                cache[graph_io.present(i, "key")] = p[0].numpy().astype(act)
                cache[graph_io.present(i, "value")] = p[1].numpy().astype(act)
            feeds = graph_io.decode_feeds(cache, nxt.numpy(), dmask.numpy(), theta.numpy(), len(r.past_key_values))
            with torch.no_grad():
                r = ref(nxt, dmask, past_key_values=r.past_key_values, use_cache=True, theta=theta)
            runs.append({"graph": "decode", "feeds": feeds, "outputs": outputs(r), "prob": prob(r)})
        cases.append({"theta": float(th), "runs": runs})
    return cases


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
