"""Figures people look at: reliability curves, bin counts, image grids and series strips."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import matplotlib

# Stages and scripts draw off-screen. Inside a Jupyter kernel the inline backend stays, so that
# plt.show() in a notebook displays figures after importing the library.
if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def reliability(p: np.ndarray, y: np.ndarray, num_bins: int = 10) -> dict:
    """Per-bin mean posterior, positive rate and count; expected calibration error; Brier."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    bins = np.minimum((p * num_bins).astype(int), num_bins - 1)
    mean_p, rate, count = [], [], []
    ece = 0.0
    for k in range(num_bins):
        sel = bins == k
        n = int(sel.sum())
        count.append(n)
        if n:
            mean_p.append(float(p[sel].mean()))
            rate.append(float(y[sel].mean()))
            ece += n / len(p) * abs(mean_p[-1] - rate[-1])
        else:
            mean_p.append(None)
            rate.append(None)
    return {"mean_posterior": mean_p, "positive_rate": rate, "count": count,
            "ece": float(ece), "brier": float(np.mean((p - y) ** 2)) if len(p) else float("nan")}


def reliability_figure(curves: dict[str, dict], title: str):
    """One line per named reliability() result, against the diagonal."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="ideal")
    for name, r in curves.items():
        pts = [(m, f) for m, f in zip(r["mean_posterior"], r["positive_rate"]) if m is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=f"{name} (ECE {r['ece']:.3f}, Brier {r['brier']:.3f})")
    ax.set_xlabel("mean posterior in bin")
    ax.set_ylabel("share of positives")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def bin_counts_figure(counts: dict[str, Sequence[int]], title: str):
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(counts)
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        c = np.asarray(counts[name])
        ax.bar(np.arange(len(c)) + j * width, c, width=width, label=name)
    ax.set_yscale("symlog")
    ax.set_xlabel("posterior bin")
    ax.set_ylabel("images")
    ax.set_xticks(np.arange(len(c)) + width * (len(names) - 1) / 2, [str(k) for k in range(len(c))])
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def _to_display(img: torch.Tensor | np.ndarray) -> tuple[np.ndarray, Optional[str]]:
    a = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    a = np.clip((a + 1) / 2, 0, 1)
    if a.shape[0] == 1:
        return a[0], "gray"
    return a.transpose(1, 2, 0), None


def image_grid(images: torch.Tensor, titles: Sequence[Sequence[str]], row_labels: Optional[Sequence[str]] = None,
               col_labels: Optional[Sequence[str]] = None, cell: float = 1.1, suptitle: Optional[str] = None):
    """images: (rows, cols, C, H, W) in [-1, 1]; titles[r][c] above each cell."""
    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 0.6, rows * (cell + 0.25) + 0.4), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            arr, cmap = _to_display(images[r, c])
            ax.imshow(arr, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if titles[r][c]:
                ax.set_title(titles[r][c], fontsize=7, pad=2)
            if row_labels is not None and c == 0:
                ax.set_ylabel(row_labels[r], fontsize=7)
            if col_labels is not None and r == rows - 1:
                ax.set_xlabel(col_labels[c], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
