"""A Triton Inference Server model repository from export folder(s) (`qtale triton-repo EXPORT_DIR...
--out REPO`, whose arguments live in cli/triton_repo.py).

One set of models per export (precision), whatever the ratio: theta is a graph input [batch].
`--backend python`: one model `qtale_<precision>` holding the prefill and decode graphs and the
weights file they share (once); onnxruntime / tensorrt: `qtale_<precision>_{prefill,decode}`
(one graph per model there). Plus `qtale_router` (Python backend, BLS, dynamic batching):
execution_ratio (+ optional precision) and input_ids / text in, generated tokens out; it turns
each row's ratio into theta with the one policy (theta.py, copied next to it as
theta_policy.py; `--ratio-mode`, default interpolate like `qtale run`) and runs each row of a
batch at batch 1 (`qtale run`'s shapes; the rows take turns) through the graph contract's loop
(deploy/graph_io.py, copied next to it as graph_io.py). `--backend python` also writes
`qtale_llm_<precision>` (triton_models/llm_model.py): decoupled, in-flight batching, streaming,
sampling, the generate extension, metrics and the elastic ratio, running the graph model's files
in its own process with copies of graph_io.py, theta.py, runtime/sampling.py and runtime/kv.py.

The graph models have max_batch_size 0 (explicit -1 dims): exec_mask [layers, batch, seq] and
past_exec do not have the batch first, which Triton's batcher requires; batching happens in the
router. Every config.pbtxt is parsed with tritonclient's ModelConfig protobuf before the
repository is renamed into place (written in a temporary folder next to --out). Graph files are
copied, not hard-linked: ONNX Runtime refuses some hard-linked external-data files (decode graphs
whose DequantizeLinear weights live inside If branches). No PyTorch.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import safe_write
from . import graph_io
from ..errors import QtaleError

BACKENDS = ("onnxruntime", "tensorrt", "python")
ROUTER = "qtale_router"
DTYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
          "bool": "TYPE_BOOL", "bfloat16": "TYPE_BF16"}
TEMPLATES = Path(__file__).parent / "triton_models"


def _dims(shape) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) and d > 0 else "-1" for d in shape) + " ]"


def _io(kind: str, items: dict) -> str:
    rows = [f'  {{ name: "{n}" data_type: {DTYPES[v["dtype"]]} dims: {_dims(v["shape"])}'
            + (" optional: true }" if v.get("optional") else " }") for n, v in items.items()]
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
        if v.get("optional"):  # the warm-up is a prefill
            continue
        dims = [d if isinstance(d, int) else sizes.get(d, 1) for d in v["shape"]]
        dt = DTYPES[v["dtype"]]
        fill = "random_data: true" if dt in ("TYPE_FP32", "TYPE_FP16") and n != "theta" else "zero_data: true"
        ins.append(f'    inputs {{ key: "{n}" value {{ data_type: {dt} dims: {_dims(dims)} {fill} }} }}')
    return "model_warmup [\n  {\n    name: \"zeros\"\n    batch_size: 1\n" + "\n".join(ins) + "\n  }\n]\n"


# TensorRT DataType names (an engine's recorded I/O, deploy/trt_builder.network_io) -> DTYPES keys
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
              "BOOL": "bool"}


def engine_io(entry: dict, graph: dict) -> dict:
    """A TensorRT model's inputs/outputs from the built engine's own I/O (names, dtypes, shapes as
    `qtale build` recorded them), named dims taken from the graph where the engine says -1; an
    engine recorded without its I/O (trtexec, older builds) falls back to the ONNX graph's."""
    io = entry.get("io")
    if not io:
        return graph
    out: dict = {"inputs": {}, "outputs": {}}
    for kind in ("inputs", "outputs"):
        for t in io[kind]:
            if t["dtype"] not in TRT_DTYPES:
                raise QtaleError(f"engine {entry.get('file')}: {t['name']} is {t['dtype']}, which Triton's "
                                 "TensorRT backend is not given by QTALE")
            named = (graph.get(kind) or {}).get(t["name"], {}).get("shape") or []
            shape = [named[k] if d < 0 and k < len(named) else d for k, d in enumerate(t["shape"])]
            out[kind][t["name"]] = {"dtype": TRT_DTYPES[t["dtype"]], "shape": shape}
    return out


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


