"""D's augmentation: DiffAugment-style random translation (Zhao et al. 2020) of every image D
sees, real and generated alike, so that D cannot memorise the few real images of the middle bins."""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("none", "translation")


def augment(x: torch.Tensor, mode: str, rng: torch.Generator, shards: tuple[int, int] = (0, 1),
            divisor: int = 8) -> torch.Tensor:
    """Shift each image of the batch by up to 1/divisor of its size (border pixels repeated),
    differentiably in x. The offsets are drawn on the CPU from `rng` (checkpointed with the run),
    one set per call; "none" returns x itself. shards = (rank, processes): x is this rank's
    contiguous share of a global batch, and the offsets are drawn for the whole global batch and
    this share taken, as one process would draw them."""
    if mode == "none":
        return x
    if mode != "translation":
        raise ValueError(f"unknown augmentation {mode!r}; known: {', '.join(MODES)}")
    b, _, h, w = x.shape
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    pad = max(1, h // divisor)
    rank, processes = shards
    shift = torch.randint(-pad, pad + 1, (2, b * processes, 1), generator=rng)[:, rank * b:(rank + 1) * b]
    shift = shift.to(x.device)
    rows = (torch.arange(h, device=x.device) + pad + shift[0]).unsqueeze(2)  # (b, h, 1)
    cols = (torch.arange(w, device=x.device) + pad + shift[1]).unsqueeze(1)  # (b, 1, w)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    x = padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # (b, h, w, ch) -> (b, ch, h, w)
    return x.contiguous(memory_format=layout)

