"""Build a TensorRT engine from a qtale export folder and record it in manifest.json (`qtale build`,
whose arguments live in cli/build.py; build_engine.sh calls `qtale build --plan` and `--record`).

The build itself (which TensorRT, parse, profile, build) is trt_builder.py; what the engine holds
is read from the builder's layer report by engine_info.py. TensorRT is imported lazily there, so
this module (validation, the trtexec command of a dry run, manifest bookkeeping) works on hosts
without TensorRT.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtale_export.contract import file_sha256
from qtale_export.errors import QtaleError
from qtale_export.deploy.manifest import Manifest, load, read_manifest, write_manifest
from qtale_export.deploy.precisions import capable, check_tensorrt, parse_sm
from qtale_export.deploy.precisions import precision as spec
from qtale_export.safe_write import write_bytes

from . import engine_info, graph_io, trt_builder

GRAPHS = ("prefill", "decode")
JETSON_ORIN_SM = "8.7"  # Orin: Ampere-class iGPU, no FP8 tensor cores
PLUGIN_DIR = "plugins"  # where an export keeps the plugin library its engines were built with
KERNELS_LIB = "libqtale_kernels.so"  # the CUDA kernels the plugin library loads from its own folder
DEFAULT_WORKSPACE_MB = 4096
JETSON_WORKSPACE_MB = 2048  # unified memory is shared with the CPU; leave room for the KV cache


@dataclass
class BuildOptions:
    """What `qtale build` was asked for (cli/build.py); `plan_build` checks it against the export."""

    export_dir: Path
    precision: str | None = None  # None: the export's precision
    graph: str = "prefill"
    min_tokens: int = 1
    opt_tokens: int = 256
    max_tokens: int = 2048
    batch: str = "1"  # N or MIN:OPT:MAX
    plugin_lib: Path | None = None
    jetson: bool = False
    dry_run: bool = False
    workspace_mb: int | None = None  # None: DEFAULT_WORKSPACE_MB, JETSON_WORKSPACE_MB with jetson
    timing_cache: Path | None = None
    engine: Path | None = None  # an engine built elsewhere (trtexec), to be recorded
    builder: str = "auto"  # trt_builder.BUILDERS
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX targets ("8.9", ...); () = its defaults


# ---- planning (no TensorRT needed) ---------------------------------------------------------


@dataclass
class BuildPlan:
    """Everything needed to build one engine, validated against the export folder."""

    export_dir: Path
    manifest: Manifest
    graph: str
    onnx_path: Path
    precision: str
    strongly_typed: bool
    uses_plugins: bool
    plugin_lib: Path | None
    jetson: bool
    workspace_mb: int
    timing_cache: Path | None
    batch: tuple[int, int, int]
    tokens: tuple[int, int, int]
    shapes: dict[str, tuple[list[int], list[int], list[int]]] = field(default_factory=dict)
    builder: str = "auto"
    compute_capabilities: tuple[str, ...] = ()

    @property
    def engine_name(self) -> str:
        return f"{self.graph}.{self.precision}.engine"

    @property
    def engine_path(self) -> Path:
        return self.export_dir / self.engine_name


def parse_range(text: str, what: str) -> tuple[int, int, int]:
    """'4' -> (4, 4, 4); '1:2:8' -> (1, 2, 8)."""
    parts = str(text).split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise QtaleError(f"--{what} must be N or MIN:OPT:MAX, got {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise QtaleError(f"--{what} needs 1 <= MIN <= OPT <= MAX, got {text!r}")
    return values[0], values[1], values[2]


def onnx_uses_qtale_ops(onnx_path: Path) -> bool:
    """True if the graph imports the "qtale" domain (weights are not loaded)."""
    try:
        import onnx
    except ImportError:
        return False
    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(op.domain == "qtale" for op in model.opset_import) or any(
        node.domain == "qtale" for node in model.graph.node)


def profile_shapes(graph: str, spec: dict[str, Any], batch: tuple[int, int, int],
                   tokens: tuple[int, int, int]) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """min/opt/max shapes per graph input from the graph contract (graph_io.dim_ranges): batch
    follows --batch, sequence dims the token profile, decode keeps total = past + 1."""
    try:
        return graph_io.profile_shapes(graph, spec, batch, tokens)
    except ValueError as e:
        raise QtaleError(f"{graph}.onnx: {e}; re-export it with this version of qtale-export") from None


def gpu_sm() -> str | None:
    """Compute capability "M.m" of GPU 0, or None when it cannot be determined (no GPU / no driver)."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout.split()
            if out and parse_sm(out[0]):
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    # Jetson has no full nvidia-smi: ask the CUDA runtime (attributes 75/76 = major/minor).
    for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.13"):
        try:
            cudart = ctypes.CDLL(name)
        except OSError:
            continue
        major, minor = ctypes.c_int(), ctypes.c_int()
        if (cudart.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0) == 0
                and cudart.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0) == 0):
            return f"{major.value}.{minor.value}"
    return None


