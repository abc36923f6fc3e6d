"""benchmarks/bench_compaction.py: skips cleanly without CUDA (the GPU run itself is tests/gpu's job)."""
from __future__ import annotations

import pytest
from qtale_testing import load_script


def load():
    return load_script("bench_compaction")


def test_skips_without_cuda(capsys, monkeypatch):
    bench = load()
    monkeypatch.setattr(bench, "cuda_device", lambda: None)
    assert bench.main(["--tokens", "4096", "--hidden", "4096"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SKIPPED: no CUDA device") and "needs a CUDA device" in out


def test_no_gpu_here_means_skip(capsys):
    bench = load()
    if bench.cuda_device() is not None:
        pytest.skip("a CUDA device is present: the benchmark runs for real (see docs/benchmarks.md)")
    assert bench.main([]) == 0 and "SKIPPED" in capsys.readouterr().out
