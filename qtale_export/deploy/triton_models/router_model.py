"""Triton Python-backend BLS model `qtale_router`: execution ratio in, generated tokens out.

Inputs (per batch row): execution_ratio FP32 [1]; input_ids INT64 [-1] (right-padded with -1
when rows differ) or text BYTES [1]; optional max_new_tokens INT32 [1]; optional precision BYTES
[1] (default: the first export's).
Outputs: output_ids INT64 [-1] (padded with -1), text BYTES [1], realized_ratio FP32 [1],
theta FP32 [1], precision BYTES [1].

theta comes from the export's theta table through theta_policy.py, a copy of qtale_export/deploy/theta.py
(the rule `qtale run` uses, in the repository's ratio_mode); the graphs are fed through graph_io.py,
a copy of qtale_export/deploy/graph_io.py (the loop `qtale run` uses). Every row of every request that
dynamic batching hands to one execute() is generated together with the rows that share its
precision, whatever their ratio or prompt length (left padding, masked): one prefill and one decode
call per step for the group, theta per sequence, finished rows dropped from the batch; greedy
decoding, stop at eos or max_new_tokens.
A bad row (ratio, prompt) fails its own request only. Parameters (config.pbtxt): exports (JSON
{precision: {prefill, decode, theta_table}}), default_precision, ratio_mode, eos_ids,
routed_layers, num_layers, max_length, default_max_new_tokens.
"""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        sys.path.insert(0, folder)
        import graph_io
        import theta_policy

        self.policy, self.graph_io = theta_policy, graph_io
        self.exports = json.loads(p["exports"])
        self.default_precision = p["default_precision"]
        self.ratio_mode = p.get("ratio_mode") or "interpolate"
        self.eos = set(json.loads(p.get("eos_ids") or "[]"))
        self.routed = json.loads(p.get("routed_layers") or "[]")
        self.num_layers = int(p["num_layers"])
        self.max_length = int(p.get("max_length") or 2048)
        self.default_new = int(p.get("default_max_new_tokens") or 32)
        self.out_names = graph_io.output_names(self.num_layers)
        self.tokenizer = None
        tj = os.path.join(folder, "tokenizer.json")
        if os.path.isfile(tj):
            try:
                from tokenizers import Tokenizer

                self.tokenizer = Tokenizer.from_file(tj)
            except ImportError:
                pass

    def call(self, model, feeds):
        tensors = [pb_utils.Tensor(k, np.array(v, copy=True, order="C")) for k, v in feeds.items()]
        req = pb_utils.InferenceRequest(model_name=model, inputs=tensors, requested_output_names=self.out_names)
        resp = req.exec()
        if resp.has_error():
            raise RuntimeError(f"{model}: {resp.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(resp, n).as_numpy() for n in self.out_names}

    # ---- one request -> rows ---------------------------------------------------------------------
    def rows(self, request):
        """[{"ids", "theta", "max_new", "precision"}] of one request; ValueError on bad input."""
        ratio = pb_utils.get_input_tensor_by_name(request, "execution_ratio")
        if ratio is None:
            raise ValueError("send execution_ratio")
        ratio = ratio.as_numpy().reshape(-1)
        n = ratio.shape[0]
        ids_t = pb_utils.get_input_tensor_by_name(request, "input_ids")
        text_t = pb_utils.get_input_tensor_by_name(request, "text")
        new_t = pb_utils.get_input_tensor_by_name(request, "max_new_tokens")
        prec_t = pb_utils.get_input_tensor_by_name(request, "precision")
        if ids_t is not None:
            ids = [[int(t) for t in r if t >= 0] for r in ids_t.as_numpy().reshape(n, -1)]
        elif text_t is not None:
            if self.tokenizer is None:
                raise ValueError("text input needs the `tokenizers` package in the server's Python")
            texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in text_t.as_numpy().reshape(-1)]
            ids = [self.tokenizer.encode(t).ids if t.strip() else [] for t in texts]
        else:
            raise ValueError("send input_ids or text")
        max_new = new_t.as_numpy().reshape(-1) if new_t is not None else np.full(n, self.default_new)
        precs = ([x.decode() if isinstance(x, bytes) else str(x) for x in prec_t.as_numpy().reshape(-1)]
                 if prec_t is not None else [self.default_precision] * n)
        out = []
        for b in range(n):
            if precs[b] not in self.exports:
                raise ValueError(f"unknown precision '{precs[b]}' (served: {', '.join(self.exports)})")
            if not ids[b]:
                raise ValueError("empty prompt")
            if len(ids[b]) >= self.max_length:
                raise ValueError(f"prompt is {len(ids[b])} tokens; the maximum is {self.max_length - 1}")
            theta = self.policy.theta_for(self.exports[precs[b]]["theta_table"], float(ratio[b]), self.ratio_mode)
            out.append({"ids": ids[b], "theta": theta, "max_new": max(int(max_new[b]), 1), "precision": precs[b]})
        return out

    # ---- a group of rows with one precision --------------------------------------------------------
    def generate(self, group):
        """Generate every row of `group` together: prompts left-padded to the longest (attention mask
        0 on the padding, so each row computes what it would alone), one theta per row."""
        io = self.graph_io
        exp = self.exports[group[0]["precision"]]
        width = max(len(r["ids"]) for r in group)
        pads = [width - len(r["ids"]) for r in group]
        ids = np.zeros((len(group), width), np.int64)
        mask = np.zeros((len(group), width), np.int64)
        for b, r in enumerate(group):
            ids[b, pads[b]:], mask[b, pads[b]:] = r["ids"], 1
        loop = io.Loop(lambda graph, feeds: self.call(exp[graph], feeds), self.num_layers,
                       [r["theta"] for r in group])
        out = loop.prefill(ids, mask)
        active = list(range(len(group)))  # the rows of `group` still generating, in batch order
        while True:
            keep = []
            for j, (b, token) in enumerate(zip(active, io.greedy(out))):
                r = group[b]
                done = int(token) in self.eos
                if not done:
                    r.setdefault("gen", []).append(int(token))
                    done = len(r["gen"]) >= r["max_new"] or len(r["ids"]) + len(r["gen"]) >= self.max_length
                if done:  # the padding's exec mask is all off: the ratio counts the row's own positions
                    r["realized"] = io.realized_ratio(out[io.EXEC_MASK][:, j:j + 1, pads[b]:], self.routed)
                    r.setdefault("gen", [])
                else:
                    keep.append(j)
            if not keep:
                return
            loop.keep(keep)
            active = [active[j] for j in keep]
            out = loop.step([group[b]["gen"][-1] for b in active])

    def respond(self, rows):
        n = len(rows)
        width = max(max((len(r["gen"]) for r in rows), default=0), 1)
        ids_out = np.full((n, width), -1, np.int64)
        for b, r in enumerate(rows):
            ids_out[b, :len(r["gen"])] = r["gen"]
        texts = [(self.tokenizer.decode(r["gen"]) if self.tokenizer is not None else "").encode("utf-8") for r in rows]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("output_ids", ids_out),
            pb_utils.Tensor("text", np.asarray(texts, dtype=np.object_).reshape(n, 1)),
            pb_utils.Tensor("realized_ratio", np.asarray([[r["realized"]] for r in rows], np.float32)),
            pb_utils.Tensor("theta", np.asarray([[r["theta"]] for r in rows], np.float32)),
            pb_utils.Tensor("precision", np.asarray([[r["precision"].encode()] for r in rows], dtype=np.object_)),
        ])

    def execute(self, requests):
        parsed, errors = [], {}
        for i, request in enumerate(requests):  # dynamic batching hands several requests to one execute()
            try:
                parsed.append(self.rows(request))
            except Exception as exc:  # one bad request fails alone; the server keeps serving
                parsed.append([])
                errors[i] = str(exc)
        groups = {}
        for i, rows in enumerate(parsed):
            for r in rows:
                r["request"] = i
                groups.setdefault(r["precision"], []).append(r)
        for group in groups.values():
            try:
                self.generate(group)
            except Exception as exc:
                for r in group:
                    errors.setdefault(r["request"], str(exc))
        return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(errors[i]))
                if i in errors else self.respond(rows) for i, rows in enumerate(parsed)]
