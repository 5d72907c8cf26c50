import numpy as np
import pytest
import torch
import torch.nn as nn

from exaggerate import metrics as M
from exaggerate.baseline import pixel_search
from exaggerate.posteriors import bin_centre


def test_fid_of_a_set_with_itself_is_zero_and_shift_gives_squared_distance():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(4000, 8)))
    assert M.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    shift = torch.zeros(8, dtype=torch.float64)
    shift[0] = 3.0
    b = torch.from_numpy(rng.normal(size=(4000, 8))) + shift
    assert M.frechet_distance(a, b) == pytest.approx(9.0, rel=0.05)
    assert M.frechet_distance(a[:1], b) is None


def test_per_bin_fid_rewards_matching_each_bin_not_copying_the_real_mix():
    """Real images sit mostly at the two ends (bins 0 and 2), few in the middle bin. A method
    whose counterfactuals look like the real images of their target bin scores ~0; one that
    leaves every query as it was scores far worse, though the pooled FID prefers it."""
    rng = np.random.default_rng(2)
    centre = {0: -4.0, 1: 0.0, 2: 4.0}
    real = {k: torch.from_numpy(rng.normal(size=(n, 3)) + centre[k]) for k, n in ((0, 3000), (1, 300), (2, 3000))}
    q = 2000
    matched = torch.stack([torch.from_numpy(rng.normal(size=(q, 3)) + centre[k]) for k in range(3)], 1)
    unchanged = torch.cat([real[0][:q // 2], real[2][:q // 2]])[:, None].expand(q, 3, 3)
    overall, per_bin = M.per_bin_fid(real, matched)
    assert overall == pytest.approx(0, abs=0.1) and set(per_bin) == {"0", "1", "2"}
    worse, per_bin_unchanged = M.per_bin_fid(real, unchanged)
    assert worse > 20 and all(per_bin_unchanged[k] > 10 for k in per_bin_unchanged)
    pooled = torch.cat(list(real.values()))
    assert M.frechet_distance(pooled, unchanged.flatten(0, 1)) < M.frechet_distance(pooled, matched.flatten(0, 1))
    # A bin without real images is reported as None and left out of the mean; none left gives None.
    overall, per_bin = M.per_bin_fid({0: real[0], 2: real[2]}, unchanged)
    assert per_bin["1"] is None and overall == pytest.approx((per_bin["0"] + per_bin["2"]) / 2)
    assert M.per_bin_fid({}, matched) == (None, {"0": None, "1": None, "2": None})
    # Grouping real features by bin keeps only bins an FID can use (at least 2 images).
    groups = M.group_by_bin(torch.arange(5.0)[:, None], np.array([0, 0, 1, 2, 2]), 3)
    assert set(groups) == {0, 2} and groups[2].flatten().tolist() == [3.0, 4.0]


def test_split_fid_is_small_for_the_same_distribution():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(2000, 4)))
    cf = torch.from_numpy(rng.normal(size=(2000, 4)))
    assert M.split_fid(x, cf) < 0.05
    assert M.split_fid(x, cf + 2) == pytest.approx(16, rel=0.1)
    assert M.split_fid(x[:3], cf[:3]) is None


def _corner_f(x):
    """A posterior that only looks at the top-left pixel."""
    return torch.sigmoid(50 * x[:, 0, 0, 0])


def test_kid_matches_the_unbiased_mmd_written_out_and_is_unbiased_for_equal_distributions():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g) + 0.5

    def k(a, b):
        return (float(a @ b) / 4 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert M.kernel_distance(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-6)
    assert M.kernel_distance(x[:1], y) is None
    # Small samples from one distribution: the estimates centre on 0 (FID's would all be > 0).
    same = [M.kernel_distance(torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)) for _ in range(200)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    shifted = M.kernel_distance(torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g) + 1)
    assert shifted > np.max(same)
    real_by_bin = {0: torch.randn(30, 8, generator=g), 2: torch.randn(30, 8, generator=g) + 1}
    fake = torch.stack([torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g),
                        torch.randn(30, 8, generator=g)], dim=1)
    mean, per_bin = M.per_bin_kid(real_by_bin, fake)
    assert per_bin["1"] is None and per_bin["2"] > per_bin["0"]
    assert mean == pytest.approx((per_bin["0"] + per_bin["2"]) / 2)


