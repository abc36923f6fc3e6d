"""The in-flight model `qtale_llm_<precision>` (llm_model.py) on a real Triton server
(conftest.run_tritonserver): streaming, sampling, in-flight batching, the generate extension, metrics,
the elastic ratio and faults. Answers are compared with the runtime (`qtale run`) on the int4 export
whose rows differ inside a batched matrix multiply (docs/triton.md)."""
from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
import urllib.request

import numpy as np
import pytest
from qtale_testing import run_concurrently

PROMPTS = ("The quick brown fox jumps over the lazy dog. A journey", "Once upon a time", "The capital of France is",
           "Water boils at one hundred degrees")
RATIOS = (0.6, 0.7, 1.0)
MODEL = "qtale_llm_int4"
TYPES = {"text_input": "BYTES", "input_ids": "INT64", "max_tokens": "INT32", "execution_ratio": "FP32", "theta": "FP32",
         "temperature": "FP32", "top_p": "FP32", "seed": "INT64", "stop": "BYTES", "stream": "BOOL", "elastic": "BOOL",
         "ignore_eos": "BOOL"}
NUMPY = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_}


def _inputs(options: dict):
    import tritonclient.grpc as grpcclient

    out = []
    for name, value in options.items():
        kind = TYPES[name]
        values = value if isinstance(value, (list, tuple)) else [value]
        if kind == "BYTES":
            values = [v.encode() for v in values]
        arr = np.asarray(values, dtype=NUMPY[kind])
        t = grpcclient.InferInput(name, list(arr.shape), kind)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


class Answer:
    """Everything one streamed request got: its pieces, its final response's outputs, or an error."""

    def __init__(self):
        self.pieces, self.ids, self.final, self.finals, self.error = [], [], None, 0, None
        self.done = threading.Event()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def generate(addr: str, options: dict, model: str = MODEL, timeout: float = 120, on_first=None) -> Answer:
    """One request on its own gRPC stream; returns once its final response (or error) arrived and
    the stream closed, so `finals` counts every final response the server sent."""
    import tritonclient.grpc as grpcclient

    ans = Answer()

    def callback(result, error):
        if error is not None:
            ans.error, ans.finals = str(error), ans.finals + 1
            ans.done.set()
            return
        ans.pieces.append(result.as_numpy("text_output")[0].decode())
        ans.ids += [int(t) for t in result.as_numpy("output_ids")]
        if on_first is not None and len(ans.pieces) == 1:
            on_first()
        if result.get_response().parameters["triton_final_response"].bool_param:
            ans.final = {n: result.as_numpy(n)[0] for n in ("requested_ratio", "served_ratio", "realized_ratio", "theta",
                                                            "stop_reason", "prompt_tokens", "new_tokens")}
            ans.final["stop_reason"] = ans.final["stop_reason"].decode()
            ans.finals += 1
            ans.done.set()

    client = grpcclient.InferenceServerClient(addr)
    try:
        client.start_stream(callback=callback)
        client.async_stream_infer(model, _inputs(options), enable_empty_final_response=True)
        assert ans.done.wait(timeout), f"no final response within {timeout} s"
        client.stop_stream()
    finally:
        client.close()
    return ans


@pytest.fixture(scope="module")
def server(tritonserver, int4_export, tmp_path_factory):
    from qtale_export.deploy.triton import build_repository

    work = tmp_path_factory.mktemp("inflight")
    build_repository([int4_export], work / "repo", max_batch=8, threads=1, max_new_tokens=8, max_new_tokens_cap=200,
                     deadline_s=60)
    ports = {}
    with tritonserver(work / "repo", work, metrics=True, ports=ports) as (client, addr):
        yield client, addr, ports


def _same(ans: Answer, want, streamed: bool) -> None:
    assert ans.error is None and ans.finals == 1, ans.error
    assert ans.ids == want.token_ids and ans.text == want.text
    assert ans.final["stop_reason"] == want.stop_reason
    assert ans.final["realized_ratio"] == pytest.approx(want.realized_ratio, abs=1e-6)
    assert ans.final["theta"] == pytest.approx(want.theta, abs=1e-6)
    assert int(ans.final["new_tokens"]) == want.new_tokens
    if not streamed:
        assert len(ans.pieces) == 1


