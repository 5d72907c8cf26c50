"""Metrics of explanation series (docs/EVALUATION.md), each a plain function of arrays/tensors.

Conventions: images are (..., C, H, W) in [-1, 1]; a series is (Q, N, C, H, W) with image k
aimed at posterior bin k; p_series is f on it, shape (Q, N).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from .posteriors import bin_centre

MONOTONIC_TOLERANCE = 0.02


# ----------------------------------------------------------------------------- compatibility with f

def compatibility(p_series: np.ndarray) -> dict:
    """MAE and Pearson correlation between the target bin centre and f(x_c)."""
    n = p_series.shape[1]
    centres = np.broadcast_to(bin_centre(np.arange(n), n), p_series.shape)
    corr = float(np.corrcoef(centres.ravel(), p_series.ravel())[0, 1]) if p_series.std() > 0 else 0.0
    return {"compatibility_mae": float(np.abs(p_series - centres).mean()), "compatibility_corr": corr}


def scalar_objective(mae: float, fid: Optional[float], fid_weight: float) -> Optional[float]:
    """The tuning studies' scalarised objective, lower is better: compatibility MAE
    + fid_weight * fid_oracle (None without an FID)."""
    return None if fid is None else mae + fid_weight * fid


def compatibility_curves(p_series: np.ndarray, p_query: np.ndarray, groups: int = 5) -> dict[str, list]:
    """Mean f(x_c) per target bin, one curve per group of source posteriors (0-0.2, 0.2-0.4, ...)."""
    g = np.minimum((p_query * groups).astype(int), groups - 1)
    curves = {}
    for k in range(groups):
        sel = g == k
        if sel.any():
            curves[f"{k / groups:.1f}-{(k + 1) / groups:.1f}"] = p_series[sel].mean(0).tolist()
    return curves


def monotonic_share(p_series: np.ndarray, tolerance: float = MONOTONIC_TOLERANCE) -> float:
    """Share of series whose posterior never drops by more than `tolerance` from one bin to the next."""
    return float((np.diff(p_series, axis=1) >= -tolerance).all(axis=1).mean())


def far_end(p_query: np.ndarray) -> np.ndarray:
    """Index of the series image at the opposite end of the query's decision."""
    return np.where(p_query < 0.5, -1, 0)


def flips(p_query: np.ndarray, p_series: np.ndarray) -> np.ndarray:
    """Whether the decision (p >= 0.5) of the far-end counterfactual differs from the query's."""
    end = p_series[np.arange(len(p_query)), far_end(p_query)]
    return (end >= 0.5) != (p_query >= 0.5)


# ----------------------------------------------------------------------------- realism (FID)

class _Passthrough(nn.Module):
    """Feeds precomputed features to torchmetrics' FID (features are computed once per set)."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> Optional[float]:
    """FID between two sets of feature vectors (torchmetrics' FrechetInceptionDistance);
    None when either set has fewer than 2 vectors."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        return None
    metric = FrechetInceptionDistance(feature=_Passthrough(real.shape[1]), reset_real_features=True)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return max(float(metric.compute()), 0.0)


def group_by_bin(features: torch.Tensor, bins: np.ndarray, num_bins: int) -> dict[int, torch.Tensor]:
    """Real images' features per posterior bin, for the bins with at least 2 (an FID needs 2)."""
    return {k: features[bins == k] for k in range(num_bins) if (bins == k).sum() >= 2}


def per_bin_fid(real_by_bin: dict[int, torch.Tensor], fake: torch.Tensor) -> tuple[Optional[float], dict]:
    """FID per target bin and overall: counterfactual features `fake` (Q, N, D), column k aimed
    at bin k, against the real images whose posterior lies in bin k. The overall score is the
    mean over the bins that have at least 2 real images (None when none has).

    Pooling all counterfactuals against all real images instead would compare a set spread
    evenly over the bins with a real set concentrated at the two ends (most images are
    classified confidently), which rewards a method that leaves its queries unchanged."""
    per_bin = {str(k): frechet_distance(real_by_bin[k], fake[:, k]) if k in real_by_bin else None
               for k in range(fake.shape[1])}
    scores = [v for v in per_bin.values() if v is not None]
    return (float(np.mean(scores)) if scores else None), per_bin


def kernel_distance(real: torch.Tensor, fake: torch.Tensor) -> Optional[float]:
    """KID: the unbiased estimate of the squared MMD between two feature sets under the cubic
    polynomial kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al., 2018). Unlike FID it has no
    bias at small sample sizes, so it can compare the 30-40 real images of a middle bin. It can
    be slightly negative when the sets are alike; None with fewer than 2 images on a side."""
    m, n = len(real), len(fake)
    if m < 2 or n < 2:
        return None
    x, y = real.double(), fake.double()
    d = x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    sum_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    sum_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(sum_xx + sum_yy - 2 * k_xy.mean())


def per_bin_kid(real_by_bin: dict[int, torch.Tensor], fake: torch.Tensor) -> tuple[Optional[float], dict]:
    """KID per target bin, as per_bin_fid pairs them, and its mean over the bins with real images."""
    per_bin = {str(k): kernel_distance(real_by_bin[k], fake[:, k]) if k in real_by_bin else None
               for k in range(fake.shape[1])}
    scores = [v for v in per_bin.values() if v is not None]
    return (float(np.mean(scores)) if scores else None), per_bin


def split_fid(originals: torch.Tensor, counterfactuals: torch.Tensor) -> Optional[float]:
    """sFID: split the pairs in halves and compare each half's counterfactuals with the other
    half's originals, averaged, so a counterfactual is never compared with its own query."""
    n = len(originals)
    if n < 4:
        return None
    a, b = np.arange(n // 2), np.arange(n // 2, n)
    one, two = frechet_distance(originals[b], counterfactuals[a]), frechet_distance(originals[a], counterfactuals[b])
    return None if one is None or two is None else (one + two) / 2


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size]).cpu() for i in range(0, len(x), batch_size)]) if len(x) else \
        torch.empty(0)


