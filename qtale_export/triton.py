"""`qtale triton-repo EXPORT_DIR... --out REPO`: a Triton Inference Server model repository.

Per export (precision) and per execution ratio, two models `qtale_<precision>_r<ratio>_{prefill,
decode}` (platform onnxruntime_onnx, tensorrt_plan, or the Python backend running ONNX Runtime),
whose config.pbtxt records the variant's theta; theta stays a graph input, sent by the caller.
Plus `qtale_router` (Python backend, BLS, dynamic batching): execution_ratio + input_ids / text
in, generated tokens out; it picks the variant nearest to the ratio and sends its theta.

The graph models have max_batch_size 0 (explicit -1 dims): exec_mask [layers, batch, seq] and
past_exec do not have the batch first, which Triton's batcher requires; batching happens in the
router. Every config.pbtxt is parsed with tritonclient's ModelConfig protobuf before the
repository is renamed into place (written in a temporary folder next to --out). Graph files are
copied, not hard-linked: ONNX Runtime refuses some hard-linked external-data files (decode graphs
whose DequantizeLinear weights live inside If branches). No PyTorch.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from . import safe_write, validate
from .errors import QtaleError
from .validate import arg

BACKENDS = ("onnxruntime", "tensorrt", "python")
ROUTER = "qtale_router"
DTYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
          "bool": "TYPE_BOOL", "bfloat16": "TYPE_BF16"}
TEMPLATES = Path(__file__).parent / "triton_models"


def add_triton_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("export_dirs", nargs="+", metavar="EXPORT_DIR",
                        help="export folder(s); one per precision")
    parser.add_argument("--out", required=True, help="model repository folder to create")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                        help="graph models: onnxruntime_onnx, tensorrt_plan (engines from `qtale build`) "
                             "or the Python backend running ONNX Runtime")
    parser.add_argument("--ratios", type=arg(validate.ratios, "--ratios"), default=None,
                        help="comma-separated execution ratios (default: the theta table's ratios)")
    parser.add_argument("--max-batch", type=arg(validate.positive_int, "--max-batch"), default=8,
                        help="router max_batch_size (dynamic batching)")
    parser.add_argument("--instances", type=arg(validate.positive_int, "--instances"), default=1,
                        help="instances per model")
    parser.add_argument("--kind", choices=["cpu", "gpu"], default=None,
                        help="instance kind (default gpu for tensorrt, else cpu)")
    parser.add_argument("--threads", type=arg(validate.nonnegative_int, "--threads"), default=0,
                        help="ONNX Runtime intra-op threads (0 = default)")
    parser.add_argument("--max-new-tokens", type=arg(validate.positive_int, "--max-new-tokens"), default=32,
                        help="router default when a request has none")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--json", action="store_true")
    return parser


# ---- config.pbtxt ------------------------------------------------------------------------------
def _dims(shape) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) and d > 0 else "-1" for d in shape) + " ]"


def _io(kind: str, items: dict) -> str:
    rows = [f'  {{ name: "{n}" data_type: {DTYPES[v["dtype"]]} dims: {_dims(v["shape"])} }}'
            for n, v in items.items()]
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def _params(params: dict) -> str:
    return "".join(f'parameters {{ key: "{k}" value {{ string_value: {json.dumps(str(v))} }} }}\n'
                   for k, v in params.items())


def _warmup(graph: str, io: dict, m: dict) -> str:
    """Zero-filled warm-up request with small concrete shapes (prompt 8, past 4)."""
    seq, past = (8, 0) if graph == "prefill" else (1, 4)
    sizes = {"batch": 1, "seq": seq, "one": 1, "past": past, "total": past + 1}
    ins = []
    for n, v in io["inputs"].items():
        dims = [d if isinstance(d, int) else sizes.get(d, 1) for d in v["shape"]]
        dt = DTYPES[v["dtype"]]
        fill = "random_data: true" if dt in ("TYPE_FP32", "TYPE_FP16") and n != "theta" else "zero_data: true"
        ins.append(f'    inputs {{ key: "{n}" value {{ data_type: {dt} dims: {_dims(dims)} {fill} }} }}')
    return "model_warmup [\n  {\n    name: \"zeros\"\n    batch_size: 1\n" + "\n".join(ins) + "\n  }\n]\n"


def graph_config(name: str, graph: str, io: dict, backend: str, filename: str, instances: int, kind: str,
                 params: dict, manifest: dict) -> str:
    head = f'name: "{name}"\n'
    if backend == "onnxruntime":
        head += 'platform: "onnxruntime_onnx"\n'
    elif backend == "tensorrt":
        head += 'platform: "tensorrt_plan"\n'
    else:
        head += 'backend: "python"\n'
    if backend != "python":
        head += f'default_model_filename: "{filename}"\n'
    head += "max_batch_size: 0\n"
    text = head + _io("input", io["inputs"]) + _io("output", io["outputs"])
    text += f"instance_group [ {{ count: {instances} kind: {'KIND_GPU' if kind == 'gpu' else 'KIND_CPU'} }} ]\n"
    text += _params(params) + _warmup(graph, io, manifest)
    return text


def router_config(max_batch: int, instances: int, params: dict) -> str:
    return (f'name: "{ROUTER}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            "input [\n"
            '  { name: "execution_ratio" data_type: TYPE_FP32 dims: [ 1 ] },\n'
            '  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] optional: true },\n'
            '  { name: "text" data_type: TYPE_STRING dims: [ 1 ] optional: true },\n'
            '  { name: "max_new_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }\n]\n'
            "output [\n"
            '  { name: "output_ids" data_type: TYPE_INT64 dims: [ -1 ] },\n'
            '  { name: "text" data_type: TYPE_STRING dims: [ 1 ] },\n'
            '  { name: "realized_ratio" data_type: TYPE_FP32 dims: [ 1 ] },\n'
            '  { name: "theta" data_type: TYPE_FP32 dims: [ 1 ] },\n'
            '  { name: "variant" data_type: TYPE_STRING dims: [ 1 ] }\n]\n'
            "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
            f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n" + _params(params))


def validate_config(text: str, where: str = "config.pbtxt"):
    """Parse with the ModelConfig protobuf shipped in tritonclient; QtaleError on any problem."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise QtaleError("validating config.pbtxt needs tritonclient[grpc] (pip install 'tritonclient[grpc]')") from None
    cfg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as exc:
        raise QtaleError(f"invalid {where}: {exc}") from None
    if not cfg.name or not (cfg.platform or cfg.backend):
        raise QtaleError(f"invalid {where}: no name or platform/backend")
    return cfg


# ---- repository ----------------------------------------------------------------------------------
def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def _graph_files(folder: Path, manifest: dict, graph: str) -> list[str]:
    """The ONNX file of a graph and its external data files (relative names)."""
    g = manifest["graphs"][graph]
    main = g["file"]
    if "external_data" in g:
        return [main] + list(g["external_data"])
    # exports written before the shared weights file: <graph>.onnx.data next to each graph
    return [main] + sorted(f for f in manifest["files"] if f.startswith(main + ".") and f != main)


def _variant_name(precision: str, ratio_key: str) -> str:
    return f"qtale_{precision}_r{ratio_key.replace('.', '_')}"


def build_repository(export_dirs, out, backend: str = "onnxruntime", ratios=None, max_batch: int = 8,
                     instances: int = 1, kind: str | None = None, threads: int = 0, force: bool = False,
                     max_new_tokens: int = 32) -> dict:
    from .export.manifest import read_manifest
    from .runtime.select import check_ratio, ratio_key, select_theta

    if backend not in BACKENDS:
        raise QtaleError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if max_batch < 1 or instances < 1:
        raise QtaleError("--max-batch and --instances must be >= 1")
    out = safe_write.check_output(out, force=force, sources=export_dirs)
    kind = kind or ("gpu" if backend == "tensorrt" else "cpu")
    exports = []
    for d in export_dirs:
        d = Path(d)
        m = read_manifest(d, verify=True)
        exports.append((d, m))
    precisions = [m["precision"] for _, m in exports]
    if len(set(precisions)) != len(precisions):
        raise QtaleError(f"two exports with the same precision ({', '.join(precisions)}): one per precision")
    first = exports[0][1]["model"]
    for d, m in exports[1:]:
        if m["model"]["num_layers"] != first["num_layers"] or m["model"]["vocab"] != first["vocab"]:
            raise QtaleError(f"{d} is an export of another model than {exports[0][0]}")
    tmp = safe_write.staging_dir(out)
    variants, models = [], []
    try:
        for folder, m in exports:
            prec = m["precision"]
            if backend == "onnxruntime" and m.get("ops") == "plugin":
                raise QtaleError(f"{folder} uses the qtale plugin ops, which Triton's ONNX Runtime backend "
                                 "cannot run: export with --ops standard, or use --backend python/tensorrt")
            engines = {}
            if backend == "tensorrt":
                for e in m.get("engines") or []:
                    if isinstance(e, dict) and e.get("graph") in ("prefill", "decode"):
                        engines.setdefault(e["graph"], e)
                for g in ("prefill", "decode"):
                    if g not in engines:
                        raise QtaleError(f"{folder} has no TensorRT engine for the {g} graph; "
                                         f"run `qtale build {folder} --graph {g}` first")
            table = m.get("theta_table") or {}
            wanted = ratios if ratios else sorted({float(k) for k in table} | {1.0}, reverse=True)
            for r in wanted:
                r = check_ratio(r)
                sel = select_theta(table, r)
                key = ratio_key(r)
                base = _variant_name(prec, key)
                v = {"name": base, "precision": prec, "ratio": r, "theta": float(sel["theta"]),
                     "selection": sel["mode"], "prefill": f"{base}_prefill", "decode": f"{base}_decode"}
                for g in ("prefill", "decode"):
                    name = f"{base}_{g}"
                    ver = tmp / name / "1"
                    ver.mkdir(parents=True)
                    if backend == "tensorrt":
                        files = [engines[g]["file"]]
                    else:
                        files = _graph_files(folder, m, g)
                    for f in files:
                        _place(folder / f, ver / Path(f).name)
                    params = {"theta": v["theta"], "execution_ratio": r, "precision": prec, "graph": g,
                              "routed_layers": json.dumps(m["model"].get("routed_layers") or [])}
                    if backend == "python":
                        shutil.copy2(TEMPLATES / "graph_model.py", ver / "model.py")
                        params.update({"graph_file": Path(files[0]).name, "threads": threads,
                                       "plugin_ops": "1" if m.get("ops") == "plugin" else "0"})
                    elif backend == "onnxruntime" and threads:
                        params["intra_op_thread_count"] = threads
                    text = graph_config(name, g, m["graphs"][g], backend, Path(files[0]).name, instances, kind,
                                        params, m)
                    validate_config(text, f"{name}/config.pbtxt")
                    (tmp / name / "config.pbtxt").write_text(text)
                    models.append(name)
                variants.append(v)
        # the router
        m0 = exports[0][1]
        ver = tmp / ROUTER / "1"
        ver.mkdir(parents=True)
        shutil.copy2(TEMPLATES / "router_model.py", ver / "model.py")
        tok = exports[0][0] / "tokenizer.json"
        if tok.is_file():
            shutil.copy2(tok, ver / "tokenizer.json")
        eos = m0["model"].get("eos_token_id")
        eos = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        mlen = m0["model"].get("max_position_embeddings") or m0["model"].get("max_length") or 2048
        params = {"variants": json.dumps(variants), "eos_ids": json.dumps(eos),
                  "routed_layers": json.dumps(m0["model"].get("routed_layers") or []),
                  "num_layers": m0["model"]["num_layers"], "max_length": mlen,
                  "default_max_new_tokens": max_new_tokens}
        text = router_config(max_batch, instances, params)
        validate_config(text, f"{ROUTER}/config.pbtxt")
        (tmp / ROUTER / "config.pbtxt").write_text(text)
        models.append(ROUTER)
        safe_write.check_output(out, force=force)  # it may have appeared meanwhile
        safe_write.publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "backend": backend, "models": models, "variants": variants}


def run_triton(args) -> dict:
    ratios = args.ratios
    if isinstance(ratios, str):  # a Namespace built by hand rather than by the parser
        ratios = validate.ratios(ratios)
    res = build_repository(args.export_dirs, args.out, backend=args.backend, ratios=ratios,
                           max_batch=args.max_batch, instances=args.instances, kind=args.kind,
                           threads=args.threads, force=args.force, max_new_tokens=args.max_new_tokens)
    if not getattr(args, "json", False):
        print(f"wrote {len(res['models'])} models to {res['out']} ({args.backend}):")
        for v in res["variants"]:
            print(f"  {v['name']}: ratio {v['ratio']} theta {v['theta']:.4f} ({v['selection']})")
        print(f"  {ROUTER}: execution_ratio -> nearest variant; see docs/triton.md")
    return res
