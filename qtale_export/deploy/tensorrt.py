"""Build a TensorRT engine from a qtale export folder and record it in manifest.json (`qtale build`,
whose arguments live in cli/build.py; build_engine.sh calls `qtale build --plan` and `--record`).

TensorRT is imported lazily inside functions, so this module (validation, the trtexec command of
a dry run, manifest bookkeeping) works on hosts without TensorRT.
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
from qtale_export.export.manifest import write_manifest
from qtale_export.safe_write import write_bytes

PRECISIONS = ("fp32", "fp16", "int4", "int8", "fp8")
GRAPHS = ("prefill", "decode")
JETSON_ORIN_SM = "8.7"  # Orin: Ampere-class iGPU, no FP8 tensor cores
FP8_MIN_SM = (8, 9)  # Ada / Hopper and newer
DEFAULT_WORKSPACE_MB = 4096
JETSON_WORKSPACE_MB = 2048  # unified memory is shared with the CPU; leave room for the KV cache
INSTALL_HINT = "pip install tensorrt (x86_64 + CUDA) / use a GPU host or Jetson with JetPack 6, or pass --dry-run"


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


# ---- planning (no TensorRT needed) ---------------------------------------------------------


@dataclass
class BuildPlan:
    """Everything needed to build one engine, validated against the export folder."""

    export_dir: Path
    manifest: dict[str, Any]
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

    @property
    def engine_name(self) -> str:
        return f"{self.graph}.{self.precision}.engine"

    @property
    def engine_path(self) -> Path:
        return self.export_dir / self.engine_name


def read_manifest(export_dir: Path, verify: bool = True, allow: tuple[str, ...] = ()) -> dict[str, Any]:
    """The export's manifest; with verify, every listed file's sha256 is checked (tampering fails)
    and no file but those in `allow` may be unlisted."""
    from qtale_export.export.manifest import read_manifest as read

    return read(export_dir, verify=verify, allow=allow)


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


def profile_shapes(graph: dict[str, Any], batch: tuple[int, int, int],
                   tokens: tuple[int, int, int]) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """min/opt/max shapes per graph input: named dims containing 'batch' follow --batch,
    every other named dim (seq, tokens, past...) follows the token profile, ints stay fixed."""
    shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}
    for name, spec in graph.get("inputs", {}).items():
        dims = spec.get("shape", []) if isinstance(spec, dict) else []
        triple: list[list[int]] = [[], [], []]
        for dim in dims:
            for k in range(3):
                if isinstance(dim, int) and dim > 0:
                    triple[k].append(dim)
                elif "batch" in str(dim).lower():
                    triple[k].append(batch[k])
                else:
                    triple[k].append(tokens[k])
        shapes[name] = (triple[0], triple[1], triple[2])
    return shapes


def parse_sm(text: str | None) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


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


def check_fp8(precision: str, jetson: bool, sm: str | None) -> None:
    """FP8 needs SM >= 8.9; Jetson Orin (SM 8.7) has none."""
    if precision != "fp8":
        return
    if jetson:
        raise QtaleError("FP8 is not supported on Jetson Orin (SM 8.7): use --precision int4 (W4A16) or fp16")
    parsed = parse_sm(sm)
    if parsed is not None and parsed < FP8_MIN_SM:
        raise QtaleError(f"FP8 needs SM >= 8.9 (Ada/Hopper) but this GPU is SM {sm}: use --precision int4 or fp16")


def plan_build(options: BuildOptions) -> BuildPlan:
    """Validate the options against the export folder; raises QtaleError with the fix."""
    export_dir = Path(options.export_dir)
    engine = options.engine  # recording: the engine built by trtexec, not listed yet
    allow = (os.path.relpath(Path(engine).resolve(), export_dir.resolve()),) if engine else ()
    manifest = read_manifest(export_dir, allow=allow)
    graphs = manifest.get("graphs") or {}
    if options.graph not in graphs:
        raise QtaleError(f"export has no {options.graph!r} graph (has: {', '.join(graphs) or 'none'}); re-export it")
    graph = graphs[options.graph]
    onnx_path = export_dir / graph.get("file", f"{options.graph}.onnx")
    if not onnx_path.is_file():
        raise QtaleError(f"{onnx_path} is missing; re-run qtale-export into {export_dir}")

    exported = manifest.get("precision", "fp32")
    precision = options.precision or exported
    if precision not in PRECISIONS:
        raise QtaleError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    # The ONNX carries its own types (Q/DQ for int4/int8/fp8), so the engine is strongly typed and the
    # precision is the export's. The one exception: an fp32 export may be built weakly typed with FP16.
    if precision == exported:
        strongly_typed = True
    elif exported == "fp32" and precision == "fp16":
        strongly_typed = False
    else:
        raise QtaleError(f"export is {exported} but --precision {precision} was asked: "
                         f"re-export with qtale-export --precision {precision}")
    check_fp8(precision, options.jetson, JETSON_ORIN_SM if options.jetson else None)

    uses_plugins = manifest.get("ops") == "plugin" or onnx_uses_qtale_ops(onnx_path)
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
                     shapes=profile_shapes(graph, batch, tokens))


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


def import_tensorrt() -> Any:
    from qtale_export.optional import require

    return require("tensorrt", INSTALL_HINT, "TensorRT")


def build_engine_bytes(plan: BuildPlan) -> tuple[bytes, str]:
    """Parse, configure and build with the TensorRT Python API; returns (engine, TensorRT version)."""
    trt = import_tensorrt()
    if int(trt.__version__.split(".")[0]) < 10:
        raise QtaleError(f"TensorRT {trt.__version__} is too old: QTALE plugins need TensorRT >= 10 (IPluginV3)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if plan.plugin_lib is not None:
        # Registers TokenCompact/TokenScatter (getCreators) before the parser looks them up.
        if builder.get_plugin_registry().load_library(str(plan.plugin_lib)) is None:
            raise QtaleError(f"TensorRT could not load {plan.plugin_lib}: rebuild plugins/ against this TensorRT")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx_path)):
        first = str(parser.get_error(0)).splitlines()[0] if parser.num_errors else "unknown error"
        raise QtaleError(f"TensorRT could not parse {plan.onnx_path}: {first}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mb << 20)
    if not plan.strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in plan.shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = None
    if plan.timing_cache is not None:
        data = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise QtaleError("TensorRT engine build failed (see the TensorRT log above); try a smaller --max-tokens")
    if cache is not None:
        write_bytes(plan.timing_cache, bytes(cache.serialize()))
    return bytes(serialized), trt.__version__


# ---- manifest bookkeeping -----------------------------------------------------------------


def record_engine(export_dir: Path, engine_file: Path, *, graph: str, precision: str,
                  tensorrt_version: str | None, sm: str | None, plugin_lib: Path | None,
                  batch: tuple[int, int, int], tokens: tuple[int, int, int], jetson: bool,
                  strongly_typed: bool, built_with: str) -> dict[str, Any]:
    """Add (or replace) the engine's entry in manifest.json and its sha256 in "files"; atomic rewrite."""
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
        "tensorrt_version": tensorrt_version,
        "gpu_sm": sm,
        "jetson": jetson,
        "strongly_typed": strongly_typed,
        "plugin_library": None if plugin_lib is None else {
            "path": str(Path(plugin_lib).resolve()), "sha256": file_sha256(Path(plugin_lib))},
        "profile": {"batch": list(batch), "tokens": list(tokens)},
        "built_with": built_with,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest.setdefault("files", {})[rel] = digest
    engines = [e for e in manifest.get("engines", []) if not (isinstance(e, dict) and e.get("file") == rel)]
    manifest["engines"] = engines + [entry]
    write_manifest(export_dir, manifest)
    return entry


# ---- entry points -------------------------------------------------------------------------


def build(options: BuildOptions) -> dict[str, Any]:
    """Build with the TensorRT Python API and record the engine; returns its manifest entry (a dry
    run: {"dry_run": True, "trtexec": the equivalent command, "engine": the path it would write})."""
    plan = plan_build(options)
    if options.dry_run:
        return {"dry_run": True, "trtexec": trtexec_command(plan), "engine": str(plan.engine_path)}
    sm = JETSON_ORIN_SM if options.jetson else gpu_sm()
    check_fp8(plan.precision, plan.jetson, sm)
    engine, version = build_engine_bytes(plan)
    write_bytes(plan.engine_path, engine)
    return record_engine(plan.export_dir, plan.engine_path, graph=plan.graph, precision=plan.precision,
                         tensorrt_version=version, sm=sm, plugin_lib=plan.plugin_lib, batch=plan.batch,
                         tokens=plan.tokens, jetson=plan.jetson, strongly_typed=plan.strongly_typed,
                         built_with="tensorrt-python")


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