# ----------------------------------------------------------------------------- COUT

@torch.no_grad()
def cout(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, x_cf: torch.Tensor, steps: int = 50) -> np.ndarray:
    """COUT per pair (binary posterior f): rank pixels by |x_cf - x| (summed over channels),
    insert the top ones into x in `steps` steps, and take AUC(target) - AUC(source) of the
    posterior curve, where the target class is the one opposite to x's decision. In [-1, 1]."""
    b = x.shape[0]
    change = (x_cf - x).abs().sum(1).flatten(1)  # (B, H*W)
    order = change.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=x.device).expand(b, -1))
    ranks = ranks.reshape(b, 1, *x.shape[-2:])
    p0 = f(x)
    target_is_one = p0 < 0.5
    curve = []
    total = order.shape[1]
    for k in range(steps + 1):
        keep = ranks < round(k / steps * total)
        p = f(torch.where(keep, x_cf, x))
        curve.append(torch.where(target_is_one, p, 1 - p))
    curve = torch.stack(curve, 1).cpu().numpy()  # probability of the target class
    auc_target = np.trapezoid(curve, dx=1 / steps, axis=1)
    return auc_target - (1 - auc_target)


# ----------------------------------------------------------------------------- oracle-based

def oracle_agreement(p_oracle_target: np.ndarray) -> Optional[float]:
    """Correlation of the oracle's target-class probability with the target bin, over a series set."""
    n = p_oracle_target.shape[1]
    centres = np.broadcast_to(bin_centre(np.arange(n), n), p_oracle_target.shape)
    if p_oracle_target.std() == 0:
        return 0.0
    return float(np.corrcoef(centres.ravel(), p_oracle_target.ravel())[0, 1])


def binned_oracle_agreement(p_oracle_target: np.ndarray, bins: np.ndarray, num_bins: int) -> Optional[float]:
    """oracle_agreement of images grouped by bin, each occupied bin weighted equally (as in a
    series set, which holds one image per bin and query): the reference that real images give."""
    p = np.asarray(p_oracle_target, dtype=np.float64)
    bins = np.asarray(bins)
    counts = np.bincount(bins, minlength=num_bins)
    if (counts > 0).sum() < 2:
        return None
    cov = np.cov(bin_centre(bins, num_bins), p, aweights=1.0 / counts[bins])
    if cov[1, 1] == 0:
        return 0.0
    return float(cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]))


def mnac(oracle_x: np.ndarray, oracle_cf: np.ndarray, target_column: int) -> float:
    """Mean number of attributes other than the target whose oracle decision changes."""
    changed = (oracle_x >= 0.5) != (oracle_cf >= 0.5)
    changed = np.delete(changed, target_column, axis=1)
    return float(changed.sum(1).mean())


def correlation_difference(oracle_data: np.ndarray, oracle_x: np.ndarray, oracle_cf: np.ndarray,
                           target_column: int) -> Optional[float]:
    """CD: mean over other attributes i of |corr_data(target, i) - corr_cf(delta target, delta i)|."""
    delta = oracle_cf - oracle_x
    diffs = []
    for i in range(oracle_data.shape[1]):
        if i == target_column:
            continue
        a, b = oracle_data[:, target_column], oracle_data[:, i]
        da, db = delta[:, target_column], delta[:, i]
        if a.std() == 0 or b.std() == 0 or da.std() == 0 or db.std() == 0:
            continue
        diffs.append(abs(np.corrcoef(a, b)[0, 1] - np.corrcoef(da, db)[0, 1]))
    return float(np.mean(diffs)) if diffs else None
