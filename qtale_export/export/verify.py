"""Check an export folder against the PyTorch routed model: prefill and decode, several thetas.

Reference: the checkpoint's RoutedModel in fp32. A quantized checkpoint (`qtale quantize`) is its
own reference, quantizers enabled: the export must reproduce the checkpoint's grid, so lowering it
to other codes or scales (or quantizing twice) fails here. For INT4/INT8/FP8 exports of a float
checkpoint the decoder projections get the export's own dequantized weights (read back from prefill.onnx by running each weight's
DequantizeLinear / MatMulNBits on an identity matrix), so the comparison isolates the graph from
the quantization error; fp16 exports are compared with the fp32 model under a relative tolerance.
Exec masks must be identical except where the reference P(execute) lies within `tie` of theta
(such a case is reported and its logits are not compared: the paths diverge legitimately).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx

from . import ort_ops
from .graphs import quantizable
from .manifest import read_manifest

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
    weights = dequantized_weights(folder / manifest["graphs"]["prefill"]["file"])
    tables = {k: weights.pop(k) for k in ("embed", "lm_head") if k in weights}  # int4 tables (ort-cpu)
    if getattr(model, "quantization_info", None):  # the quantized checkpoint itself (fake quant)
        weights = {}
        if not tables:
            return model.eval()
    ref = copy.deepcopy(model)
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
    prefill = ort_ops.session(folder / manifest["graphs"]["prefill"]["file"], exact=True)
    decode = ort_ops.session(folder / manifest["graphs"]["decode"]["file"], exact=True)
    atol, rtol = TOLERANCE[precision]
    tie = TIE[precision]
    L = manifest["model"]["num_layers"]
    routed = list(ref.layer_ids)
    cases = []
    for th in thetas if thetas is not None else _thetas(manifest):
        theta = torch.full((ids.shape[0],), float(th))
        case = {"theta": float(th)}
        with torch.no_grad():
            r = ref(ids, mask, theta=theta, use_cache=True)
        out = dict(zip([o.name for o in prefill.get_outputs()],
                       prefill.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                          "theta": theta.numpy()})))
        valid = mask.bool().numpy()
        status = _compare(case, "prefill", out, r, valid, routed, th, tie, atol, rtol, MIN_TOP1[precision])
        ok_case = status != "fail"
        # decode: the reference's greedy tokens, fed to both
        past_t = r.past_key_values
        feeds = {f"past.{i}.{kv}": out[f"present.{i}.{kv}"] for i in range(L) for kv in ("key", "value")}
        feeds["past_exec"] = out["exec_mask"]
        nxt = r.logits[:, -1].argmax(-1, keepdim=True)
        dmask = mask
        dcase = {"max_abs_diff": 0.0, "top1": [], "steps": 0}
        for _ in range(decode_steps if status == "ok" else 0):
            dmask = torch.cat([dmask, torch.ones_like(nxt)], 1)
            with torch.no_grad():
                rd = ref(nxt, dmask, past_key_values=past_t, use_cache=True, theta=theta)
            od = dict(zip([o.name for o in decode.get_outputs()],
                          decode.run(None, {"input_ids": nxt.numpy(), "attention_mask": dmask.numpy(),
                                            "theta": theta.numpy(), **feeds})))
            step = {}
            st = _compare(step, "decode", od, rd, np.ones((ids.shape[0], 1), bool), routed, th, tie,
                          atol, rtol, MIN_TOP1[precision], new_only=True)
            if st != "ok":
                dcase["stopped"] = st
                dcase.update({k: v for k, v in step.items() if "exec" in k or "ties" in k})
                ok_case = ok_case and st == "tie"
                break
            dcase["max_abs_diff"] = max(dcase["max_abs_diff"], step["decode_max_abs_diff"])
            dcase["top1"].append(step["decode_top1"])
            dcase["steps"] += 1
            feeds = {f"past.{i}.{kv}": od[f"present.{i}.{kv}"] for i in range(L) for kv in ("key", "value")}
            feeds["past_exec"] = od["exec_mask"]
            past_t = rd.past_key_values
            nxt = rd.logits[:, -1].argmax(-1, keepdim=True)
        dcase["top1"] = float(np.mean(dcase["top1"])) if dcase["top1"] else None
        case["decode"] = dcase
        case["ok"] = bool(ok_case)
        cases.append(case)
    diffs = [c["max_abs_diff"] for c in cases if c.get("max_abs_diff") is not None]
    diffs += [c["decode"]["max_abs_diff"] for c in cases if c["decode"]["steps"]]
    top1 = [c["top1"] for c in cases if c.get("top1") is not None]
    report = {
        "ok": all(c["ok"] for c in cases),
        "precision": precision, "ops": manifest["ops"],
        "reference": (f"pytorch quantized checkpoint ({ref.quantization_info.get('format')}, quantizers enabled)"
                      if quantized_ckpt else
                      "pytorch fp32 with the export's dequantized weights" if precision in ("int4", "int8", "fp8")
                      else "pytorch fp32"),
        "tolerance": {"atol": atol, "rtol": rtol, "tie": tie, "min_top1": MIN_TOP1[precision]},
        "prompts": int(ids.shape[0]), "tokens": int(mask.sum()), "decode_steps": decode_steps,
        "max_abs_diff": float(max(diffs)) if diffs else None,
        "top1_agreement": float(min(top1)) if top1 else None,
        "exec_mask_agreement": float(min(c["exec_agreement"] for c in cases)),
        "tie_cases": int(sum(1 for c in cases if c.get("ties") or c["decode"].get("stopped") == "tie")),
        "cases": cases,
    }
    return report


def _compare(case, kind, out, r, valid, routed, theta, tie, atol, rtol, min_top1, new_only=False) -> str:
    """Fill `case` with the metrics of one run: "ok", "tie" (exec masks differ only where the
    reference P(execute) is within `tie` of theta) or "fail"."""
    ref_logits = r.logits.float().numpy()
    lo = out["logits"]
    ref_exec = np.stack([p[2].numpy() for p in r.past_key_values])
    ex = out["exec_mask"]
    if new_only:  # decode: compare the new column; the past was checked before
        ref_exec, ex = ref_exec[:, :, -1:], ex[:, :, -1:]
    mism = (ref_exec != ex) & valid[None]
    pre = "" if kind == "prefill" else "decode_"
    case[f"{pre}exec_agreement"] = 1.0 - float(mism.sum()) / max(int(valid.sum()) * ex.shape[0], 1)
    if mism.any():
        probs = [rl.softmax(-1)[..., 0].numpy() for rl in r.router_logits]
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
    return "ok" if diff <= bound and top1 >= min_top1 else "fail"