def test_cout_of_a_full_flip_is_about_one_and_of_no_change_minus_one():
    x = torch.full((2, 1, 8, 8), -0.2)
    x[:, 0, 0, 0] = -1
    cf = x.clone()
    cf[:, 0, 0, 0] = 1  # the most changed pixel flips the decision on its own
    assert M.cout(_corner_f, x, cf, steps=50) == pytest.approx(np.full(2, 0.98), abs=0.01)
    assert M.cout(_corner_f, x, x.clone(), steps=50) == pytest.approx(np.full(2, -1.0), abs=1e-3)


def test_compatibility_monotonic_and_flips():
    perfect = np.tile(bin_centre(np.arange(10), 10), (3, 1))
    assert M.compatibility(perfect)["compatibility_mae"] == pytest.approx(0)
    assert M.compatibility(perfect + 0.01)["compatibility_mae"] == pytest.approx(0.01)
    assert M.monotonic_share(np.array([[0.1, 0.2, 0.19], [0.3, 0.2, 0.9]])) == 0.5
    p_query = np.array([0.1, 0.9, 0.2])
    p_series = np.array([[0.0, 0.8], [0.3, 1.0], [0.0, 0.4]])
    assert M.flips(p_query, p_series).tolist() == [True, True, False]
    assert M.scalar_objective(0.1, 20.0, 0.002) == pytest.approx(0.14)
    assert M.scalar_objective(0.1, None, 0.002) is None
    curves = M.compatibility_curves(perfect, np.array([0.1, 0.5, 0.95]))
    assert set(curves) == {"0.0-0.2", "0.4-0.6", "0.8-1.0"}


def test_oracle_metrics_on_known_cases():
    n = 10
    perfect = np.tile(bin_centre(np.arange(n), n), (4, 1))
    assert M.oracle_agreement(perfect) == pytest.approx(1)
    assert M.oracle_agreement(1 - perfect) == pytest.approx(-1)
    # Real images grouped by bin: each bin weighs the same, however many images it holds.
    bins = np.repeat(np.arange(n), [50] + [1] * (n - 2) + [50])
    assert M.binned_oracle_agreement(bin_centre(bins, n), bins, n) == pytest.approx(1)
    rng = np.random.default_rng(1)
    equal = np.repeat(np.arange(n), 3)
    p_equal = np.clip(bin_centre(equal, n) + rng.normal(0, 0.3, len(equal)), 0, 1)
    # With equal counts it is oracle_agreement of the same images laid out as series.
    assert M.binned_oracle_agreement(p_equal, equal, n) == pytest.approx(
        M.oracle_agreement(p_equal.reshape(n, 3).T))
    # Ten images in bin 0 with the same values as one image there: the weighting undoes the count.
    one = np.arange(n)
    many = np.concatenate([np.zeros(9, dtype=int), one])
    p_one = rng.uniform(size=n)
    p_many = np.concatenate([np.full(9, p_one[0]), p_one])
    assert M.binned_oracle_agreement(p_many, many, n) == pytest.approx(M.oracle_agreement(p_one[None]))
    assert M.binned_oracle_agreement(np.ones(5), np.zeros(5, dtype=int), n) is None  # one bin: undefined
    ox = np.array([[0.1, 0.9, 0.2, 0.3], [0.2, 0.1, 0.9, 0.4]])
    ocf = np.array([[0.9, 0.1, 0.2, 0.7], [0.8, 0.1, 0.9, 0.4]])  # target column 0 flips in both
    assert M.mnac(ox, ocf, 0) == pytest.approx(1.0)  # 2 other changes, then 0: mean 1
    rng = np.random.default_rng(0)
    data = rng.uniform(size=(500, 3))
    data[:, 1] = data[:, 0]
    delta = rng.uniform(size=(500, 3))
    delta[:, 1] = delta[:, 0]
    cd = M.correlation_difference(data, np.zeros_like(delta), delta, 0)
    assert cd == pytest.approx(np.mean([0.0, abs(np.corrcoef(data[:, 0], data[:, 2])[0, 1]
                                                 - np.corrcoef(delta[:, 0], delta[:, 2])[0, 1])]), abs=1e-9)


def test_pixel_search_reaches_the_target_bins():
    def mean_f(x):
        return torch.sigmoid(8 * x.mean(dim=(1, 2, 3)))
    x = torch.full((2, 1, 6, 6), -0.5)
    # patience 0: the search itself (at lr 0.05 bin 8's circles its centre for 100 steps before it
    # lands, which the stall stop would cut short).
    s = pixel_search(mean_f, x, 10, steps=400, lr=0.05, lam=0.0, tolerance=0.01, patience=0)
    assert s.shape == (2, 10, 1, 6, 6) and s.min() >= -1 and s.max() <= 1
    p = mean_f(s.flatten(0, 1)).reshape(2, 10).detach().numpy()
    assert np.abs(p - bin_centre(np.arange(10), 10)).max() < 0.011


