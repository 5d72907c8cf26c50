"""Devices, seeds and threads."""
from __future__ import annotations

import random

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def channels_last(*modules: torch.nn.Module, enabled: bool = True) -> None:
    """Put modules' 4-D weights in channels-last (NHWC) layout, in place. Convolutions then
    return channels-last activations whatever their input's layout; values are unchanged,
    only the order of floating-point sums inside oneDNN/cuDNN kernels may differ."""
    if enabled:
        for m in modules:
            m.to(memory_format=torch.channels_last)


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
