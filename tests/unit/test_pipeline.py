"""The main job (run.sh): the deployment path end to end on a tiny QTALE checkpoint, then again
with every expensive stage reused."""
import json

from qtale_export import pipeline
from qtale_export.train import TrainConfig, train


def test_main_job_runs_then_reuses_its_stages(tiny_dir, text_file, tmp_path):
    ckpt = train(TrainConfig(model=str(tiny_dir), data=[str(text_file)], out=str(tmp_path / "ckpt"), steps=2,
                             batch_size=2, seq_len=64, router_hidden=16, target_ratio=0.6), progress=False)
    out = tmp_path / "deploy"
    first = pipeline.run(out=out, model=str(ckpt), ratio=0.6, other_ratio=0.8, calib_ratios=(0.6, 0.8))
    assert first["model"] == str(ckpt) and first["ratio"] == 0.6 and first["precision"] == "int4"
    # the dial: one prompt at every layer, the other ratio and the export's, in that order
    dial = first["generate"]
    assert list(dial) == ["1.0", "0.8", "0.6"] and first["prompt"] == pipeline.PROMPT
    assert dial["1.0"]["realized_ratio"] == 1.0 and dial["1.0"]["theta"] == 0.0
    assert all(0 < g["realized_ratio"] < 1 and g["tokens_per_s"] > 0 and g["new_tokens"] > 0
               for r, g in dial.items() if r != "1.0")
    assert first["sizes_mb"]["export"] > first["sizes_mb"]["export_weights_and_graphs"] > 0
    speed = first["speed_vs_all_layers"]
    assert speed["decode_tokens_per_s"] > 0 and speed["decode_tokens_per_s_all_layers"] > 0
    assert 0 < speed["prefill_realized_ratio"] < 1  # the routed run skipped something, the reference did not
    held = first["heldout"]
    assert held["tokens"] > 0 and held["kl_vs_all_layers"] >= 0 and 0 < held["realized_ratio"] < 1
    assert all(isinstance(v, float) for v in first["stage_seconds"].values())
    again = pipeline.run(out=out, model=str(ckpt), ratio=0.6, other_ratio=0.8, calib_ratios=(0.6, 0.8))
    reused = {k for k, v in again["stage_seconds"].items() if v == "reused"}
    assert reused == {"quantize", "calibrate", "export", "bench", "heldout"}
    assert again["heldout"] == first["heldout"] and again["sizes_mb"] == first["sizes_mb"]
    assert json.loads((out / "summary.json").read_text())["artifacts"]["export"] == str(
        out / "export-int4-r0.6")
