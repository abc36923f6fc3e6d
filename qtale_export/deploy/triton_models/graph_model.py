"""Triton Python-backend model `qtale_<precision>`: the prefill and decode graphs of one export on
ONNX Runtime (CPU), with the weights file they share held once.

Written by `qtale triton-repo --backend python`. Parameters in config.pbtxt: graphs (JSON
{"prefill": file, "decode": file} in this version folder), threads, plugin_ops. A request that
carries past_exec runs the decode graph, any other the prefill graph; theta is an input, one per
sequence, so this one model serves every ratio. The graph contract's names come from graph_io.py,
a copy of qtale_export/deploy/graph_io.py in this version folder. Needs numpy and onnxruntime in the
server's Python; plugin-op graphs also need qtale_export.
"""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


def _session(path, threads, plugin_ops):
    if plugin_ops:
        from qtale_export.export import ort_ops

        return ort_ops.session(path, threads=threads or None)
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        sys.path.insert(0, folder)
        import graph_io

        self.graph_io = graph_io
        threads = int(params.get("threads") or 0)
        self.sessions = {g: _session(os.path.join(folder, f), threads, params.get("plugin_ops") == "1")
                         for g, f in json.loads(params["graphs"]).items()}
        self.inputs = {g: [i.name for i in s.get_inputs()] for g, s in self.sessions.items()}
        self.outputs = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                past_exec = pb_utils.get_input_tensor_by_name(request, self.graph_io.PAST_EXEC)
                graph = "prefill" if past_exec is None else "decode"  # past_exec: a decode-only input
                feeds = {}
                for name in self.inputs[graph]:
                    t = pb_utils.get_input_tensor_by_name(request, name)
                    if t is None:
                        raise ValueError(f"missing input '{name}' ({graph})")
                    feeds[name] = t.as_numpy()
                outs = self.sessions[graph].run(None, feeds)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(n, np.ascontiguousarray(o)) for n, o in zip(self.outputs[graph], outs)]))
            except Exception as exc:  # a bad request gets an error response; the model keeps serving
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses
