"""Training the explainer: the conditional GAN of METHOD.md ("Losses"), against a frozen f.

With x' = G(x, c') and x'' = G(x', c_x):
  D:   lambda_GAN * (E[relu(1 - D(x, c_x))] + E[relu(1 + D(x', c'))])          (hinge)
  G:   -lambda_GAN * E[D(x', c')]                                              (adversarial)
       + lambda_cls * (BCE(f(x'), t(c')) + BCE(f(x''), f(x)))                  (classifier consistency)
       + lambda_cyc * L1(x, x'')                                               (cycle)
       + lambda_cyc * L2(E(x, c_x), E(x', c_x))                                (embedding consistency)
       + lambda_rec * L1(x, G(x, c_x))                     (reconstruction; 0, off, in the paper)
D is updated every iteration, G every n_critic-th; f is frozen and only passes gradients to G.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import plots
from .classifier import BlackBox
from .config import Base, Config, Explainer as ExplainerParams
from .datasets import ImageDataset
from .io import save_figure, save_torch, write_json
from .networks import Discriminator, Generator
from .tracking import Tracker
from .utils import channels_last, resolve_device, seed_everything

LOSS_NAMES = ("d_hinge", "g_adv", "g_cls", "g_cls_cycle", "g_cycle", "g_embedding", "g_rec", "g_total")


class CheckpointError(ValueError):
    """A checkpoint or generator file that does not fit the current settings."""


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite."""


def bin_targets(c: torch.Tensor, num_bins: int, mode: str) -> torch.Tensor:
    """t(c): the bin centre (c + 0.5) / N, or the original code's lower edge c / N."""
    return (c.float() + (0.5 if mode == "centre" else 0.0)) / num_bins


# ----------------------------------------------------------------------------- signatures

def architecture(base: Base, params: ExplainerParams) -> dict:
    """Settings a generator's weights depend on; a mismatch makes a checkpoint unusable."""
    return {"image_size": base.image_size, "channels": base.channels, "num_bins": base.num_bins,
            "generator_widths": list(params.generator_widths),
            "discriminator_widths": list(params.discriminator_widths)}


def training_seed(base: Base, params: ExplainerParams) -> int:
    """explainer.seed, or base.seed when it is null."""
    return base.seed if params.seed is None else params.seed


def training_signature(base: Base, params: ExplainerParams, inputs_digest: str = "") -> dict:
    """What a training run depends on: settings (steps and logging cadence excepted, so that a
    longer run continues a shorter one) and a digest of its inputs (classifier, binned images)."""
    d = asdict(params)
    for k in ("steps", "checkpoint_every", "log_every", "image_every", "grid_queries"):
        d.pop(k)
    if not d["ema_decay"]:
        d.pop("ema_decay")  # off: checkpoints from before the option existed still resume
    if d["lr_decay"]:
        d["steps"] = params.steps  # the schedule ends at `steps`: another length is another run
    else:
        d.pop("lr_decay")
    d.pop("seed")
    # Options at their original value stay out, so that checkpoints from before they existed
    # still resume. "target" names base.target (the class explained) in the signature, so the
    # classifier-consistency target goes in as cls_target.
    if d.pop("cls_weighting") != "uniform":
        d["cls_weighting"] = params.cls_weighting
    if d.pop("sampling") != "uniform":
        d["sampling"] = params.sampling
    if d.pop("augment") != "none":
        d["augment"] = params.augment
    if not d["lambda_rec"]:
        d.pop("lambda_rec")
    if d.pop("target") != "centre":
        d["cls_target"] = params.target
    return {**architecture(base, params), **d, "seed": training_seed(base, params), "dataset": base.dataset,
            "target": base.target, "inputs": inputs_digest}


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
    # Both ways: a setting that only the file records (an option away from its original value,
    # which the current settings leave out) is a mismatch too.
    for key in [*expected, *(k for k in found if k not in expected)]:
        if found.get(key) != expected.get(key):
            raise CheckpointError(f"{source} was made with {key}={found.get(key)!r}, but the current "
                                  f"settings say {key}={expected.get(key)!r}; refusing to load it")