def router_config(max_batch: int, instances: int, params: dict, queue: int, deadline_s: float) -> str:
    """The router's config: dynamic batching behind a bounded queue (`queue` requests at most, each
    rejected after `deadline_s` waiting), so a flood is refused instead of piling up."""
    wait_us = int(deadline_s * 1_000_000)
    return (f'name: "{ROUTER}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            "input [\n"
            '  { name: "execution_ratio" data_type: TYPE_FP32 dims: [ 1 ] },\n'
            '  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] optional: true },\n'
            '  { name: "text" data_type: TYPE_STRING dims: [ 1 ] optional: true },\n'
            '  { name: "max_new_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true },\n'
            '  { name: "precision" data_type: TYPE_STRING dims: [ 1 ] optional: true }\n]\n'
            "output [\n"
            '  { name: "output_ids" data_type: TYPE_INT64 dims: [ -1 ] },\n'
            '  { name: "text" data_type: TYPE_STRING dims: [ 1 ] },\n'
            '  { name: "realized_ratio" data_type: TYPE_FP32 dims: [ 1 ] },\n'
            '  { name: "theta" data_type: TYPE_FP32 dims: [ 1 ] },\n'
            '  { name: "precision" data_type: TYPE_STRING dims: [ 1 ] },\n'
            '  { name: "stop_reason" data_type: TYPE_STRING dims: [ 1 ] }\n]\n'
            "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n"
            f"  default_queue_policy {{ timeout_action: REJECT default_timeout_microseconds: {wait_us} "
            f"max_queue_size: {queue} }}\n}}\n"
            f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n" + _params(params))


LLM_INPUTS = [("text_input", "TYPE_STRING", "1"), ("input_ids", "TYPE_INT64", "-1"), ("max_tokens", "TYPE_INT32", "1"),
              ("execution_ratio", "TYPE_FP32", "1"), ("theta", "TYPE_FP32", "1"), ("temperature", "TYPE_FP32", "1"),
              ("top_p", "TYPE_FP32", "1"), ("seed", "TYPE_INT64", "1"), ("stop", "TYPE_STRING", "-1"),
              ("stream", "TYPE_BOOL", "1"), ("elastic", "TYPE_BOOL", "1"), ("ignore_eos", "TYPE_BOOL", "1")]
LLM_OUTPUTS = [("text_output", "TYPE_STRING", "1"), ("output_ids", "TYPE_INT64", "-1"),
               ("requested_ratio", "TYPE_FP32", "1"), ("served_ratio", "TYPE_FP32", "1"),
               ("realized_ratio", "TYPE_FP32", "1"), ("theta", "TYPE_FP32", "1"), ("stop_reason", "TYPE_STRING", "1"),
               ("prompt_tokens", "TYPE_INT32", "1"), ("new_tokens", "TYPE_INT32", "1")]
ELASTIC = ("off", "tpot", "queue")


def llm_config(name: str, params: dict) -> str:
    """The in-flight model's config: decoupled (a response per text piece when streaming), every
    input optional but a prompt, names as Triton's generate extension maps JSON fields. No dynamic
    batching: execute() only queues a request; the model's scheduler batches in flight."""
    row = lambda n, t, d, opt: f'  {{ name: "{n}" data_type: {t} dims: [ {d} ]{" optional: true" if opt else ""} }}'
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            "model_transaction_policy { decoupled: true }\n"
            "input [\n" + ",\n".join(row(*i, True) for i in LLM_INPUTS) + "\n]\n"
            "output [\n" + ",\n".join(row(*o, False) for o in LLM_OUTPUTS) + "\n]\n"
            "instance_group [ { count: 1 kind: KIND_CPU } ]\n" + _params(params))


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
MARKER = ".qtale-triton-repository"  # what `--force` looks for before it replaces a folder


