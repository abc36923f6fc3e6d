"""Shared fixtures; the helpers themselves live in qtale_testing.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from qtale_testing import TEXT, build_tiny_model, make_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "text.txt"
    p.write_text(TEXT * 3)
    return p


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return build_tiny_model(tiny_dir)


@pytest.fixture(scope="session")
def tiny_export(tiny_model, tiny_dir, tmp_path_factory) -> Path:
    """A tiny calibrated fp32 export (standard ops), built once per test session."""
    from qtale_export.export.main import export

    out = tmp_path_factory.mktemp("rt") / "tiny-fp32"
    export(tiny_model, out, checkpoint=str(tiny_dir), ratio=0.6, precision="fp32", ops="standard",
           decode_steps=1, verify_thetas=[0.0, 0.31])
    return out


@pytest.fixture(scope="session")
def trt_exports(tiny_dir, tmp_path_factory):
    """(get(precision, ops, trt_decode="if") -> export folder, model, checkpoint): tiny --target
    tensorrt exports, each made once per test session."""
    from qtale_export.export import main as export_main
    from qtale_testing import spread_checkpoint

    model, ckpt = spread_checkpoint(tiny_dir, tmp_path_factory.mktemp("ckpt") / "routed")
    root = tmp_path_factory.mktemp("trt-exports")
    cache = {}

    def get(precision, ops, trt_decode=None):
        key = (precision, ops, trt_decode or "default")
        if key not in cache:
            out = root / "-".join(key)
            export_main.export(model, out, checkpoint=str(ckpt), ratio=0.6, precision=precision, ops=ops,
                               target="tensorrt", decode_steps=3, trt_decode=trt_decode)
            cache[key] = out
        return cache[key]
    return get, model, ckpt
