"""Posteriors of f on every image, posterior bins, and calibrated sampling (METHOD.md, step 3)."""
from __future__ import annotations

import csv
import io as _io
import math
from pathlib import Path

import numpy as np
import torch

from . import plots
from .classifier import BlackBox, predict
from .config import Base, Bin
from .datasets import ImageDataset
from .io import save_figure, write_json, write_text
from .tracking import Tracker
from .utils import resolve_device


class PosteriorError(ValueError):
    pass


def bin_index(p: np.ndarray, num_bins: int) -> np.ndarray:
    """k = min(floor(N p), N - 1)."""
    return np.minimum(np.floor(np.asarray(p) * num_bins).astype(np.int64), num_bins - 1)


def bin_centre(k, num_bins: int):
    return (np.asarray(k) + 0.5) / num_bins


def check_posteriors(p: np.ndarray, source: str) -> None:
    bad = ~np.isfinite(p)
    if bad.any():
        raise PosteriorError(f"classifier {source} returned {int(bad.sum())} NaN or infinite posteriors; "
                             "refusing to bin them")
    if len(p) and (p.min() < 0 or p.max() > 1):
        raise PosteriorError(
            f"classifier {source} returned values in [{p.min():.3g}, {p.max():.3g}], outside [0, 1]: "
            "it looks like it returns logits, not probabilities; set classifier.external.output: logit")


def compute_posteriors(f: BlackBox, dataset: ImageDataset, splits: dict[str, np.ndarray], base: Base,
                       batch_size: int) -> list[dict]:
    device = resolve_device(base.device)
    f = f.to(device)
    rows = []
    for split, idx in splits.items():
        loader = torch.utils.data.DataLoader(dataset.torch_dataset(idx), batch_size=batch_size)
        p, y = predict(f, loader, device, progress=f"posteriors on {split}")
        check_posteriors(p, f.source)
        bins = bin_index(p, base.num_bins)
        for i, pi, yi, bi in zip(idx, p, y, bins):
            row = {"id": dataset.ids[i], "split": split}
            row.update({f"label_{n}": int(v) for n, v in zip(dataset.label_names, yi)})
            row.update({"p": float(pi), "bin": int(bi)})
            rows.append(row)
    return rows


def write_table(path: str | Path, rows: list[dict]) -> None:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["id"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.8f}" if isinstance(v, float) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