def build_networks(base: Base, params: ExplainerParams) -> tuple[Generator, Discriminator]:
    g = Generator(base.channels, list(params.generator_widths), base.num_bins)
    d = Discriminator(base.channels, list(params.discriminator_widths), base.num_bins)
    return g, d


def load_generator(path: str | Path, base: Base, params: ExplainerParams) -> Generator:
    """The trained generator, in eval mode (running batch-norm statistics)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generator {path} not found: train the explainer first (dvc repro)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read generator {path}: {exc}") from exc
    if not isinstance(state, dict) or "architecture" not in state or "generator" not in state:
        raise CheckpointError(f"{path} is not an exaggerate generator file")
    check_signature(state["architecture"], architecture(base, params), str(path))
    g, _ = build_networks(base, params)
    g.load_state_dict(state["generator"])
    return g.eval()


# ----------------------------------------------------------------------------- data

class PairSampler:
    """Random (image, source bin) batches from the binned explainer inputs."""

    def __init__(self, dataset: ImageDataset, indices: np.ndarray, bins: np.ndarray, batch_size: int,
                 generator: torch.Generator, sampling: str = "uniform"):
        self.bins = torch.from_numpy(bins)
        self.batch_size, self.generator = batch_size, generator
        # Per-image weight 1 / size(bin)^power; "uniform" keeps torch.randint (and its stream).
        power = {"uniform": None, "sqrt": 0.5, "balanced": 1.0}[sampling]
        self.weights = None
        if power is not None:
            sizes = torch.bincount(self.bins).double()
            self.weights = sizes[self.bins].pow(-power)
        self.in_memory = dataset._pixels is not None
        if self.in_memory:
            self.images = dataset.images(indices)
        else:
            self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.bins)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.weights is None:
            idx = torch.randint(len(self.bins), (self.batch_size,), generator=self.generator)
        else:
            idx = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
        if self.in_memory:
            return self.images[idx], self.bins[idx]
        return self.dataset.images(self.indices[idx.numpy()]), self.bins[idx]


def grid_queries(dataset: ImageDataset, val_indices: np.ndarray, f: BlackBox, count: int, num_bins: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed validation queries for the training grid, spread over the posterior range."""
    pool = val_indices[: min(len(val_indices), 512)]
    x = dataset.images(pool)
    with torch.no_grad():
        p = f(x.to(device)).cpu()
    order = torch.argsort(p)
    picks = order[torch.linspace(0, len(order) - 1, count).round().long()]
    return x[picks], p[picks]


