"""Execution backends for the prefill/decode graphs of an export folder (no PyTorch).

`OrtBackend`: ONNX Runtime, CPU by default; device="cuda" or "tensorrt" adds that execution
provider in front of CPU when the installed onnxruntime has it (QtaleError otherwise). Plugin-op
graphs (domain "qtale") run through `qtale_export.export.ort_ops.session`, which registers the
Python kernels of the qtale ops.

`TensorRTBackend`: serialized engines recorded in manifest["engines"] by `qtale build`;
`tensorrt` and `cuda-python` are imported lazily, a clear QtaleError says what is missing.

Both expose `run(graph, feeds) -> {output name: np.ndarray}` with graph in ("prefill", "decode").
"""
from __future__ import annotations

import ctypes

import numpy as np

from ...errors import QtaleError
from ..manifest import Manifest
from .kv import InPlaceDecoder

GRAPHS = ("prefill", "decode")
BACKENDS = ("ort", "tensorrt")
ORT_DEVICES = {"cpu": [], "cuda": ["CUDAExecutionProvider"],
               "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}


class OrtBackend:
    kind = "ort"

    def __init__(self, manifest: Manifest, device: str = "cpu", threads: int | None = None, exact: bool = False,
                 spin: bool = True):
        import onnxruntime as ort

        from .. import ort_ops  # onnx + onnxruntime(-extensions)

        if device not in ORT_DEVICES:
            raise QtaleError(f"unknown ONNX Runtime device '{device}' (choose from {', '.join(ORT_DEVICES)})")
        have = ort.get_available_providers()
        want = ORT_DEVICES[device]
        missing = [p for p in want if p not in have]
        if missing:
            raise QtaleError(f"ONNX Runtime has no {missing[0]} here (available: {', '.join(have)}); "
                             f"install onnxruntime-gpu or use device='cpu'")
        self.providers = want + ["CPUExecutionProvider"]
        self.folder = manifest.folder
        self.sessions = {}
        for g in GRAPHS:
            path = manifest.graph_file(g)  # inside the folder and listed, or a QtaleError
            self.sessions[g] = ort_ops.session(path, providers=self.providers,
                                               threads=threads, exact=exact, spin=spin)
        self.outputs = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}
        self.inputs = {g: {i.name for i in s.get_inputs()} | {i.name for i in s.get_overridable_initializers()}
                       for g, s in self.sessions.items()}
        self.name = f"onnxruntime:{device}:{manifest.precision}"
        self.in_place = manifest.in_place_kv

    def accepts(self, graph: str, name: str) -> bool:
        """Whether `graph` takes input `name` (graph_io.optional_inputs are not in every export)."""
        return name in self.inputs[graph]

    def run(self, graph: str, feeds: dict) -> dict:
        sess = self.sessions[graph]
        return dict(zip(self.outputs[graph], sess.run(None, feeds)))

    def decoder(self, prefill_out: dict, num_layers: int, capacity: int) -> "InPlaceDecoder | None":
        """An in-place KV decoder for exports whose decode graph allows it (manifest "kv_cache":
        "in-place"); None otherwise (the caller feeds present.* back as past.*)."""
        if not self.in_place:
            return None
        return InPlaceDecoder(self.sessions["decode"], prefill_out, num_layers, capacity)


def _import_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        raise QtaleError("backend 'tensorrt' needs the TensorRT Python package (pip install tensorrt, "
                         "or JetPack on Jetson); use backend='ort' otherwise") from None
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
    except ImportError:
        raise QtaleError("backend 'tensorrt' needs cuda-python (pip install cuda-python)") from None
    return trt, cudart


def _ck(res):
    err = res[0] if isinstance(res, tuple) else res
    if int(err) != 0:
        raise QtaleError(f"CUDA error {err}")
    return res[1] if isinstance(res, tuple) and len(res) == 2 else res


