"""A real Triton server (the tritonserver binary bundled in nvidia-pytriton, Python backend, CPU;
started by conftest.run_tritonserver) serving a tiny export from `qtale triton-repo --backend
python`; answers compared with the runtime. QTALE_TRITON_TEST=0 skips.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qtale_testing import THETAS, run_concurrently, spread_routers

PROMPT = "The quick brown fox jumps over the lazy dog. A journey"


@pytest.fixture(scope="module")
def tiny_export_triton(tiny_dir, tmp_path_factory) -> Path:
    import qtale_export
    from qtale_export.export.main import export

    model = qtale_export.load(str(tiny_dir))
    spread_routers(model)
    model.theta_table = {k: {"theta": t, "realized": None} for k, t in THETAS.items()}
    out = tmp_path_factory.mktemp("triton") / "tiny-fp32"
    export(model.eval(), out, checkpoint=str(tiny_dir), ratio=0.6, precision="fp32", ops="standard",
           decode_steps=1, verify_thetas=[0.31])
    return out


@pytest.fixture(scope="module")
def server(tritonserver, tiny_export_triton, tmp_path_factory):
    from qtale_export.deploy.triton import build_repository

    work = tmp_path_factory.mktemp("tritonserver")
    repo = work / "repo"
    build_repository([tiny_export_triton], repo, backend="python", max_batch=8, threads=1, max_new_tokens=8)
    with tritonserver(repo, work) as (client, addr):
        yield client, repo, addr


def _infer_router(client, ids=None, text=None, ratio=0.6, new=8):
    import tritonclient.grpc as grpcclient

    inputs = []
    r = grpcclient.InferInput("execution_ratio", [1, 1], "FP32")
    r.set_data_from_numpy(np.asarray([[ratio]], np.float32))
    inputs.append(r)
    if ids is not None:
        t = grpcclient.InferInput("input_ids", [1, len(ids)], "INT64")
        t.set_data_from_numpy(np.asarray([ids], np.int64))
        inputs.append(t)
    if text is not None:
        t = grpcclient.InferInput("text", [1, 1], "BYTES")
        t.set_data_from_numpy(np.asarray([[text.encode()]], dtype=np.object_))
        inputs.append(t)
    n = grpcclient.InferInput("max_new_tokens", [1, 1], "INT32")
    n.set_data_from_numpy(np.asarray([[new]], np.int32))
    inputs.append(n)
    return client.infer("qtale_router", inputs, client_timeout=60)


RATIOS = (0.6, 0.7, 1.0)  # calibrated, interpolated (between 0.6 and 0.8) and all layers
PROMPTS = (PROMPT, "Once upon a time", "The capital of France is")


def _tokens(res) -> list[int]:
    return [int(t) for t in res.as_numpy("output_ids")[0] if t >= 0]


def test_one_model_serves_every_ratio_like_qtale_run(server, tiny_export_triton):
    from tritonclient.utils import InferenceServerException

    from qtale_export.deploy.runtime import Runtime

    client, repo, _ = server
    assert sorted(p.name for p in repo.iterdir()) == [".qtale-triton-repository", "qtale_fp32", "qtale_llm_fp32",
                                                      "qtale_router"]
    rt = Runtime.open(tiny_export_triton)  # what `qtale run` uses, with its default ratio mode
    ids = rt.tokenizer.encode(PROMPT)
    for ratio in RATIOS:
        want = rt.generate(PROMPT, ratio=ratio, max_new_tokens=8)
        res = _infer_router(client, ids=ids, ratio=ratio)
        assert _tokens(res) == want.token_ids
        assert float(res.as_numpy("theta")[0, 0]) == pytest.approx(want.theta)
        assert float(res.as_numpy("realized_ratio")[0, 0]) == pytest.approx(want.realized_ratio, abs=1e-6)
        assert res.as_numpy("precision")[0, 0].decode() == "fp32"
    assert len({round(rt.generate(PROMPT, ratio=r, max_new_tokens=8).theta, 6) for r in RATIOS}) == 3
    # bad requests: a ratio outside (0, 1] or below the table, no prompt, a graph call missing an input
    for bad in (1.5, 0.0, 0.2):
        with pytest.raises(InferenceServerException, match=r"\(0, 1\]|below the lowest calibrated ratio"):
            _infer_router(client, ids=ids, ratio=bad)
    with pytest.raises(InferenceServerException, match="input_ids or text"):
        _infer_router(client, ratio=0.6)
    with pytest.raises(InferenceServerException):
        import tritonclient.grpc as grpcclient

        t = grpcclient.InferInput("input_ids", [1, 3], "INT64")
        t.set_data_from_numpy(np.asarray([[1, 2, 3]], np.int64))
        client.infer("qtale_fp32", [t], client_timeout=30)
    # still serving: the text path equals the runtime too
    assert client.is_server_ready()
    want = rt.generate(PROMPT, ratio=0.6, max_new_tokens=8)
    res = _infer_router(client, text=PROMPT, ratio=0.6)
    assert _tokens(res) == want.token_ids and res.as_numpy("text")[0, 0].decode() == want.text
    # one request, three rows of different prompt lengths and ratios: generated as one left-padded
    # batch, each row as `qtale run` generates it alone
    import tritonclient.grpc as grpcclient

    rows = [rt.tokenizer.encode(p) for p in PROMPTS]
    assert len({len(r) for r in rows}) == 3
    width = max(len(r) for r in rows)
    ids_in = np.full((3, width), -1, np.int64)
    for b, r in enumerate(rows):
        ids_in[b, :len(r)] = r
    inputs = [grpcclient.InferInput("execution_ratio", [3, 1], "FP32"), grpcclient.InferInput("input_ids", [3, width], "INT64"),
              grpcclient.InferInput("max_new_tokens", [3, 1], "INT32")]
    inputs[0].set_data_from_numpy(np.asarray([[r] for r in RATIOS], np.float32))
    inputs[1].set_data_from_numpy(ids_in)
    inputs[2].set_data_from_numpy(np.full((3, 1), 8, np.int32))
    res = client.infer("qtale_router", inputs, client_timeout=60)
    for b, (p, r) in enumerate(zip(PROMPTS, RATIOS)):
        want = rt.generate(p, ratio=r, max_new_tokens=8)
        assert [int(t) for t in res.as_numpy("output_ids")[b] if t >= 0] == want.token_ids, (p, r)
        assert float(res.as_numpy("realized_ratio")[b, 0]) == pytest.approx(want.realized_ratio, abs=1e-6), (p, r)


def test_concurrent_clients_at_mixed_ratios_are_batched_and_equal_qtale_run(server, tiny_export_triton):
    """8 clients at once, 240 requests over three ratios and three prompts: every answer equals
    `qtale run`'s, and the router executed fewer batches than requests (rows of different ratios ran
    together), all on the one graph model."""
    import tritonclient.grpc as grpcclient

    from qtale_export.deploy.runtime import Runtime

    client, repo, addr = server
    rt = Runtime.open(tiny_export_triton)
    want = {(p, r): rt.generate(p, ratio=r, max_new_tokens=8) for p in PROMPTS for r in RATIOS}
    ids = {p: rt.tokenizer.encode(p) for p in PROMPTS}
    before = client.get_inference_statistics("qtale_router").model_stats[0]
    clients, per_client = 8, 30
    results = []

    def work(k: int) -> None:
        c = grpcclient.InferenceServerClient(addr)
        try:
            for j in range(per_client):
                p, r = PROMPTS[j % len(PROMPTS)], RATIOS[(j // len(PROMPTS) + k) % len(RATIOS)]
                res = _infer_router(c, ids=ids[p], ratio=r)
                results.append((p, r, _tokens(res), float(res.as_numpy("realized_ratio")[0, 0])))
        finally:
            c.close()

    errors = run_concurrently(work, clients)
    assert not errors
    assert len(results) == clients * per_client and {(p, r) for p, r, _, _ in results} == set(want)
    for p, r, toks, realized in results:
        assert toks == want[(p, r)].token_ids, (p, r)
        assert realized == pytest.approx(want[(p, r)].realized_ratio, abs=1e-6), (p, r)
    after = client.get_inference_statistics("qtale_router").model_stats[0]
    n_req = after.inference_count - before.inference_count
    n_exec = after.execution_count - before.execution_count
    assert n_req == clients * per_client and n_exec < n_req  # dynamic batching merged requests
    assert [m.name for m in client.get_model_repository_index().models] == ["qtale_fp32", "qtale_llm_fp32", "qtale_router"]


