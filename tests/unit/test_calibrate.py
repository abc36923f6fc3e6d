import random

import pytest
import torch

import qtale_export
from qtale_testing import TEXT, spread_routers
from qtale_export.calibrate import calibrate, realized_ratio
from qtale_export.deploy.theta import check_ratio
from qtale_export.data import CALIBRATION_TEXT, text_batches


@pytest.fixture(scope="module")
def model(tiny_dir):
    m = qtale_export.load(tiny_dir)
    spread_routers(m, std=0.5)
    return m


def corpus(path, seed: int, n_words: int = 2500):
    """Text from the tiny tokenizer's domain; different seeds give disjoint-in-order samples."""
    words = sorted(set(TEXT.replace(".", " .").split()))
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(words) for _ in range(n_words)))
    return path


def test_calibration_generalizes_to_heldout_text(model, tmp_path):
    # ~10k calibration tokens; the held-out text is a different sample the bisection never saw
    calib = text_batches(corpus(tmp_path / "calib.txt", 1), model.tokenizer, 128, 8)
    heldout = text_batches(corpus(tmp_path / "heldout.txt", 2), model.tokenizer, 128, 8)
    table = calibrate(model, calib, [0.5, 0.7, 1.0], progress=False)
    for target in (0.5, 0.7):
        entry = table[str(target)]
        assert abs(entry["realized"] - target) <= 0.01
        assert abs(realized_ratio(model, heldout, entry["theta"]) - target) <= 0.02
    assert table["1.0"] == {"theta": 0.0, "realized": 1.0}
    model.set_ratio(0.5)
    assert model.theta == table["0.5"]["theta"]


def test_builtin_calibration_text_is_usable(model):
    batches = text_batches(CALIBRATION_TEXT, model.tokenizer, 128, 4)
    assert sum(int(b["attention_mask"].sum()) for b in batches) > 500


def test_set_ratio_one_reproduces_base_model(model):
    ids = torch.randint(3, 200, (2, 16))
    with torch.no_grad():
        model.set_ratio(1.0)
        assert (model(ids).logits - model.causal_lm(ids).logits).abs().max() < 1e-5


def test_uncalibrated_ratio_is_a_clear_error(model):
    with pytest.raises(qtale_export.QtaleError, match="not calibrated"):
        model.set_ratio(0.33)


@pytest.mark.parametrize("bad", ["1.5", "0", "-1", "abc", "nan"])
def test_check_ratio_rejects(bad):
    with pytest.raises(qtale_export.QtaleError, match="invalid ratio"):
        check_ratio(bad)
