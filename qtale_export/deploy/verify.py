"""The comparison half of verification, torch-free: an export's outputs against reference outputs.

The criteria (`compare`): exec masks identical except where the reference P(execute) lies within
`tie` of theta (such a case is reported and its logits are not compared: the paths diverge
legitimately), max |logit diff| <= atol + rtol * max|reference logits| over real tokens, top-1
agreement >= min_top1; the tolerances are the precision's (precisions.py `Tolerance`).
Both verifiers use them: the export-time check against the live PyTorch model (export/verify.py)
and `qtale verify` here (`verify`): Polygraphy's runners (ONNX Runtime, or the TensorRT engines
recorded in the manifest) and its Comparator against the PyTorch outputs stored in the export
(reference.py), so no PyTorch is needed. Thetas or decode steps the stored file does not hold come
from `live_cases`, a callable of the PyTorch side (export/verify.py `live_cases`).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import QtaleError
from . import graph_io, ort_ops, reference
from .manifest import Manifest, load
from .precisions import precision as spec

# (cases, decode steps, a description of the source) of a reference set
Cases = tuple[list[dict], int, str]
LiveCases = Callable[[Manifest, "list[float] | None", "int | None"], Cases]


def compare(case, kind, out, ref, probs, valid, routed, theta, tie, atol, rtol, min_top1, new_only=False,
            logits_ok=None) -> str:
    """Fill `case` with the metrics of one run (outputs `out` against reference arrays `ref`, P(execute)
    `probs` [L_routed, B, T]): "ok", "tie" (exec masks differ only where the reference P(execute) is
    within `tie` of theta) or "fail". `logits_ok(bound)` decides closeness instead of diff <= bound
    (the Polygraphy comparator)."""
    ref_logits = ref["logits"]
    lo = out["logits"]
    ref_exec = ref["exec_mask"]
    ex = out["exec_mask"]
    if new_only:  # decode: compare the new column; the past was checked before
        ref_exec, ex = ref_exec[:, :, -1:], ex[:, :, -1:]
    mism = (ref_exec != ex) & valid[None]
    pre = "" if kind == "prefill" else "decode_"
    case[f"{pre}exec_agreement"] = 1.0 - float(mism.sum()) / max(int(valid.sum()) * ex.shape[0], 1)
    if mism.any():
        ties = 0
        for layer, bb, t in zip(*np.nonzero(mism)):
            if int(layer) in routed:
                j = routed.index(int(layer))
                ties += abs(float(probs[j][bb, t]) - theta) <= tie
        case[f"{pre}ties"] = int(ties)
        case[f"{pre}exec_mismatch"] = int(mism.sum())
        case[f"{pre}max_abs_diff"] = None
        case[f"{pre}top1"] = None
        return "tie" if ties == int(mism.sum()) else "fail"
    diff = float(np.abs(lo - ref_logits)[valid].max()) if valid.any() else 0.0
    top1 = float((lo.argmax(-1) == ref_logits.argmax(-1))[valid].mean()) if valid.any() else 1.0
    bound = atol + rtol * float(np.abs(ref_logits[valid]).max() if valid.any() else 0.0)
    case[f"{pre}max_abs_diff"] = diff
    case[f"{pre}top1"] = top1
    case[f"{pre}bound"] = bound
    close = diff <= bound if logits_ok is None else logits_ok(bound)
    return "ok" if close and top1 >= min_top1 else "fail"


def tally_decode(dcase: dict, status: str, step: dict) -> bool:
    """Add one compared decode step to `dcase`; False when the walk stops there (a mismatch or a
    tie: the two sides would decode different tokens from then on)."""
    if status != "ok":
        dcase["stopped"] = status
        dcase.update({k: v for k, v in step.items() if "exec" in k or "ties" in k})
        return False
    dcase["max_abs_diff"] = max(dcase["max_abs_diff"], step["decode_max_abs_diff"])
    dcase["top1"].append(step["decode_top1"])
    dcase["steps"] += 1
    return True


def close_case(case: dict, dcase: dict, prefill_ok: bool) -> dict:
    """The case with its decode walk; ok when prefill passed and decode did not stop on a mismatch."""
    dcase["top1"] = float(np.mean(dcase["top1"])) if dcase["top1"] else None
    case["decode"] = dcase
    case["ok"] = bool(prefill_ok and dcase.get("stopped", "tie") == "tie")
    return case


def agreement(cases: list[dict]) -> dict:
    """The report's summary over every case: worst difference, top-1 and exec-mask agreement, ties."""
    diffs = [c["max_abs_diff"] for c in cases if c.get("max_abs_diff") is not None]
    diffs += [c["decode"]["max_abs_diff"] for c in cases if c["decode"]["steps"]]
    top1 = [c["top1"] for c in cases if c.get("top1") is not None]
    return {"max_abs_diff": float(max(diffs)) if diffs else None,
            "top1_agreement": float(min(top1)) if top1 else None,
            "exec_mask_agreement": float(min(c["exec_agreement"] for c in cases)),
            "tie_cases": int(sum(1 for c in cases if c.get("ties") or c["decode"].get("stopped") == "tie"))}


