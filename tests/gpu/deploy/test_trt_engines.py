"""The engines `qtale build` makes, run on a GPU against the PyTorch outputs stored in the export
(the check tests/unit/deploy/test_trt_build.py stops before, for want of a GPU)."""
from __future__ import annotations

import pytest

from qtale_export.deploy import tensorrt as qtrt
from qtale_export.export.verify import verify_with_polygraphy


@pytest.mark.parametrize("precision", ["fp16", "int4", "fp8"])
def test_engines_match_the_stored_reference(trt_exports, precision):
    export = trt_exports[0](precision, "standard")
    for graph in ("prefill", "decode"):
        qtrt.build(qtrt.BuildOptions(export_dir=export, graph=graph, min_tokens=1, opt_tokens=32, max_tokens=128,
                                     batch="1:2:2"))
    report = verify_with_polygraphy(export, backend="tensorrt")
    assert report["ok"], report
