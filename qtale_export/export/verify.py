"""Check an export folder against the PyTorch routed model: prefill and decode, several thetas.

Reference: the checkpoint's RoutedModel in fp32. A quantized checkpoint (`qtale quantize`) is its
own reference, quantizers enabled: the export must reproduce the checkpoint's grid, so lowering it
to other codes or scales (or quantizing twice) fails here. For INT4/INT8/FP8 exports of a float
checkpoint the decoder projections get the export's own dequantized weights (read back from prefill.onnx by running each weight's
DequantizeLinear / MatMulNBits on an identity matrix), so the comparison isolates the graph from
the quantization error; fp16 exports are compared with the fp32 model under a relative tolerance.
Exec masks must be identical except where the reference P(execute) lies within `tie` of theta
(such a case is reported and its logits are not compared: the paths diverge legitimately).

Two entry points with these criteria: `verify_export` (at export: ONNX Runtime against the live
PyTorch model, decode chained on ORT's own K/V) and `verify_with_polygraphy` (`qtale verify`:
Polygraphy's runners and Comparator against the reference outputs stored in the export by
`store_reference`, so no PyTorch is needed; TensorRT engines with the same command).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx

from ..deploy import graph_io
from ..errors import QtaleError
from . import ort_ops
from .graphs import quantizable
from .manifest import engine_file, graph_files, plugin_library, read_manifest

PROMPTS = [
    "The capital of France is",
    "Water boils at one hundred degrees Celsius at sea level, and",
    "Plants convert sunlight into chemical energy through photosynthesis. The process",
    "A journey of a thousand miles begins",
]
# max |onnx - torch| over real tokens must be <= atol + rtol * max|torch logits|
TOLERANCE = {"fp32": (1e-3, 0.0), "fp16": (0.0, 2e-2), "int4": (2e-3, 1e-4), "int8": (2e-3, 1e-4),
             "fp8": (2e-3, 1e-4)}
TIE = {"fp32": 1e-4, "fp16": 5e-2, "int4": 1e-3, "int8": 1e-3, "fp8": 1e-3}
MIN_TOP1 = {"fp32": 0.99, "fp16": 0.95, "int4": 0.98, "int8": 0.98, "fp8": 0.98}


def dequantized_weights(path: Path) -> dict[str, np.ndarray]:
    """{projection name: W [out, in] fp32} of every quantized projection in an ONNX graph."""
    import onnxruntime as ort

    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    nodes, outs, ins, used = [], [], {}, set()
    for n in m.graph.node:
        name = n.name.split("/")[0]
        if n.op_type not in ("MatMul", "MatMulNBits") or not (quantizable(name) or name == "lm_head"):
            continue
        deps = [producer[x] for x in n.input[1:] if x in producer]
        if n.op_type == "MatMul" and (not deps or name == "lm_head"):
            continue  # a float weight
        if n.op_type == "MatMulNBits":
            k = next(a.i for a in n.attribute if a.name == "K")
        else:
            k = inits[deps[0].input[0]].dims[0]
        x = f"eye_{k}"
        if x not in ins:
            ins[x] = k
        node = copy.deepcopy(n)
        node.input[0] = x
        node.output[0] = f"W:{name}"
        nodes += [copy.deepcopy(d) for d in deps] + [node]
        outs.append(node.output[0])
        for nd in deps + [n]:
            used.update(i for i in nd.input if i in inits)
    for n in m.graph.node:  # a table behind a DequantizeLinear (the TensorRT int4 form): the table itself
        table = producer.get(n.input[0]) if n.op_type == "Gather" and n.input else None
        if table is not None and table.op_type == "DequantizeLinear":
            node = copy.deepcopy(table)
            node.output[0] = "T:embed"
            nodes.append(node)
            outs.append(node.output[0])
            used.update(i for i in table.input if i in inits)
    gathers = []  # the int4 embedding table (OrtLowering): gather every row
    for n in m.graph.node:
        if n.op_type == "GatherBlockQuantized":
            node = copy.deepcopy(n)
            node.input[1] = "all_ids"
            node.output[0] = "T:embed"
            nodes.append(node)
            outs.append(node.output[0])
            used.update(i for i in n.input if i in inits)
            gathers.append(int(inits[n.input[0]].dims[0]))
    if not nodes:
        return {}
    g = onnx.helper.make_graph(
        nodes, "dequant", [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [k, k]) for x, k in ins.items()]
        + [onnx.helper.make_tensor_value_info("all_ids", onnx.TensorProto.INT64, [None]) for _ in gathers[:1]],
        [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outs],
        [inits[u] for u in sorted(used)])
    mm = onnx.helper.make_model(g, opset_imports=list(m.opset_import))
    mm.ir_version = m.ir_version
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(mm.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {x: np.eye(k, dtype=np.float32) for x, k in ins.items()}
    if gathers:
        feeds["all_ids"] = np.arange(gathers[0], dtype=np.int64)
    res = sess.run(outs, feeds)
    return {o[2:]: (r if o.startswith("T:") else r.T).copy() for o, r in zip(outs, res)}


def reference_model(manifest: dict, folder: Path, model=None):
    """The PyTorch model the export must reproduce (see the module doc)."""
    import torch

    import qtale_export

    if model is None:
        model = qtale_export.load(manifest["checkpoint"])
    if manifest["precision"] not in ("int4", "int8", "fp8"):
        return model
    weights = dequantized_weights(folder / manifest["graphs"]["prefill"]["file"])  # names checked by read_manifest
    tables = {k: weights.pop(k) for k in ("embed", "lm_head") if k in weights}  # int4 tables (ort-cpu)
    if getattr(model, "quantization_info", None):  # the quantized checkpoint itself (fake quant)
        weights = {}
        if not tables:
            return model.eval()
    ref = copy.deepcopy(model)
    if hasattr(ref.base, "peft_config"):
        # the export's weights are W + BA (graphs.extract merges); overwriting the base weights of an
        # unmerged adapter would add BA a second time
        ref.base = ref.base.merge_and_unload()
    lm = ref.causal_lm
    with torch.no_grad():  # tied: the LM head is the embedding, one table in the export as well
        if "embed" in tables:
            lm.model.embed_tokens.weight.copy_(torch.from_numpy(tables["embed"]))
        if "lm_head" in tables:
            lm.lm_head.weight.copy_(torch.from_numpy(tables["lm_head"]))
    layers = lm.model.layers
    for name, w in _split_fused(weights, layers).items():
        _, i, proj = name.split(".")
        layer = layers[int(i)]
        mod = getattr(layer.self_attn, proj, None) or getattr(layer.mlp, proj)
        if hasattr(mod, "weight_quantizer"):  # modelopt fake quant: the weights are final already
            mod.weight_quantizer.disable()
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(w))
    return ref.eval()


def _split_fused(weights: dict, layers) -> dict:
    """layers.i.qkv_proj / gate_up_proj (the ort-cpu form) -> their parts, by the parts' row counts."""
    from .graphs import PARTS

    out = {}
    for name, w in weights.items():
        prefix, _, proj = name.rpartition(".")
        if proj not in PARTS:
            out[name] = w
            continue
        layer = layers[int(prefix.split(".")[1])]
        rows = [(getattr(layer.self_attn, p, None) or getattr(layer.mlp, p)).weight.shape[0] for p in PARTS[proj]]
        out.update(zip((f"{prefix}.{p}" for p in PARTS[proj]), np.split(w, np.cumsum(rows)[:-1], 0)))
    return out


