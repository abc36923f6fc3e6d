"""Triton Python-backend model `qtale_<precision>`: the prefill and decode graphs of one export on
ONNX Runtime (CPU), with the weights file they share held once.

Written by `qtale triton-repo --backend python`. Parameters in config.pbtxt: graphs (JSON
{"prefill": file, "decode": file} in this version folder), threads, plugin_ops, vocab, max_length,
max_batch. A request that carries past_exec runs the decode graph, any other the prefill graph;
theta is an input, one per sequence, so this one model serves every ratio. logits_to_keep (a [1]
tensor) is fed where the prefill graph declares it. Every request is checked before it runs (an
error response for that request only): token ids in 0..vocab-1, attention mask of 0/1, theta finite
in [0, 1], one theta and one mask row per sequence, at most max_batch rows and max_length positions. The graph contract's names come from graph_io.py,
a copy of qtale_export/deploy/graph_io.py in this version folder. Needs numpy and onnxruntime in the
server's Python; plugin-op graphs also need qtale_export.
"""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        sys.path.insert(0, folder)
        import graph_io
        import model_files

        self.graph_io = graph_io
        self.vocab = int(params["vocab"])
        self.max_length = int(params["max_length"])
        self.max_batch = int(params.get("max_batch") or 64)
        threads = int(params.get("threads") or 0)
        self.sessions = {g: model_files.session(os.path.join(folder, f), threads, params.get("plugin_ops") == "1")
                         for g, f in json.loads(params["graphs"]).items()}
        self.inputs = {g: [i.name for i in s.get_inputs()] for g, s in self.sessions.items()}
        # inputs with a default (logits_to_keep): fed when a request carries them
        self.optional = {g: [i.name for i in s.get_overridable_initializers()] for g, s in self.sessions.items()}
        self.outputs = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}

    def check(self, feeds) -> None:
        """The limits of one request's feeds; ValueError on the first broken one."""
        io = self.graph_io
        ids, mask, theta = feeds[io.INPUT_IDS], feeds[io.ATTENTION_MASK], feeds[io.THETA]
        if ids.ndim != 2 or mask.ndim != 2 or theta.ndim != 1:
            raise ValueError("input_ids and attention_mask must be [batch, positions], theta [batch]")
        rows = ids.shape[0]
        if not 1 <= rows <= self.max_batch or mask.shape[0] != rows or theta.shape[0] != rows:
            raise ValueError(f"input_ids, attention_mask and theta must have the same batch of 1..{self.max_batch} "
                             f"rows, got {rows}, {mask.shape[0]}, {theta.shape[0]}")
        if mask.shape[1] > self.max_length or ids.shape[1] > mask.shape[1]:
            raise ValueError(f"{mask.shape[1]} positions for {ids.shape[1]} tokens; the maximum is {self.max_length}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            bad = ids.min() if ids.min() < 0 else ids.max()
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.vocab - 1})")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold 0 or 1")
        if not (np.isfinite(theta).all() and ((theta >= 0) & (theta <= 1)).all()):
            raise ValueError(f"theta must be finite and in [0, 1], got {theta.tolist()}")

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
                for name in self.optional[graph]:
                    t = pb_utils.get_input_tensor_by_name(request, name)
                    if t is not None:
                        feeds[name] = t.as_numpy().reshape(())  # a scalar, sent as [1]
                self.check(feeds)
                outs = self.sessions[graph].run(None, feeds)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(n, np.ascontiguousarray(o)) for n, o in zip(self.outputs[graph], outs)]))
            except Exception as exc:  # a bad request gets an error response; the model keeps serving
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses
