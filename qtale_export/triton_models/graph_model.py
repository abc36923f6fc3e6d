"""Triton Python-backend model: one QTALE graph (prefill or decode) on ONNX Runtime (CPU).

Written by `qtale triton-repo --backend python`. Parameters in config.pbtxt: graph_file (the ONNX
file in this version folder), threads, theta / execution_ratio (informational: theta is an input).
Needs numpy and onnxruntime in the server's Python; plugin-op graphs also need qtale_export.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        path = os.path.join(folder, params["graph_file"])
        threads = int(params.get("threads") or 0)
        if params.get("plugin_ops") == "1":
            from qtale_export.export import ort_ops

            self.sess = ort_ops.session(path, threads=threads or None)
        else:
            so = ort.SessionOptions()
            if threads:
                so.intra_op_num_threads = threads
            so.log_severity_level = 3
            self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feeds = {}
                for name in self.inputs:
                    t = pb_utils.get_input_tensor_by_name(request, name)
                    if t is None:
                        raise ValueError(f"missing input '{name}'")
                    feeds[name] = t.as_numpy()
                outs = self.sess.run(None, feeds)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(o)) for n, o in zip(self.outputs, outs)]))
            except Exception as exc:  # a bad request gets an error response; the model keeps serving
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses
