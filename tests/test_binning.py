import numpy as np
import pandas as pd
import pytest

from exaggerate.config import Base, Bin
from exaggerate.plots import reliability
from exaggerate.posteriors import INPUT_COLUMNS, PosteriorError, bin_index, bin_stage, calibrated_sample, read_table


def _overconfident(n=20000, seed=0):
    """Posteriors pushed towards 0 and 1 compared with the true positive rate."""
    rng = np.random.default_rng(seed)
    true_p = rng.uniform(0, 1, n)
    y = (rng.uniform(0, 1, n) < true_p).astype(int)
    logit = np.log(true_p / (1 - true_p)) * 2.5
    return 1 / (1 + np.exp(-logit)), y


def test_bin_index_edges():
    assert bin_index(np.array([0.0, 0.0999, 0.1, 0.55, 0.9999, 1.0]), 10).tolist() == [0, 0, 1, 5, 9, 9]
    assert bin_index(np.array([0.49, 0.5]), 2).tolist() == [0, 1]


def test_calibrated_sample_keeps_positive_share_in_bin_range():
    p, y = _overconfident()
    chosen, report = calibrated_sample(p, y, 10, 500, np.random.default_rng(0))
    bins = bin_index(p[chosen], 10)
    for k, r in enumerate(report):
        sel = bins == k
        assert sel.sum() == r["selected"] <= 500
        share = y[chosen][sel].mean()
        assert k / 10 - 1e-9 <= share <= (k + 1) / 10 + 1e-9
    assert len(set(chosen.tolist())) == len(chosen)
    before, after = reliability(p, y), reliability(p[chosen], y[chosen])
    assert after["ece"] < before["ece"]


def test_short_and_empty_bins_are_reported():
    p = np.array([0.05] * 30 + [0.95] * 30 + [0.55] * 4 + [0.75] * 3)
    y = np.array([0] * 30 + [1] * 30 + [1, 0, 1, 0] + [0, 0, 1])
    chosen, report = calibrated_sample(p, y, 10, 20, np.random.default_rng(0))
    assert report[0]["selected"] == 20 and not report[0]["short"]
    assert report[3]["selected"] == 0 and report[3]["short"]
    assert report[5]["selected"] == 4 and report[5]["selected_positives"] == 2  # share 0.5 in [0.5, 0.6]
    # bin 7 needs a positive share in [0.7, 0.8]: no subset of 1 positive and 2 negatives has one
    assert report[7]["available"] == 3 and report[7]["selected"] == 0 and report[7]["short"]


@pytest.mark.parametrize("bins,per_bin,msg", [(1, 10, "num_bins must be >= 2"), (10, 0, "per_bin must be > 0")])
def test_bad_sampling_settings(bins, per_bin, msg):
    with pytest.raises(PosteriorError, match=msg):
        calibrated_sample(np.array([0.1]), np.array([0]), bins, per_bin, np.random.default_rng(0))


def test_bin_stage_writes_table_metrics_plots(tmp_path):
    p, y = _overconfident(3000)
    rows = pd.DataFrame([{"id": f"im{i}", "split": "train", "label_Boot": int(t), "p": float(q), "bin": int(b)}
                         for i, (q, t, b) in enumerate(zip(p, y, bin_index(p, 10)))])
    metrics = bin_stage(rows, "Boot", Base(), Bin(per_bin=100), tmp_path)
    table = read_table(tmp_path / "explainer_inputs.csv", INPUT_COLUMNS)
    assert len(table) == metrics["images"] <= 1000
    assert metrics["after"]["ece"] < metrics["before"]["ece"]
    assert metrics["empty_bins"] == []
    assert (tmp_path / "reliability.png").stat().st_size > 1000
    assert (tmp_path / "bin_counts.png").stat().st_size > 1000
    again = tmp_path / "again"
    bin_stage(rows, "Boot", Base(), Bin(per_bin=100), again)
    assert (again / "explainer_inputs.csv").read_bytes() == (tmp_path / "explainer_inputs.csv").read_bytes()
    with pytest.raises(PosteriorError, match="no images of split 'val'"):
        bin_stage(rows, "Boot", Base(), Bin(split="val"), tmp_path / "x")
