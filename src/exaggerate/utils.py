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


class _LogLines:
    """A stream for progress bars in logs: each redraw becomes one plain line, erasures vanish."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, **kwargs):
    """A tqdm progress bar that redraws on a terminal and, in a log (DVC, CI), writes one line at
    most every 60 s instead of a redraw a second. Set postfixes with refresh=False."""
    import sys

    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        kwargs = {"mininterval": 60.0, "maxinterval": 120.0, "ascii": True, "file": _LogLines(sys.stderr),
                  **kwargs}
    return tqdm(iterable, **{"mininterval": 1.0, **kwargs})