class TensorRTBackend:
    """Runs the engines of manifest["engines"] (one per graph; `precision` picks among several)."""

    kind = "tensorrt"

    def __init__(self, manifest: Manifest, precision: str | None = None, plugin_library: str | None = None):
        folder = manifest.folder
        engines = {}
        for e in manifest.engines:
            if not isinstance(e, dict) or e.get("graph") not in GRAPHS:
                continue
            if precision and e.get("precision") != precision:
                continue
            engines.setdefault(e["graph"], e)
        missing = [g for g in GRAPHS if g not in engines]
        if missing:
            have = ", ".join(f"{e.get('graph')}:{e.get('precision')}" for e in manifest.engines) or "none"
            raise QtaleError(f"export {folder} has no TensorRT engine for the {missing[0]} graph"
                             f"{' at ' + precision if precision else ''} (engines: {have}); "
                             f"build one with `qtale build {folder} --graph {missing[0]}`")
        # every path checked before TensorRT is imported or anything is loaded; a plugin library
        # only by the user's word or the manifest's inside the folder with its sha256 (threat-model.md)
        files = {g: manifest.engine_file(e) for g, e in engines.items()}
        libs = {lib for e in engines.values() if (lib := manifest.plugin_library(e, plugin_library)) is not None}
        trt, cudart = _import_tensorrt()
        self.trt, self.cudart = trt, cudart
        for lib in sorted(libs):
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        runtime = trt.Runtime(logger)
        self.engines, self.contexts = {}, {}
        for g, e in engines.items():
            engine = runtime.deserialize_cuda_engine(files[g].read_bytes())
            if engine is None:
                raise QtaleError(f"TensorRT could not load {files[g]} (built for another "
                                 f"TensorRT version or GPU? built with {e.get('tensorrt_version')}, sm {e.get('gpu_sm')})")
            self.engines[g] = engine
            self.contexts[g] = engine.create_execution_context()
        self.stream = _ck(cudart.cudaStreamCreate())
        self.name = f"tensorrt:{engines['prefill'].get('precision')}"

    def accepts(self, graph: str, name: str) -> bool:
        """Whether the `graph` engine has input `name`."""
        engine = self.engines[graph]
        return any(engine.get_tensor_name(i) == name and engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT
                   for i in range(engine.num_io_tensors))

    def run(self, graph: str, feeds: dict) -> dict:
        trt, cudart = self.trt, self.cudart
        engine, ctx = self.engines[graph], self.contexts[graph]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        bufs, outs = [], {}
        try:
            for n in names:
                if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT:
                    arr = np.ascontiguousarray(feeds[n], dtype=trt.nptype(engine.get_tensor_dtype(n)))
                    ctx.set_input_shape(n, arr.shape)
                    ptr = _ck(cudart.cudaMalloc(max(arr.nbytes, 1)))
                    bufs.append(ptr)
                    _ck(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes,
                                               cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
                    ctx.set_tensor_address(n, ptr)
            for n in names:
                if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT:
                    arr = np.empty(tuple(ctx.get_tensor_shape(n)), dtype=trt.nptype(engine.get_tensor_dtype(n)))
                    ptr = _ck(cudart.cudaMalloc(max(arr.nbytes, 1)))
                    bufs.append(ptr)
                    ctx.set_tensor_address(n, ptr)
                    outs[n] = (arr, ptr)
            if not ctx.execute_async_v3(self.stream):
                raise QtaleError(f"TensorRT execution of the {graph} engine failed")
            for n, (arr, ptr) in outs.items():
                _ck(cudart.cudaMemcpyAsync(arr.ctypes.data, ptr, arr.nbytes,
                                           cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            _ck(cudart.cudaStreamSynchronize(self.stream))
        finally:
            for p in bufs:
                cudart.cudaFree(p)
        return {n: a for n, (a, _) in outs.items()}


def make_backend(manifest: Manifest, backend: str = "ort", device: str = "cpu", threads=None,
                 precision: str | None = None, plugin_library: str | None = None, exact: bool = False,
                 spin: bool = True):
    if backend == "ort":
        return OrtBackend(manifest, device=device, threads=threads, exact=exact, spin=spin)
    if backend == "tensorrt":
        return TensorRTBackend(manifest, precision=precision, plugin_library=plugin_library)
    raise QtaleError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
