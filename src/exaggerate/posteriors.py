"""Posteriors of f on every image, posterior bins, and calibrated sampling (docs/METHOD.md, "Pipeline", step 3)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import plots
from .classifier import BlackBox, predict
from .config import Base, Bin
from .datasets import ImageDataset
from .errors import ExaggerateError
from .io import save_figure, write_json, write_text
from .tracking import Tracker
from .utils import resolve_device


class PosteriorError(ExaggerateError, ValueError):
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
                       batch_size: int) -> pd.DataFrame:
    """One row per image of every split: id, split, labels, f's posterior p and its bin."""
    device = resolve_device(base.device)
    f = f.to(device)
    parts = []
    for split, idx in splits.items():
        loader = torch.utils.data.DataLoader(dataset.torch_dataset(idx), batch_size=batch_size)
        p, y = predict(f, loader, device, progress=f"posteriors on {split}")
        check_posteriors(p, f.source)
        part = pd.DataFrame({"id": [dataset.ids[i] for i in idx], "split": split})
        for name, column in zip(dataset.label_names, np.asarray(y).T):
            part[f"label_{name}"] = column.astype(np.int64)
        part["p"] = np.asarray(p, dtype=np.float64)
        part["bin"] = bin_index(p, base.num_bins)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def write_table(path: str | Path, table: pd.DataFrame) -> None:
    write_text(path, table.to_csv(index=False, float_format="%.8f", lineterminator="\n"))


POSTERIOR_COLUMNS = ("id", "split", "p", "bin")  # posteriors.csv; label_<name> columns follow
INPUT_COLUMNS = ("id", "p", "bin", "label")        # explainer_inputs.csv


def read_table(path: str | Path, columns: tuple[str, ...] = POSTERIOR_COLUMNS) -> pd.DataFrame:
    """A table the posteriors or bin stage wrote; refuses one that lacks `columns` or whose p
    and bin are not numbers, naming the file, the column or the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first (dvc repro)")
    # round_trip: the same doubles Python's float() gives, so a table read back writes the same bytes.
    table = pd.read_csv(path, dtype={"id": str, "split": str}, float_precision="round_trip", keep_default_na=False)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise PosteriorError(f"{path} lacks the column(s) {', '.join(missing)} (has: "
                             f"{', '.join(table.columns) or 'none'}); rerun the stage that writes it")
    for name, kind, parse in (("p", "fi", float), ("bin", "i", int)):
        if len(table) and table[name].dtype.kind not in kind:  # some value did not parse as a number
            line, value = next((k, v) for k, v in enumerate(table[name], start=2) if not _parses(parse, v))
            raise PosteriorError(f"{path}, line {line}: {name}={value!r} is not "
                                 f"{'a number' if name == 'p' else 'a bin index'}")
    return table


def _parses(parse, value) -> bool:
    try:
        parse(value)
        return True
    except ValueError:
        return False


def posterior_stage(f: BlackBox, dataset: ImageDataset, splits, base: Base, batch_size: int,
                    out_dir: str | Path, tracker: Tracker = Tracker()) -> dict:
    out_dir = Path(out_dir)
    table = compute_posteriors(f, dataset, splits, base, batch_size)
    write_table(out_dir / "posteriors.csv", table)
    target = f"label_{dataset.label_names[0]}"
    summary = {}
    for split in splits:
        sel = table[table["split"] == split]
        rel = plots.reliability(sel["p"].to_numpy(), sel[target].to_numpy(), base.num_bins)
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


def bin_stage(table: pd.DataFrame, label_name: str, base: Base, params: Bin, out_dir: str | Path,
              tracker: Tracker = Tracker()) -> dict:
    """Explainer inputs: the calibrated sample of one split, with plots before and after."""
    out_dir = Path(out_dir)
    sel = table[table["split"] == params.split]
    if not len(sel):
        raise PosteriorError(f"the posterior table has no images of split {params.split!r} (bin.split)")
    p = sel["p"].to_numpy()
    y = sel[f"label_{label_name}"].to_numpy()
    rng = np.random.default_rng(base.seed)
    chosen, report = calibrated_sample(p, y, base.num_bins, params.per_bin, rng)
    write_table(out_dir / "explainer_inputs.csv", pd.DataFrame({
        "id": sel["id"].to_numpy()[chosen], "p": p[chosen], "bin": sel["bin"].to_numpy()[chosen],
        "label": y[chosen].astype(np.int64)}))

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
    table = read_table(path, INPUT_COLUMNS)
    bins = table["bin"].to_numpy(np.int64, copy=True)  # writable: torch warns on read-only views
    if len(bins) and bins.max() >= num_bins:
        raise PosteriorError(f"{path} has bin {bins.max()} but base.num_bins is {num_bins}; rerun the bin stage")
    return dataset.index_of(table["id"].tolist()), bins
