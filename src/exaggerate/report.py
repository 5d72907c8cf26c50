"""The evaluate stage's report: the results table (results.md) and its figures."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from . import plots
from .config import Base
from .io import save_figure, write_json, write_text
from .posteriors import bin_centre
from .tracking import Tracker

TABLE_ROWS = [
    ("flip_rate", "flip rate (higher is better)"), ("compatibility_mae", "compatibility MAE (lower)"),
    ("compatibility_corr", "compatibility correlation (higher)"), ("monotonic_share", "monotonic share (higher)"),
    ("oracle_agreement", "oracle agreement (higher)"), ("fid_oracle", "fid_oracle, mean over target bins (lower)"),
    ("kid_oracle", "KID_oracle, mean over target bins (lower)"),
    ("fid_oracle_pooled", "fid_oracle, all bins pooled vs all real images (lower)"),
    ("fid_oracle_counterfactuals", "fid_oracle, counterfactuals vs queries (lower)"),
    ("sfid_oracle", "sFID_oracle (lower)"), ("fid_inception", "FID, Inception-v3 (lower)"),
    ("cout", "COUT (higher)"), ("mnac", "MNAC (lower)"), ("cd", "CD (lower)"), ("fva", "FVA (higher)"),
    ("fs", "FS (higher)"), ("reconstruction_l1", "reconstruction L1 (lower)"), ("cycle_l1", "cycle L1 (lower)"),
    ("tuning_objective", "tuning objective: MAE + tune.fid_weight x fid_oracle (lower)"),
    ("seconds_per_series", "seconds per series"),
]


def results_table(summary: dict) -> str:
    def fmt(v):
        return "absent" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    cols = [("explainer", f"explainer ({summary['queries']} queries)"),
            ("explainer_paper_series", f"explainer, the paper's series ({summary['queries']} queries)"),
            ("explainer_on_baseline_queries", f"explainer ({summary['baseline_queries']} queries)"),
            ("baseline", f"baseline ({summary['baseline_queries']} queries)")]
    lines = ["| metric | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, label in TABLE_ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt(summary[c].get(key)) for c, _ in cols) + " |")
    lines.append("")
    if summary.get("explain_probes"):
        lines.append(f"The explainer's series are calibrated (explain.probes = {summary['explain_probes']}): G and f "
                     f"first score {summary['explain_probes']} probe conditions per query, then G generates the "
                     "series at the conditions where f crosses the bin centres. Its time per series includes "
                     "both generator passes and f's scoring.")
    if summary.get("explain_detail"):
        lines.append(f"The query's own detail is kept (explain.detail = {summary['explain_detail']}): what G's "
                     "reconstruction misses is added back where G changes little, fading with the distance from "
                     "the query's bin. The reconstruction L1 is G's own, before the detail is added.")
    if summary.get("speedup_explainer_vs_baseline"):
        def timings(name):
            by_batch = summary[name].get("seconds_per_series_by_batch") or {}
            return ", ".join(f"{t * 1000:.3g} ms at {b}" for b, t in by_batch.items())
        lines.append(f"The explainer produced a series {summary['speedup_explainer_vs_baseline']:.0f} times faster "
                     "than the baseline, each method at its fastest number of queries per call, measured in "
                     f"turns in the same process (explainer: {timings('explainer_on_baseline_queries')}; "
                     f"baseline: {timings('baseline')} per series).")
    if summary.get("cost_per_series"):
        lines.append(cost_text(summary["cost_per_series"], summary.get("speedup_explainer_vs_baseline")))
    kept = query_kept_text(summary["explainer"])
    if kept:
        lines.append(kept)
    real = summary.get("real_images") or {}
    if real.get("oracle_agreement") is not None:
        lines.append(f"Reference: the {real['images']} real {real['split']} images, grouped by f's posterior bin "
                     "and each bin weighted equally (a series set holds one image per bin), give oracle "
                     f"agreement {real['oracle_agreement']:.4f}: what real data reaches under this oracle.")
        reading = oracle_reading_text(summary["explainer"], real["oracle_agreement"])
        if reading:
            lines.append(reading)
    if summary.get("oracle_test_accuracy") is not None:
        lines.append(f"Oracle test accuracy: {summary['oracle_test_accuracy']:.4f} over all classes.")
    if summary.get("oracle_task_accuracy") is not None:
        verdict = "passed" if summary["oracle_task_accuracy"] >= summary["oracle_gate"] else \
            "FAILED: oracle-based metrics refused"
        lines.append(f"Oracle accuracy on held-out images of the task's classes: {summary['oracle_task_accuracy']:.4f} "
                     f"(gate evaluate.oracle_gate {summary['oracle_gate']:g}: {verdict}).")
    if summary["absent"]:
        lines.append("")
        lines.append("Absent metrics:")
        lines += [f"- {k}: {v}" for k, v in sorted(summary["absent"].items())]
    return "\n".join(lines) + "\n"


# What a run whose G does not keep the query shows, and what to do (evaluate.reconstruction).
QUERY_LOST = ("the series are variations of one mode of G rather than of each query (a seed that settles there "
              "usually inverts the query's brightness or greys it out). Look at the series grid, and train another "
              "seed (explainer.seed).")


def reconstruction_text(l1: float, constant: float) -> str:
    """G's reconstruction L1 against the one of the queries' per-pixel median image."""
    return (f"G reconstructs the queries at L1 {l1:.3f}, {l1 / constant:.2f} of the {constant:.3f} that one constant "
            "image (their per-pixel median) reaches")


def query_kept_text(explainer: dict) -> str:
    """Whether G keeps the query (evaluate.reconstruction), in one paragraph; empty when the
    figures are absent."""
    from .evaluate import QUERY_KEPT_SHARE

    l1, constant = explainer.get("reconstruction_l1"), explainer.get("median_image_l1")
    if l1 is None or not constant:
        return ""
    if explainer.get("query_kept"):
        return f"{reconstruction_text(l1, constant)}: it keeps the query (below {QUERY_KEPT_SHARE:g})."
    return (f"**G does not keep the query.** {reconstruction_text(l1, constant)}, at or above "
            f"{QUERY_KEPT_SHARE:g}: {QUERY_LOST}")


# What a run whose series move f more than the oracle shows, and what to look at.
ORACLE_UNMOVED = ("the series move f by edits the oracle does not read as the class. Either G found changes that "
                  "move this f without changing the class as the oracle sees it, or f relies on evidence other "
                  "than the class's (which is what an audit looks for): read the series grid before taking the "
                  "series as class evidence.")


def oracle_reading_text(explainer: dict, real_agreement: float) -> str:
    """Whether the oracle reads the series' change as the class's (evaluate.oracle_reading), in
    one paragraph; empty when the figures are absent."""
    from .evaluate import ORACLE_READS_SHARE

    share = explainer.get("oracle_agreement_share")
    if share is None:
        return ""
    figures = (f"The oracle's agreement with the explainer's series, {explainer['oracle_agreement']:.3f}, is "
               f"{share:.2f} of the real images' ({real_agreement:.3f})")
    if explainer.get("oracle_reads_change"):
        return f"{figures}: it reads the series' change as the class's (at or above {ORACLE_READS_SHARE:g})."
    return f"**The oracle reads less class change than f does.** {figures}, below {ORACLE_READS_SHARE:g}: {ORACLE_UNMOVED}"


def cost_text(cost: dict, speedup) -> str:
    """What the speed-up is made of (evaluate.series_cost), in one paragraph."""
    e, b = cost["explainer"], cost["baseline"]
    g_mf, f_mf = cost.get("generator_mflops_per_image"), cost.get("classifier_mflops_per_image")
    text = (f"What a series costs (counted on {cost['queries']} queries): the explainer ran G on "
            f"{e['generator_images']:.1f} images and f on {e['classifier_images']:.1f}; the baseline ran f "
            f"forward and backward on {b['classifier_images']:.0f} images (each bin image needed "
            f"{b['steps_per_image']:.0f} Adam steps on average and at most {b['steps_per_image_max']:.0f}, "
            f"{b['reached_share']:.0%} reached their bin; an image leaves the search once it has).")
    if g_mf is not None and f_mf is not None:
        text += (f" G costs {g_mf:.3g} MFLOPs per image and f {f_mf:.3g}: {e['gflops']:.3g} GFLOPs per series "
                 f"against the baseline's {b['gflops']:.3g} (its backward counted as twice the forward), "
                 f"a ratio of {cost['flops_ratio']:.0f}")
        if speedup and e.get("gflop_per_s") and b.get("gflop_per_s"):
            text += (f"; the time ratio, {speedup:.0f}, is that times the quotient of the rates the two ran at "
                     f"({e['gflop_per_s']:.3g} GFLOP/s against {b['gflop_per_s']:.3g}).")
        else:
            text += "."
    return text


def write_report(out_dir: Path, summary: dict, compared: dict, base: Base, tracker: Tracker) -> None:
    """metrics.json, results.md and the figures, also logged to the stage's MLflow run."""
    write_json(out_dir / "metrics.json", summary)
    write_text(out_dir / "results.md", results_table(summary))
    tracker.metrics({f"{m}_{k}": v for m in ("explainer", "explainer_paper_series", "baseline")
                     for k, v in summary[m].items() if isinstance(v, float)})
    tracker.metrics({"speedup": summary["speedup_explainer_vs_baseline"] or 0.0})
    tracker.artifact(out_dir / "results.md")
    figures(out_dir, summary, compared, base, tracker)