def default_thetas(theta: float, extra=None) -> list[float]:
    """The thetas a verification checks by default: 0 (every layer), the export's, 0.3 and 0.7."""
    out = [0.0, float(theta), 0.3, 0.7] + list(extra or [])
    seen: list[float] = []
    for t in out:
        if round(t, 6) not in [round(s, 6) for s in seen]:
            seen.append(float(t))
    return seen


# ---- Polygraphy (`qtale verify`) ---------------------------------------------------------------
def _quiet():
    from polygraphy.logger import G_LOGGER

    return G_LOGGER.verbosity(G_LOGGER.ERROR)  # Polygraphy logs to stdout; `--json` owns stdout


def _infer(runner, feeds_list: list[dict], max_batch: int | None) -> list[dict]:
    """Polygraphy's Comparator.run over every feed dict (rows one at a time where the batch exceeds an
    engine profile's max batch); returns logits and exec_mask per feed dict."""
    from polygraphy.comparator import Comparator

    compared = (graph_io.LOGITS, graph_io.EXEC_MASK)
    items, owner = [], []
    for k, feeds in enumerate(feeds_list):
        batch = feeds["input_ids"].shape[0]
        if max_batch is None or batch <= max_batch:
            items.append(feeds)
            owner.append(k)
            continue
        for row in range(batch):
            items.append({n: np.take(a, [row], axis=graph_io.batch_axis(n)) for n, a in feeds.items()})
            owner.append(k)
    with _quiet():
        results = Comparator.run([runner], data_loader=items)
    parts: list[list] = [[] for _ in feeds_list]
    for k, it in zip(owner, results[0][1]):
        parts[k].append({n: np.asarray(it[n]) for n in compared})
    return [{n: np.concatenate([p[n] for p in ps], axis=graph_io.batch_axis(n)) for n in compared} for ps in parts]


def _polygraphy_close(runner_name: str, got: dict, want: dict, valid: np.ndarray, new_only: bool):
    """logits_ok(bound) for `compare`: Polygraphy's Comparator with SimpleCompareFunc(atol=bound, rtol=0)
    on the real tokens' logits (padding zeroed on both sides) and on the exec mask (exactly)."""
    from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc

    def view(o):
        ex = o["exec_mask"][:, :, -1:] if new_only else o["exec_mask"]
        return {"logits": np.where(valid[..., None], o["logits"], 0.0).astype(np.float32),
                "exec_mask": ex.astype(np.int32)}

    def ok(bound: float) -> bool:
        rr = RunResults()
        rr.append((runner_name, [IterationResult(view(got), runner_name=runner_name)]))
        rr.append(("pytorch", [IterationResult(view(want), runner_name="pytorch")]))
        with _quiet(), np.errstate(divide="ignore", invalid="ignore"):  # relative errors of zeroed padding
            return bool(Comparator.compare_accuracy(
                rr, compare_func=SimpleCompareFunc(atol={"logits": bound, "exec_mask": 0.0}, rtol=0.0)))
    return ok


