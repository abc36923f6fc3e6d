"""Triton Python-backend BLS model `qtale_router`: execution ratio in, generated tokens out.

Inputs (per batch row): execution_ratio FP32 [1]; input_ids INT64 [-1] (right-padded with -1
when rows differ) or text BYTES [1]; optional max_new_tokens INT32 [1]; optional precision BYTES
[1] (default: the first export's).
Outputs: output_ids INT64 [-1] (padded with -1), text BYTES [1], realized_ratio FP32 [1],
theta FP32 [1], precision BYTES [1], stop_reason BYTES [1] (eos | length | max_length | deadline).

theta comes from the export's theta table through theta_policy.py, a copy of qtale_export/deploy/theta.py
(the rule `qtale run` uses, in the repository's ratio_mode); the graphs are fed through graph_io.py,
a copy of qtale_export/deploy/graph_io.py (the loop `qtale run` uses).

Every row runs at batch 1, the shapes `qtale run` uses, so it gets `qtale run`'s numbers: ONNX
Runtime picks kernels by the number of rows (MatMulNBits), and an int4 graph quantizes its
activations to int8 on the fly, so a row batched with others can differ by a whole int8 step and
then take another token or gate (docs/triton.md). The rows of all the requests one execute() gets
advance in turn, one graph call each, so a long row does not hold the short ones back.

Limits, each checked per request (a bad request gets an error response alone; the others are
answered): max_new_tokens in 1..max_new_tokens_cap; a prompt of 1..max_prompt_tokens tokens (at
most max_length - 1); token ids in 0..vocab-1 (-1 only as right padding); ratio in (0, 1] and
servable by the theta table; theta in [0, 1]. A row still generating `deadline_s` after its
execute() began stops there and returns its tokens so far with stop_reason "deadline".
Parameters (config.pbtxt): exports (JSON {precision: {prefill, decode, theta_table, logits_to_keep}}),
default_precision, ratio_mode, eos_ids, routed_layers, num_layers, max_length, vocab,
default_max_new_tokens, max_new_tokens_cap, max_prompt_tokens, deadline_s.
"""
import json
import math
import os
import sys
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        sys.path.insert(0, folder)
        import graph_io
        import model_files
        import theta_policy

        self.policy, self.graph_io = theta_policy, graph_io
        self.exports = json.loads(p["exports"])
        self.default_precision = p["default_precision"]
        self.ratio_mode = p.get("ratio_mode") or "interpolate"
        self.eos = set(json.loads(p.get("eos_ids") or "[]"))
        self.routed = json.loads(p.get("routed_layers") or "[]")
        self.num_layers = int(p["num_layers"])
        self.max_length = int(p.get("max_length") or 2048)
        self.vocab = int(p["vocab"])
        self.default_new = int(p.get("default_max_new_tokens") or 32)
        self.new_cap = int(p.get("max_new_tokens_cap") or 512)
        self.prompt_cap = min(int(p.get("max_prompt_tokens") or self.max_length), self.max_length - 1)
        self.deadline_s = float(p.get("deadline_s") or 60)
        self.out_names = graph_io.output_names(self.num_layers)
        self.tokenizer = model_files.tokenizer(folder)

    def call(self, model, feeds):
        # Triton dims have at least one axis: a scalar (logits_to_keep) travels as [1]
        tensors = [pb_utils.Tensor(k, np.array(v, copy=True, order="C").reshape(np.shape(v) or (1,)))
                   for k, v in feeds.items()]
        req = pb_utils.InferenceRequest(model_name=model, inputs=tensors, requested_output_names=self.out_names)
        resp = req.exec()
        if resp.has_error():
            raise RuntimeError(f"{model}: {resp.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(resp, n).as_numpy() for n in self.out_names}

    # ---- one request -> rows ---------------------------------------------------------------------
    def prompt_ids(self, row) -> list:
        """A row of input_ids without its right padding (-1); ValueError on any other bad id."""
        ids = [int(t) for t in row]
        while ids and ids[-1] == -1:
            ids.pop()
        bad = next((t for t in ids if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.vocab - 1}; -1 only as right padding)")
        return ids

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
            ids = [self.prompt_ids(r) for r in ids_t.as_numpy().reshape(n, -1)]
        elif text_t is not None:
            if self.tokenizer is None:
                raise ValueError("text input needs the `tokenizers` package in the server's Python")
            texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in text_t.as_numpy().reshape(-1)]
            ids = [self.prompt_ids(self.tokenizer.encode(t).ids) if t.strip() else [] for t in texts]
        else:
            raise ValueError("send input_ids or text")
        max_new = new_t.as_numpy().reshape(-1) if new_t is not None else np.full(n, self.default_new)
        precs = ([x.decode() if isinstance(x, bytes) else str(x) for x in prec_t.as_numpy().reshape(-1)]
                 if prec_t is not None else [self.default_precision] * n)
        if len(ids) != n or len(max_new) != n or len(precs) != n:
            raise ValueError(f"{n} execution ratios but {len(ids)} prompts, {len(max_new)} max_new_tokens, "
                             f"{len(precs)} precisions")
        out = []
        for b in range(n):
            if precs[b] not in self.exports:
                raise ValueError(f"unknown precision '{precs[b]}' (served: {', '.join(self.exports)})")
            if not ids[b]:
                raise ValueError("empty prompt")
            if len(ids[b]) > self.prompt_cap:
                raise ValueError(f"prompt is {len(ids[b])} tokens; the maximum is {self.prompt_cap}")
            if not 1 <= int(max_new[b]) <= self.new_cap:
                raise ValueError(f"max_new_tokens must be in 1..{self.new_cap}, got {int(max_new[b])}")
            theta = self.policy.theta_for(self.exports[precs[b]]["theta_table"], float(ratio[b]), self.ratio_mode)
            if not (math.isfinite(theta) and 0.0 <= theta <= 1.0):  # a damaged table must not reach the graphs
                raise ValueError(f"theta {theta} for ratio {float(ratio[b])} is outside [0, 1]")
            out.append({"ids": ids[b], "theta": theta, "max_new": int(max_new[b]), "precision": precs[b]})
        return out

    # ---- generation: every row alone, all rows in turn ---------------------------------------------
    def start(self, r) -> None:
        """Prefill row r at batch 1 (logits of the last position only where the graph model takes
        logits_to_keep, as `qtale run` asks)."""
        exp = self.exports[r["precision"]]
        r["loop"] = self.graph_io.Loop(lambda graph, feeds: self.call(exp[graph], feeds), self.num_layers, [r["theta"]])
        r["out"] = r["loop"].prefill([r["ids"]], np.ones((1, len(r["ids"])), np.int64),
                                     logits_to_keep=1 if exp.get("logits_to_keep") else None)
        r["gen"] = []

    def advance(self, r) -> bool:
        """Take row r's next token and feed it; False once the row is done (r["stop"] says why)."""
        io = self.graph_io
        token = int(io.greedy(r["out"])[0])
        stop = None
        if token in self.eos:
            stop = "eos"
        else:
            r["gen"].append(token)
            if len(r["gen"]) >= r["max_new"]:
                stop = "length"
            elif len(r["ids"]) + len(r["gen"]) >= self.max_length:
                stop = "max_length"
            elif time.monotonic() >= r["deadline"]:
                stop = "deadline"
        if stop is None:
            r["out"] = r["loop"].step([token])
            return True
        r["stop"] = stop
        r["realized"] = io.realized_ratio(r["out"][io.EXEC_MASK], self.routed)
        del r["loop"], r["out"]  # the KV cache
        return False

    def generate(self, rows, errors) -> None:
        """Run every row to its end, one graph call per row in turn; a row whose graph call fails
        fails its request (in `errors`), the others go on."""
        active = []
        for r in rows:
            try:
                self.start(r)
                active.append(r)
            except Exception as exc:
                errors.setdefault(r["request"], str(exc))
        while active:
            going = []
            for r in active:
                if r["request"] in errors:  # another row of its request failed
                    continue
                try:
                    if self.advance(r):
                        going.append(r)
                except Exception as exc:
                    errors.setdefault(r["request"], str(exc))
            active = going

    def respond(self, rows):
        n = len(rows)
        width = max(max((len(r["gen"]) for r in rows), default=0), 1)
        ids_out = np.full((n, width), -1, np.int64)
        for b, r in enumerate(rows):
            ids_out[b, :len(r["gen"])] = r["gen"]
        texts = [(self.tokenizer.decode(r["gen"]) if self.tokenizer is not None else "").encode("utf-8") for r in rows]
        column = lambda values: np.asarray(values, dtype=np.object_).reshape(n, 1)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("output_ids", ids_out),
            pb_utils.Tensor("text", column(texts)),
            pb_utils.Tensor("realized_ratio", np.asarray([[r["realized"]] for r in rows], np.float32)),
            pb_utils.Tensor("theta", np.asarray([[r["theta"]] for r in rows], np.float32)),
            pb_utils.Tensor("precision", column([r["precision"].encode() for r in rows])),
            pb_utils.Tensor("stop_reason", column([r["stop"].encode() for r in rows])),
        ])

    def execute(self, requests):
        deadline = time.monotonic() + self.deadline_s  # the queue wait is bounded by the queue policy
        parsed, errors = [], {}
        for i, request in enumerate(requests):  # dynamic batching hands several requests to one execute()
            try:
                parsed.append(self.rows(request))
            except Exception as exc:  # one bad request fails alone; the server keeps serving
                parsed.append([])
                errors[i] = str(exc)
        rows = []
        for i, request_rows in enumerate(parsed):
            for r in request_rows:
                r["request"], r["deadline"] = i, deadline
                rows.append(r)
        self.generate(rows, errors)
        return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(errors[i]))
                if i in errors else self.respond(request_rows) for i, request_rows in enumerate(parsed)]
