"""The graph contract (qtale_export/deploy/graph_io.py): names, the loop's carry-over, the Triton copy."""
from __future__ import annotations

import numpy as np

from qtale_export.deploy import graph_io

LAYERS = 2


class FakeGraphs:
    """Stands in for a backend: records every call's feeds, answers with contract-shaped outputs
    whose logits make token (position + 1) % 7 the greedy choice."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, graph: str, feeds: dict) -> dict:
        self.calls.append((graph, feeds))
        batch, total = feeds[graph_io.ATTENTION_MASK].shape
        new = feeds[graph_io.INPUT_IDS].shape[1]
        logits = np.zeros((batch, new, 7), np.float32)
        logits[:, -1, total % 7] = 1.0
        out = {graph_io.LOGITS: logits, graph_io.EXEC_MASK: np.full((LAYERS, batch, total), total % 2 == 0)}
        for name in graph_io.present_names(LAYERS):
            out[name] = np.full((batch, 1, total, 4), float(total), np.float32)
        return out


def test_names_follow_the_graph_order():
    assert graph_io.past(3, "key") == "past.3.key" and graph_io.present(0, "value") == "present.0.value"
    assert graph_io.output_names(2) == ["logits", "present.0.key", "present.0.value", "present.1.key",
                                        "present.1.value", "exec_mask"]
    decode = graph_io.inputs("decode", 2, kv_heads=3, head_dim=8, act="float16")
    assert list(decode) == ["input_ids", "attention_mask", "theta", *graph_io.past_names(2), "past_exec"]
    assert decode["past.1.value"] == ("float16", ["batch", 3, "past", 8])
    assert decode["past_exec"] == ("bool", [2, "batch", "past"])
    assert list(graph_io.inputs("prefill", 2, 3, 8)) == ["input_ids", "attention_mask", "theta"]
    assert graph_io.outputs("prefill", 2, 3, 8, vocab=11)["logits"] == ("float32", ["batch", "kept", 11])
    assert graph_io.optional_inputs("prefill") == {"logits_to_keep": ("int64", [], 0)} and not graph_io.optional_inputs("decode")
    assert graph_io.outputs("decode", 2, 3, 8, vocab=11)["exec_mask"] == ("bool", [2, "batch", "total"])
    assert graph_io.batch_axis("exec_mask") == graph_io.batch_axis("past_exec") == 1
    assert graph_io.batch_axis("present.0.key") == 0


def test_loop_carries_the_cache_and_drops_finished_rows():
    graphs = FakeGraphs()
    loop = graph_io.Loop(graphs, LAYERS, [0.1, 0.2, 0.3])
    mask = np.array([[0, 1, 1], [1, 1, 1], [1, 1, 1]])  # left padding carried into decode
    out = loop.prefill(np.arange(9).reshape(3, 3), mask)
    assert graph_io.greedy(out).tolist() == [3, 3, 3]
    out = loop.step(graph_io.greedy(out))
    graph, feeds = graphs.calls[-1]
    assert graph == "decode" and list(feeds) == list(graph_io.inputs("decode", LAYERS, 1, 4))
    assert feeds["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert feeds["input_ids"].tolist() == [[3], [3], [3]] and feeds["theta"].dtype == np.float32
    assert (feeds["past.1.value"] == 3.0).all() and feeds["past_exec"].shape == (LAYERS, 3, 3)
    loop.keep([0, 2])
    loop.step([5, 6])
    _, feeds = graphs.calls[-1]
    assert feeds["theta"].tolist() == [np.float32(0.1), np.float32(0.3)]
    assert feeds["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert feeds["past.0.key"].shape == (2, 1, 4, 4) and feeds["past_exec"].shape == (LAYERS, 2, 4)


def test_in_place_decoder_gets_no_cache():
    class Decoder:
        def step(self, feeds):
            self.feeds = feeds
            return {graph_io.LOGITS: np.zeros((1, 1, 7)), graph_io.EXEC_MASK: np.ones((LAYERS, 1, 3), bool)}

    loop = graph_io.Loop(FakeGraphs(), LAYERS, [0.0])
    loop.prefill([[1, 2]], np.ones((1, 2)))
    loop.decoder = Decoder()
    loop.step([4])
    assert list(loop.decoder.feeds) == ["input_ids", "attention_mask", "theta", "past_exec"]


def test_realized_ratio_over_routed_layers():
    mask = np.zeros((3, 1, 4), bool)
    mask[0] = True  # an unrouted layer always runs
    mask[2, 0, :1] = True
    assert graph_io.realized_ratio(mask, [1, 2]) == 0.125
    assert graph_io.realized_ratio(mask, []) == 1.0


def test_the_triton_copy_runs_without_the_package(tmp_path):
    """The Triton models import a copy of graph_io.py with no package around it."""
    import shutil
    import subprocess
    import sys

    shutil.copy2(graph_io.__file__, tmp_path / "graph_io.py")
    code = ("import numpy as np, graph_io as io\n"
            "loop = io.Loop(lambda g, f: {'logits': np.eye(3)[None, [len(f['attention_mask'][0]) % 3]],"
            " 'exec_mask': np.ones((1, 1, 1), bool), 'present.0.key': 0, 'present.0.value': 0}, 1, [0.5])\n"
            "print(io.greedy(loop.prefill([[1, 2]], [[1, 1]]))[0], io.greedy(loop.step([2]))[0], io.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(tmp_path)}).stdout.split()
    assert out == ["2", "0", "graph_io"]
