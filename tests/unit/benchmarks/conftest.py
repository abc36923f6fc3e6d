from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_int4_export(tiny_model, tiny_dir, tmp_path_factory) -> Path:
    """A tiny int4 --target ort-cpu export (GroupQueryAttention, in-place KV, one If per routed layer)."""
    from qtale_export.export import main as export_main

    out = tmp_path_factory.mktemp("bench") / "int4"
    export_main.export(tiny_model, out, checkpoint=str(tiny_dir), ratio=0.6, precision="int4", target="ort-cpu",
                       decode_steps=1, verify_thetas=[0.0, 0.31])
    return out