def _tally_decode(dcase: dict, status: str, step: dict) -> bool:
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


def _close_case(case: dict, dcase: dict, prefill_ok: bool) -> dict:
    """The case with its decode walk; ok when prefill passed and decode did not stop on a mismatch."""
    dcase["top1"] = float(np.mean(dcase["top1"])) if dcase["top1"] else None
    case["decode"] = dcase
    case["ok"] = bool(prefill_ok and dcase.get("stopped", "tie") == "tie")
    return case


def _agreement(cases: list[dict]) -> dict:
    """The report's summary over every case: worst difference, top-1 and exec-mask agreement, ties."""
    diffs = [c["max_abs_diff"] for c in cases if c.get("max_abs_diff") is not None]
    diffs += [c["decode"]["max_abs_diff"] for c in cases if c["decode"]["steps"]]
    top1 = [c["top1"] for c in cases if c.get("top1") is not None]
    return {"max_abs_diff": float(max(diffs)) if diffs else None,
            "top1_agreement": float(min(top1)) if top1 else None,
            "exec_mask_agreement": float(min(c["exec_agreement"] for c in cases)),
            "tie_cases": int(sum(1 for c in cases if c.get("ties") or c["decode"].get("stopped") == "tie"))}


def _thetas(manifest: dict, extra=None) -> list[float]:
    out = [0.0, float(manifest["theta"]), 0.3, 0.7] + list(extra or [])
    seen = []
    for t in out:
        if round(t, 6) not in [round(s, 6) for s in seen]:
            seen.append(float(t))
    return seen


