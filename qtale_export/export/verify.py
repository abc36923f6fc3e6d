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
import functools
from pathlib import Path

import numpy as np
import onnx

from ..deploy import graph_io, ort_ops, reference
from ..deploy.manifest import Manifest, load
from ..deploy.precisions import precision as spec
from ..deploy.verify import Cases, agreement, close_case, compare, default_thetas, tally_decode
from ..deploy.verify import verify as verify_stored
from .graphs import quantizable

PROMPTS = [
    "The capital of France is",
    "Water boils at one hundred degrees Celsius at sea level, and",
    "Plants convert sunlight into chemical energy through photosynthesis. The process",
    "A journey of a thousand miles begins",
]


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
    if not spec(manifest["precision"]).quantized:
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










def verify_export(folder, model=None, thetas=None, decode_steps: int = 4, prompts=None,
                  check_files: bool = True) -> dict:
    """Run both graphs in ONNX Runtime against PyTorch; returns the JSON-able report."""
    import torch

    manifest = load(folder, verify=check_files)
    precision = manifest.precision
    ref = reference_model(manifest.data, manifest.folder, model)
    quantized_ckpt = bool(getattr(ref, "quantization_info", None))
    tok = ref.tokenizer
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(manifest.folder)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(list(prompts or PROMPTS), return_tensors="pt", padding=True, truncation=True, max_length=48)
    finally:
        tok.padding_side = side
    ids, mask = enc["input_ids"], enc["attention_mask"].long()
    sessions = {graph: ort_ops.session(manifest.graph_file(graph), exact=True) for graph in graph_io.GRAPHS}
    tol = spec(precision).tolerance
    atol, rtol, tie, min_top1 = tol.atol, tol.rtol, tol.tie, tol.min_top1
    num_layers = manifest.model.num_layers
    routed = list(ref.layer_ids)
    cases = []
    for theta_value in thetas if thetas is not None else default_thetas(manifest.theta):
        theta = torch.full((ids.shape[0],), float(theta_value))
        case = {"theta": float(theta_value)}
        with torch.no_grad():
            r = ref(ids, mask, theta=theta, use_cache=True)
        loop = graph_io.Loop(lambda graph, feeds: _run(sessions[graph], feeds), num_layers, theta.numpy())
        out = loop.prefill(ids.numpy(), mask.numpy())
        valid = mask.bool().numpy()
        status = _compare(case, "prefill", out, r, valid, routed, theta_value, tie, atol, rtol, min_top1)
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
                          atol, rtol, min_top1, new_only=True)
            if not tally_decode(dcase, st, step):
                break
            past_t = rd.past_key_values
            nxt = rd.logits[:, -1].argmax(-1, keepdim=True)
        cases.append(close_case(case, dcase, ok_case))
    report = {
        "ok": all(c["ok"] for c in cases),
        "precision": precision, "ops": manifest.ops,
        "reference": (f"pytorch quantized checkpoint ({ref.quantization_info.get('format')}, quantizers enabled)"
                      if quantized_ckpt else
                      "pytorch fp32 with the export's dequantized weights" if spec(precision).quantized
                      else "pytorch fp32"),
        "tolerance": {"atol": atol, "rtol": rtol, "tie": tie, "min_top1": min_top1},
        "prompts": int(ids.shape[0]), "tokens": int(mask.sum()), "decode_steps": decode_steps,
        **agreement(cases),
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




# ---- the stored reference and `qtale verify`'s live reference ----------------------------------
def store_reference(folder: Path, model, precision: str, graphs_desc: dict, theta: float) -> dict | None:
    """Write reference.npz (PyTorch outputs at theta 0 and the export's theta) into an export being
    built; returns its manifest entry (None without a tokenizer)."""
    from .precision import activation_dtype

    if model.tokenizer is None:
        return None
    ref = reference_model({"precision": precision, "graphs": graphs_desc}, Path(folder), model)
    thetas = [0.0] + ([float(theta)] if round(float(theta), 6) != 0.0 else [])
    prompts = PROMPTS[:reference.PROMPTS]
    cases = compute_reference(ref, model.tokenizer, thetas, prompts, reference.STEPS, activation_dtype(precision))
    reference.save(folder, cases, prompts)
    return {"file": reference.FILE, "thetas": thetas, "prompts": len(prompts), "decode_steps": reference.STEPS}


def compute_reference(ref, tokenizer, thetas, prompts, steps: int, act_dtype) -> list[dict]:
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


def live_cases(manifest: Manifest, thetas: list[float] | None, decode_steps: int | None, model=None) -> Cases:
    """`qtale verify`'s reference computed now from the checkpoint (deploy/verify.py `LiveCases`):
    4 prompts, the default thetas, 4 decode steps unless asked otherwise."""
    ref = reference_model(manifest.data, manifest.folder, model)
    tok = ref.tokenizer
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(manifest.folder)
    n_steps = 4 if decode_steps is None else decode_steps
    act = np.dtype(manifest.model.activation_dtype)
    cases = compute_reference(ref, tok, thetas if thetas is not None else default_thetas(manifest.theta), PROMPTS,
                              n_steps, act)
    return cases, n_steps, f"live pytorch ({len(PROMPTS)} prompts)"


def verify_with_polygraphy(folder, *, thetas=None, decode_steps: int | None = None, backend: str = "onnxrt",
                           plugin_lib=None, live: bool = False, model=None) -> dict:
    """`qtale verify` (deploy/verify.py `verify`) with this side's live reference for thetas or
    decode steps reference.npz does not hold, or `live`; `model`: the loaded checkpoint to use."""
    return verify_stored(folder, thetas=thetas, decode_steps=decode_steps, backend=backend, plugin_lib=plugin_lib,
                         live=live, live_cases=functools.partial(live_cases, model=model))
