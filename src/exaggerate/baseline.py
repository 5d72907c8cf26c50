"""The baseline measured side by side: gradient-based counterfactual search in pixel space
(Wachter et al. 2017), as in alibi's Counterfactual and OmniXAI's CounterfactualExplainer."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .posteriors import bin_centre

# A search stops, unreached, once its distance to the bin has not fallen by STALL_IMPROVEMENT
# below its best in STALL_STEPS steps. On 50 validation queries per benchmark task it kept all
# but 1 of the 2,859 bin images the full 300 steps reached, in 0.55-1.00x the steps; 50 steps
# lost 4 (an Adam search can circle its bin that long before it lands): docs/MEASUREMENTS.md,
# 2026-12-06 (before midnight).
STALL_STEPS = 100
STALL_IMPROVEMENT = 1e-4


def pixel_search(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, num_bins: int, steps: int,
                 lr: float, lam: float, tolerance: float, return_steps: bool = False,
                 patience: int = STALL_STEPS, min_improvement: float = STALL_IMPROVEMENT):
    """Gradient-based counterfactual search in pixel space (Wachter et al. 2017): for each
    query and target bin, minimise (f(x') - t)^2 + lam * mean|x' - x| with Adam, x' clipped
    to [-1, 1]; an image is kept once |f(x') - t| < tolerance. Returns (B, N, C, H, W); with
    return_steps, also the Adam steps each image took (B, N) and whether it reached its bin (B, N).

    With patience > 0 an image whose distance |f(x') - t| has not fallen by min_improvement
    below its best in `patience` steps stops there, unreached: where f saturates or the distance
    term outweighs a small probability error the search would otherwise bill all `steps` to a
    bin it never reaches (docs/MEASUREMENTS.md, 2026-12-06 (afternoon)). patience 0 searches
    every unreached image for all `steps`.

    Each image's search is its own (Adam works element by element and f sees each image alone),
    so an image that reached its bin leaves the batch: a call costs the sum of its images'
    steps, not its slowest image's steps times their number. Keeping finished images in the
    batch made the baseline 1.6-4x slower than it has to be (docs/MEASUREMENTS.md, 2026-12-02)."""
    b = x.shape[0]
    x0 = x.repeat_interleave(num_bins, 0).detach()
    t = torch.from_numpy(bin_centre(np.arange(num_bins), num_bins)).float().to(x.device).repeat(b)
    delta = torch.zeros_like(x0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    result = x0.clone()
    taken = torch.full((len(x0),), steps, dtype=torch.long, device=x.device)
    done = torch.zeros(len(x0), dtype=torch.bool, device=x.device)
    best = torch.full((len(x0),), float("inf"), device=x.device)  # the distance last improved on
    best_step = torch.zeros(len(x0), dtype=torch.long, device=x.device)
    active = torch.arange(len(x0), device=x.device)  # the images still searching
    for step in range(steps):
        xp = (x0[active] + delta[active]).clamp(-1, 1)
        p = f(xp)
        distance = (p - t[active]).abs().detach()
        hit = distance < tolerance
        done[active[hit]] = True
        leaving = hit
        if patience > 0:
            better = distance < best[active] - min_improvement
            best[active[better]] = distance[better]
            best_step[active[better]] = step
            leaving = hit | (step - best_step[active] >= patience)
        if bool(leaving.any()):
            result[active[leaving]] = xp[leaving].detach()
            taken[active[leaving]] = step
        searching = ~leaving
        if not bool(searching.any()):
            active = active[searching]
            break
        loss = ((p - t[active]) ** 2 + lam * (xp - x0[active]).abs().flatten(1).mean(1))[searching].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        active = active[searching]
    with torch.no_grad():
        result[active] = (x0[active] + delta[active]).clamp(-1, 1)
    result = result.reshape(b, num_bins, *x.shape[1:])
    if return_steps:
        return result, taken.reshape(b, num_bins), done.reshape(b, num_bins)
    return result




def configured_search(f: Callable[[torch.Tensor], torch.Tensor], num_bins: int, params) -> Callable:
    """pixel_search with the evaluate section's settings (baseline_steps, _lr, _lambda,
    _tolerance), called as evaluate times and counts it: search(x, steps=None, f=f,
    return_steps=False); steps and f replace the configured ones."""
    def search(x, steps=None, f=f, return_steps=False):
        return pixel_search(f, x, num_bins, params.baseline_steps if steps is None else steps, params.baseline_lr,
                            params.baseline_lambda, params.baseline_tolerance, return_steps=return_steps)
    return search
