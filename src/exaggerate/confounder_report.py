"""The planted-confounder audit's report: the detector over every series of both arms, the
shares with their intervals, the pictures and an MLflow run (see confounder.py for the
experiment and the definitions)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import Config
from .confounder import (ARMS, REPORT, ROOT, ArmData, ConfounderError, arm_data, arm_dir, detector_threshold,
                         explainer_params, mark_coverage, mark_scores, seed_dir)
from .io import read_json, write_json, write_text


def bootstrap_interval(per_query: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of per-query values, resampling queries."""
    rng = np.random.default_rng(seed)
    q = len(per_query)
    means = per_query[rng.integers(0, q, (resamples, q))].mean(1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def mark_changes(present: np.ndarray) -> dict[str, np.ndarray]:
    """Per series, from whether the mark is present in each image (Q, N): it appears towards the
    class (absent at the lowest bin, present at the highest), disappears (the reverse), or either."""
    low, high = present[:, 0], present[:, -1]
    return {"toward": high & ~low, "away": low & ~high, "any": high != low}


def coverage_changes(coverage: np.ndarray, min_change: float) -> dict[str, np.ndarray]:
    """Per series, from the mark's coverage in each image (Q, N): at least min_change more of it
    lit at the highest bin than at the lowest (toward the class), as much less (away), and the
    whole mark appearing or disappearing (coverage crossing one half)."""
    delta = coverage[:, -1] - coverage[:, 0]
    whole = mark_changes(coverage >= 0.5)
    return {"toward": delta >= min_change, "away": delta <= -min_change, "whole_toward": whole["toward"],
            "whole_away": whole["away"]}


def judge_detector(data: ArmData, size: int) -> dict:
    """The detector's threshold (from the explainers' unmarked images) and its accuracy on the
    real test images, whose marks are known."""
    val, test = data.splits["val"], data.splits["test"]
    unmarked = val[~data.dataset.marked[val]]
    threshold = detector_threshold(mark_scores(data.dataset.images(unmarked), size))
    found = mark_coverage(data.dataset.images(test), size, threshold) >= 0.5
    truth = data.dataset.marked[test]
    return {"threshold": threshold, "accuracy": float((found == truth).mean()),
            "accuracy_marked": float(found[truth].mean()) if truth.any() else None,
            "accuracy_unmarked": float((~found[~truth]).mean()) if (~truth).any() else None,
            "test_images": int(len(test))}


def summarise_arm(root: Path, arm: str, seeds: list[int], size: int, threshold: float, change_pixels: int) -> dict:
    per_seed, toward, whole, curves, ids = {}, [], [], [], None
    for seed in seeds:
        path = seed_dir(root, arm, seed) / "explain" / "series.npz"
        if not path.is_file():
            raise ConfounderError(f"{path} not found: run the explainer stage of arm {arm}, seed {seed} first "
                                  "(dvc repro audit/dvc.yaml)")
        with np.load(path) as z:
            series, seed_ids = z["series"], list(z["ids"])
        if ids is not None and seed_ids != ids:
            raise ConfounderError(f"{path} explains other queries than seed {seeds[0]}'s; rerun the explainer stages")
        ids = seed_ids
        coverage = mark_coverage(series, size, threshold)
        changes = coverage_changes(coverage, change_pixels / size ** 2)
        per_seed[seed] = {k: float(v.mean()) for k, v in changes.items()}
        toward.append(changes["toward"].astype(float))
        whole.append(changes["whole_toward"].astype(float))
        curves.append(coverage.mean(0))
    per_query, per_query_whole = np.mean(toward, axis=0), np.mean(whole, axis=0)
    low, high = bootstrap_interval(per_query)
    whole_low, whole_high = bootstrap_interval(per_query_whole)
    return {"share_toward": float(per_query.mean()), "ci_low": low, "ci_high": high,
            "share_away": float(np.mean([s["away"] for s in per_seed.values()])),
            "share_whole_toward": float(per_query_whole.mean()), "whole_ci_low": whole_low,
            "whole_ci_high": whole_high,
            "share_whole_away": float(np.mean([s["whole_away"] for s in per_seed.values()])),
            "per_seed": per_seed, "mark_per_bin": np.mean(curves, axis=0).tolist(),
            "mark_per_bin_per_seed": {s: c.tolist() for s, c in zip(seeds, curves)}, "queries": len(ids)}


def side_by_side_figure(root: Path, seed: int, count: int, target: str):
    """The same test queries explained against the biased f (top) and the clean f (bottom)."""
    from . import plots

    rows, labels, titles = [], [], []
    arrays = {arm: np.load(seed_dir(root, arm, seed) / "explain" / "series.npz") for arm in ARMS}
    picks = _pick_queries(arrays["biased"]["labels"], count)
    for arm in ARMS:
        z = arrays[arm]
        for q in picks:
            rows.append(torch.from_numpy(z["series"][q]))
            labels.append(f"{arm} f, query {q}")
            titles.append([f"{p:.2f}" for p in z["p_series"][q]])
    fig = plots.image_grid(torch.stack(rows), titles, row_labels=labels,
                           suptitle=f"series of p({target}) against the biased f (top) and the clean f (bottom); "
                                    f"the mark is the square in the top-left corner (seed {seed})")
    for z in arrays.values():
        z.close()
    return fig


def _pick_queries(labels: np.ndarray, count: int) -> list[int]:
    """Up to `count` queries, alternating negatives and positives, first of each in order."""
    neg, pos = list(np.flatnonzero(labels == 0)), list(np.flatnonzero(labels == 1))
    picks = []
    while len(picks) < count and (neg or pos):
        for group in (neg, pos):
            if group and len(picks) < count:
                picks.append(int(group.pop(0)))
    return picks


def curve_figure(arms: dict[str, dict], num_bins: int, target: str):
    from . import plots

    plt = plots.plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = np.arange(num_bins)
    for arm, colour in zip(ARMS, ("#c0392b", "#2e6da4")):
        s = arms[arm]
        for curve in s["mark_per_bin_per_seed"].values():
            ax.plot(x, curve, color=colour, alpha=0.3, lw=1)
        ax.plot(x, s["mark_per_bin"], color=colour, lw=2.2, marker="o", ms=3,
                label=f"{arm} f: {s['share_toward']:.0%} of series draw more of the mark toward the class")
    ax.set_xticks(x)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"target bin of p({target})")
    ax.set_ylabel("share of the mark's pixels lit (mean)")
    ax.set_title("the planted mark along the series (thin: one explainer seed)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def report_text(summary: dict) -> str:
    a, det = summary["arms"], summary["detector"]
    lines = [f"# Planted-confounder audit: p({summary['target']}), {summary['queries']} test queries, "
             f"explainer seeds {summary['seeds']}", "",
             f"The mark (a white {summary['mark_size']}x{summary['mark_size']}-pixel square, top-left) was on "
             f"{summary['rate_positive']:.0%} of the biased f's positive and {summary['rate_negative']:.0%} of its "
             f"negative training images; on {summary['mark_rate']:.0%} of the clean f's, of the explainers' and of "
             "the test images, independently of the class.", "",
             "| f | series that draw the mark toward the class [95% CI] | the whole mark appears [95% CI] | "
             "draw less of it | test accuracy (mark independent) | along the bias | against it |",
             "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        s, r = a[arm], summary["reliance"][arm]
        lines.append(f"| {arm} | {s['share_toward']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] | "
                     f"{s['share_whole_toward']:.3f} [{s['whole_ci_low']:.3f}, {s['whole_ci_high']:.3f}] | "
                     f"{s['share_away']:.3f} | {r['accuracy_independent']:.3f} | {r['accuracy_along']:.3f} | "
                     f"{r['accuracy_against']:.3f} |")
    lines += ["", f"A series draws the mark toward the class when its image of the highest bin has at least "
              f"{summary['change_pixels']} more of the mark's {summary['mark_size'] ** 2} pixels lit than its image "
              "of the lowest bin; the whole mark appears when at least half of it is lit at the highest bin and "
              "less than half at the lowest. Shares are means over the explainer seeds; the intervals resample the "
              "queries. Accuracy along the bias: every positive test image marked and no negative; against it: the "
              "reverse.", "",
              "Mark coverage per bin (share of its pixels lit, mean over the series): " + "; ".join(
                  f"{arm} " + " ".join(f"{v:.2f}" for v in a[arm]["mark_per_bin"]) for arm in ARMS) + ".", "",
              f"Detector: a pixel of the mark is lit above {det['threshold']:.3f}; on the real test images (the mark "
              f"there when at least half of it is lit) it is {det['accuracy']:.3f} accurate (marked "
              f"{det['accuracy_marked']:.3f}, unmarked {det['accuracy_unmarked']:.3f}).", "",
              f"Checks: biased f's share >= 0.5: {'yes' if a['biased']['share_toward'] >= 0.5 else 'NO'}; "
              f"clean f's share <= 0.1: {'yes' if a['clean']['share_toward'] <= 0.1 else 'NO'}."]
    per_seed = ", ".join(f"{arm} seed {s}: {v['toward']:.3f}" for arm in ARMS for s, v in a[arm]["per_seed"].items())
    lines += ["", f"Per seed: {per_seed}. Explainers of {summary['explainer_steps']} steps."]
    return "\n".join(lines) + "\n"


def report_stage(cfg: Config, root: Path = ROOT, out: Path = REPORT, tracker=None) -> dict:
    """Judge every series with the detector; write confounder.md/.json/.png and the curve."""
    from . import plots
    from .io import save_figure

    a = cfg.audit
    data = arm_data(cfg, "clean")  # explainers' and test images: the same in both arms
    detector = judge_detector(data, a.mark_size)
    if detector["accuracy"] < a.detector_gate:
        raise ConfounderError(f"the mark detector is {detector['accuracy']:.3f} accurate on the real test images, below "
                              f"audit.detector_gate {a.detector_gate}: the mark (audit.mark_size {a.mark_size}) is not "
                              "told apart from this dataset's corners")
    arms = {arm: summarise_arm(root, arm, a.seeds, a.mark_size, detector["threshold"], a.change_pixels)
            for arm in ARMS}
    reliance_of = {arm: read_json(arm_dir(root, arm) / "reliance.json") for arm in ARMS}
    summary = {"target": cfg.base.target, "seeds": a.seeds, "queries": arms["biased"]["queries"],
               "mark_size": a.mark_size, "change_pixels": a.change_pixels, "rate_positive": a.rate_positive, "rate_negative": a.rate_negative,
               "mark_rate": data.rate, "detector": detector, "arms": arms, "reliance": reliance_of,
               "explainer_steps": explainer_params(cfg, a.seeds[0]).steps}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "confounder.json", summary)
    text = report_text(summary)
    write_text(out / "confounder.md", text)
    grid = side_by_side_figure(root, a.seeds[0], 4, cfg.base.target)
    save_figure(out / "confounder.png", grid)
    curve = curve_figure(arms, cfg.base.num_bins, cfg.base.target)
    save_figure(out / "confounder_curve.png", curve)
    if tracker is not None:
        tracker.figure(grid, "confounder.png")
        tracker.figure(curve, "confounder_curve.png")
        tracker.artifact(out / "confounder.md")
        tracker.artifact(out / "confounder.json")
        metrics = {"detector_accuracy": detector["accuracy"]}
        for arm in ARMS:
            metrics |= {f"{arm}_share_toward": arms[arm]["share_toward"], f"{arm}_ci_low": arms[arm]["ci_low"],
                        f"{arm}_share_whole_toward": arms[arm]["share_whole_toward"],
                        f"{arm}_ci_high": arms[arm]["ci_high"],
                        f"{arm}_accuracy_gap": reliance_of[arm]["accuracy_gap"],
                        f"{arm}_accuracy_independent": reliance_of[arm]["accuracy_independent"]}
        tracker.metrics(metrics)
    plots.close(grid)
    plots.close(curve)
    print(text, end="")
    return summary
