"""Auditing what else changes along the series: the attribute report.

A series should change what f treats as evidence of the target, and the rest only as much as
real data ties it to the target. For every class (or attribute) of the oracle other than the
target, this compares

- how much the oracle's probability of that class changes along the series: the least-squares
  slope of p_oracle(class) over the target bins' centres, averaged over the queries (per unit of
  f's posterior), with a bootstrap 95% interval over the queries;
- how much it co-varies with the target on real data: the same slope over the real images of
  the same split, grouped by f's posterior bin (each bin weighted equally, as in a series).

A class whose series slope exceeds its real slope by more than `margin`, with the interval
excluding the real slope, is flagged: the series change it more than real data explains. The
task's own classes (the target and the negatives `base.negatives` names) are the class evidence,
not something else: they are listed for scale and never flagged. On
CelebA this reads, for instance, what else a Smiling classifier's series change (the paper's
biased-classifier experiment found gender); on Fashion-MNIST, the other garment classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .errors import ExaggerateError


class AuditError(ExaggerateError):
    """An audit that cannot be computed; the message says why."""


def bin_centres(num_bins: int) -> np.ndarray:
    return (np.arange(num_bins) + 0.5) / num_bins


def slopes(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Least-squares slope of each row of `values` (..., N) against x (N,)."""
    xc = x - x.mean()
    return ((values - values.mean(-1, keepdims=True)) * xc).sum(-1) / (xc ** 2).sum()


def real_slopes(p_real: np.ndarray, real_bins: np.ndarray, num_bins: int) -> np.ndarray:
    """(A,) slope of each class's mean probability per f-bin over the bins holding real images;
    NaN when the real images fall in fewer than 2 bins (no slope to compare with)."""
    present = [k for k in range(num_bins) if (real_bins == k).any()]
    if len(present) < 2:
        return np.full(p_real.shape[1], np.nan)
    means = np.stack([p_real[real_bins == k].mean(0) for k in present], axis=1)  # (A, bins present)
    return slopes(means, bin_centres(num_bins)[present])


def attribute_report(p_series: np.ndarray, p_real: np.ndarray, real_bins: np.ndarray, names: list[str],
                     target: Optional[str], margin: float = 0.1, resamples: int = 2000, seed: int = 0,
                     negatives: tuple[str, ...] = ()) -> list[dict]:
    """Rows ranked by excess (series slope - real slope), one per oracle class but the task's own:
    the target and its named negatives (a pair task's other class falls as the target rises; that
    is the class evidence, not a confounder).

    p_series: (Q, N, A) oracle probabilities of each query's series; p_real: (R, A) of real
    images whose f-bins are real_bins."""
    q, n, a = p_series.shape
    if q < 2:
        raise AuditError(f"{q} series: an interval over queries needs at least 2")
    per_query = slopes(np.moveaxis(p_series, 1, 2), bin_centres(n))  # (Q, A)
    series = per_query.mean(0)
    rng = np.random.default_rng(seed)
    boot = np.stack([per_query[rng.integers(0, q, q)].mean(0) for _ in range(resamples)])
    low, high = np.quantile(boot, [0.025, 0.975], axis=0)
    real = real_slopes(p_real, real_bins, n)
    rows = []
    for j, name in enumerate(names):
        if name == target or name in negatives:
            continue
        known = bool(np.isfinite(real[j]))
        excess = float(series[j] - real[j]) if known else None
        outside = known and not (low[j] <= real[j] <= high[j])
        rows.append({"class": name, "series_slope": float(series[j]), "ci_low": float(low[j]),
                     "ci_high": float(high[j]), "real_slope": float(real[j]) if known else None, "excess": excess,
                     "flagged": bool(known and abs(excess) > margin and outside)})
    rows.sort(key=lambda r: -abs(r["excess"] if r["excess"] is not None else r["series_slope"]))
    return rows


def task_rows(p_series: np.ndarray, p_real: np.ndarray, real_bins: np.ndarray, names: list[str],
              classes: list[str]) -> list[dict]:
    """The task's own classes' slopes (the target first, then its negatives), for scale; a class
    the oracle does not have is left out."""
    n = p_series.shape[1]
    rows = []
    for name in classes:
        if name not in names:
            continue
        j = names.index(name)
        real = float(real_slopes(p_real[:, [j]], real_bins, n)[0])
        rows.append({"class": name, "series_slope": float(slopes(p_series[:, :, j], bin_centres(n)).mean()),
                     "real_slope": real if np.isfinite(real) else None})
    return rows


def report_table(rows: list[dict], task: list[dict], margin: float) -> str:
    def fmt(v):
        return "absent" if v is None else f"{v:+.3f}"
    lines = ["| class | series slope [95% CI] | real-data slope | excess | flagged |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['class']} | {r['series_slope']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | "
                     f"{fmt(r['real_slope'])} | {fmt(r['excess'])} | {'YES' if r['flagged'] else ''} |")
    lines.append("")
    lines.append("Slopes are the oracle's probability of each class per unit of f's posterior, along the series "
                 "(mean over queries, bootstrap 95% interval) and over real images grouped by f's bin. Flagged: the "
                 f"series change the class more than real data explains (|excess| > {margin:g}, interval excluding "
                 "the real slope).")
    if any(r["real_slope"] is None for r in rows):
        lines.append("Real-data slopes are absent: the real images fall in fewer than 2 of f's bins, so nothing "
                     "is flagged.")
    if task:
        scale = "; ".join(f"{t['class']} {t['series_slope']:+.3f} (real data {fmt(t['real_slope'])})" for t in task)
        lines.append(f"The task's own classes, for scale and never flagged (series slope): {scale}.")
    return "\n".join(lines) + "\n"


def report_figure(rows: list[dict], target_name: Optional[str]):
    from . import plots

    plt = plots.plt
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
    y = np.arange(len(rows))[::-1]
    series = np.array([r["series_slope"] for r in rows])
    err = np.array([[r["series_slope"] - r["ci_low"], r["ci_high"] - r["series_slope"]] for r in rows]).T
    ax.barh(y + 0.18, series, height=0.36, xerr=err, color=["#d0641b" if r["flagged"] else "#5b7fa6" for r in rows],
            label="along the series (95% CI)")
    ax.barh(y - 0.18, [r["real_slope"] or 0.0 for r in rows], height=0.36, color="#bbbbbb", label="real data")
    ax.set_yticks(y, [r["class"] + (" *" if r["flagged"] else "") for r in rows])
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel("change of the oracle's probability per unit of f's posterior")
    ax.set_title(f"What else changes along the series of p({target_name}) (* flagged)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def attribute_audit(cfg, paths: dict, out_dir: Path, margin: float = 0.1, tracker=None) -> list[dict]:
    """The report on the pipeline's outputs: the explain stage's series, the oracle, the real
    images of the same split. Writes attributes.csv, attributes.md and attributes.png."""
    import pandas as pd
    import torch

    from .datasets import open_dataset
    from .evaluate import real_reference_rows
    from .io import load_npz, read_json, save_figure, write_text
    from .metrics import batched
    from .oracle import load_oracle
    from .posteriors import read_table
    from .utils import resolve_device

    base, device = cfg.base, resolve_device(cfg.base.device)
    gate = read_json(Path(paths["train_oracle"]) / "metrics.json").get("task_accuracy")
    if gate is None or gate < cfg.evaluate.oracle_gate:
        raise AuditError(f"the oracle's task accuracy is {gate}, below evaluate.oracle_gate "
                         f"{cfg.evaluate.oracle_gate}: it cannot judge what the series change")
    oracle = load_oracle(Path(paths["train_oracle"]) / "oracle.pt", base).to(device)
    data = load_npz(Path(paths["explain"]) / "series.npz", "series file", ("series",))
    series = torch.from_numpy(data["series"])
    q, n = series.shape[:2]
    p_series = batched(lambda t: oracle.probabilities(t.to(device)), series.flatten(0, 1)).reshape(q, n, -1).numpy()
    dataset = open_dataset(base)
    ids, real_bins = real_reference_rows(read_table(Path(paths["posteriors"]) / "posteriors.csv"), cfg.explain.split)
    p_real = batched(lambda t: oracle.probabilities(t.to(device)), dataset.images(dataset.index_of(ids))).numpy()
    negatives = tuple(base.negatives or ())
    rows = attribute_report(p_series, p_real, real_bins, oracle.names, base.target, margin, negatives=negatives)
    task = task_rows(p_series, p_real, real_bins, oracle.names, [base.target, *negatives])
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out_dir / "attributes.csv", index=False)
    text = report_table(rows, task, margin)
    write_text(out_dir / "attributes.md", f"# Attribute report: {q} series of p({base.target}), {cfg.explain.split} "
                                          f"split\n\n{text}")
    fig = report_figure(rows, base.target)
    save_figure(out_dir / "attributes.png", fig)
    if tracker is not None:
        tracker.figure(fig, "attributes.png")
        tracker.artifact(out_dir / "attributes.md")
        tracker.artifact(out_dir / "attributes.csv")
        tracker.metrics({"flagged_classes": sum(r["flagged"] for r in rows)})
    from . import plots
    plots.close(fig)
    print(text, end="")
    return rows