def verify_export(folder, model=None, thetas=None, decode_steps: int = 4, prompts=None,
                  check_files: bool = True) -> dict:
    """Run both graphs in ONNX Runtime against PyTorch; returns the JSON-able report."""
    import torch

    folder = Path(folder)
    manifest = read_manifest(folder, verify=check_files)
    precision = manifest["precision"]
    ref = reference_model(manifest, folder, model)
    quantized_ckpt = bool(getattr(ref, "quantization_info", None))
    tok = ref.tokenizer
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(list(prompts or PROMPTS), return_tensors="pt", padding=True, truncation=True, max_length=48)
    finally:
        tok.padding_side = side
    ids, mask = enc["input_ids"], enc["attention_mask"].long()
    sessions = {graph: ort_ops.session(graph_files(folder, manifest, graph)[0], exact=True)
                for graph in graph_io.GRAPHS}
    atol, rtol = TOLERANCE[precision]
    tie = TIE[precision]
    num_layers = manifest["model"]["num_layers"]
    routed = list(ref.layer_ids)
    cases = []
    for theta_value in thetas if thetas is not None else _thetas(manifest):
        theta = torch.full((ids.shape[0],), float(theta_value))
        case = {"theta": float(theta_value)}
        with torch.no_grad():
            r = ref(ids, mask, theta=theta, use_cache=True)
        loop = graph_io.Loop(lambda graph, feeds: _run(sessions[graph], feeds), num_layers, theta.numpy())
        out = loop.prefill(ids.numpy(), mask.numpy())
        valid = mask.bool().numpy()
        status = _compare(case, "prefill", out, r, valid, routed, theta_value, tie, atol, rtol, MIN_TOP1[precision])
        ok_case = status != "fail"
        # decode: the reference's greedy tokens, fed to both (ONNX Runtime on its own K/V)
        past_t = r.past_key_values
        nxt = r.logits[:, -1].argmax(-1, keepdim=True)
        dmask = mask
        dcase = {"max_abs_diff": 0.0, "top1": [], "steps": 0}
        for _ in range(decode_steps if status == "ok" else 0):
            dmask = torch.cat([dmask, torch.ones_like(nxt)], 1)
            with torch.no_grad():
                rd = ref(nxt, dmask, past_key_values=past_t, use_cache=True, theta=theta)
            od = loop.step(nxt.numpy())
            step = {}
            st = _compare(step, "decode", od, rd, np.ones((ids.shape[0], 1), bool), routed, theta_value, tie,
                          atol, rtol, MIN_TOP1[precision], new_only=True)
            if not _tally_decode(dcase, st, step):
                break
            past_t = rd.past_key_values
            nxt = rd.logits[:, -1].argmax(-1, keepdim=True)
        cases.append(_close_case(case, dcase, ok_case))
    report = {
        "ok": all(c["ok"] for c in cases),
        "precision": precision, "ops": manifest["ops"],
        "reference": (f"pytorch quantized checkpoint ({ref.quantization_info.get('format')}, quantizers enabled)"
                      if quantized_ckpt else
                      "pytorch fp32 with the export's dequantized weights" if precision in ("int4", "int8", "fp8")
                      else "pytorch fp32"),
        "tolerance": {"atol": atol, "rtol": rtol, "tie": tie, "min_top1": MIN_TOP1[precision]},
        "prompts": int(ids.shape[0]), "tokens": int(mask.sum()), "decode_steps": decode_steps,
        **_agreement(cases),
        "cases": cases,
    }
    return report