def plan_build(options: BuildOptions) -> BuildPlan:
    """Validate the options against the export folder; raises QtaleError with the fix."""
    export_dir = Path(options.export_dir)
    engine = options.engine  # recording: the engine built by trtexec, not listed yet
    allow = (os.path.relpath(Path(engine).resolve(), export_dir.resolve()),) if engine else ()
    manifest = load(export_dir, allow=allow)
    graphs = manifest.graphs
    if options.graph not in graphs:
        raise QtaleError(f"export has no {options.graph!r} graph (has: {', '.join(graphs) or 'none'}); re-export it")
    graph = graphs[options.graph]
    onnx_path = manifest.graph_file(options.graph)  # checked: listed, inside the folder
    if not onnx_path.is_file():
        raise QtaleError(f"{onnx_path} is missing; re-run qtale-export into {export_dir}")

    exported = manifest.precision
    precision = options.precision or exported
    spec(precision)  # an unknown precision: one line naming the choices
    # The ONNX carries its own types (Q/DQ for int4/int8/fp8), so the engine is strongly typed and the
    # precision is the export's. The one exception: an fp32 export may be built weakly typed with FP16.
    if precision == exported:
        strongly_typed = True
    elif exported == "fp32" and precision == "fp16":
        strongly_typed = False
    else:
        raise QtaleError(f"export is {exported} but --precision {precision} was asked: "
                         f"re-export with qtale-export --precision {precision}")
    check_tensorrt(precision, options.jetson, JETSON_ORIN_SM if options.jetson else None)

    uses_plugins = manifest.ops == "plugin" or onnx_uses_qtale_ops(onnx_path)
    plugin_lib = Path(options.plugin_lib) if options.plugin_lib else None
    if uses_plugins and plugin_lib is None:
        raise QtaleError("export uses qtale plugin ops (TokenCompact/TokenScatter): build plugins/ with cmake and "
                         "pass --plugin-lib build/plugins/libqtale_trt_plugins.so")
    # A dry run only prints commands, so the library may not be built yet.
    if plugin_lib is not None and not plugin_lib.is_file() and not options.dry_run:
        raise QtaleError(f"--plugin-lib {plugin_lib} not found: build it with "
                         "cmake -S plugins -B build/plugins && cmake --build build/plugins")
    if plugin_lib is not None and not uses_plugins:
        # Decision (docs/tensorrt.md): warn and ignore, so one build script serves both export flavours.
        print(f"warning: export uses standard ops only; ignoring --plugin-lib {plugin_lib}", file=sys.stderr)
        plugin_lib = None

    tokens = (options.min_tokens, options.opt_tokens, options.max_tokens)
    if not 1 <= tokens[0] <= tokens[1] <= tokens[2]:
        raise QtaleError(f"need 1 <= --min-tokens <= --opt-tokens <= --max-tokens, got {tokens}")
    batch = parse_range(options.batch, "batch")
    workspace_mb = options.workspace_mb or (JETSON_WORKSPACE_MB if options.jetson else DEFAULT_WORKSPACE_MB)
    if workspace_mb <= 0:
        raise QtaleError("--workspace-mb must be positive")
    return BuildPlan(export_dir=export_dir, manifest=manifest, graph=options.graph, onnx_path=onnx_path,
                     precision=precision, strongly_typed=strongly_typed, uses_plugins=uses_plugins,
                     plugin_lib=plugin_lib, jetson=options.jetson, workspace_mb=workspace_mb,
                     timing_cache=options.timing_cache, batch=batch, tokens=tokens,
                     shapes=profile_shapes(options.graph, graph.get("inputs", {}), batch, tokens),
                     builder=options.builder, compute_capabilities=tuple(options.compute_capabilities))


def trtexec_command(plan: BuildPlan) -> list[str]:
    """The trtexec command line equivalent to the Python API build."""
    def shape_arg(k: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, dims[k]))}" for name, dims in plan.shapes.items())

    cmd = ["trtexec", f"--onnx={plan.onnx_path}", f"--saveEngine={plan.engine_path}",
           f"--minShapes={shape_arg(0)}", f"--optShapes={shape_arg(1)}", f"--maxShapes={shape_arg(2)}",
           "--stronglyTyped" if plan.strongly_typed else "--fp16"]
    if plan.plugin_lib is not None:
        cmd.append(f"--dynamicPlugins={plan.plugin_lib}")
    if plan.timing_cache is not None:
        cmd.append(f"--timingCacheFile={plan.timing_cache}")
    cmd += [f"--memPoolSize=workspace:{plan.workspace_mb}M", "--skipInference"]
    return cmd


# ---- building (TensorRT needed) -----------------------------------------------------------


def build_engine(plan: BuildPlan, flavour: trt_builder.Flavour) -> trt_builder.Built:
    """Parse, configure and build with the TensorRT Python API (trt_builder); updates the timing cache."""
    if not flavour.rtx and int(flavour.version.split(".")[0]) < 10:
        raise QtaleError(f"TensorRT {flavour.version} is too old: QTALE plugins need TensorRT >= 10 (IPluginV3)")
    cache = None
    if plan.timing_cache is not None:
        cache = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
    built, cache = trt_builder.build(flavour, plan.onnx_path, shapes=plan.shapes, strongly_typed=plan.strongly_typed,
                                     workspace_mb=plan.workspace_mb, plugin_lib=plan.plugin_lib,
                                     compute_capabilities=plan.compute_capabilities, timing_cache=cache)
    if cache is not None:
        write_bytes(plan.timing_cache, cache)
    return built


# ---- manifest bookkeeping -----------------------------------------------------------------


def record_engine(export_dir: Path, engine_file: Path, *, graph: str, precision: str,
                  tensorrt_version: str | None, sm: str | None, plugin_lib: Path | None,
                  batch: tuple[int, int, int], tokens: tuple[int, int, int], jetson: bool,
                  strongly_typed: bool, built_with: str, builder: str = "tensorrt",
                  compute_capabilities: tuple[str, ...] = (),
                  shapes: dict[str, tuple[list[int], list[int], list[int]]] | None = None,
                  layers_file: Path | None = None, summary: dict | None = None,
                  io: dict | None = None) -> dict[str, Any]:
    """Add (or replace) the engine's entry in manifest.json and the sha256 of it (and of its layer
    report, if one was written) in "files"; atomic rewrite."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir, verify=False)  # the engine being (re)recorded changed on purpose
    engine_file = Path(engine_file)
    if not engine_file.is_file():
        raise QtaleError(f"engine {engine_file} not found: the build did not produce it")
    rel = os.path.relpath(engine_file.resolve(), export_dir.resolve())
    if rel.startswith(".."):
        raise QtaleError(f"engine {engine_file} must be inside {export_dir}")
    digest = file_sha256(engine_file)
    entry = {
        "file": rel,
        "graph": graph,
        "precision": precision,
        "sha256": digest,
        "builder": builder,
        "tensorrt_version": tensorrt_version,
        "compute_capabilities": list(compute_capabilities),
        "gpu_sm": sm,
        "jetson": jetson,
        "strongly_typed": strongly_typed,
        "plugin_library": None if plugin_lib is None else _plugin_into(export_dir, Path(plugin_lib), manifest),
        "profile": {"batch": list(batch), "tokens": list(tokens),
                    "shapes": {name: [list(d) for d in dims] for name, dims in (shapes or {}).items()}},
        "built_with": built_with,
        "layers": None if layers_file is None else {"file": layers_file.name, "summary": summary},
        "io": io,  # the engine's own inputs/outputs (names, TensorRT dtypes, shapes; -1 dynamic)
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest.setdefault("files", {})[rel] = digest
    if layers_file is not None:
        manifest["files"][os.path.relpath(Path(layers_file).resolve(), export_dir.resolve())] = file_sha256(layers_file)
    engines = [e for e in manifest.get("engines", []) if not (isinstance(e, dict) and e.get("file") == rel)]
    manifest["engines"] = engines + [entry]
    write_manifest(export_dir, manifest)
    return entry


def _plugin_into(export_dir: Path, lib: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Copy the plugin library (and the kernel library it loads through $ORIGIN) into the export's
    plugins/ folder and list them, so the engine travels with the one library it was built with and
    readers load it only as a listed file with its sha256 (deploy/manifest.py plugin_library)."""
    folder = export_dir / PLUGIN_DIR
    entry = {}
    for src in [lib] + [p for p in [lib.parent / KERNELS_LIB] if p.is_file() and p.resolve() != lib.resolve()]:
        dst = folder / src.name
        if src.resolve() != dst.resolve():
            write_bytes(dst, src.read_bytes())
        rel = f"{PLUGIN_DIR}/{src.name}"
        manifest.setdefault("files", {})[rel] = file_sha256(dst)
        entry = entry or {"path": rel, "sha256": manifest["files"][rel]}
    return entry


# ---- entry points -------------------------------------------------------------------------


def build(options: BuildOptions) -> dict[str, Any]:
    """Build with the TensorRT Python API and record the engine; returns its manifest entry (a dry
    run: {"dry_run": True, "trtexec": the equivalent command, "engine": the path it would write})."""
    plan = plan_build(options)
    if options.dry_run:
        return {"dry_run": True, "trtexec": trtexec_command(plan), "engine": str(plan.engine_path)}
    sm = JETSON_ORIN_SM if options.jetson else gpu_sm()
    check_tensorrt(plan.precision, plan.jetson, sm)
    flavour = trt_builder.load(plan.builder)
    plan.compute_capabilities = target_capabilities(plan, flavour)
    built = build_engine(plan, flavour)
    layers_file = None
    summary = None
    if built.layers is not None:
        layers = engine_info.parse(built.layers)
        summary = engine_info.summary(layers)
        summary["engine_bytes"] = len(built.engine)
        summary["weights_bytes"] = built.weights_bytes
        summary["plan_text"] = engine_info.plan_text(built.engine)
        layers_file = plan.engine_path.with_name(plan.engine_name + ".layers.json")
        write_bytes(layers_file, engine_info.to_json(layers, summary).encode())
    write_bytes(plan.engine_path, built.engine)
    return record_engine(plan.export_dir, plan.engine_path, graph=plan.graph, precision=plan.precision,
                         tensorrt_version=flavour.version, sm=sm, plugin_lib=plan.plugin_lib, batch=plan.batch,
                         tokens=plan.tokens, jetson=plan.jetson, strongly_typed=plan.strongly_typed,
                         built_with="tensorrt-python", builder=flavour.name,
                         compute_capabilities=plan.compute_capabilities, shapes=plan.shapes,
                         layers_file=layers_file, summary=summary, io=built.io)


def target_capabilities(plan: BuildPlan, flavour: trt_builder.Flavour) -> tuple[str, ...]:
    """The SM versions a TensorRT-RTX engine is built for: as asked, else TensorRT-RTX's defaults,
    and for a precision with an SM floor (FP8: 8.9) only those above it. Empty for TensorRT (it builds
    for its GPU)."""
    if not flavour.rtx:
        return tuple(plan.compute_capabilities)
    sms = tuple(plan.compute_capabilities) or trt_builder.RTX_DEFAULT_SM
    able = capable(plan.precision, sms)
    low = [sm for sm in sms if sm not in able]
    if plan.compute_capabilities and low:
        need = ".".join(map(str, spec(plan.precision).trt_min_sm))
        raise QtaleError(f"{plan.precision.upper()} needs SM >= {need} but --compute-capability asks for {', '.join(low)}")
    return able


def record_built(options: BuildOptions, trtexec_log: Path | None = None) -> dict[str, Any]:
    """Record `options.engine`, built by trtexec (build_engine.sh), in manifest.json; the TensorRT
    version is read from the trtexec log."""
    plan = plan_build(options)
    sm = JETSON_ORIN_SM if options.jetson else gpu_sm()
    return record_engine(plan.export_dir, options.engine, graph=plan.graph, precision=plan.precision,
                         tensorrt_version=_version_from_log(trtexec_log), sm=sm, plugin_lib=plan.plugin_lib,
                         batch=plan.batch, tokens=plan.tokens, jetson=plan.jetson,
                         strongly_typed=plan.strongly_typed, built_with="trtexec")


def _version_from_log(path: Path | None) -> str | None:
    """TensorRT version from a trtexec log ("TensorRT version: 10.3.0" or "[TensorRT v100300]")."""
    if path is None or not Path(path).is_file():
        return None
    text = Path(path).read_text(errors="replace")
    match = re.search(r"TensorRT version:\s*([\d.]+)", text)
    if match:
        return match.group(1)
    match = re.search(r"\[TensorRT v(\d+)\]", text)  # major*10000 + minor*100 + patch
    if match is None:
        return None
    code = int(match.group(1))
    return f"{code // 10000}.{code // 100 % 100}.{code % 100}"