def figures(out_dir: Path, summary: dict, compared: dict, base: Base, tracker: Tracker) -> None:
    """compatibility.png/.csv, oracle_agreement.png and series_comparison.png (dvc.yaml's plots)."""
    compatibility_figure(out_dir, summary, base.num_bins, tracker)
    oracle_figure(out_dir, summary, base, tracker)
    comparison_figure(out_dir, compared, base.num_bins, tracker)


def compatibility_figure(out_dir: Path, summary: dict, n: int, tracker: Tracker) -> None:
    centres = bin_centre(np.arange(n), n)
    fig, axes = plots.plt.subplots(1, 2, figsize=(10, 4.3), sharey=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "source_group", "target_centre", "mean_f"])
    for ax, key, title in ((axes[0], "explainer", "explainer"), (axes[1], "baseline", "baseline (pixel search)")):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="ideal")
        for group, curve in summary[key]["compatibility_curves"].items():
            ax.plot(centres, curve, marker="o", markersize=3, label=f"source p in {group}")
            for c, v in zip(centres, curve):
                writer.writerow([key, group, f"{c:.3f}", f"{v:.6f}"])
        ax.set_title(f"{title}: MAE {summary[key]['compatibility_mae']:.3f}")
        ax.set_xlabel("target bin centre")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean f(x_c)")
    fig.tight_layout()
    save_figure(out_dir / "compatibility.png", fig)
    tracker.figure(fig, "compatibility.png")
    plots.close(fig)
    write_text(out_dir / "compatibility.csv", buf.getvalue())


