"""Triton Python-backend BLS model `qtale_router`: execution ratio in, generated tokens out.

Inputs (per batch row): execution_ratio FP32 [1]; input_ids INT64 [-1] (right-padded with -1
when rows differ) or text BYTES [1]; optional max_new_tokens INT32 [1].
Outputs: output_ids INT64 [-1] (padded with -1), text BYTES [1], realized_ratio FP32 [1],
theta FP32 [1], variant BYTES [1].

The variant is the calibrated one nearest to the requested ratio (a tie goes to the higher ratio);
its theta is sent to the variant's prefill/decode models, called through BLS with the KV cache
(present.* -> past.*, exec_mask -> past_exec); greedy decoding, stop at eos or max_new_tokens.
Parameters (config.pbtxt): variants (JSON), eos_ids (JSON), routed_layers (JSON), num_layers,
max_length, default_max_new_tokens.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        self.variants = json.loads(p["variants"])
        self.eos = set(json.loads(p.get("eos_ids") or "[]"))
        self.routed = json.loads(p.get("routed_layers") or "[]")
        self.num_layers = int(p["num_layers"])
        self.max_length = int(p.get("max_length") or 2048)
        self.default_new = int(p.get("default_max_new_tokens") or 32)
        self.tokenizer = None
        tj = os.path.join(args["model_repository"], args["model_version"], "tokenizer.json")
        if os.path.isfile(tj):
            try:
                from tokenizers import Tokenizer

                self.tokenizer = Tokenizer.from_file(tj)
            except ImportError:
                pass

    def pick(self, ratio):
        if not ratio == ratio or not 0.0 < ratio <= 1.0:
            raise ValueError(f"execution_ratio must be in (0, 1], got {ratio}")
        return min(self.variants, key=lambda v: (round(abs(v["ratio"] - ratio), 9), -v["ratio"]))

    def call(self, model, feeds):
        tensors = [pb_utils.Tensor(k, np.array(v, copy=True, order="C")) for k, v in feeds.items()]
        req = pb_utils.InferenceRequest(model_name=model, inputs=tensors,
                                        requested_output_names=self.out_names)
        resp = req.exec()
        if resp.has_error():
            raise RuntimeError(f"{model}: {resp.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(resp, n).as_numpy() for n in self.out_names}

    @property
    def out_names(self):
        return ["logits", "exec_mask"] + [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def generate(self, ids, variant, max_new):
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.max_length:
            raise ValueError(f"prompt is {len(ids)} tokens; the maximum is {self.max_length - 1}")
        theta = np.asarray([variant["theta"]], dtype=np.float32)
        out = self.call(variant["prefill"], {"input_ids": np.asarray([ids], np.int64),
                                             "attention_mask": np.ones((1, len(ids)), np.int64), "theta": theta})
        gen = []
        while True:
            tok = int(np.argmax(out["logits"][0, -1]))
            if tok in self.eos:
                break
            gen.append(tok)
            total = len(ids) + len(gen)
            if len(gen) >= max_new or total >= self.max_length:
                break
            feeds = {f"past.{i}.{kv}": out[f"present.{i}.{kv}"] for i in range(self.num_layers) for kv in ("key", "value")}
            feeds.update({"input_ids": np.asarray([[tok]], np.int64), "attention_mask": np.ones((1, total), np.int64),
                          "theta": theta, "past_exec": out["exec_mask"]})
            out = self.call(variant["decode"], feeds)
        ex = out["exec_mask"][self.routed] if self.routed else np.ones(1, bool)
        return gen, float(ex.mean())

    def execute(self, requests):
        responses = []
        for request in requests:  # dynamic batching hands several requests to one execute()
            try:
                ratio = pb_utils.get_input_tensor_by_name(request, "execution_ratio").as_numpy().reshape(-1)
                ids_t = pb_utils.get_input_tensor_by_name(request, "input_ids")
                text_t = pb_utils.get_input_tensor_by_name(request, "text")
                new_t = pb_utils.get_input_tensor_by_name(request, "max_new_tokens")
                n = ratio.shape[0]
                if ids_t is not None:
                    rows = [[int(t) for t in r if t >= 0] for r in ids_t.as_numpy().reshape(n, -1)]
                elif text_t is not None:
                    if self.tokenizer is None:
                        raise ValueError("text input needs the `tokenizers` package in the server's Python")
                    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in text_t.as_numpy().reshape(-1)]
                    rows = [self.tokenizer.encode(t).ids if t.strip() else [] for t in texts]
                else:
                    raise ValueError("send input_ids or text")
                max_new = new_t.as_numpy().reshape(-1) if new_t is not None else np.full(n, self.default_new)
                results = []
                for b in range(n):
                    v = self.pick(float(ratio[b]))
                    gen, realized = self.generate(rows[b], v, max(int(max_new[b]), 1))
                    results.append((gen, realized, v))
                width = max(max((len(g) for g, _, _ in results), default=0), 1)
                ids_out = np.full((n, width), -1, np.int64)
                for b, (g, _, _) in enumerate(results):
                    ids_out[b, :len(g)] = g
                texts = [(self.tokenizer.decode(g) if self.tokenizer is not None else "").encode("utf-8")
                         for g, _, _ in results]
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("output_ids", ids_out),
                    pb_utils.Tensor("text", np.asarray(texts, dtype=np.object_).reshape(n, 1)),
                    pb_utils.Tensor("realized_ratio", np.asarray([[r] for _, r, _ in results], np.float32)),
                    pb_utils.Tensor("theta", np.asarray([[v["theta"]] for _, _, v in results], np.float32)),
                    pb_utils.Tensor("variant", np.asarray([[v["name"].encode()] for _, _, v in results], dtype=np.object_)),
                ]))
            except Exception as exc:  # one bad request fails alone; the server keeps serving
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses
