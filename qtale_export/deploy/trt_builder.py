"""Which TensorRT builds the engine, and the build itself: parse an export graph, add the profile,
build, and keep the builder's own report of the engine's layers.

Two TensorRT flavours share the builder, network, ONNX parser and plugin-registry API:
  * `tensorrt`: TensorRT 10+ on a GPU host or Jetson (builds for the GPU it runs on);
  * `tensorrt-rtx` (`tensorrt_rtx`, TensorRT for RTX): builds ahead of time on a machine without a
    GPU (CPU-only AOT) for the compute capabilities it is given; the engine is JIT-specialized on the
    GPU at run time. It builds strongly typed networks only (no FP16 builder flag) and targets
    Ampere-and-later RTX-class GPUs (SM 8.0/8.6/8.9/12.x; not Hopper SM 9.0, not Jetson Orin SM 8.7).
"auto" picks `tensorrt` where it is installed for real, else `tensorrt-rtx`.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtale_export.errors import QtaleError

from . import engine_info

BUILDERS = ("auto", "tensorrt", "tensorrt-rtx")
MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINT = {
    "tensorrt": "pip install tensorrt on a GPU host (or use JetPack's TensorRT on Jetson)",
    "tensorrt-rtx": "pip install 'qtale-export[tensorrt-rtx]' (builds on a machine without a GPU)",
}
# TensorRT-RTX's default targets when none is given (its documentation, "CPU-only AOT")
RTX_DEFAULT_SM = ("8.0", "8.6", "8.9", "12.0")


@dataclass
class Flavour:
    name: str  # "tensorrt" or "tensorrt-rtx"
    trt: Any  # the imported module
    version: str

    @property
    def rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    def compute_capabilities(self) -> tuple[str, ...]:
        """SM versions this flavour can target ("8.9", ...); empty for TensorRT (its build GPU)."""
        if not self.rtx:
            return ()
        return tuple(f"{m[2:-1]}.{m[-1]}" for m in self.trt.ComputeCapability.__members__
                     if m.startswith("SM") and m[2:].isdigit())


def _import(name: str) -> Any | None:
    try:
        module = importlib.import_module(MODULES[name])
        # the `tensorrt` package on PyPI without its libraries is a stub that imports but has no Builder
        return module if hasattr(module, "Builder") else None
    except Exception:  # a stub or a missing CUDA library fails in many ways; all mean "not usable"
        return None


def load(builder: str = "auto") -> Flavour:
    """The TensorRT flavour to build with; QtaleError naming what to install if it is missing."""
    if builder not in BUILDERS:
        raise QtaleError(f"unknown --builder {builder!r}; use one of {', '.join(BUILDERS)}")
    for name in (("tensorrt", "tensorrt-rtx") if builder == "auto" else (builder,)):
        module = _import(name)
        if module is not None:
            return Flavour(name, module, str(module.__version__))
    hint = " or ".join(INSTALL_HINT.values()) if builder == "auto" else INSTALL_HINT[builder]
    raise QtaleError(f"{'TensorRT' if builder == 'auto' else builder} is not installed: {hint} "
                     "(or pass --dry-run)")


_LOGGERS: dict[str, Any] = {}


def _logger(trt: Any) -> Any:
    """The process's one TensorRT logger (TensorRT keeps the first logger a builder was given and
    ignores later ones), which prints warnings and errors and keeps every message of the current
    build, so the builder's "Layers:" report and weights total can be read afterwards."""
    if trt.__name__ not in _LOGGERS:
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[str] = []

            def log(self, severity, msg):
                self.messages.append(msg)
                if int(severity) <= int(trt.ILogger.Severity.WARNING) and "Int64 binding" not in msg:
                    print(f"[TensorRT] {msg}", file=sys.stderr)
        _LOGGERS[trt.__name__] = Logger()
    logger = _LOGGERS[trt.__name__]
    logger.messages = []
    return logger


@dataclass
class Built:
    engine: bytes
    layers: str | None  # the builder's "Layers:" report, when it gave one
    weights_bytes: int | None  # the builder's "Total Weights Memory"
    io: dict  # {"inputs"|"outputs": [{"name", "dtype", "shape"}]}: the engine's I/O, -1 = dynamic


