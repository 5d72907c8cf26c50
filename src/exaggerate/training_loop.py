"""Training the explainer: the pair sampler and the loop, over already built objects.

Each iteration updates D on the hinge loss and, every n_critic-th iteration, G on the sum of
the paper's terms (losses.py). f is frozen and only passes gradients to G."""
from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import plots
from .augment import augment
from .checkpoint import (TrainState, build_networks, checkpoint_dir, inputs_digest, latest_checkpoint,
                         load_checkpoint, save_checkpoint, save_generator, training_seed, training_signature)
from .classifier import BlackBox
from .config import Base, Explainer as ExplainerParams
from .datasets import ImageDataset
from .distributed import World, average_gradients, barrier, init, shard, sync_batch_norm
from .errors import ExaggerateError
from .inference import series_figure
from .io import save_figure, write_json
from .losses import ExplainerLoss, LossWeights
from .networks import Generator
from .tracking import Tracker
from .utils import channels_last, progress, resolve_device, seed_everything


class TrainingDiverged(ExaggerateError, RuntimeError):
    """A loss became NaN or infinite."""


class PairSampler:
    """Random (image, source bin) batches from the binned explainer inputs, every image equally often."""

    def __init__(self, dataset: ImageDataset, indices: np.ndarray, bins: np.ndarray, batch_size: int,
                 generator: torch.Generator):
        self.bins = torch.from_numpy(bins)
        self.batch_size, self.generator = batch_size, generator
        self.in_memory = dataset.in_memory
        if self.in_memory:
            self.images = dataset.images(indices)
        else:
            self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.bins)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.bins), (self.batch_size,), generator=self.generator)
        if self.in_memory:
            return self.images[idx], self.bins[idx]
        return self.dataset.images(self.indices[idx.numpy()]), self.bins[idx]


def grid_queries(dataset: ImageDataset, val_indices: np.ndarray, f: BlackBox, count: int,
                 device: torch.device) -> torch.Tensor:
    """Fixed validation queries for the training grid, spread over the posterior range."""
    pool = val_indices[: min(len(val_indices), 512)]
    x = dataset.images(pool)
    with torch.no_grad():
        p = f(x.to(device)).cpu()
    order = torch.argsort(p)
    return x[order[torch.linspace(0, len(order) - 1, count).round().long()]]


