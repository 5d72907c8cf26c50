"""The explainer's files: run signatures, building the networks, the training state, and
saving and loading checkpoints and the trained generator."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .classifier import BlackBox
from .config import Base, Explainer as ExplainerParams
from .datasets import ImageDataset
from .io import ArtifactError, read_torch_file, save_torch
from .networks import Discriminator, Generator

# Settings that do not change what a run computes: a longer run continues a shorter one.
# Neither how long nor in how many processes: a run resumes from its checkpoints either way.
_CADENCE = ("steps", "checkpoint_every", "log_every", "image_every", "grid_queries", "seed", "processes")
# Settings added after runs were recorded, and the value that computes what those runs did: at
# that value a signature leaves them out, so existing checkpoints and generators keep loading.
_ADDED_OFF = {"classifier_augment": "none", "ema_decay": 0.0}


class CheckpointError(ArtifactError):
    """A checkpoint or generator file that cannot be read or does not fit the current settings."""


def architecture(base: Base, params: ExplainerParams) -> dict:
    """Settings a generator's weights depend on; a mismatch makes a checkpoint unusable."""
    arch = {"image_size": base.image_size, "channels": base.channels, "num_bins": base.num_bins,
            "generator_widths": list(params.generator_widths),
            "discriminator_widths": list(params.discriminator_widths)}
    return arch


def training_seed(base: Base, params: ExplainerParams) -> int:
    """explainer.seed, or base.seed when it is null."""
    return base.seed if params.seed is None else params.seed


def training_signature(base: Base, params: ExplainerParams, inputs_digest: str = "") -> dict:
    """What a training run depends on: every explainer setting but its length and cadence, the
    data and class explained, and a digest of its inputs (classifier, binned images)."""
    settings = {k: v for k, v in asdict(params).items() if k not in _CADENCE}
    for key, off in _ADDED_OFF.items():  # files made before the setting existed still load
        if settings.get(key) == off:
            del settings[key]
    return {**architecture(base, params), **settings, "seed": training_seed(base, params),
            "dataset": base.dataset, "target": base.target, "inputs": inputs_digest}


def inputs_digest(f: BlackBox, dataset: ImageDataset, indices: np.ndarray, bins: np.ndarray) -> str:
    """Digest of the training pairs and of f's weights: new inputs never resume old checkpoints."""
    h = hashlib.sha256()
    for i, b in zip(indices, bins):
        h.update(f"{dataset.ids[i]}:{b};".encode())
    for name, tensor in sorted(f.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_signature(found: dict, expected: dict, source: str) -> None:
    """Refuse a file whose recorded settings differ from the current ones, naming the first."""
    for key in [*expected, *(k for k in found if k not in expected)]:
        if found.get(key) != expected.get(key):
            raise CheckpointError(f"{source} was made with {key}={found.get(key)!r}, but the current "
                                  f"settings say {key}={expected.get(key)!r}; refusing to load it")


def build_networks(base: Base, params: ExplainerParams) -> tuple[Generator, Discriminator]:
    g = Generator(base.channels, list(params.generator_widths), base.num_bins)
    d = Discriminator(base.channels, list(params.discriminator_widths), base.num_bins)
    return g, d


def save_generator(path: Path, g: Generator, base: Base, params: ExplainerParams) -> None:
    save_torch(path, {"architecture": architecture(base, params), "generator": g.state_dict()})


def load_generator(path: str | Path, base: Base, params: ExplainerParams) -> Generator:
    """The trained generator, in eval mode (running batch-norm statistics)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generator {path} not found: train the explainer first (dvc repro)")
    state = read_torch_file(path, "generator", ("architecture", "generator"))
    check_signature(state["architecture"], architecture(base, params), str(path))
    g, _ = build_networks(base, params)
    try:
        g.load_state_dict(state["generator"])
    except RuntimeError as exc:
        raise CheckpointError(f"generator {path}: its weights do not fit the network: {exc}") from exc
    return g.eval()


@dataclass
class TrainState:
    g: Generator
    d: Discriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sampler_rng: torch.Generator
    step: int = 0
    # The moving average of G's weights (explainer.ema_decay > 0), else None.
    g_ema: Optional[Generator] = None

    def exported(self) -> Generator:
        """The generator that is saved and explained with: the average when there is one."""
        return self.g if self.g_ema is None else self.g_ema


def checkpoint_dir(root: Path, signature: dict) -> Path:
    """One folder per signature, so that runs of other settings never resume each other."""
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:12]
    return root / digest


CHECKPOINT_KEYS = ("signature", "step", "generator", "discriminator", "opt_g", "opt_d", "sampler_rng", "torch_rng")


def save_checkpoint(path: Path, state: TrainState, signature: dict) -> None:
    save_torch(path, {
        "signature": signature, "step": state.step,
        "generator": state.g.state_dict(), "discriminator": state.d.state_dict(),
        "opt_g": state.opt_g.state_dict(), "opt_d": state.opt_d.state_dict(),
        "sampler_rng": state.sampler_rng.get_state(), "torch_rng": torch.get_rng_state(),
        **({} if state.g_ema is None else {"generator_ema": state.g_ema.state_dict()}),
    })


def load_checkpoint(path: Path, state: TrainState, signature: dict, device: torch.device) -> None:
    ckpt = read_torch_file(path, "checkpoint", CHECKPOINT_KEYS, device)
    check_signature(ckpt["signature"], signature, str(path))
    state.g.load_state_dict(ckpt["generator"])
    if state.g_ema is not None:
        if "generator_ema" not in ckpt:
            raise CheckpointError(f"{path} holds no weight average (generator_ema), but explainer.ema_decay is on")
        state.g_ema.load_state_dict(ckpt["generator_ema"])
    state.d.load_state_dict(ckpt["discriminator"])
    state.opt_g.load_state_dict(ckpt["opt_g"])
    state.opt_d.load_state_dict(ckpt["opt_d"])
    state.sampler_rng.set_state(ckpt["sampler_rng"].cpu())
    torch.set_rng_state(ckpt["torch_rng"].cpu())
    state.step = ckpt["step"]


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = sorted(folder.glob("step-*.pt"))
    return found[-1] if found else None