def read_table(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first (dvc repro)")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["p"] = float(r["p"])
        r["bin"] = int(r["bin"])
        for k in r:
            if k.startswith("label_"):
                r[k] = int(r[k])
    return rows


def posterior_stage(f: BlackBox, dataset: ImageDataset, splits, base: Base, batch_size: int,
                    out_dir: str | Path, tracker: Tracker = Tracker()) -> dict:
    out_dir = Path(out_dir)
    rows = compute_posteriors(f, dataset, splits, base, batch_size)
    write_table(out_dir / "posteriors.csv", rows)
    target = f"label_{dataset.label_names[0]}"
    summary = {}
    for split in splits:
        sel = [r for r in rows if r["split"] == split]
        p = np.array([r["p"] for r in sel])
        y = np.array([r[target] for r in sel])
        rel = plots.reliability(p, y, base.num_bins)
        summary[split] = {"images": len(sel), "bin_counts": rel["count"], "ece": rel["ece"], "brier": rel["brier"]}
    write_json(out_dir / "summary.json", summary)
    tracker.metrics({f"{s}_ece": v["ece"] for s, v in summary.items()})
    return summary


# ----------------------------------------------------------------------------- calibrated sampling

def calibrated_sample(p: np.ndarray, y: np.ndarray, num_bins: int, per_bin: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """Pick up to `per_bin` images per posterior bin k such that the share of positives lies
    in the bin's range [k/N, (k+1)/N] (as close to the bin's mean posterior as the images
    allow), taking as many images as that constraint permits. Returns the chosen positions
    (sorted) and one report per bin."""
    if num_bins < 2:
        raise PosteriorError(f"num_bins must be >= 2, got {num_bins}")
    if per_bin <= 0:
        raise PosteriorError(f"bin.per_bin must be > 0, got {per_bin}")
    bins = bin_index(p, num_bins)
    chosen, report = [], []
    for k in range(num_bins):
        members = np.flatnonzero(bins == k)
        pos, neg = members[y[members] == 1], members[y[members] == 0]
        lo, hi = k / num_bins, (k + 1) / num_bins
        target = float(np.clip(p[members].mean(), lo, hi)) if len(members) else (lo + hi) / 2
        best = None
        for m in range(min(per_bin, len(members)), 0, -1):
            a = max(m - len(neg), math.ceil(lo * m - 1e-9), 0)
            b = min(m, len(pos), math.floor(hi * m + 1e-9))
            if a <= b:
                n_pos = int(np.clip(round(target * m), a, b))
                best = (m, n_pos)
                break
        m, n_pos = best if best else (0, 0)
        take = np.concatenate([pos[rng.permutation(len(pos))[:n_pos]], neg[rng.permutation(len(neg))[:m - n_pos]]])
        chosen.append(take)
        report.append({"bin": k, "available": int(len(members)), "available_positives": int(len(pos)),
                       "selected": int(m), "selected_positives": int(n_pos),
                       "positive_share": (n_pos / m) if m else None, "short": bool(m < per_bin)})
    return np.sort(np.concatenate(chosen)).astype(np.int64), report


def bin_stage(rows: list[dict], label_name: str, base: Base, params: Bin, out_dir: str | Path,
              tracker: Tracker = Tracker()) -> dict:
    """Explainer inputs: the calibrated sample of one split, with plots before and after."""
    out_dir = Path(out_dir)
    sel = [r for r in rows if r["split"] == params.split]
    if not sel:
        raise PosteriorError(f"the posterior table has no images of split {params.split!r} (bin.split)")
    p = np.array([r["p"] for r in sel])
    y = np.array([r[f"label_{label_name}"] for r in sel])
    rng = np.random.default_rng(base.seed)
    chosen, report = calibrated_sample(p, y, base.num_bins, params.per_bin, rng)
    table = [{"id": sel[i]["id"], "p": sel[i]["p"], "bin": sel[i]["bin"], "label": int(y[i])} for i in chosen]
    write_table(out_dir / "explainer_inputs.csv", table)

    before = plots.reliability(p, y, base.num_bins)
    after = plots.reliability(p[chosen], y[chosen], base.num_bins)
    short = [r["bin"] for r in report if r["short"]]
    empty = [r["bin"] for r in report if r["selected"] == 0]
    for r in report:
        if r["short"]:
            print(f"bin {r['bin']}: only {r['selected']} of the {params.per_bin} images asked for "
                  f"({r['available']} in the bin, {r['available_positives']} positive); keeping what it has")
    metrics = {"images": len(chosen), "bins": report, "short_bins": short, "empty_bins": empty,
               "before": {"ece": before["ece"], "brier": before["brier"], "images": len(p)},
               "after": {"ece": after["ece"], "brier": after["brier"], "images": len(chosen)}}
    write_json(out_dir / "metrics.json", metrics)
    tracker.metrics({"ece_before": before["ece"], "ece_after": after["ece"], "brier_before": before["brier"],
                     "brier_after": after["brier"], "images": len(chosen), "short_bins": len(short)})
    fig = plots.reliability_figure({"before sampling": before, "after sampling": after},
                                   f"reliability of p({label_name}) on {params.split}")
    save_figure(out_dir / "reliability.png", fig)
    tracker.figure(fig, "reliability.png")
    plots.close(fig)
    fig = plots.bin_counts_figure({"before": before["count"], "after": after["count"]},
                                  f"images per posterior bin ({params.split})")
    save_figure(out_dir / "bin_counts.png", fig)
    tracker.figure(fig, "bin_counts.png")
    plots.close(fig)
    return metrics


def read_explainer_inputs(path: str | Path, dataset: ImageDataset, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Dataset indices and source bins of the explainer's training pairs."""
    rows = read_table(path)
    bins = np.array([r["bin"] for r in rows], dtype=np.int64)
    if len(bins) and bins.max() >= num_bins:
        raise PosteriorError(f"{path} has bin {bins.max()} but base.num_bins is {num_bins}; rerun the bin stage")
    return dataset.index_of([r["id"] for r in rows]), bins

