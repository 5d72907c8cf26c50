"""The baseline measured side by side: gradient-based counterfactual search in pixel space
(Wachter et al. 2017), as in alibi's Counterfactual and OmniXAI's CounterfactualExplainer."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .posteriors import bin_centre


def pixel_search(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, num_bins: int, steps: int,
                 lr: float, lam: float, tolerance: float, return_steps: bool = False):
    """Gradient-based counterfactual search in pixel space (Wachter et al. 2017): for each
    query and target bin, minimise (f(x') - t)^2 + lam * mean|x' - x| with Adam, x' clipped
    to [-1, 1]; an image is kept once |f(x') - t| < tolerance. Returns (B, N, C, H, W); with
    return_steps, also the Adam steps each image took to reach its bin (B, N; `steps` where it
    did not) and whether it did (B, N).

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
    active = torch.arange(len(x0), device=x.device)  # the images still searching
    for step in range(steps):
        xp = (x0[active] + delta[active]).clamp(-1, 1)
        p = f(xp)
        hit = (p - t[active]).abs() < tolerance
        if bool(hit.any()):
            result[active[hit]] = xp[hit].detach()
            taken[active[hit]] = step
        searching = ~hit
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
    done = torch.ones(len(x0), dtype=torch.bool, device=x.device)
    done[active] = False
    result = result.reshape(b, num_bins, *x.shape[1:])
    if return_steps:
        return result, taken.reshape(b, num_bins), done.reshape(b, num_bins)
    return result
