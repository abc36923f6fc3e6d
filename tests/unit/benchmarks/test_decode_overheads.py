"""benchmarks/decode_overheads.py and profile_decode.py on a tiny int4 ort-cpu export: the cut graphs
run and generate the export's own tokens at theta 0; the profile accounts for the Ifs' own time."""
from __future__ import annotations

from qtale_testing import load_script


def test_variants_run_and_agree(tiny_int4_export, capsys):
    bench = load_script("decode_overheads")
    args = [str(tiny_int4_export), "--repeats", "1", "--tokens", "4", "--prompt-tokens", "8", "--threads", "1"]
    assert bench.main(args) == 0
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "ms/token" not in ln]
    assert [ln.split(" | ")[0][2:] for ln in table] == ["as exported", "as exported", "routers cut", "routers cut, no If"]
    assert not list(tiny_int4_export.parent.glob(".overheads-*"))  # the variants are removed


def test_profile_counts_branch_nodes_apart(tiny_int4_export, capsys):
    prof = load_script("profile_decode")
    names = prof.branch_node_names(tiny_int4_export / "decode.onnx")
    assert any("GroupQueryAttention" in n for n in names) and not any(n.startswith("lm_head") for n in names)
    assert prof.main([str(tiny_int4_export), "--prompt-tokens", "8", "--tokens", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "the Ifs' own time" in out and "| MatMulNBits |" in out
