"""deploy/runtime/sampling.py (and kv.py): the sampler and stop-string text shared by `qtale run` and the
Triton in-flight model, which gets them as copies, so they import nothing from the package."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from qtale_export.deploy.runtime import kv, sampling
from qtale_export.deploy.runtime.sampling import Sampler, StopText


@pytest.mark.parametrize("module", [sampling, kv])
def test_copied_files_import_nothing_from_the_package(module):
    tree = ast.parse(Path(module.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "." for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert not relative and set(names) <= {"__future__", "numpy", "onnxruntime"}, names


@pytest.mark.parametrize("temperature, top_p, seed, message", [
    (-0.1, 1.0, None, "temperature"), (float("nan"), 1.0, None, "temperature"),
    (1.0, 0.0, None, "top_p"), (1.0, 1.5, None, "top_p"), (1.0, float("nan"), None, "top_p"),
    (1.0, 1.0, -1, "seed"),
])
def test_sampler_refuses_bad_options(temperature, top_p, seed, message):
    with pytest.raises(ValueError, match=message):
        Sampler(temperature, top_p, seed)


def test_sampler_greedy_seeded_and_nucleus():
    logits = np.asarray([0.0, 3.0, 2.9, -5.0], np.float32)
    assert Sampler()(logits) == 1
    draws = lambda seed: [s(logits) for s in [Sampler(1.0, 1.0, seed)] for _ in range(20)]
    assert draws(7) == draws(7) and draws(7) != draws(8)
    nucleus = Sampler(1.0, 0.5, 3)
    assert {nucleus(logits) for _ in range(50)} == {1}  # token 1 alone covers half the mass


def test_stop_text_holds_back_and_cuts():
    vocab = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "\n\n", 6: "more"}
    decode = lambda ids: "".join(vocab[i] for i in ids)
    text = StopText(decode, ["\n\n"])
    pieces = [text.add(t) for t in (1, 2, 3, 4)]
    assert "".join(pieces) == "Hello worl" and not text.stopped  # one character held back
    assert text.add(5) == "" and text.stopped and text.text == "Hello world"
    assert text.finish() == "d"
    plain = StopText(decode)
    assert [plain.add(t) for t in (1, 6)] == ["Hel", "more"] and plain.finish() == ""
    assert plain.text == "Helmore"


def test_stop_text_waits_for_a_whole_character():
    decode = lambda ids: "".join({1: "a", 2: "\ufffd", 3: "é"}[i] for i in ids) if ids[-1] != 3 else "aé"
    text = StopText(decode)
    assert text.add(1) == "a" and text.add(2) == "" and text.add(3) == "é" and text.finish() == ""