def _runners(manifest: Manifest, backend: str, plugin_lib) -> dict:
    """{graph: (Polygraphy runner, max batch or None)} for the backend."""
    folder = manifest.folder
    if backend == "onnxrt":
        from polygraphy.backend.onnxrt import OnnxrtRunner

        return {g: (OnnxrtRunner(lambda g=g: ort_ops.session(manifest.graph_file(g), exact=True),
                                 name=f"onnxrt:{g}"), None) for g in graph_io.GRAPHS}
    import polygraphy.config

    from . import trt_builder

    # the TensorRT the engines were built with: Polygraphy runs TensorRT-RTX engines with TensorRT-RTX
    rtx = {e.get("builder", "tensorrt") for e in manifest.engines} == {"tensorrt-rtx"}
    flavour = trt_builder.load("tensorrt-rtx" if rtx else "tensorrt")
    polygraphy.config.USE_TENSORRT_RTX = rtx
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, LoadPlugins, TrtRunner

    out = {}
    for e in manifest.engines:
        # the user's library, or the manifest's only inside the folder with its sha256 (threat-model.md)
        lib = manifest.plugin_library(e, plugin_lib)
        if manifest.ops == "plugin" and not lib:
            raise QtaleError(f"{e['file']} uses the qtale plugins: pass --plugin-lib libqtale_trt_plugins.so")
        loader = EngineFromBytes(BytesFromPath(str(manifest.engine_file(e))))
        if lib:
            loader = LoadPlugins(plugins=[str(lib)], obj=loader)
        out[e["graph"]] = (TrtRunner(loader, name=f"trt:{e['graph']}"), int(e["profile"]["batch"][2]))
    if "prefill" not in out:
        raise QtaleError(f"{folder} has no TensorRT engine for prefill.onnx: build one first (build_engine.sh / qtale build)")
    if not trt_builder.has_gpu():  # everything above (listing, sha256, plugin rule, TensorRT) ran; running needs a GPU
        raise QtaleError(f"running the {flavour.name} engines of {folder} needs an NVIDIA GPU "
                         f"({'Ampere or later, RTX class' if rtx else 'the one they were built for'}); this machine has "
                         "none. The engines were checked (listed, sha256, plugin rule) but not run")
    return out


def stored_cases(folder: Path, thetas: list[float] | None, decode_steps: int | None) -> Cases | None:
    """The cases of the export's stored reference for `thetas` (None: all) with `decode_steps` (None:
    all), or None when the file is missing or does not hold them."""
    if not (folder / reference.FILE).is_file():
        return None
    meta, stored = reference.load(folder)
    have = {round(c["theta"], 6): c for c in stored}
    steps = min(len(c["runs"]) for c in stored) - 1
    if (thetas is not None and any(round(t, 6) not in have for t in thetas)) or (decode_steps or 0) > steps:
        return None
    cases = [have[round(t, 6)] for t in thetas] if thetas is not None else stored
    n_steps = steps if decode_steps is None else decode_steps
    cases = [{"theta": c["theta"], "runs": c["runs"][:1 + n_steps]} for c in cases]
    return cases, n_steps, f"stored {reference.FILE} ({len(meta['prompts'])} prompts)"