def _run(session, feeds: dict) -> dict:
    """{output name: array} of one ONNX Runtime session run."""
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _compare(case, kind, out, r, valid, routed, theta, tie, atol, rtol, min_top1, new_only=False) -> str:
    """`compare` with the PyTorch model's RoutedOutput `r` as the reference."""
    probs = np.stack([rl.softmax(-1)[..., 0].numpy() for rl in r.router_logits]) if r.router_logits else None
    ref = {"logits": r.logits.float().numpy(), "exec_mask": np.stack([p[2].numpy() for p in r.past_key_values])}
    return compare(case, kind, out, ref, probs, valid, routed, theta, tie, atol, rtol, min_top1, new_only)


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


# ---------------------------------------------------------------------------------------------
# stored references and Polygraphy (`qtale verify`)
# ---------------------------------------------------------------------------------------------
def store_reference(folder: Path, model, precision: str, graphs_desc: dict, theta: float) -> dict | None:
    """Write reference.npz (PyTorch outputs at theta 0 and the export's theta) into an export being
    built; returns its manifest entry (None without a tokenizer)."""
    from . import reference
    from .precision import activation_dtype

    if model.tokenizer is None:
        return None
    ref = reference_model({"precision": precision, "graphs": graphs_desc}, Path(folder), model)
    thetas = [0.0] + ([float(theta)] if round(float(theta), 6) != 0.0 else [])
    prompts = PROMPTS[:reference.PROMPTS]
    cases = reference.compute(ref, model.tokenizer, thetas, prompts, reference.STEPS, activation_dtype(precision))
    reference.save(folder, cases, prompts)
    return {"file": reference.FILE, "thetas": thetas, "prompts": len(prompts), "decode_steps": reference.STEPS}


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


def _runners(folder: Path, manifest: dict, backend: str, plugin_lib) -> dict:
    """{graph: (Polygraphy runner, max batch or None)} for the backend."""
    if backend == "onnxrt":
        from polygraphy.backend.onnxrt import OnnxrtRunner

        return {g: (OnnxrtRunner(lambda g=g: ort_ops.session(graph_files(folder, manifest, g)[0], exact=True),
                                 name=f"onnxrt:{g}"), None) for g in ("prefill", "decode")}
    import polygraphy.config

    from ..deploy import trt_builder

    # the TensorRT the engines were built with: Polygraphy runs TensorRT-RTX engines with TensorRT-RTX
    rtx = {e.get("builder", "tensorrt") for e in manifest.get("engines", [])} == {"tensorrt-rtx"}
    flavour = trt_builder.load("tensorrt-rtx" if rtx else "tensorrt")
    polygraphy.config.USE_TENSORRT_RTX = rtx
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, LoadPlugins, TrtRunner

    out = {}
    for e in manifest.get("engines", []):
        # the user's library, or the manifest's only inside the folder with its sha256 (threat-model.md)
        lib = plugin_library(folder, manifest, e, plugin_lib)
        if manifest.get("ops") == "plugin" and not lib:
            raise QtaleError(f"{e['file']} uses the qtale plugins: pass --plugin-lib libqtale_trt_plugins.so")
        loader = EngineFromBytes(BytesFromPath(str(engine_file(folder, manifest, e))))
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


def verify_with_polygraphy(folder, *, thetas=None, decode_steps: int | None = None, backend: str = "onnxrt",
                           plugin_lib=None, live: bool = False, model=None) -> dict:
    """`qtale verify`: Polygraphy's runners (ONNX Runtime, or the TensorRT engines recorded in the
    manifest) on the reference inputs, Polygraphy's Comparator against the PyTorch outputs, with the
    per-precision tolerances of `verify_export`. The reference is the export's reference.npz (no
    PyTorch needed) unless `live`, or thetas / decode steps it does not hold are asked for: then it
    is computed from the checkpoint (needs PyTorch). Returns verify_export's report plus "verifier"."""
    from ..optional import require
    from . import reference

    require("polygraphy", "pip install polygraphy (part of the base install)", "Polygraphy")
    import polygraphy

    folder = Path(folder)
    manifest = read_manifest(folder, verify=True)
    precision = manifest["precision"]
    stored = None if live or not (folder / reference.FILE).is_file() else reference.load(folder)
    want = [float(t) for t in thetas] if thetas is not None else None
    if stored is not None:
        have = {round(c["theta"], 6): c for c in stored[1]}
        steps = min(len(c["runs"]) for c in stored[1]) - 1
        if (want is None or all(round(t, 6) in have for t in want)) and (decode_steps is None or decode_steps <= steps):
            cases = [have[round(t, 6)] for t in want] if want is not None else stored[1]
            n_steps = steps if decode_steps is None else decode_steps
            cases = [{"theta": c["theta"], "runs": c["runs"][:1 + n_steps]} for c in cases]
            source = f"stored {reference.FILE} ({len(stored[0]['prompts'])} prompts)"
        else:
            stored = None
    if stored is None:
        require("torch", "verifying against a live PyTorch model needs the training extra "
                "(or use the thetas/decode steps stored in reference.npz)", "PyTorch")
        ref = reference_model(manifest, folder, model)
        tok = ref.tokenizer
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(folder)
        n_steps = 4 if decode_steps is None else decode_steps
        act = np.float16 if manifest["model"]["activation_dtype"] == "float16" else np.float32
        cases = reference.compute(ref, tok, want if want is not None else _thetas(manifest), PROMPTS, n_steps, act)
        source = f"live pytorch ({len(PROMPTS)} prompts)"
    runners = _runners(folder, manifest, backend, plugin_lib)
    got = {}
    for g, (runner, max_batch) in runners.items():
        runs = [r for c in cases for r in c["runs"] if r["graph"] == g]
        got[g] = iter(_infer(runner, [r["feeds"] for r in runs], max_batch)) if runs else iter(())
    atol, rtol = TOLERANCE[precision]
    tie, min_top1 = TIE[precision], MIN_TOP1[precision]
    routed = list(manifest["model"]["routed_layers"])
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
            _tally_decode(dcase, st, step)
        report_cases.append(_close_case(case, dcase, ok_case))
    first = cases[0]["runs"][0]["feeds"]["attention_mask"]
    return {
        "ok": all(c["ok"] for c in report_cases),
        "precision": precision, "ops": manifest["ops"],
        "reference": source,
        "verifier": {"tool": "polygraphy", "version": polygraphy.__version__,
                     "runners": [r.name for r, _ in runners.values()]},
        "tolerance": {"atol": atol, "rtol": rtol, "tie": tie, "min_top1": min_top1},
        "prompts": int(first.shape[0]), "tokens": int(first.sum()), "decode_steps": int(n_steps),
        **_agreement(report_cases),
        "cases": report_cases,
    }
