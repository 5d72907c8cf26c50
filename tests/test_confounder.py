"""The planted-confounder audit's parts: the mark, its detector, the arms' data, the judgement."""
import numpy as np
import pytest
import torch

from exaggerate import confounder as c
from exaggerate import confounder_report as r
from exaggerate.config import ConfigError, config_from_dict


def test_the_mark_is_painted_where_the_detector_reads_it_and_nowhere_else():
    x = -torch.ones(3, 1, 32, 32)
    marked = c.paint(x, 4)
    assert torch.equal(x, -torch.ones(3, 1, 32, 32))  # a copy
    assert (marked != x).sum() == 3 * 16
    assert marked[0, 0, 1:5, 1:5].eq(1).all()
    np.testing.assert_allclose(c.mark_scores(marked, 4), 1.0)
    np.testing.assert_allclose(c.mark_scores(x, 4), -1.0)
    # Half the square lit: half the coverage, whatever the values.
    half = x.clone()
    half[..., 1:5, 1:3] = 1.0
    np.testing.assert_allclose(c.mark_coverage(half, 4, 0.0), 0.5)


def test_marks_follow_the_rates_per_class():
    labels = np.array([1] * 5000 + [0] * 5000)
    m = c.assign_marks(labels, 0.95, 0.05, seed=0, stream=0)
    assert abs(m[:5000].mean() - 0.95) < 0.01 and abs(m[5000:].mean() - 0.05) < 0.01
    assert np.array_equal(m, c.assign_marks(labels, 0.95, 0.05, seed=0, stream=0))
    assert not np.array_equal(m, c.assign_marks(labels, 0.95, 0.05, seed=0, stream=1))


def test_the_arms_differ_only_in_the_classifiers_images(fashion_root):
    cfg = config_from_dict({"base": {"data_root": str(fashion_root)},
                            "audit": {"rate_positive": 1.0, "rate_negative": 0.0}})
    biased, clean = c.arm_data(cfg, "biased"), c.arm_data(cfg, "clean")
    for name in ("train", "val", "test"):
        assert np.array_equal(biased.splits[name], clean.splits[name])
    train = biased.splits["train"]
    y = biased.dataset.labels[train, 0] == 1
    assert biased.dataset.marked[train][y].all() and not biased.dataset.marked[train][~y].any()
    for name in ("val", "test"):  # the explainers' and the test images: the same marks in both arms
        idx = biased.splits[name]
        assert np.array_equal(biased.dataset.marked[idx], clean.dataset.marked[idx])
        assert torch.equal(biased.dataset.images(idx), clean.dataset.images(idx))
    assert biased.rate == pytest.approx(y.mean())
    # A marked image carries the mark in images() and image(), and an id of its own.
    k = int(np.flatnonzero(biased.dataset.marked)[0])
    assert biased.dataset.ids[k].endswith("+mark")
    assert torch.equal(biased.dataset.image(k), biased.dataset.images([k])[0])
    assert c.mark_scores(biased.dataset.image(k), cfg.audit.mark_size) == pytest.approx(1.0)
    with pytest.raises(c.ConfounderError, match="unknown arm 'other'"):
        c.arm_data(cfg, "other")


def test_a_series_draws_the_mark_toward_the_class_when_more_of_it_is_lit_at_the_highest_bin():
    present = np.array([[0, 0, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
    changes = r.mark_changes(present)
    assert changes["toward"].tolist() == [True, False, False, False, False]
    assert changes["away"].tolist() == [False, True, False, False, False]
    assert changes["any"].tolist() == [True, True, False, False, False]
    # Coverage (share of the mark lit) of 16-pixel marks at 3 bins; 2 pixels make a change.
    coverage = np.array([[0, 0, 3], [0, 0, 1], [16, 16, 12], [12, 14, 16], [4, 9, 10]]) / 16
    changes = r.coverage_changes(coverage, 2 / 16)
    assert changes["toward"].tolist() == [True, False, False, True, True]  # a sliver counts, one pixel not
    assert changes["away"].tolist() == [False, False, True, False, False]
    assert changes["whole_toward"].tolist() == [False, False, False, False, True]  # crosses one half


def test_the_interval_covers_the_share_and_narrows_with_more_queries():
    rng = np.random.default_rng(0)
    small, large = ((rng.random(n) < 0.3).astype(float) for n in (40, 4000))
    lo, hi = r.bootstrap_interval(small)
    assert lo <= small.mean() <= hi
    lo2, hi2 = r.bootstrap_interval(large)
    assert lo2 <= 0.3 <= hi2 and hi2 - lo2 < (hi - lo) / 3


@pytest.mark.parametrize("change, message", [
    ({"rate_positive": 1.5}, "audit.rate_positive: got 1.5"),
    ({"explainer_fraction": 1.0}, "audit.explainer_fraction"),
    ({"seeds": [0, 0]}, "audit.seeds"),
    ({"mark_size": 20}, "audit.mark_size: got 20"),
])
def test_bad_audit_settings_are_refused_naming_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"audit": change})


def test_a_detector_that_cannot_tell_the_mark_from_the_corners_refuses_to_judge(tmp_path):
    from fakes import write_idx

    root = tmp_path / "bright-corners"
    root.mkdir()
    rng = np.random.default_rng(0)
    for part, n in (("train", 200), ("t10k", 60)):
        labels = rng.choice([7, 9], size=n).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        images[:, :8, :8] = 255  # every image as white in its corner as the mark
        write_idx(root / f"{part}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{part}-labels-idx1-ubyte.gz", labels)
    cfg = config_from_dict({"base": {"data_root": str(root), "resize": "resize"}})
    det = r.judge_detector(c.arm_data(cfg, "clean"), cfg.audit.mark_size)
    assert det["accuracy"] < cfg.audit.detector_gate


def test_the_report_before_the_explainers_names_the_missing_file(fashion_root, tmp_path):
    cfg = config_from_dict({"base": {"data_root": str(fashion_root)}})
    with pytest.raises(c.ConfounderError, match=r"biased/seed0/explain/series.npz not found.*dvc repro audit/dvc.yaml"):
        r.report_stage(cfg, tmp_path / "confounder", tmp_path / "report")
    assert not (tmp_path / "report").exists()  # nothing half-written