def explainer_step(state: TrainState, loss: ExplainerLoss, x: torch.Tensor, c_x: torch.Tensor,
                   n_critic: int, autocast: Callable, world: World = World(), decay: float = 0.0) -> dict[str, float]:
    """One iteration on the global batch (x, c_x): a D update, and a G update every n_critic-th
    iteration; with several processes each trains on its share and the gradients are averaged.
    G's weight average (state.g_ema, if any) follows G at `decay` after each G update.
    Returns each term by name (d_/g_ prefixed, unweighted; this process's share) and the
    weighted totals."""
    c_new = torch.randint(loss.num_bins, c_x.shape, generator=state.sampler_rng).to(x.device)
    batch = (shard(x, world), shard(c_x, world), shard(c_new, world))
    d_terms, d_total = _update(state.opt_d, loss.discriminator_terms, loss.discriminator_total, batch,
                               autocast, world)
    logged = {**{f"d_{k}": v.item() for k, v in d_terms.items()}, "d_total": d_total.item()}
    if (state.step + 1) % n_critic == 0:
        with frozen(state.d):
            g_terms, g_total = _update(state.opt_g, loss.generator_terms, loss.generator_total, batch,
                                       autocast, world)
        logged.update({f"g_{k}": v.item() for k, v in g_terms.items()}, g_total=g_total.item())
        if state.g_ema is not None:  # per G update: iterations that only train D leave G as it was
            update_average(state.g_ema, state.g, decay, (state.step + 1) // n_critic)
    state.step += 1
    return logged


def update_average(average: torch.nn.Module, current: torch.nn.Module, decay: float, step: int) -> None:
    """average <- w * average + (1 - w) * current for every floating-point weight and buffer, w =
    min(decay, (1 + step) / (10 + step)) so that the first steps' weights do not linger; integer
    buffers (batch norm's counters) are copied."""
    w = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for a, c in zip(average.state_dict().values(), current.state_dict().values()):
            if a.is_floating_point():
                a.lerp_(c, 1.0 - w)
            else:
                a.copy_(c)


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """module's parameters stop requiring gradients for the block: G's update still passes
    gradients through D to x', but no longer computes D's own weight gradients, which D's update
    discards (5% of a default training step's FLOPs; G's gradients are the same to the bit)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


def _update(optimiser: torch.optim.Optimizer, terms_of: Callable, total_of: Callable, batch: tuple,
            autocast: Callable, world: World = World()) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimiser step on the weighted sum of a network's loss terms (gradients averaged
    over the processes)."""
    with autocast():
        terms = terms_of(*batch)
        total = total_of(terms)
    optimiser.zero_grad(set_to_none=True)
    total.backward()
    average_gradients((p for group in optimiser.param_groups for p in group["params"]), world)
    optimiser.step()
    return terms, total


def new_state(base: Base, params: ExplainerParams, f: BlackBox, device: torch.device,
              world: World = World()) -> TrainState:
    """Networks initialised from the run's seed (the same in every process), their optimisers and
    the sampling stream."""
    seed = training_seed(base, params)
    seed_everything(seed)
    g, d = build_networks(base, params)
    if world.distributed:  # batch statistics of the global batch
        sync_batch_norm(g)
    g, d = g.to(device), d.to(device)
    # Before the optimisers see the parameters. f is changed in place (layout only, same values).
    channels_last(g, d, f, enabled=params.channels_last)
    g_ema = copy.deepcopy(g).requires_grad_(False) if params.ema_decay > 0 else None
    return TrainState(g=g, d=d, g_ema=g_ema,
                      opt_g=torch.optim.Adam(g.parameters(), lr=params.lr_g, betas=tuple(params.betas)),
                      opt_d=torch.optim.Adam(d.parameters(), lr=params.lr_d, betas=tuple(params.betas)),
                      sampler_rng=torch.Generator().manual_seed(seed))


def resume(state: TrainState, root: Path, signature: dict, device: torch.device,
           world: World = World()) -> Path:
    """The run's checkpoint folder; the state continues from its latest checkpoint, if any
    (every process from the same one)."""
    folder = checkpoint_dir(root, signature)
    if world.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "signature.json").write_text(json.dumps(signature, indent=2, sort_keys=True))
    barrier(world)
    last = latest_checkpoint(folder)
    if last is not None:
        load_checkpoint(last, state, signature, device)
        print(f"resuming explainer training at step {state.step} from {last}")
    return folder


class _Loop:
    """What happens between iterations: loss logging, checkpoints, training grids."""

    def __init__(self, state: TrainState, f: BlackBox, base: Base, params: ExplainerParams, folder: Path,
                 signature: dict, x_grid: torch.Tensor, tracker: Tracker, on_checkpoint, world: World = World()):
        self.state, self.f, self.base, self.params, self.folder = state, f, base, params, folder
        self.world = world
        self.signature, self.x_grid, self.tracker, self.on_checkpoint = signature, x_grid, tracker, on_checkpoint
        self.window: dict[str, list[float]] = {}
        self.last_good = latest_checkpoint(folder)

    def record(self, losses: dict[str, float], bar) -> None:
        for k, v in losses.items():
            if not np.isfinite(v):
                where = (f"the last good checkpoint is {self.last_good}" if self.last_good
                         else "no checkpoint was written yet")
                raise TrainingDiverged(f"loss {k} became {v} at step {self.state.step}; {where}")
            self.window.setdefault(k, []).append(v)
        step, p = self.state.step, self.params
        if step % p.log_every == 0 or step == p.steps:
            means = {k: float(np.mean(v)) for k, v in self.window.items()}
            self.tracker.metrics(means, step=step)
            shown = ("d_total", "g_classifier", "g_cycle")
            bar.set_postfix({k: f"{means[k]:.3g}" for k in shown if k in means}, refresh=False)
            self.window = {}
        if not self.world.is_main:  # rank 0 writes
            return
        if step % p.checkpoint_every == 0 or step == p.steps:
            self.checkpoint(step)
        if step % p.image_every == 0 or step == p.steps:
            fig = series_figure(self.state.exported(), self.f, self.x_grid, self.base.num_bins,
                                f"explainer series at step {step}")
            self.tracker.figure(fig, f"series/step_{step:08d}.png")
            plots.close(fig)

    def checkpoint(self, step: int) -> None:
        path = self.folder / f"step-{step:08d}.pt"
        save_checkpoint(path, self.state, self.signature)
        for old in sorted(self.folder.glob("step-*.pt"))[:-2]:
            old.unlink()
        self.last_good = path
        if self.on_checkpoint:
            self.on_checkpoint(step, self.state.exported())