def network_io(network: Any) -> dict:
    """The network's inputs and outputs as the engine has them (TensorRT dtype names, -1 = dynamic)."""
    def desc(t):
        return {"name": t.name, "dtype": str(t.dtype).split(".")[-1], "shape": [int(d) for d in t.shape]}
    return {"inputs": [desc(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [desc(network.get_output(i)) for i in range(network.num_outputs)]}


def has_gpu() -> bool:
    """Whether a CUDA driver with at least one device is here (running an engine needs one)."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def parse_network(flavour: Flavour, builder: Any, logger: Any, onnx_path: Path,
                  strongly_typed: bool) -> tuple[Any, Any]:
    """(network, parser): the parser owns the parsed weights, so it must live until the build ends."""
    trt = flavour.trt
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        first = str(parser.get_error(0)).splitlines()[0] if parser.num_errors else "unknown error"
        raise QtaleError(f"{flavour.name} could not parse {onnx_path}: {first}")
    return network, parser


def takes_plugins(flavour: Flavour) -> bool:
    """Whether this TensorRT's networks accept IPluginV3 layers. TensorRT-RTX 1.7.1 loads a plugin
    library into its registry and finds its creators, but its network has no add_plugin_v3 and its
    ONNX parser calls std::terminate right after creating the plugin (docs/tensorrt.md), so this is
    asked before parsing rather than learnt from a crash."""
    return hasattr(flavour.trt.INetworkDefinition, "add_plugin_v3")


def set_compute_capabilities(flavour: Flavour, config: Any, sms: tuple[str, ...]) -> None:
    if not sms:
        return
    if not flavour.rtx:
        raise QtaleError("--compute-capability applies to --builder tensorrt-rtx; TensorRT builds for its own GPU")
    known = flavour.compute_capabilities()
    config.num_compute_capabilities = len(sms)
    for k, sm in enumerate(sms):
        if sm not in known:
            raise QtaleError(f"{flavour.name} {flavour.version} cannot target SM {sm}; it knows {', '.join(known)}")
        config.set_compute_capability(getattr(flavour.trt.ComputeCapability, "SM" + sm.replace(".", "")), k)


def build(flavour: Flavour, onnx_path: Path, *, shapes: dict, strongly_typed: bool, workspace_mb: int,
          plugin_lib: Path | None = None, compute_capabilities: tuple[str, ...] = (),
          timing_cache: bytes | None = None) -> tuple[Built, bytes | None]:
    """Parse and build one engine; returns it and the updated timing cache (None without one)."""
    trt = flavour.trt
    logger = _logger(trt)
    builder = trt.Builder(logger)
    if plugin_lib is not None and not takes_plugins(flavour):
        raise QtaleError(f"{flavour.name} {flavour.version} networks take no plugin layers (its network API has no "
                         "add_plugin_v3 and its ONNX parser aborts on a plugin node): build --ops plugin exports "
                         "with TensorRT on a GPU host, or export with --ops standard")
    if plugin_lib is not None:
        # registers TokenCompact/TokenScatter (getCreators) before the parser looks them up
        if builder.get_plugin_registry().load_library(str(plugin_lib)) is None:
            raise QtaleError(f"{flavour.name} could not load {plugin_lib}: rebuild plugins/ against this TensorRT")
    if flavour.rtx and not strongly_typed:
        raise QtaleError("TensorRT-RTX builds strongly typed networks only: export with --precision fp16 "
                         "instead of building an fp32 export as fp16")
    network, _parser = parse_network(flavour, builder, logger, onnx_path, strongly_typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the layer report names constants
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    set_compute_capabilities(flavour, config, compute_capabilities)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None and flavour.rtx:
        print("warning: TensorRT-RTX has no timing cache (its timing-cache calls are no-ops); --timing-cache ignored",
              file=sys.stderr)
    elif timing_cache is not None:
        cache = config.create_timing_cache(timing_cache)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise QtaleError(f"{flavour.name} engine build failed (see the log above); try a smaller --max-tokens")
    built = Built(bytes(serialized), engine_info.layers_report(logger.messages),
                  engine_info.weights_memory(logger.messages), network_io(network))
    return built, (bytes(cache.serialize()) if cache is not None else None)