def test_concurrent_rows_equal_qtale_run_and_bad_options_fail_alone(server, runtime):
    """8 clients at once, streaming and not, four prompts, three ratios, and requests with bad
    options among them: every good answer equals `qtale run` at its ratio (tokens, text, realized
    ratio, stop reason), each request gets exactly one final response."""
    _, addr, _ = server
    want = {(p, r): runtime.generate(p, ratio=r, max_new_tokens=12) for p in PROMPTS for r in RATIOS}
    bad = [({"max_tokens": 0}, "max_tokens must be in 1..200, got 0"), ({"temperature": -1.0}, "temperature"),
           ({"execution_ratio": 1.5}, r"\(0, 1\]"), ({"top_p": 0.0}, "top_p"), ({"theta": 0.3}, "not both")]
    answers = []

    def work(k: int) -> None:
        for j in range(9):
            p, r = PROMPTS[(j + k) % 4], RATIOS[(j // 4 + k) % 3]
            options = {"text_input": p, "execution_ratio": r, "max_tokens": 12, "stream": bool((j + k) % 2)}
            if (j + k) % 4 == 3:
                extra, message = bad[(j + k) % len(bad)]
                answers.append(("bad", message, generate(addr, {**options, **extra})))
            else:
                answers.append(((p, r), options["stream"], generate(addr, options)))

    errors = run_concurrently(work, 8)
    assert not errors and len(answers) == 72
    for key, extra, ans in answers:
        if key == "bad":
            assert ans.finals == 1 and ans.error and re.search(extra, ans.error), ans.error
        else:
            _same(ans, want[key], extra)


def test_a_request_joins_a_running_batch(server, runtime):
    """A short request sent while a long one is generating is answered before the long one ends
    (it joined between two decode steps), and both equal `qtale run`."""
    _, addr, _ = server
    long_opts = {"text_input": PROMPTS[0], "execution_ratio": 1.0, "max_tokens": 200, "ignore_eos": True, "stream": True}
    started, order = threading.Event(), []
    box = {}

    def long_request():
        box["long"] = generate(addr, long_opts, on_first=started.set)
        order.append("long")

    t = threading.Thread(target=long_request, daemon=True)
    t.start()
    assert started.wait(60)
    short = generate(addr, {"text_input": PROMPTS[2], "execution_ratio": 0.6, "max_tokens": 4})
    order.append("short")
    t.join(120)
    assert order == ["short", "long"]
    _same(short, runtime.generate(PROMPTS[2], ratio=0.6, max_new_tokens=4), False)
    _same(box["long"], runtime.generate(PROMPTS[0], ratio=1.0, max_new_tokens=200, ignore_eos=True), True)


@pytest.mark.parametrize("options", [
    {"temperature": 0.8, "top_p": 0.9, "seed": 5},
    {"temperature": 1.3, "seed": 11},
    {"stop": [" the", "."]},
])
def test_sampling_and_stop_strings_equal_qtale_run(server, runtime, options):
    _, addr, _ = server
    kw = {k: v for k, v in options.items()}
    want = runtime.generate(PROMPTS[1], ratio=0.7, max_new_tokens=24, **kw)
    for stream in (False, True):
        ans = generate(addr, {"text_input": PROMPTS[1], "execution_ratio": 0.7, "max_tokens": 24, "stream": stream, **options})
        _same(ans, want, stream)


def _curl(port: int, path: str, body: dict, timeout: int = 60) -> str:
    return subprocess.run(["curl", "-sS", "-X", "POST", f"http://127.0.0.1:{port}/v2/models/{MODEL}/{path}",
                           "-d", json.dumps(body)], capture_output=True, text=True, check=True, timeout=timeout).stdout


def test_generate_extension_with_curl(server, runtime):
    """docs/triton.md's curl commands: /generate answers one JSON object, /generate_stream server-sent
    events whose text pieces add up to the same text; both equal `qtale run`."""
    _, _, ports = server
    want = runtime.generate(PROMPTS[2], ratio=0.6, max_new_tokens=16)
    body = {"text_input": PROMPTS[2], "max_tokens": 16, "execution_ratio": 0.6}
    out = json.loads(_curl(ports["http"], "generate", body))
    assert out["text_output"] == want.text and out["output_ids"] == want.token_ids
    assert out["stop_reason"] == want.stop_reason and out["requested_ratio"] == pytest.approx(0.6)
    assert out["realized_ratio"] == pytest.approx(want.realized_ratio, abs=1e-6)
    events = [json.loads(line[len("data: "):]) for line in
              _curl(ports["http"], "generate_stream", {**body, "stream": True}).splitlines() if line.startswith("data: ")]
    assert len(events) > 1 and "".join(e["text_output"] for e in events) == want.text
    listed = lambda v: v if isinstance(v, list) else [v]  # the extension writes a one-element tensor as a scalar
    assert sum((listed(e["output_ids"]) for e in events), []) == want.token_ids
    assert events[-1]["stop_reason"] == want.stop_reason
    err = _curl(ports["http"], "generate", {**body, "max_tokens": 0})
    assert "max_tokens must be in 1..200, got 0" in err


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _value(text: str, name: str) -> float:
    m = re.search(rf'^{name}{{[^}}]*model="{MODEL}"[^}}]*}} ([0-9.e+-]+)$', text, re.M)
    assert m, f"{name} not on the metrics port"
    return float(m.group(1))


def test_metrics_on_the_metrics_port(server, runtime):
    """TTFT, TPOT, queue time, tokens in/out and the realized-ratio histogram, scraped from Triton's
    metrics port: the counters move by exactly this request's tokens, the histograms count it."""
    _, addr, ports = server
    before = _scrape(ports["metrics"])
    ans = generate(addr, {"text_input": PROMPTS[0], "execution_ratio": 0.6, "max_tokens": 10, "ignore_eos": True})
    time.sleep(0.5)  # the final response goes out just before the metrics are recorded
    after = _scrape(ports["metrics"])
    delta = lambda name: _value(after, name) - _value(before, name)
    assert delta("qtale_generation_tokens_total") == 10 == len(ans.ids)
    assert delta("qtale_prompt_tokens_total") == int(ans.final["prompt_tokens"])
    for h in ("qtale_time_to_first_token_seconds", "qtale_time_per_output_token_seconds", "qtale_queue_seconds",
              "qtale_realized_execution_ratio"):
        assert delta(f"{h}_count") == 1, h
    assert delta("qtale_realized_execution_ratio_sum") == pytest.approx(float(ans.final["realized_ratio"]), abs=1e-5)
    le = 0.6 if ans.final["realized_ratio"] <= 0.6 else 0.7
    assert re.search(rf'qtale_realized_execution_ratio_bucket{{[^}}]*le="{le}"', after)
    assert _value(after, "qtale_running_rows") >= 0 and _value(after, "qtale_elastic_ratio") == 1.0


def test_faults_leave_the_server_serving(server, runtime):
    """A client that disconnects mid-stream (curl killed), a cancelled request (gRPC stream closed
    with cancel_requests) and requests around them: the others are answered, right, exactly once,
    and the cancelled rows leave the batch."""
    import tritonclient.grpc as grpcclient

    _, addr, ports = server
    long_opts = {"text_input": PROMPTS[0], "execution_ratio": 1.0, "max_tokens": 200, "ignore_eos": True, "stream": True}
    curl = subprocess.Popen(["curl", "-sS", "-N", "-X", "POST",
                             f"http://127.0.0.1:{ports['http']}/v2/models/{MODEL}/generate_stream",
                             "-d", json.dumps(long_opts)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert curl.stdout.readline().startswith(b"data: ")  # streaming
    curl.kill()
    curl.wait(10)
    got = queue.Queue()
    cancelled = grpcclient.InferenceServerClient(addr)
    cancelled.start_stream(callback=lambda result, error: got.put((result, error)))
    cancelled.async_stream_infer(MODEL, _inputs(long_opts))
    assert got.get(timeout=60)[1] is None  # its first piece: it is running
    others = []
    threads = [threading.Thread(target=lambda p=p: others.append((p, generate(addr, {"text_input": p, "max_tokens": 8,
                                                                                      "execution_ratio": 0.7}))))
               for p in PROMPTS]
    for t in threads:
        t.start()
    cancelled.stop_stream(cancel_requests=True)
    cancelled.close()
    for t in threads:
        t.join(120)
    assert len(others) == 4
    for p, ans in others:
        _same(ans, runtime.generate(p, ratio=0.7, max_new_tokens=8), False)
    deadline = time.monotonic() + 60  # the killed stream's row may run to its end; none stays
    while _value(_scrape(ports["metrics"]), "qtale_running_rows") > 0 and time.monotonic() < deadline:
        generate(addr, {"text_input": PROMPTS[2], "max_tokens": 1})  # the gauge is set once per round
        time.sleep(0.5)
    assert _value(_scrape(ports["metrics"]), "qtale_running_rows") <= 1  # at most the probe itself


def test_flood_beyond_the_queue_is_refused_and_the_rest_answered(tritonserver, int4_export, runtime, tmp_path):
    """One running row and a queue of 2: of 10 requests sent at once, those beyond the queue get
    'queue full' at once; every request gets exactly one final response; the served ones are right."""
    from qtale_export.deploy.triton import build_repository

    build_repository([int4_export], tmp_path / "repo", max_batch=1, max_queue=2, threads=1, max_new_tokens=8)
    with tritonserver(tmp_path / "repo", tmp_path) as (_, addr):
        answers = []
        threads = [threading.Thread(target=lambda k=k: answers.append(generate(addr, {
            "text_input": PROMPTS[k % 4], "execution_ratio": 0.6, "max_tokens": 40, "ignore_eos": True})))
            for k in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert len(answers) == 10 and all(a.finals == 1 for a in answers)
        refused = [a for a in answers if a.error]
        assert refused and all("queue full (2 requests waiting)" in a.error for a in refused)
        served = [a for a in answers if not a.error]
        assert len(served) >= 3
        wants = {runtime.generate(p, ratio=0.6, max_new_tokens=40, ignore_eos=True).text for p in PROMPTS}
        assert all(a.text in wants for a in served)


@pytest.mark.parametrize("policy, target, rows", [("tpot", 1e-6, 8), ("queue", 0.5, 1)])
def test_elastic_ratio_lowers_rows_toward_the_floor_and_respects_opt_out(tritonserver, int4_export, runtime, tmp_path,
                                                                         policy, target, rows):
    """An elastic policy whose target the load breaks (tpot: no round is that fast; queue: one row
    runs, the other waits): the ratio cap falls to the floor (0.6); the elastic request says
    requested 1.0, served 0.6, realized below 1; the request that opted out keeps ratio 1.0 and
    equals `qtale run`; once the batch is empty the cap is back at 1.0 on the metrics port."""
    from qtale_export.deploy.triton import build_repository

    build_repository([int4_export], tmp_path / "repo", threads=1, max_batch=rows, max_new_tokens=8,
                     max_new_tokens_cap=200, elastic=policy, elastic_target=target, elastic_floor=0.6, elastic_interval=0)
    ports = {}
    with tritonserver(tmp_path / "repo", tmp_path, metrics=True, ports=ports) as (_, addr):
        opts = {"text_input": PROMPTS[0], "execution_ratio": 1.0, "max_tokens": 200, "ignore_eos": True}
        box = {}
        t = threading.Thread(target=lambda: box.update(elastic=generate(addr, opts)), daemon=True)
        t.start()
        kept = generate(addr, {**opts, "elastic": False})
        t.join(120)
        el = box["elastic"]
        assert el.error is None and el.final["requested_ratio"] == pytest.approx(1.0)
        assert el.final["served_ratio"] == pytest.approx(0.6) and el.final["realized_ratio"] < 0.99
        _same(kept, runtime.generate(PROMPTS[0], ratio=1.0, max_new_tokens=200, ignore_eos=True), False)
        assert kept.final["served_ratio"] == pytest.approx(1.0)
        deadline = time.monotonic() + 30
        while _value(_scrape(ports["metrics"]), "qtale_elastic_ratio") != 1.0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _value(_scrape(ports["metrics"]), "qtale_elastic_ratio") == 1.0