def _place(src: Path, dst: Path) -> None:
    """Copy `src`, a file the manifest's checked helpers resolved inside the export, to `dst`."""
    if not src.is_file():
        raise QtaleError(f"{src} is not a file")
    if dst.exists():  # two listed names with one base name would overwrite each other
        raise QtaleError(f"{src.parent}: two files would be copied to {dst.name}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _tokenizer(folder: Path, manifest: dict) -> Path:
    """tokenizer.json of an export: inside the folder (no symlink out) and checksummed."""
    from ..contract import member

    path = member(folder, "tokenizer.json", f"{folder}: tokenizer")
    if "tokenizer.json" not in manifest["files"]:
        raise QtaleError(f"{folder}: tokenizer.json is not among the manifest's checksummed files")
    return path


def _check_out(out, force: bool, sources) -> Path:
    """safe_write's rule, and `--force` only over a repository this command wrote (its marker)
    or an empty folder: never over a folder of the user's own files."""
    out = safe_write.check_output(out, force=force, sources=sources, kind="triton")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise QtaleError(f"{out} is not a QTALE Triton repository (no {MARKER}): --force replaces only what "
                         "qtale triton-repo wrote; choose another --out or remove it yourself")
    return out


def _max_length(manifest: dict) -> int:
    """The model's maximum sequence length from the manifest (positions), checked."""
    m = manifest["model"]
    value = m.get("max_position_embeddings") or m.get("max_length") or 2048
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise QtaleError(f"manifest: max_position_embeddings must be an integer >= 2, got {value!r}")
    return value


def _eos(manifest: dict) -> list[int]:
    eos = manifest["model"].get("eos_token_id")
    return [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


def _llm_model(tmp: Path, folder: Path, m: dict, graph_model: str, graph_params: dict, max_rows: int,
               max_queue: int, max_new_tokens: int, cap: int, max_prompt_tokens: int | None, deadline_s: float,
               ratio_mode: str, elastic: str, elastic_target: float | None, elastic_floor: float,
               elastic_interval: float) -> str:
    """Write `qtale_llm_<precision>`: llm_model.py and the shared files it runs (the graph contract,
    the theta policy, qtale run's sampler and KV decoder); its graphs are `graph_model`'s files."""
    from . import theta as policy
    from .runtime import kv, sampling

    name = f"qtale_llm_{m['precision']}"
    ver = tmp / name / "1"
    ver.mkdir(parents=True)
    shutil.copy2(TEMPLATES / "llm_model.py", ver / "model.py")
    shutil.copy2(TEMPLATES / "model_files.py", ver / "model_files.py")  # its session and tokenizer
    for module, copy in ((graph_io, "graph_io.py"), (policy, "theta_policy.py"), (sampling, "sampling.py"), (kv, "kv.py")):
        shutil.copy2(Path(module.__file__), ver / copy)
    if (folder / "tokenizer.json").exists():
        _place(_tokenizer(folder, m), ver / "tokenizer.json")
    mlen = _max_length(m)
    params = {"precision": m["precision"], "graph_model": graph_model, "graphs": graph_params["graphs"],
              "threads": graph_params["threads"], "plugin_ops": graph_params["plugin_ops"],
              "in_place": "1" if m["graphs"]["decode"].get("kv_cache") == "in-place" else "0",
              "num_layers": m["model"]["num_layers"], "vocab": m["model"]["vocab"],
              "routed_layers": json.dumps(m["model"].get("routed_layers") or []), "eos_ids": json.dumps(_eos(m)),
              "max_length": mlen, "max_prompt_tokens": min(max_prompt_tokens or mlen - 1, mlen - 1),
              "default_max_tokens": max_new_tokens, "max_tokens_cap": cap, "deadline_s": deadline_s,
              "max_rows": max_rows, "max_queue": max_queue, "theta_table": json.dumps(m.get("theta_table") or {}),
              "ratio_mode": ratio_mode, "default_ratio": m.get("ratio") or "", "default_theta": m.get("theta") or 0.0,
              "elastic": elastic, "elastic_target": elastic_target or "", "elastic_floor": elastic_floor,
              "elastic_interval": elastic_interval}
    text = llm_config(name, params)
    validate_config(text, f"{name}/config.pbtxt")
    (tmp / name / "config.pbtxt").write_text(text)
    return name


def _io_union(prefill: dict, decode: dict) -> dict:
    """One model serving both graphs: decode-only inputs are optional (their presence picks decode)."""
    ins = {n: dict(v) for n, v in prefill["inputs"].items()}
    for n, v in decode["inputs"].items():
        if n not in ins:
            ins[n] = {**v, "optional": True}
    return {"inputs": ins, "outputs": dict(prefill["outputs"])}


def _check_limits(backend: str, max_batch: int, instances: int, max_queue: int, router_instances: int,
                  max_new_tokens: int, max_new_tokens_cap: int, max_prompt_tokens: int | None,
                  deadline_s: float) -> None:
    """The serving limits' own ranges (one line naming the option)."""
    if backend not in BACKENDS:
        raise QtaleError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if min(max_batch, instances, max_queue, router_instances, max_new_tokens_cap) < 1:
        raise QtaleError("--max-batch, --instances, --max-queue, --router-instances and --max-new-tokens-cap "
                         "must be >= 1")
    if not 1 <= max_new_tokens <= max_new_tokens_cap:
        raise QtaleError(f"--max-new-tokens {max_new_tokens} must be in 1..--max-new-tokens-cap ({max_new_tokens_cap})")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise QtaleError("--max-prompt-tokens must be >= 1")
    if not (deadline_s > 0 and deadline_s <= 86400):  # NaN fails too
        raise QtaleError(f"--deadline must be in (0, 86400] seconds, got {deadline_s}")


def _check_elastic(backend: str, elastic: str, elastic_target: float | None, elastic_floor: float,
                   elastic_interval: float) -> float:
    """The elastic policy's options; returns the checked floor ratio."""
    from . import theta as policy

    if elastic not in ELASTIC:
        raise QtaleError(f"unknown elastic policy '{elastic}' (choose from {', '.join(ELASTIC)})")
    if elastic == "off":
        return elastic_floor
    if backend != "python":
        raise QtaleError("--elastic needs --backend python (the in-flight model)")
    if elastic_target is None or not (elastic_target > 0 and elastic_target < 1e6):  # NaN fails too
        raise QtaleError(f"--elastic {elastic} needs --elastic-target > 0 (seconds per output token or "
                         f"requests waiting), got {elastic_target}")
    if not 0 <= elastic_interval <= 3600:
        raise QtaleError(f"--elastic-interval must be in [0, 3600] seconds, got {elastic_interval}")
    return policy.check_ratio(elastic_floor)


def _read_exports(export_dirs) -> list[tuple[Path, dict]]:
    """(folder, manifest) of every export, checked: one per precision, all of one model."""
    from .manifest import read_manifest

    exports = [(Path(d), read_manifest(Path(d), verify=True)) for d in export_dirs]
    precisions = [m["precision"] for _, m in exports]
    if len(set(precisions)) != len(precisions):
        raise QtaleError(f"two exports with the same precision ({', '.join(precisions)}): one per precision")
    first = exports[0][1]["model"]
    for d, m in exports[1:]:
        if m["model"]["num_layers"] != first["num_layers"] or m["model"]["vocab"] != first["vocab"]:
            raise QtaleError(f"{d} is an export of another model than {exports[0][0]}")
    return exports


def _engines(folder: Path, m: dict) -> dict:
    """{graph: engine entry} of an export served by Triton's TensorRT backend (both graphs needed)."""
    engines: dict = {}
    for e in m.get("engines") or []:
        if isinstance(e, dict) and e.get("graph") in ("prefill", "decode"):
            engines.setdefault(e["graph"], e)
    for g in ("prefill", "decode"):
        if g not in engines:
            raise QtaleError(f"{folder} has no TensorRT engine for the {g} graph; "
                             f"run `qtale build {folder} --graph {g}` first")
    return engines


def _python_graph_model(tmp: Path, folder: Path, m: dict, base: str, common: dict, threads: int,
                        max_batch: int, instances: int, kind: str) -> dict:
    """`qtale_<precision>`: one Python model holding both graphs and the weights file they share
    (once per precision); returns its parameters (the in-flight model reads the same graphs)."""
    from .manifest import graph_files

    ver = tmp / base / "1"
    ver.mkdir(parents=True)
    files = sorted(set(graph_files(folder, m, "prefill")) | set(graph_files(folder, m, "decode")))
    for f in files:
        _place(f, ver / f.name)
    shutil.copy2(TEMPLATES / "graph_model.py", ver / "model.py")
    shutil.copy2(TEMPLATES / "model_files.py", ver / "model_files.py")  # its sessions
    shutil.copy2(Path(graph_io.__file__), ver / "graph_io.py")  # the names model.py feeds
    params = {**common, "graphs": json.dumps({g: Path(m["graphs"][g]["file"]).name for g in ("prefill", "decode")}),
              "threads": threads, "plugin_ops": "1" if m.get("ops") == "plugin" else "0",
              "vocab": m["model"]["vocab"], "max_length": _max_length(m), "max_batch": max_batch}
    io = _io_union(m["graphs"]["prefill"], m["graphs"]["decode"])
    io["inputs"][graph_io.LOGITS_TO_KEEP] = {"dtype": "int64", "shape": [1], "optional": True}
    text = graph_config(base, "prefill", io, "python", "", instances, kind, params, m)
    validate_config(text, f"{base}/config.pbtxt")
    (tmp / base / "config.pbtxt").write_text(text)
    return params


def _per_graph_models(tmp: Path, folder: Path, m: dict, base: str, common: dict, backend: str, threads: int,
                      instances: int, kind: str) -> dict:
    """`qtale_<precision>_{prefill,decode}` for Triton's ONNX Runtime or TensorRT backend (one graph
    per model; the ratio still never multiplies them); returns {graph: model name}."""
    from .manifest import engine_file, graph_files

    engines = _engines(folder, m) if backend == "tensorrt" else {}
    names = {}
    for g in ("prefill", "decode"):
        name = f"{base}_{g}"
        ver = tmp / name / "1"
        ver.mkdir(parents=True)
        files = [engine_file(folder, m, engines[g])] if backend == "tensorrt" else graph_files(folder, m, g)
        for f in files:
            _place(f, ver / f.name)
        params = {**common, "graph": g}
        if backend == "onnxruntime" and threads:
            params["intra_op_thread_count"] = threads
        io = engine_io(engines[g], m["graphs"][g]) if backend == "tensorrt" else m["graphs"][g]
        text = graph_config(name, g, io, backend, Path(files[0]).name, instances, kind, params, m)
        validate_config(text, f"{name}/config.pbtxt")
        (tmp / name / "config.pbtxt").write_text(text)
        names[g] = name
    return names


def _router(tmp: Path, exports: list, served: dict, ratio_mode: str, max_batch: int, router_instances: int,
            max_queue: int, max_new_tokens: int, max_new_tokens_cap: int, max_prompt_tokens: int | None,
            deadline_s: float) -> str:
    """The router model: tokenizer, theta policy and generation loop over the graph models."""
    from . import theta as policy

    folder, m0 = exports[0]
    ver = tmp / ROUTER / "1"
    ver.mkdir(parents=True)
    shutil.copy2(TEMPLATES / "router_model.py", ver / "model.py")
    shutil.copy2(TEMPLATES / "model_files.py", ver / "model_files.py")  # its tokenizer
    shutil.copy2(Path(policy.__file__), ver / "theta_policy.py")  # the same rule as `qtale run`
    shutil.copy2(Path(graph_io.__file__), ver / "graph_io.py")  # the same loop as `qtale run`
    if (folder / "tokenizer.json").exists():
        _place(_tokenizer(folder, m0), ver / "tokenizer.json")
    mlen = _max_length(m0)
    params = {"exports": json.dumps(served), "default_precision": m0["precision"], "ratio_mode": ratio_mode,
              "eos_ids": json.dumps(_eos(m0)), "routed_layers": json.dumps(m0["model"].get("routed_layers") or []),
              "num_layers": m0["model"]["num_layers"], "max_length": mlen, "vocab": m0["model"]["vocab"],
              "default_max_new_tokens": max_new_tokens, "max_new_tokens_cap": max_new_tokens_cap,
              "max_prompt_tokens": min(max_prompt_tokens or mlen - 1, mlen - 1), "deadline_s": deadline_s}
    text = router_config(max_batch, router_instances, params, max_queue, deadline_s)
    validate_config(text, f"{ROUTER}/config.pbtxt")
    (tmp / ROUTER / "config.pbtxt").write_text(text)
    return ROUTER


def build_repository(export_dirs, out, backend: str = "python", ratios=None, max_batch: int = 8,
                     instances: int = 1, kind: str | None = None, threads: int = 0, force: bool = False,
                     max_new_tokens: int = 32, ratio_mode: str = "interpolate", max_new_tokens_cap: int = 512,
                     max_prompt_tokens: int | None = None, deadline_s: float = 60.0, max_queue: int = 64,
                     router_instances: int = 2, elastic: str = "off", elastic_target: float | None = None,
                     elastic_floor: float = 0.6, elastic_interval: float = 0.5) -> dict:
    """Write the repository: per export (precision) its graphs and weights once, plus the router,
    which turns each request's execution_ratio into theta with the one policy (theta.py, copied
    next to it) in `ratio_mode`, the same rule and default as `qtale run`. `ratios` are only
    checked (each must be servable by every export) and listed with their thetas.

    Serving limits (docs/triton.md): a request's max_new_tokens up to `max_new_tokens_cap`, its
    prompt up to `max_prompt_tokens` (and the model's maximum length), `max_queue` requests waiting,
    each for at most `deadline_s`, and each generating for at most `deadline_s`;
    `router_instances` routers so a long request does not hold the only one.

    `--backend python` adds `qtale_llm_<precision>` per export: the decoupled in-flight model
    (llm_model.py; streaming, sampling, the generate extension, metrics), at most `max_batch`
    running rows and `max_queue` waiting. `elastic` ("tpot": `elastic_target` seconds per output
    token; "queue": `elastic_target` requests waiting) lowers the ratio of its rows toward
    `elastic_floor` while the server falls behind, one 0.1 step per `elastic_interval` seconds at most;
    "off" (default) never changes a ratio."""
    from . import theta as policy

    _check_limits(backend, max_batch, instances, max_queue, router_instances, max_new_tokens, max_new_tokens_cap,
                  max_prompt_tokens, deadline_s)
    policy.check_mode(ratio_mode)
    elastic_floor = _check_elastic(backend, elastic, elastic_target, elastic_floor, elastic_interval)
    out = _check_out(out, force, export_dirs)
    kind = kind or ("gpu" if backend == "tensorrt" else "cpu")
    exports = _read_exports(export_dirs)
    precisions = [m["precision"] for _, m in exports]
    # every ratio is checked before anything is written (a bad one leaves nothing behind)
    checked = [{"precision": m["precision"], "ratio": policy.check_ratio(r),
                **policy.select(m.get("theta_table"), r, ratio_mode)}
               for _, m in exports for r in (ratios or [])]
    if elastic != "off":  # the floor must be servable, or the policy would fail rows under load
        for d, m in exports:
            policy.select(m.get("theta_table"), elastic_floor, ratio_mode, where=f" in {d} (--elastic-floor)")
    tmp = safe_write.staging_dir(out)
    served, models = {}, []
    try:
        for folder, m in exports:
            prec = m["precision"]
            if backend == "onnxruntime" and m.get("ops") == "plugin":
                raise QtaleError(f"{folder} uses the qtale plugin ops, which Triton's ONNX Runtime backend "
                                 "cannot run: export with --ops standard, or use --backend python/tensorrt")
            base = f"qtale_{prec}"
            common = {"precision": prec, "routed_layers": json.dumps(m["model"].get("routed_layers") or [])}
            if backend == "python":
                params = _python_graph_model(tmp, folder, m, base, common, threads, max_batch, instances, kind)
                names = {"prefill": base, "decode": base}
                models += [base, _llm_model(tmp, folder, m, base, params, max_batch, max_queue, max_new_tokens,
                                            max_new_tokens_cap, max_prompt_tokens, deadline_s, ratio_mode,
                                            elastic, elastic_target, elastic_floor, elastic_interval)]
            else:
                names = _per_graph_models(tmp, folder, m, base, common, backend, threads, instances, kind)
                models += [names["prefill"], names["decode"]]
            # the Python graph model takes logits_to_keep: the router's prefill asks for the last position only
            served[prec] = {**names, "theta_table": m.get("theta_table") or {}, "logits_to_keep": backend == "python"}
        models.append(_router(tmp, exports, served, ratio_mode, max_batch, router_instances, max_queue,
                              max_new_tokens, max_new_tokens_cap, max_prompt_tokens, deadline_s))
        (tmp / MARKER).write_text(json.dumps({"format": "qtale-triton-repository", "models": models}) + "\n")
        _check_out(out, force, export_dirs)  # it may have appeared meanwhile
        safe_write.publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "backend": backend, "models": models, "precisions": precisions,
            "ratio_mode": ratio_mode, "ratios": checked, "elastic": elastic}