def verify(folder, *, thetas=None, decode_steps: int | None = None, backend: str = "onnxrt",
           plugin_lib=None, live: bool = False, live_cases: LiveCases | None = None) -> dict:
    """`qtale verify`: Polygraphy's runners on the reference inputs and its Comparator against the
    PyTorch outputs, with the precision's tolerances. The reference is the export's reference.npz
    (no PyTorch needed) unless `live`, or thetas / decode steps it does not hold are asked for: then
    `live_cases(manifest, thetas, decode_steps)` computes it (the PyTorch side). Returns the report
    of the export-time check plus "verifier"."""
    from .. import validate
    from ..optional import require

    for t in thetas or []:
        validate.theta(t, "--theta")
    if decode_steps is not None:
        validate.positive_int(decode_steps, "--decode-steps")
    require("polygraphy", "pip install polygraphy (part of the base install)", "Polygraphy")
    folder = Path(folder)
    manifest = load(folder, verify=True)
    want = [float(t) for t in thetas] if thetas is not None else None
    found = None if live else stored_cases(folder, want, decode_steps)
    if found is None:
        require("torch", "verifying against a live PyTorch model needs the training extra "
                "(or use the thetas/decode steps stored in reference.npz)", "PyTorch")
        if live_cases is None:
            raise QtaleError("verifying against a live PyTorch model needs the PyTorch side's reference "
                             "(qtale_export.export.verify.verify_with_polygraphy)")
        found = live_cases(manifest, want, decode_steps)
    return compare_cases(manifest, *found, backend=backend, plugin_lib=plugin_lib)


def compare_cases(manifest: Manifest, cases: list[dict], n_steps: int, source: str, *, backend: str = "onnxrt",
                  plugin_lib=None) -> dict:
    """Run `cases` (reference.py's layout) on the backend's Polygraphy runners and compare them."""
    import polygraphy

    runners = _runners(manifest, backend, plugin_lib)
    got = {}
    for g, (runner, max_batch) in runners.items():
        runs = [r for c in cases for r in c["runs"] if r["graph"] == g]
        got[g] = iter(_infer(runner, [r["feeds"] for r in runs], max_batch)) if runs else iter(())
    tol = spec(manifest.precision).tolerance
    atol, rtol, tie, min_top1 = tol.atol, tol.rtol, tol.tie, tol.min_top1
    routed = list(manifest.model.routed_layers)
    report_cases = []
    for c in cases:
        case = {"theta": c["theta"]}
        pre = c["runs"][0]
        out = next(got["prefill"])
        valid = pre["feeds"]["attention_mask"].astype(bool)
        status = compare(case, "prefill", out, pre["outputs"], pre["prob"], valid, routed, c["theta"], tie, atol,
                         rtol, min_top1, logits_ok=_polygraphy_close(runners["prefill"][0].name, out,
                                                                      pre["outputs"], valid, False))
        ok_case = status != "fail"
        dcase = {"max_abs_diff": 0.0, "top1": [], "steps": 0}
        decode_runs = c["runs"][1:] if "decode" in got else []
        for run in decode_runs:
            out = next(got["decode"])  # consumed in order even after a stop, to stay aligned
            if status != "ok" or "stopped" in dcase:
                continue
            step = {}
            ones = np.ones((run["feeds"]["input_ids"].shape[0], 1), bool)
            st = compare(step, "decode", out, run["outputs"], run["prob"], ones, routed, c["theta"], tie, atol,
                         rtol, min_top1, new_only=True,
                         logits_ok=_polygraphy_close(runners["decode"][0].name, out, run["outputs"], ones, True))
            tally_decode(dcase, st, step)
        report_cases.append(close_case(case, dcase, ok_case))
    first = cases[0]["runs"][0]["feeds"]["attention_mask"]
    return {
        "ok": all(c["ok"] for c in report_cases),
        "precision": manifest.precision, "ops": manifest.ops,
        "reference": source,
        "verifier": {"tool": "polygraphy", "version": polygraphy.__version__,
                     "runners": [r.name for r, _ in runners.values()]},
        "tolerance": {"atol": atol, "rtol": rtol, "tie": tie, "min_top1": min_top1},
        "prompts": int(first.shape[0]), "tokens": int(first.sum()), "decode_steps": int(n_steps),
        **agreement(report_cases),
        "cases": report_cases,
    }
