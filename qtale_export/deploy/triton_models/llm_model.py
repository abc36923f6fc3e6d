"""Triton Python-backend model `qtale_llm_<precision>`: decoupled, in-flight batching, streaming.

One model per precision serves every ratio. `execute()` only checks a request and queues it; a
scheduler thread owns the running batch. Between two decode rounds it admits waiting requests
(their prefill runs, their KV cache joins the batch), then gives every running row one token;
finished, cancelled and failed rows leave at once. Each row keeps its own theta, position, sampler,
stop strings and deadline. The KV cache lives in this process (an in-place buffer per row where the
export's decode graph allows it, as `qtale run`): nothing goes through BLS.

Each row's graph calls have the shapes `qtale run` uses (batch 1, logits of the last position),
so at temperature 0 a row's tokens equal `qtale run`'s at its ratio whatever else is running:
ONNX Runtime's int4 kernels give a row other numbers inside a batch (docs/triton.md). What the
in-flight batch buys is scheduling (join between steps, no head-of-line wait, streaming) and no
KV copies, not a batched matrix multiply.

Inputs (all optional but a prompt): text_input BYTES [1] or input_ids INT64 [-1]; max_tokens INT32;
execution_ratio FP32 or theta FP32 (default: the export's); temperature FP32, top_p FP32, seed
INT64; stop BYTES [-1]; stream BOOL (one response per text piece, then a final one); elastic BOOL
(false: this request opts out of the elastic ratio); ignore_eos BOOL.
Outputs: text_output, output_ids (stream: the new ones since the previous response), and in the
final response requested_ratio, served_ratio (the lowest ratio the row ran at), realized_ratio,
theta, stop_reason (eos | stop | length | max_length | deadline), prompt_tokens, new_tokens.

Shared code, copied next to this file by `qtale triton-repo`: graph_io.py (the graph contract),
theta_policy.py (deploy/theta.py: ratio -> theta, as `qtale run`), sampling.py (the sampler and
stop strings of `qtale run`), kv.py (its in-place KV decoder). Needs numpy and onnxruntime (+
tokenizers for text) in the server's Python.
"""
import collections
import json
import math
import os
import sys
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
RATIO_BUCKETS = [round(0.1 * i, 1) for i in range(1, 11)]


def _one(request, name, cast):
    """The single value of an optional [1] input, or None."""
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    v = t.as_numpy().reshape(-1)
    if v.size != 1:
        raise ValueError(f"{name} takes one value, got {v.size}")
    v = v[0]
    return cast(v.decode("utf-8") if isinstance(v, bytes) else v)


def _column(value, dtype=None):
    return np.asarray([value], dtype=dtype if dtype is not None else np.object_)


class Row:
    """One request in the batch: its options, its loop (KV cache) and what it produced."""

    def __init__(self, sender, ids, ratio, theta, elastic, sampler, text, max_new, stream, ignore_eos, deadline):
        self.sender, self.ids, self.requested, self.theta, self.elastic = sender, ids, ratio, theta, elastic
        self.sampler, self.text, self.max_new, self.stream, self.ignore_eos = sampler, text, max_new, stream, ignore_eos
        self.deadline, self.arrived = deadline, time.monotonic()
        self.ratio = self.served = ratio  # the ratio in force / the lowest one so far (elastic)
        self.loop = self.logits = self.exec_mask = None
        self.started = self.first = None
        self.sent = 0  # tokens already sent (stream)


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        sys.path.insert(0, folder)
        import graph_io
        import model_files
        import kv
        import sampling
        import theta_policy

        self.io, self.kv, self.sampling, self.policy = graph_io, kv, sampling, theta_policy
        self.name, self.precision = cfg["name"], p["precision"]
        self.num_layers, self.vocab = int(p["num_layers"]), int(p["vocab"])
        self.routed = json.loads(p.get("routed_layers") or "[]")
        self.eos = set(json.loads(p.get("eos_ids") or "[]"))
        self.max_length = int(p["max_length"])
        self.prompt_cap = min(int(p.get("max_prompt_tokens") or self.max_length), self.max_length - 1)
        self.default_new, self.new_cap = int(p["default_max_tokens"]), int(p["max_tokens_cap"])
        self.table, self.mode = json.loads(p["theta_table"]), p.get("ratio_mode") or "interpolate"
        self.default_ratio = float(p["default_ratio"]) if p.get("default_ratio") else None
        self.default_theta = float(p.get("default_theta") or 0.0)
        self.deadline_s, self.max_rows, self.max_queue = float(p["deadline_s"]), int(p["max_rows"]), int(p["max_queue"])
        self.elastic = p.get("elastic") or "off"
        self.elastic_target, self.floor = float(p.get("elastic_target") or 0), float(p.get("elastic_floor") or 1)
        self.interval = float(p.get("elastic_interval") or 0)
        self.level = 1.0  # the elastic policy's ratio cap (1.0: no cap)
        # the graphs are the sibling graph model's files (held once in the repository)
        graphs_dir = os.path.join(os.path.dirname(args["model_repository"]), p["graph_model"], "1")
        threads, plugin = int(p.get("threads") or 0), p.get("plugin_ops") == "1"
        self.sessions = {g: model_files.session(os.path.join(graphs_dir, f), threads, plugin)
                         for g, f in json.loads(p["graphs"]).items()}
        self.outputs = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}
        self.keep_last = graph_io.LOGITS_TO_KEEP in {i.name for i in self.sessions["prefill"].get_overridable_initializers()}
        self.in_place = p.get("in_place") == "1"
        self.tokenizer = model_files.tokenizer(folder)
        self.metrics()
        self.cond = threading.Condition()
        self.waiting, self.active, self.stopping = collections.deque(), [], False
        self.round_s = 0.0  # smoothed duration of a decode round (every running row's time per token)
        self.adjusted = time.monotonic()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def metrics(self) -> None:
        """Prometheus metrics on Triton's metrics port (custom-metrics API), labelled by model."""
        F, labels = pb_utils.MetricFamily, {"model": self.name, "precision": self.precision}

        def metric(name, kind, text, buckets=None):
            family = F(name=name, description=text, kind=kind)
            self.families.append(family)  # a family is unregistered when it is collected
            return family.Metric(labels=labels, buckets=buckets) if buckets else family.Metric(labels=labels)

        self.families = []
        self.m_ttft = metric("qtale_time_to_first_token_seconds", F.HISTOGRAM,
                             "arrival to first generated token", LATENCY_BUCKETS)
        self.m_tpot = metric("qtale_time_per_output_token_seconds", F.HISTOGRAM,
                             "per request: (last token - first token) / (new tokens - 1)", LATENCY_BUCKETS)
        self.m_queue = metric("qtale_queue_seconds", F.HISTOGRAM, "arrival to prefill start", LATENCY_BUCKETS)
        self.m_ratio = metric("qtale_realized_execution_ratio", F.HISTOGRAM,
                              "realized execution ratio per request (routed layers, every token)", RATIO_BUCKETS)
        self.m_in = metric("qtale_prompt_tokens_total", F.COUNTER, "prompt tokens of finished requests")
        self.m_out = metric("qtale_generation_tokens_total", F.COUNTER, "generated tokens of finished requests")
        self.m_rows = metric("qtale_running_rows", F.GAUGE, "rows in the running batch")
        self.m_waiting = metric("qtale_waiting_requests", F.GAUGE, "requests waiting to join the batch")
        self.m_level = metric("qtale_elastic_ratio", F.GAUGE, "the elastic policy's ratio cap (1: none)")
        self.m_level.set(1.0)

    # ---- requests ----------------------------------------------------------------------------------
    def theta_of(self, ratio: float) -> float:
        theta = self.policy.theta_for(self.table, ratio, self.mode)
        if not (math.isfinite(theta) and 0.0 <= theta <= 1.0):  # a damaged table must not reach the graphs
            raise ValueError(f"theta {theta} for ratio {ratio} is outside [0, 1]")
        return theta

    def parse(self, request) -> Row:
        """A checked Row; ValueError (one line) on any bad option."""
        ids_t = pb_utils.get_input_tensor_by_name(request, "input_ids")
        text = _one(request, "text_input", str)
        if ids_t is not None:
            ids = [int(t) for t in ids_t.as_numpy().reshape(-1)]
        elif text is not None:
            if self.tokenizer is None:
                raise ValueError("text_input needs the `tokenizers` package in the server's Python")
            ids = self.tokenizer.encode(text).ids if text.strip() else []
        else:
            raise ValueError("send text_input or input_ids")
        if not ids:
            raise ValueError("empty prompt")
        bad = next((t for t in ids if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.vocab - 1})")
        if len(ids) > self.prompt_cap:
            raise ValueError(f"prompt is {len(ids)} tokens; the maximum is {self.prompt_cap}")
        max_new = _one(request, "max_tokens", int)
        max_new = self.default_new if max_new is None else max_new
        if not 1 <= max_new <= self.new_cap:
            raise ValueError(f"max_tokens must be in 1..{self.new_cap}, got {max_new}")
        ratio, theta = _one(request, "execution_ratio", float), _one(request, "theta", float)
        if ratio is not None and theta is not None:
            raise ValueError("send execution_ratio or theta, not both")
        elastic = _one(request, "elastic", bool)
        if theta is not None:
            if not (math.isfinite(theta) and 0.0 <= theta <= 1.0):
                raise ValueError(f"theta must be in [0, 1], got {theta}")
            elastic = False  # a theta is a choice of path, not a ratio the policy may lower
        elif ratio is not None or self.default_ratio is not None:
            ratio = self.policy.check_ratio(ratio if ratio is not None else self.default_ratio)
            theta = self.theta_of(ratio)
        else:
            theta, elastic = self.default_theta, False
        temperature = _one(request, "temperature", float)
        top_p, seed = _one(request, "top_p", float), _one(request, "seed", int)
        sampler = self.sampling.Sampler(0.0 if temperature is None else temperature, 1.0 if top_p is None else top_p, seed)
        stop_t = pb_utils.get_input_tensor_by_name(request, "stop")
        stops = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in stop_t.as_numpy().reshape(-1)] if stop_t is not None else []
        decode = (lambda t: self.tokenizer.decode(t, skip_special_tokens=True)) if self.tokenizer is not None else (lambda t: "")
        return Row(request.get_response_sender(), ids, ratio, theta, elastic is not False and ratio is not None,
                   sampler, self.sampling.StopText(decode, stops), max_new, bool(_one(request, "stream", bool)),
                   bool(_one(request, "ignore_eos", bool)), time.monotonic() + self.deadline_s)

    def execute(self, requests):
        for request in requests:
            try:
                row = self.parse(request)
            except Exception as exc:  # a bad request fails alone, before it joins the batch
                request.get_response_sender().send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))),
                                                   flags=FINAL)
                continue
            with self.cond:
                full = len(self.waiting) >= self.max_queue
                if not full:
                    self.waiting.append(row)
                    self.cond.notify()
            if full:
                row.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"queue full ({self.max_queue} requests waiting); retry later", pb_utils.TritonError.UNAVAILABLE)),
                    flags=FINAL)
        return None  # decoupled: the scheduler thread answers

    # ---- the batch -----------------------------------------------------------------------------------
    def run(self, graph, feeds):
        return dict(zip(self.outputs[graph], self.sessions[graph].run(None, feeds)))

    def start(self, r: Row) -> None:
        """Prefill row r at batch 1, as `qtale run` does (its KV cache joins the batch)."""
        r.started = time.monotonic()
        self.m_queue.observe(r.started - r.arrived)
        if r.elastic and self.level < r.requested:
            self.set_ratio(r, self.level)
        r.loop = self.io.Loop(self.run, self.num_layers, [r.theta])
        out = r.loop.prefill([r.ids], np.ones((1, len(r.ids)), np.int64), logits_to_keep=1 if self.keep_last else None)
        r.exec_mask, r.logits = out[self.io.EXEC_MASK], out[self.io.LOGITS][0, -1]
        if self.in_place and r.max_new > 1:
            r.loop.decoder = self.kv.InPlaceDecoder(self.sessions["decode"], out, self.num_layers,
                                                    min(self.max_length, len(r.ids) + r.max_new))

    def set_ratio(self, r: Row, ratio: float) -> None:
        r.ratio, r.theta = ratio, self.theta_of(ratio)
        r.served = min(r.served, ratio)
        if r.loop is not None:
            r.loop.theta[:] = r.theta  # the next decode step runs at the new theta

    def advance(self, r: Row):
        """One token for row r (the loop of Runtime.stream); its stop reason once it is done."""
        token = r.sampler(r.logits)
        if r.first is None:
            r.first = time.monotonic()
            self.m_ttft.observe(r.first - r.arrived)
        if token in self.eos and not r.ignore_eos:
            return "eos"
        piece = r.text.add(token)
        if r.text.stopped:
            return "stop"
        if r.stream and piece:
            self.send_piece(r, piece)
        n = len(r.text.tokens)
        if n >= r.max_new:
            return "length"
        if len(r.ids) + n >= self.max_length:
            return "max_length"
        if time.monotonic() >= r.deadline:
            return "deadline"
        out = r.loop.step([token])
        r.exec_mask, r.logits = out[self.io.EXEC_MASK], out[self.io.LOGITS][0, -1]
        return None

    def send_piece(self, r: Row, piece: str) -> None:
        new = r.text.tokens[r.sent:]
        r.sent = len(r.text.tokens)
        r.sender.send(pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", _column(piece.encode("utf-8"))),
            pb_utils.Tensor("output_ids", np.asarray(new, np.int64))]))

    def finish(self, r: Row, stop: str) -> None:
        """The row's final response (stream: what was not sent yet) and its metrics."""
        done = time.monotonic()
        rest = r.text.finish()
        tokens = r.text.tokens
        realized = self.io.realized_ratio(r.exec_mask, self.routed)
        text = rest if r.stream else r.text.text
        ids = tokens[r.sent:] if r.stream else tokens
        nan = float("nan")
        r.sender.send(pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", _column(text.encode("utf-8"))),
            pb_utils.Tensor("output_ids", np.asarray(ids, np.int64)),
            pb_utils.Tensor("requested_ratio", _column(nan if r.requested is None else r.requested, np.float32)),
            pb_utils.Tensor("served_ratio", _column(nan if r.served is None else r.served, np.float32)),
            pb_utils.Tensor("realized_ratio", _column(realized, np.float32)),
            pb_utils.Tensor("theta", _column(r.theta, np.float32)),
            pb_utils.Tensor("stop_reason", _column(stop.encode())),
            pb_utils.Tensor("prompt_tokens", _column(len(r.ids), np.int32)),
            pb_utils.Tensor("new_tokens", _column(len(tokens), np.int32))]), flags=FINAL)
        r.loop = None  # the KV cache leaves with the row
        self.m_ratio.observe(realized)
        self.m_in.increment(len(r.ids))
        self.m_out.increment(len(tokens))
        if len(tokens) > 1 and r.first is not None:
            self.m_tpot.observe((done - r.first) / (len(tokens) - 1))

    def fail(self, r: Row, message: str, code=None) -> None:
        r.loop = None
        try:
            err = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
            r.sender.send(pb_utils.InferenceResponse(error=err), flags=FINAL)
        except Exception:  # the client is gone; nothing left to answer
            pass

    # ---- the elastic ratio -----------------------------------------------------------------------------
    def rebalance(self, waiting: int) -> None:
        """Lower the ratio cap toward the floor while the server falls behind (a decode round, i.e.
        every running row's time per token, over the target; or more requests waiting than the
        target), raise it back once it has caught up (all of the way once the batch is empty); at
        most one 0.1 step per `interval` seconds."""
        now = time.monotonic()
        if self.elastic == "off" or now - self.adjusted < self.interval:
            return
        load = self.round_s if self.elastic == "tpot" else waiting
        level = self.level
        if load > self.elastic_target:
            level = max(self.floor, round(level - 0.1, 6))
        elif load < 0.7 * self.elastic_target or (self.elastic == "queue" and waiting == 0):
            level = min(1.0, round(level + 0.1, 6))
        if level != self.level:
            self.level, self.adjusted = level, now
            self.m_level.set(level)
            for r in self.active:
                if r.elastic:
                    self.set_ratio(r, min(r.requested, level))

    # ---- the scheduler ------------------------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            with self.cond:
                if not self.waiting and not self.active and self.level < 1.0:
                    self.level = 1.0  # nothing left to do: the server has caught up
                    self.m_level.set(1.0)
                while not self.stopping and not self.waiting and not self.active:
                    self.cond.wait()
                if self.stopping:
                    return
                joining = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_rows - len(self.active)))]
                waiting = len(self.waiting)
            t0 = time.monotonic()  # a round: the joiners' prefill, then one token per row
            for r in joining:  # new rows join between two decode rounds
                try:
                    self.start(r)
                    self.active.append(r)
                except Exception as exc:
                    self.fail(r, f"prefill failed: {exc}")
            self.m_rows.set(len(self.active))
            self.m_waiting.set(waiting)
            self.rebalance(waiting)
            going = []
            for r in self.active:
                try:
                    if r.sender.is_cancelled():
                        self.fail(r, "request cancelled", pb_utils.TritonError.CANCELLED)
                        continue
                    stop = self.advance(r)
                    if stop is None:
                        going.append(r)
                    else:
                        self.finish(r, stop)
                except Exception as exc:  # this row fails alone; the batch goes on
                    self.fail(r, f"generation failed: {exc}")
            if self.active:
                self.round_s = 0.7 * self.round_s + 0.3 * (time.monotonic() - t0)
            self.active = going

    def finalize(self):
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=30)
        for r in list(self.waiting) + self.active:  # every request is answered once, even now
            self.fail(r, "the model is being unloaded", pb_utils.TritonError.UNAVAILABLE)