def oracle_figure(out_dir: Path, summary: dict, base: Base, tracker: Tracker) -> None:
    n = base.num_bins
    centres = bin_centre(np.arange(n), n)
    fig, ax = plots.plt.subplots(figsize=(5.5, 4.3))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="p = bin centre")
    if summary["explainer"].get("oracle_curve") is not None:
        curves = [("explainer", f"explainer ({summary['queries']} queries)"),
                  ("baseline", f"baseline ({summary['baseline_queries']} queries)")]
        for key, label in curves:
            ax.plot(centres, summary[key]["oracle_curve"], marker="o", markersize=3,
                    label=f"{label}: agreement {summary[key]['oracle_agreement']:.2f}")
        real = summary.get("real_images") or {}
        if real.get("oracle_curve") and real.get("oracle_agreement") is not None:
            kept = [(c, v) for c, v in zip(centres, real["oracle_curve"]) if v is not None]
            ax.plot(*zip(*kept), marker="s", markersize=3, color="black",
                    label=f"real {real['split']} images in f's bins: {real['oracle_agreement']:.2f}")
    else:  # the file dvc.yaml declares is still written, saying why it is empty
        why = (f"the oracle has no output for {base.target!r}" if summary.get("oracle_task_accuracy") is None or
               summary["oracle_task_accuracy"] >= summary["oracle_gate"] else "the oracle failed its accuracy gate")
        ax.text(0.5, 0.5, why, ha="center", va="center")
    ax.set_xlabel("target bin centre (real images: f's bin)")
    ax.set_ylabel(f"oracle's mean p({base.target})")
    ax.set_title("does an independent classifier see the change?", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(out_dir / "oracle_agreement.png", fig)
    tracker.figure(fig, "oracle_agreement.png")
    plots.close(fig)


def comparison_figure(out_dir: Path, compared: dict, n: int, tracker: Tracker) -> None:
    sub, results = compared["subset"], compared["results"]
    explainer_series, baseline_series = compared["series"]["explainer"], compared["series"]["baseline"]
    p_series = {k: results[k]["p_series"] for k in ("explainer_on_baseline_queries", "baseline")}
    rows = np.argsort(sub["p_query"])[np.linspace(0, len(sub["p_query"]) - 1, min(4, len(sub["p_query"]))).astype(int)]
    q = torch.from_numpy(sub["queries"][rows])
    grid, titles, labels = [], [], []
    for r, qi in zip(rows, q):
        for name, s, ps in (("explainer", explainer_series, p_series["explainer_on_baseline_queries"]),
                            ("baseline", baseline_series, p_series["baseline"])):
            grid.append(torch.cat([qi[None], s[r]]))
            titles.append([f"query f={sub['p_query'][r]:.2f}"] + [f"f={v:.2f}" for v in ps[r]])
            labels.append(name)
    fig = plots.image_grid(torch.stack(grid), titles, row_labels=labels,
                           col_labels=["query"] + [f"bin {k}" for k in range(n)],
                           suptitle="explainer (odd rows) vs pixel-space baseline (even rows), same queries")
    save_figure(out_dir / "series_comparison.png", fig)
    tracker.figure(fig, "series_comparison.png")
    plots.close(fig)


def summarise(compared: dict, reference: dict, split: str, oracle_metrics: dict, oracle_gate: float,
              probes: int, detail: float = 0.0) -> dict:
    """metrics.json: both methods' metrics, the speed-up, the real-image reference and what is absent."""
    results = compared["results"]
    t_explainer = results["explainer"]["seconds_per_series"]
    t_baseline = results["baseline"]["seconds_per_series"]
    summary = {
        "queries": int(len(results["explainer"]["p_series"])),
        "baseline_queries": int(len(results["baseline"]["p_series"])),
        "speedup_explainer_vs_baseline": t_baseline / t_explainer if t_explainer > 0 else None,
        "oracle_test_accuracy": oracle_metrics["test_accuracy"],
        "oracle_task_accuracy": oracle_metrics.get("task_accuracy"), "oracle_gate": oracle_gate,
        "real_images": {"split": split, **reference},
        **{name: {k: v for k, v in r.items() if k != "p_series"} for name, r in results.items()},
        "absent": compared["absent"],
    }
    if compared.get("cost"):
        from .evaluate import add_flop_rates
        summary["cost_per_series"] = add_flop_rates(compared["cost"], {"explainer": t_explainer,
                                                                       "baseline": t_baseline})
    from .evaluate import oracle_reading
    for name in results:
        summary[name].update(oracle_reading(summary[name].get("oracle_agreement"), reference.get("oracle_agreement")))
    if probes:
        summary["explain_probes"] = probes
    if detail:
        summary["explain_detail"] = detail
    return summary