def test_face_identity_on_real_faces():
    pytest.importorskip("dlib")
    data = pytest.importorskip("skimage.data")
    from exaggerate.faces import face_verification

    astronaut = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 127.5 - 1
    brighter = (astronaut * 0.9 + 0.05).clamp(-1, 1)
    other = torch.from_numpy(np.asarray(data.lfw_subset()[50], dtype=np.float32))[None, None]
    other = (torch.nn.functional.interpolate(other, size=(512, 512), mode="bilinear")[0] * 2 - 1).expand(3, -1, -1)
    same = face_verification(astronaut[None], brighter[None])
    assert same["fva"] == 1.0 and same["fs"] > 0.99
    diff = face_verification(astronaut[None], other[None])
    assert diff["fva"] == 0.0 and diff["face_distance"] > 0.6


def test_results_table_lists_each_method_and_names_absent_metrics():
    from exaggerate.report import results_table

    method = {"compatibility_mae": 0.1, "tuning_objective": 0.3, "fid_oracle": None}
    summary = {"queries": 4, "baseline_queries": 2, "explainer": method, "explainer_on_baseline_queries": method,
               "explainer_paper_series": {**method, "compatibility_mae": 0.15},
               "baseline": {**method, "compatibility_mae": 0.2}, "absent": {"mnac": "single-label dataset"}}
    table = results_table(summary)
    assert "| explainer, the paper's series (4 queries) |" in table
    assert "| compatibility MAE (lower) | 0.1 | 0.15 | 0.1 | 0.2 |" in table
    assert "| tuning objective: MAE + tune.fid_weight x fid_oracle (lower) | 0.3 | 0.3 | 0.3 | 0.3 |" in table
    assert "fid_oracle, mean over target bins (lower) | absent |" in table
    assert "- mnac: single-label dataset" in table


def test_a_generator_that_greys_out_or_inverts_the_query_does_not_keep_it():
    from exaggerate.evaluate import reconstruction
    from exaggerate.report import query_kept_text

    rng = np.random.default_rng(0)
    # Queries of two kinds with their own shapes and noise, as a dataset's images are.
    shapes = np.where(rng.random((2, 1, 8, 8)) < 0.5, -1.0, 1.0)
    queries = np.clip(shapes[rng.integers(0, 2, 40)] + rng.normal(0, 0.3, (40, 1, 8, 8)), -1, 1).astype(np.float32)
    close = reconstruction(queries + rng.normal(0, 0.05, queries.shape).astype(np.float32), queries)
    grey = reconstruction(np.zeros_like(queries), queries)
    inverted = reconstruction(-queries, queries)
    assert close["query_kept"] and not grey["query_kept"] and not inverted["query_kept"]
    assert close["median_image_l1"] == grey["median_image_l1"] == pytest.approx(
        float(np.abs(queries - np.median(queries, axis=0)).mean()))
    # The per-pixel median is the best constant image: G drawing it exactly sits at share 1.0.
    median = reconstruction(np.broadcast_to(np.median(queries, axis=0), queries.shape), queries)
    assert median["reconstruction_l1"] == pytest.approx(median["median_image_l1"]) and not median["query_kept"]
    assert query_kept_text(close).endswith("it keeps the query (below 0.5).")
    text = query_kept_text(inverted)
    assert text.startswith("**G does not keep the query.** G reconstructs the queries at L1 ")
    assert f"{inverted['reconstruction_l1'] / inverted['median_image_l1']:.2f} of the" in text
    assert query_kept_text({"reconstruction_l1": 0.1}) == ""


def test_evaluate_says_whether_the_oracle_reads_the_series_change_as_the_class():
    from exaggerate.evaluate import oracle_reading
    from exaggerate.report import oracle_reading_text

    real = 0.8
    reads, short = oracle_reading(0.76, real), oracle_reading(0.64, real)
    assert reads["oracle_agreement_share"] == pytest.approx(0.95) and reads["oracle_reads_change"]
    assert short["oracle_agreement_share"] == pytest.approx(0.8) and not short["oracle_reads_change"]
    assert oracle_reading(0.5625, 0.625)["oracle_reads_change"]  # exactly on the line (0.9) passes
    # Above the real images' (a series set can beat real data) still reads as the class.
    assert oracle_reading(0.9, real)["oracle_agreement_share"] > 1
    # Refused oracle (None), no real reference, or a reference that is no correlation at all: nothing said.
    assert oracle_reading(None, real) == oracle_reading(0.5, None) == oracle_reading(0.5, 0.0) == {}
    text = oracle_reading_text({"oracle_agreement": 0.64, **short}, real)
    assert text.startswith("**The oracle reads less class change than f does.**")
    assert "0.640, is 0.80 of the real images' (0.800), below 0.9" in text and "series grid" in text
    assert oracle_reading_text({"oracle_agreement": 0.76, **reads}, real).endswith(
        "it reads the series' change as the class's (at or above 0.9).")
    assert oracle_reading_text({"oracle_agreement": None}, real) == ""