def fit(dataset: ImageDataset, indices: np.ndarray, bins: np.ndarray, val_indices: np.ndarray, f: BlackBox,
        base: Base, params: ExplainerParams, out_dir: Path, tracker: Tracker = Tracker(),
        on_checkpoint: Optional[Callable[[int, Generator], None]] = None) -> dict:
    """Train G and D, resuming from out_dir/checkpoints; writes generator.pt, series_grid.png and
    metrics.json. `on_checkpoint(step, g)` runs after each checkpoint (tuning scores there and
    may stop the run by raising)."""
    if len(indices) == 0:
        raise ExaggerateError("the explainer has no training images: the bin stage selected none (no posterior bin "
                              "of f held a calibrated sample; see the bin stage's metrics.json and bin_counts.png)")
    world, device = init(resolve_device(base.device))
    f = f.to(device)
    state = new_state(base, params, f, device, world)
    signature = training_signature(base, params, inputs_digest(f, dataset, indices, bins))
    folder = resume(state, out_dir / "checkpoints", signature, device, world)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if params.amp
                else contextlib.nullcontext)
    loss = ExplainerLoss(state.g, state.d, f, base.num_bins,
                         LossWeights(params.lambda_gan, params.lambda_cyc, params.lambda_cls, params.lambda_rec),
                         lambda img: augment(img, params.augment, state.sampler_rng, (world.rank, world.size)),
                         lambda img: augment(img, params.classifier_augment, state.sampler_rng,
                                             (world.rank, world.size), divisor=16))
    sampler = PairSampler(dataset, indices, bins, params.batch_size, state.sampler_rng)
    x_grid = grid_queries(dataset, val_indices, f, params.grid_queries, device).to(device)
    loop = _Loop(state, f, base, params, folder, signature, x_grid, tracker, on_checkpoint, world)
    start_time, start_step = time.time(), state.step
    state.g.train()
    state.d.train()
    with progress(total=params.steps, initial=state.step, desc="explainer", disable=not world.is_main) as bar:
        while state.step < params.steps:
            x, c_x = sampler.sample()
            loop.record(explainer_step(state, loss, x.to(device), c_x.to(device), params.n_critic, autocast,
                                       world, params.ema_decay), bar)
            bar.update(1)
    elapsed = time.time() - start_time
    if not world.is_main:
        return {"steps": state.step}
    return _finish(state, f, base, params, out_dir, x_grid, tracker, elapsed, state.step - start_step, len(indices))


def _finish(state: TrainState, f: BlackBox, base: Base, params: ExplainerParams, out_dir: Path,
            x_grid: torch.Tensor, tracker: Tracker, elapsed: float, steps_run: int, images: int) -> dict:
    g = state.exported().eval()
    save_generator(out_dir / "generator.pt", g, base, params)
    fig = series_figure(g, f, x_grid, base.num_bins, f"explainer series after {state.step} steps")
    save_figure(out_dir / "series_grid.png", fig)
    plots.close(fig)
    metrics = {"steps": state.step, "steps_this_run": steps_run,
               "seconds_per_step": elapsed / steps_run if steps_run else None, "training_images": int(images)}
    write_json(out_dir / "metrics.json", metrics)
    tracker.artifact(out_dir / "generator.pt")
    tracker.artifact(out_dir / "series_grid.png")
    print(f"explainer: {state.step} steps, {metrics['seconds_per_step'] or 0:.3f} s/step this run")
    return metrics
