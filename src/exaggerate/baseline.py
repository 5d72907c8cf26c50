"""The baseline measured side by side: gradient-based counterfactual search in pixel space
(Wachter et al. 2017), as in alibi's Counterfactual and OmniXAI's CounterfactualExplainer."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .posteriors import bin_centre


def pixel_search(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, num_bins: int, steps: int,
                 lr: float, lam: float, tolerance: float) -> torch.Tensor:
    """Gradient-based counterfactual search in pixel space (Wachter et al. 2017): for each
    query and target bin, minimise (f(x') - t)^2 + lam * mean|x' - x| with Adam, x' clipped
    to [-1, 1]; an image is kept once |f(x') - t| < tolerance. Returns (B, N, C, H, W)."""
    b = x.shape[0]
    x0 = x.repeat_interleave(num_bins, 0).detach()
    t = torch.from_numpy(bin_centre(np.arange(num_bins), num_bins)).float().to(x.device).repeat(b)
    delta = torch.zeros_like(x0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    result = x0.clone()
    done = torch.zeros(len(x0), dtype=torch.bool, device=x.device)
    for _ in range(steps):
        xp = (x0 + delta).clamp(-1, 1)
        p = f(xp)
        hit = ((p - t).abs() < tolerance) & ~done
        result[hit] = xp[hit].detach()
        done |= hit
        if bool(done.all()):
            break
        loss = (((p - t) ** 2 + lam * (xp - x0).abs().flatten(1).mean(1)) * (~done).float()).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = (x0 + delta).clamp(-1, 1)
        result[~done] = last[~done]
    return result.reshape(b, num_bins, *x.shape[1:])