def test_oracle_index_of_names_its_columns():
    from exaggerate.oracle import Oracle, OracleNet

    oracle = Oracle(OracleNet(1, [4], 8, 3), ["Sneaker", "Bag", "Ankle boot"], "multiclass")
    assert oracle.index_of("Ankle boot") == 2
    assert oracle.index_of("Sneaker") == 0
    assert oracle.index_of("Smiling") is None


def test_time_in_turns_interleaves_methods_per_batch_and_repeats_the_fast_one():
    from exaggerate.evaluate import time_in_turns
    calls = []

    def method(name, scale):
        def fn(xb):
            calls.append((name, len(xb)))
            return xb * scale
        return fn

    x = torch.arange(5.0)[:, None]
    out, seconds = time_in_turns({"fast": (method("fast", 2), 3), "slow": (method("slow", -1), 1)}, x, 2)
    # Batches of 2, 2 and 1; per batch the fast method three times, then the slow one once.
    assert calls == [("fast", 2)] * 3 + [("slow", 2)] + [("fast", 2)] * 3 + [("slow", 2)] + \
        [("fast", 1)] * 3 + [("slow", 1)]
    assert torch.equal(out["fast"], 2 * x) and torch.equal(out["slow"], -x)
    assert set(seconds) == {"fast", "slow"} and all(t > 0 for t in seconds.values())
    # A progress bar advances by each turn's queries, after both methods have had it.
    steps = []

    class Bar:
        def update(self, n):
            steps.append((n, len(calls)))

    calls.clear()
    time_in_turns({"fast": (method("fast", 2), 1), "slow": (method("slow", -1), 1)}, x, 2, Bar())
    assert steps == [(2, 2), (2, 4), (1, 6)]


def test_oracle_task_accuracy_judges_the_explained_decision_only():
    from exaggerate.config import Base
    from exaggerate.oracle import task_accuracy

    names = ["T-shirt", "Trouser", "Sneaker", "Ankle boot"]
    p = torch.tensor([[0.1, 0.1, 0.2, 0.6], [0.1, 0.1, 0.7, 0.1], [0.7, 0.0, 0.1, 0.2], [0.9, 0.0, 0.05, 0.05],
                      [0.0, 0.9, 0.04, 0.06]])
    y = torch.tensor([3, 2, 3, 0, 2])
    # Boot vs sneaker: the T-shirt image is not the task's; image 2 is a boot among the two
    # classes (0.2 > 0.1) though the T-shirt column is larger; image 4 is taken for a boot.
    pair = task_accuracy(p, y, names, "multiclass", Base(target="Ankle boot", negatives=["Sneaker"]))
    assert pair == {"task_accuracy": 0.75, "task_images": 4, "task_classes": ["Ankle boot", "Sneaker"]}
    # One-vs-rest: every image counts; image 2 is now lost to the T-shirt.
    rest = task_accuracy(p, y, names, "multiclass", Base(target="Ankle boot", negatives=[]))
    assert rest["task_accuracy"] == 0.8 and rest["task_images"] == 5
    attrs = task_accuracy(torch.tensor([[0.7, 0.2], [0.4, 0.9]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
                          ["Smiling", "Male"], "multilabel", Base(target="Smiling"))
    assert attrs["task_accuracy"] == 0.5


def test_small_datasets_train_the_oracle_for_more_epochs_and_a_weak_one_is_refused():
    from exaggerate.config import Oracle as OracleParams
    from exaggerate.evaluate import oracle_refusal
    from exaggerate.oracle import oracle_epochs

    params = OracleParams(epochs=2, min_steps=900, batch_size=128)
    assert oracle_epochs(params, 60000) == 2      # 469 steps an epoch: 2 epochs reach 900
    assert oracle_epochs(params, 1580) == 70      # 13 steps an epoch
    assert oracle_refusal({"task_accuracy": 0.93}, 0.9) is None
    assert "0.5400, below evaluate.oracle_gate 0.9" in oracle_refusal({"task_accuracy": 0.54}, 0.9)
    assert "rerun the train_oracle stage" in oracle_refusal({"test_accuracy": 0.9}, 0.9)


def test_the_attribute_report_flags_what_the_series_change_beyond_real_data():
    from exaggerate.audit import attribute_report, report_table, task_rows

    rng = np.random.default_rng(0)
    q, n, r = 40, 10, 400
    t = (np.arange(n) + 0.5) / n
    names = ["target", "confounder", "tied", "still", "other"]
    # Along the series: the target rises, "confounder" falls with it, "tied" rises with it, and the
    # task's other class ("other") falls faster than on real images: the series exaggerate.
    p_series = np.stack([np.stack([t, 0.8 - 0.6 * t, 0.2 + 0.4 * t, np.full(n, 0.3), 1 - t], -1)] * q)
    p_series = p_series + rng.normal(0, 0.02, p_series.shape)
    # Real images: "tied" co-varies with f's bin as much as along the series, "confounder" not at all.
    bins = rng.integers(0, n, r)
    tb = (bins + 0.5) / n
    p_real = np.stack([tb, np.full(r, 0.5), 0.2 + 0.4 * tb, np.full(r, 0.3), 0.8 - 0.6 * tb], -1)
    p_real = p_real + rng.normal(0, 0.02, (r, 5))
    rows = attribute_report(p_series, p_real, bins, names, "target", margin=0.1, resamples=500)
    by = {row["class"]: row for row in rows}
    # One-vs-rest (no negatives named): every class but the target is a row, "other" flagged.
    assert set(by) == {"confounder", "tied", "still", "other"} and rows[0]["class"] == "confounder"
    assert by["other"]["flagged"]
    assert by["confounder"]["flagged"] and by["confounder"]["series_slope"] == pytest.approx(-0.6, abs=0.03)
    assert by["confounder"]["ci_low"] < by["confounder"]["series_slope"] < by["confounder"]["ci_high"]
    assert not by["tied"]["flagged"] and by["tied"]["excess"] == pytest.approx(0, abs=0.05)
    assert not by["still"]["flagged"]
    # A pair task: its other class is the class evidence, listed for scale and never flagged.
    rows = attribute_report(p_series, p_real, bins, names, "target", margin=0.1, resamples=500, negatives=("other",))
    assert {row["class"] for row in rows} == {"confounder", "tied", "still"}
    task = task_rows(p_series, p_real, bins, names, ["target", "other", "absent"])
    assert [row["class"] for row in task] == ["target", "other"]
    assert task[0]["series_slope"] == pytest.approx(1, abs=0.03) and task[1]["series_slope"] == pytest.approx(-1, abs=0.03)
    assert task[1]["real_slope"] == pytest.approx(-0.6, abs=0.05)
    text = report_table(rows, task, 0.1)
    assert "| other |" not in text and "task's own classes" in text and "other -1.0" in text


@pytest.mark.parametrize("flip", [False, True])
def test_oracle_training_mirrors_images_only_when_asked_and_decays_its_rate(flip, monkeypatch):
    from exaggerate.config import Oracle as OracleParams
    from exaggerate import oracle as O

    image = torch.zeros(1, 1, 4, 4)
    image[..., 0] = 1.0  # lit on the left only

    class OneImage:
        def images(self, idx):
            return image.expand(len(idx), -1, -1, -1).clone()

    seen, rates = [], []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.w.expand(len(x), 2) * x.mean()

    class RecordingAdam(torch.optim.Adam):
        def step(self, *args, **kwargs):
            rates.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(O.torch.optim, "Adam", RecordingAdam)
    params = OracleParams(batch_size=16, lr=0.01, flip=flip)
    O._fit(Recorder(), OneImage(), torch.zeros(64, dtype=torch.long), np.arange(64), "multiclass", params, 2, 0,
           torch.device("cpu"))
    x = torch.cat(seen)
    mirrored = (x[..., -1] == 1).flatten()
    assert len(x) == 128 and bool(mirrored.any()) == flip and bool((~mirrored).any())
    if flip:
        assert 0.3 < mirrored.float().mean() < 0.7
    # Cosine decay: the full rate at the first step, falling to near 0 at the last.
    assert rates[0] == pytest.approx(0.01) and rates[-1] < 0.01 * 0.05 and rates == sorted(rates, reverse=True)