@torch.no_grad()
def series(g: Generator, x: torch.Tensor, num_bins: int, conditions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x_0 ... x_{N-1} for each image: one batched generator call, shape (B, N, C, H, W); at the
    bins 0..N-1, or at real-valued `conditions` of shape (B, N) (calibrated_conditions)."""
    b = x.shape[0]
    c = torch.arange(num_bins, device=x.device).repeat(b) if conditions is None else conditions.flatten()
    out = g(x.repeat_interleave(num_bins, dim=0), c)
    return out.reshape(b, num_bins, *x.shape[1:])


@torch.no_grad()
def calibrated_conditions(g: Generator, f: BlackBox, x: torch.Tensor, num_bins: int, probes: int,
                          return_probes: bool = False):
    """Per image, the generator conditions t_0 <= ... <= t_{N-1} in [0, N-1] at which f's
    posterior should sit at the bin centres (shape (B, N)); with return_probes, also the probe
    images G(x, t) at the probe conditions (B, probes, C, H, W).

    G(x, t) is generated at `probes` evenly spaced conditions and f scores each; f as a function
    of t is taken piecewise linear between them (made non-decreasing along t), and inverted at
    every bin centre. Centres below the first probe's posterior get t = 0, above the last
    t = N - 1: the generator has no condition beyond its end bins.
    """
    b, dev = x.shape[0], x.device
    grid = probe_grid(num_bins, probes, dev)
    images = g(x.repeat_interleave(probes, dim=0), grid.repeat(b))
    p = f(images).reshape(b, probes).float()
    # Non-decreasing, then strictly increasing by a negligible ramp so that no segment is flat.
    p = torch.cummax(p, dim=1).values + torch.arange(probes, device=dev) * 1e-6
    centres = bin_targets(torch.arange(num_bins, device=dev), num_bins, "centre").expand(b, num_bins).contiguous()
    hi = torch.searchsorted(p, centres).clamp(1, probes - 1)
    p_lo, p_hi = p.gather(1, hi - 1), p.gather(1, hi)
    share = ((centres - p_lo) / (p_hi - p_lo)).clamp(0, 1)
    conditions = torch.lerp(grid[hi - 1], grid[hi], share)
    if return_probes:
        return conditions, images.reshape(b, probes, *x.shape[1:])
    return conditions


def probe_grid(num_bins: int, probes: int, device=None) -> torch.Tensor:
    """The probe conditions of calibrated_conditions: evenly spaced over [0, N-1]."""
    return torch.linspace(0, num_bins - 1, probes, device=device)


@torch.no_grad()
def explain_series(g: Generator, f: BlackBox, x: torch.Tensor, num_bins: int,
                   probes: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The series (B, N, C, H, W) and the conditions it was generated at (B, N): the bins
    themselves when probes is 0 (the paper), calibrated ones otherwise (explain.probes).

    A calibrated condition that equals a probe's (mostly the end bins, when f's posterior at an
    end condition does not reach that end bin's centre) takes the probe's image instead of
    generating it again."""
    if not probes:
        bins = torch.arange(num_bins, device=x.device, dtype=torch.float32).expand(x.shape[0], num_bins)
        return series(g, x, num_bins), bins
    conditions, probe_images = calibrated_conditions(g, f, x, num_bins, probes, return_probes=True)
    match = conditions[..., None] == probe_grid(num_bins, probes, x.device)  # (B, N, probes)
    reuse = match.any(-1)
    query = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(reuse)
    out = probe_images.new_empty(x.shape[0], num_bins, *x.shape[1:])
    out[reuse] = probe_images[query[reuse], match.int().argmax(-1)[reuse]]
    if not bool(reuse.all()):
        out[~reuse] = g(x[query[~reuse]], conditions[~reuse])
    return out, conditions


def series_figure(g: Generator, f: BlackBox, x: torch.Tensor, num_bins: int, title: str):
    was_training = g.training
    g.eval()
    with torch.no_grad():
        s = series(g, x, num_bins)
        p = f(s.flatten(0, 1)).reshape(s.shape[:2]).cpu()
        p_query = f(x).cpu()
    g.train(was_training)
    grid = torch.cat([x[:, None].cpu(), s.cpu()], dim=1)
    titles = [[f"query p={pq:.2f}"] + [f"f={v:.2f}" for v in row] for pq, row in zip(p_query, p)]
    cols = ["query"] + [f"bin {k}" for k in range(num_bins)]
    return plots.image_grid(grid, titles, col_labels=cols, suptitle=title)


# ----------------------------------------------------------------------------- training

@dataclass
class TrainState:
    g: Generator
    d: Discriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sampler_rng: torch.Generator
    step: int = 0
    g_ema: Optional[Generator] = None  # the weight average, when explainer.ema_decay > 0

    @property
    def generator(self) -> Generator:
        """The generator to save, score and show: the average when there is one."""
        return self.g_ema if self.g_ema is not None else self.g


@torch.no_grad()
def update_ema(ema: Generator, g: Generator, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * g for weights; batch-norm statistics are copied."""
    for p_ema, p in zip(ema.parameters(), g.parameters()):
        p_ema.lerp_(p, 1 - decay)
    for b_ema, b in zip(ema.buffers(), g.buffers()):
        b_ema.copy_(b)


def _checkpoint_dir(root: Path, signature: dict) -> Path:
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:12]
    return root / digest


def save_checkpoint(path: Path, state: TrainState, signature: dict) -> None:
    save_torch(path, {
        "signature": signature, "step": state.step,
        "generator": state.g.state_dict(), "discriminator": state.d.state_dict(),
        "opt_g": state.opt_g.state_dict(), "opt_d": state.opt_d.state_dict(),
        "sampler_rng": state.sampler_rng.get_state(), "torch_rng": torch.get_rng_state(),
        **({"generator_ema": state.g_ema.state_dict()} if state.g_ema is not None else {}),
    })


def load_checkpoint(path: Path, state: TrainState, signature: dict, device: torch.device) -> None:
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    check_signature(ckpt["signature"], signature, str(path))
    state.g.load_state_dict(ckpt["generator"])
    state.d.load_state_dict(ckpt["discriminator"])
    state.opt_g.load_state_dict(ckpt["opt_g"])
    state.opt_d.load_state_dict(ckpt["opt_d"])
    state.sampler_rng.set_state(ckpt["sampler_rng"].cpu())
    torch.set_rng_state(ckpt["torch_rng"].cpu())
    state.step = ckpt["step"]
    if state.g_ema is not None:
        if "generator_ema" not in ckpt:
            raise CheckpointError(f"{path} holds no averaged generator although explainer.ema_decay > 0")
        state.g_ema.load_state_dict(ckpt["generator_ema"])


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = sorted(folder.glob("step-*.pt"))
    return found[-1] if found else None


def _bce(p: torch.Tensor, target: torch.Tensor, eps: float = 1e-6,
         weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary cross-entropy of probabilities, optionally weighted per image; unlike
    F.binary_cross_entropy it lets a NaN posterior through as a NaN loss (reported with its
    step) instead of raising."""
    p = p.clamp(eps, 1 - eps)
    loss = -(target * torch.log(p) + (1 - target) * torch.log1p(-p))
    return (loss if weight is None else loss * weight).mean()


def cls_weights(c: torch.Tensor, num_bins: int, params: ExplainerParams) -> Optional[torch.Tensor]:
    """Per-image weights of the classifier-consistency term (explainer.cls_weighting): None for
    "uniform"; for "variance" m(1 - m) over its mean across the bins, m the bin centre (also
    under target "lower", whose bin 0 would otherwise get weight 0), so that the weights average
    1 over uniformly drawn bins and lambda_cls keeps its scale."""
    if params.cls_weighting == "uniform":
        return None
    every = bin_targets(torch.arange(num_bins), num_bins, "centre")
    t = bin_targets(c, num_bins, "centre")
    return t * (1 - t) / (every * (1 - every)).mean().to(t.device)


def lr_factor(step: int, params: ExplainerParams) -> float:
    """Learning-rate multiplier at iteration `step` (0-based): 1, then falling linearly over the
    last lr_decay share of the steps so that the final iteration runs at 1/decay_steps."""
    decay_steps = round(params.lr_decay * params.steps)
    if decay_steps <= 0:
        return 1.0
    return min(1.0, (params.steps - step) / decay_steps)


def set_learning_rates(state: TrainState, params: ExplainerParams) -> None:
    """Stateless schedule: derived from the step alone, so a resumed run continues it exactly."""
    factor = lr_factor(state.step, params)
    for opt, lr in ((state.opt_g, params.lr_g), (state.opt_d, params.lr_d)):
        for group in opt.param_groups:
            group["lr"] = lr * factor


def augment(x: torch.Tensor, mode: str, rng: torch.Generator) -> torch.Tensor:
    """DiffAugment-style random translation (and cutout) of a batch, differentiable in x. The
    offsets are drawn on the CPU from `rng` (checkpointed with the run), one set per call."""
    if mode == "none":
        return x
    b, _, h, w = x.shape
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    pad = max(1, h // 8)
    shift = torch.randint(-pad, pad + 1, (2, b, 1), generator=rng).to(x.device)
    rows = (torch.arange(h, device=x.device) + pad + shift[0]).unsqueeze(2)  # (b, h, 1)
    cols = (torch.arange(w, device=x.device) + pad + shift[1]).unsqueeze(1)  # (b, 1, w)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    x = padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # (b, h, w, ch) -> (b, ch, h, w)
    if mode == "translation_cutout":
        ch, cw = h // 2, w // 2
        top = torch.randint(0, h - ch + 1, (b, 1, 1), generator=rng).to(x.device)
        left = torch.randint(0, w - cw + 1, (b, 1, 1), generator=rng).to(x.device)
        r = torch.arange(h, device=x.device).view(1, h, 1)
        c = torch.arange(w, device=x.device).view(1, 1, w)
        keep = ~((r >= top) & (r < top + ch) & (c >= left) & (c < left + cw))
        x = x * keep.unsqueeze(1).to(x.dtype)
    return x.contiguous(memory_format=layout)


def explainer_step(state: TrainState, f: BlackBox, x: torch.Tensor, c_x: torch.Tensor, base: Base,
                   params: ExplainerParams, autocast: Callable) -> dict[str, float]:
    """One iteration: a D update, and a G update every n_critic-th iteration."""
    g, d, n = state.g, state.d, base.num_bins
    c_new = torch.randint(n, c_x.shape, generator=state.sampler_rng).to(x.device)
    set_learning_rates(state, params)
    losses: dict[str, float] = {}
    aug = lambda img: augment(img, params.augment, state.sampler_rng)  # noqa: E731

    with autocast():
        with torch.no_grad():
            x_fake = g(x, c_new)
        d_loss = params.lambda_gan * (F.relu(1 - d(aug(x), c_x)).mean()
                                      + F.relu(1 + d(aug(x_fake), c_new)).mean())
    state.opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    state.opt_d.step()
    losses["d_hinge"] = d_loss.item()

    if (state.step + 1) % params.n_critic == 0:
        with autocast():
            embed_x = g.encode(x, c_x)
            x_fake = g(x, c_new)
            embed_fake = g.encode(x_fake, c_x)
            x_cycle = g.decode(embed_fake, c_x)
            with torch.no_grad():
                p_x = f(x).float()
            g_adv = -params.lambda_gan * d(aug(x_fake), c_new).mean()
            p_fake, p_cycle = f(x_fake).float(), f(x_cycle).float()
            cls = _bce(p_fake, bin_targets(c_new, n, params.target), weight=cls_weights(c_new, n, params))
            cls_cycle = _bce(p_cycle, p_x)
            cycle = (x - x_cycle).abs().mean()
            embedding = (embed_x - embed_fake).pow(2).mean()
            total = (g_adv + params.lambda_cls * (cls + cls_cycle)
                     + params.lambda_cyc * cycle + params.lambda_cyc * embedding)
            if params.lambda_rec > 0:  # skipped at 0, so that the paper's losses train as before
                rec = (x - g.decode(embed_x, c_x)).abs().mean()
                total = total + params.lambda_rec * rec
                losses["g_rec"] = rec.item()
        state.opt_g.zero_grad(set_to_none=True)
        total.backward()
        state.opt_g.step()
        if state.g_ema is not None:
            t = (state.step + 1) // params.n_critic  # G updates so far, this one included
            update_ema(state.g_ema, g, min(params.ema_decay, (1 + t) / (10 + t)))
        losses.update(g_adv=g_adv.item(), g_cls=cls.item(), g_cls_cycle=cls_cycle.item(),
                      g_cycle=cycle.item(), g_embedding=embedding.item(), g_total=total.item())
    state.step += 1
    return losses


def train_explainer(cfg: Config, paths: dict, tracker: Tracker = Tracker(),
                    on_checkpoint: Optional[Callable[[int, Generator], None]] = None) -> dict:
    """The train_explainer stage: resumable GAN training; writes generator.pt and metrics."""
    from .classifier import load_classifier
    from .datasets import open_dataset
    from .posteriors import read_explainer_inputs
    from .splits import read_splits

    base, params = cfg.base, cfg.explainer
    out_dir = Path(paths["train_explainer"])
    device = resolve_device(base.device)
    dataset = open_dataset(base)
    splits = read_splits(Path(paths["prepare"]) / "splits.json", dataset)
    f = load_classifier(paths["train_classifier"], base).to(device)
    indices, bins = read_explainer_inputs(Path(paths["bin"]) / "explainer_inputs.csv", dataset, base.num_bins)
    return fit(dataset, indices, bins, splits["val"], f, base, params, out_dir, tracker, on_checkpoint)


def fit(dataset: ImageDataset, indices: np.ndarray, bins: np.ndarray, val_indices: np.ndarray, f: BlackBox,
        base: Base, params: ExplainerParams, out_dir: Path, tracker: Tracker = Tracker(),
        on_checkpoint: Optional[Callable[[int, Generator], None]] = None) -> dict:
    """Train G and D; `on_checkpoint(step, g)` is called after each checkpoint (tuning reports
    intermediate scores there and may stop the run by raising)."""
    device = resolve_device(base.device)
    seed = training_seed(base, params)
    seed_everything(seed)
    g, d = build_networks(base, params)
    g, d = g.to(device), d.to(device)
    # Before the optimisers see the parameters. f is changed in place (layout only, same values).
    channels_last(g, d, f, enabled=params.channels_last)
    state = TrainState(
        g=g, d=d,
        opt_g=torch.optim.Adam(g.parameters(), lr=params.lr_g, betas=tuple(params.betas)),
        opt_d=torch.optim.Adam(d.parameters(), lr=params.lr_d, betas=tuple(params.betas)),
        sampler_rng=torch.Generator().manual_seed(seed),
        g_ema=copy.deepcopy(g).eval().requires_grad_(False) if params.ema_decay > 0 else None)
    signature = training_signature(base, params, inputs_digest(f, dataset, indices, bins))
    ckpt_dir = _checkpoint_dir(out_dir / "checkpoints", signature)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "signature.json").write_text(json.dumps(signature, indent=2, sort_keys=True))
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        load_checkpoint(last, state, signature, device)
        print(f"resuming explainer training at step {state.step} from {last}")

    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if params.amp
                else contextlib.nullcontext)
    sampler = PairSampler(dataset, indices, bins, params.batch_size, state.sampler_rng, params.sampling)
    x_grid, _ = grid_queries(dataset, val_indices, f, params.grid_queries, base.num_bins, device)
    x_grid = x_grid.to(device)

    window: dict[str, list[float]] = {k: [] for k in LOSS_NAMES}
    last_good = last
    start_time, start_step = time.time(), state.step
    g.train()
    d.train()
    bar = tqdm(total=params.steps, initial=state.step, desc="explainer", mininterval=1.0)
    while state.step < params.steps:
        x, c_x = sampler.sample()
        losses = explainer_step(state, f, x.to(device), c_x.to(device), base, params, autocast)
        for k, v in losses.items():
            if not np.isfinite(v):
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise TrainingDiverged(f"loss {k} became {v} at step {state.step}; {where}")
            window[k].append(v)
        bar.update(1)
        step = state.step
        if step % params.log_every == 0 or step == params.steps:
            means = {k: float(np.mean(v)) for k, v in window.items() if v}
            tracker.metrics(means, step=step)
            bar.set_postfix({k: f"{v:.3g}" for k, v in means.items() if k in ("d_hinge", "g_cls", "g_cycle")})
            window = {k: [] for k in LOSS_NAMES}
        if step % params.checkpoint_every == 0 or step == params.steps:
            path = ckpt_dir / f"step-{step:08d}.pt"
            save_checkpoint(path, state, signature)
            for old in sorted(ckpt_dir.glob("step-*.pt"))[:-2]:
                old.unlink()
            last_good = path
            if on_checkpoint:
                on_checkpoint(step, state.generator)
        if step % params.image_every == 0 or step == params.steps:
            fig = series_figure(state.generator, f, x_grid, base.num_bins, f"explainer series at step {step}")
            tracker.figure(fig, f"series/step_{step:08d}.png")
            plots.close(fig)
    bar.close()
    elapsed = time.time() - start_time
    steps_run = state.step - start_step
    g = state.generator.eval()
    save_torch(out_dir / "generator.pt", {"architecture": architecture(base, params), "generator": g.state_dict()})
    fig = series_figure(g, f, x_grid, base.num_bins, f"explainer series after {state.step} steps")
    save_figure(out_dir / "series_grid.png", fig)
    plots.close(fig)
    metrics = {"steps": state.step, "steps_this_run": steps_run,
               "seconds_per_step": elapsed / steps_run if steps_run else None,
               "training_images": int(len(indices))}
    write_json(out_dir / "metrics.json", metrics)
    tracker.artifact(out_dir / "generator.pt")
    tracker.artifact(out_dir / "series_grid.png")
    print(f"explainer: {state.step} steps, {metrics['seconds_per_step'] or 0:.3f} s/step this run")
    return metrics
