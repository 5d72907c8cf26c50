"""Typed, validated configuration.

params.yaml is read once (by the stage wrappers or the CLI) into a `Config`; library code
receives the typed sections and never reads params.yaml itself. Every error names the
offending key (as a dotted path) and what would have been accepted.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ExaggerateError



class ConfigError(ExaggerateError, ValueError):
    """A parameter file or value that cannot be used; the message names the key."""


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass(frozen=True)
class Base:
    seed: int = 0
    dataset: str = field(default="fashion_mnist", metadata=_choices("fashion_mnist", "celeba", "image_folder"))
    data_root: str = "data/fashion-mnist"
    # Class (fashion_mnist, image_folder) or attribute (celeba) whose posterior is explained.
    target: str = "Ankle boot"
    # Class datasets: the classes used as negatives; empty means one-vs-rest.
    negatives: list[str] = field(default_factory=lambda: ["Sneaker"])
    # CelebA: attributes the classifier predicts (multi-label); empty means [target].
    attributes: list[str] = field(default_factory=list)
    image_size: int = 32
    channels: int = 1
    # How images reach image_size: "pad" (centre them on a black canvas) or "resize".
    resize: str = field(default="pad", metadata=_choices("pad", "resize"))
    # CelebA's centre crop before resizing (the paper's 150x150); 0 disables it.
    center_crop: int = 150
    num_bins: int = 10
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    # Torch CPU threads; 0 keeps torch's default.
    threads: int = 0

    def validate(self, key: str) -> None:
        _check(self.num_bins >= 2, f"{key}.num_bins", self.num_bins, "an integer >= 2")
        _check(self.image_size >= 8, f"{key}.image_size", self.image_size, "an integer >= 8")
        _check(self.channels in (1, 3), f"{key}.channels", self.channels, "1 or 3")
        _check(self.target != "", f"{key}.target", self.target, "a class or attribute name")
        _check(self.threads >= 0, f"{key}.threads", self.threads, "an integer >= 0")


@dataclass(frozen=True)
class Prepare:
    # Share of the training partition held out for validation (stratified, seeded).
    val_fraction: float = 0.1
    # Used only for datasets without an official test partition (image_folder).
    test_fraction: float = 0.1
    # Cap per split and class, for quick runs; 0 means no cap.
    max_per_class: int = 0

    def validate(self, key: str) -> None:
        _check(0 < self.val_fraction < 0.5, f"{key}.val_fraction", self.val_fraction, "a number in (0, 0.5)")
        _check(0 < self.test_fraction < 0.5, f"{key}.test_fraction", self.test_fraction, "a number in (0, 0.5)")
        _check(self.max_per_class >= 0, f"{key}.max_per_class", self.max_per_class, "an integer >= 0")


@dataclass(frozen=True)
class ExternalClassifier:
    """A user's own classifier, a TorchScript file or a torch.export program (.pt2); replaces training."""
    path: str = ""
    output_index: int = 0
    input_size: int = 32
    channels: int = 1
    value_range: list[float] = field(default_factory=lambda: [-1.0, 1.0])
    # What the model returns: "probability" (already in [0, 1]) or "logit" (sigmoid applied here).
    output: str = field(default="probability", metadata=_choices("probability", "logit"))

    def validate(self, key: str) -> None:
        _check(self.output_index >= 0, f"{key}.output_index", self.output_index, "an integer >= 0")
        _check(self.channels in (1, 3), f"{key}.channels", self.channels, "1 or 3")
        _check(len(self.value_range) == 2 and self.value_range[0] < self.value_range[1],
               f"{key}.value_range", self.value_range, "[low, high] with low < high")


@dataclass(frozen=True)
class Classifier:
    external: Optional[ExternalClassifier] = None
    # torchvision DenseNet hyper-parameters (paper: growth 32, blocks 6/12/24/16, init 64).
    growth_rate: int = 12
    block_config: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_init_features: int = 16
    bn_size: int = 4
    # "small": 3x3 stride-1 stem + 2x2 max-pool, for 32x32 inputs; "imagenet": 7x7/2 + pool.
    stem: str = field(default="small", metadata=_choices("small", "imagenet"))
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Mixup (Zhang et al. 2018): each training image is blended with another of its batch,
    # x = m x_i + (1 - m) x_j and y = m y_i + (1 - m) y_j, m ~ Beta(alpha, alpha) per image.
    # Trains f to give graded posteriors between the classes instead of a step. 0 = off.
    mixup_alpha: float = 0.4
    grid_images: int = 16
    # Training processes on this machine (torchrun, DistributedDataParallel; gloo on CPUs, NCCL
    # on GPUs), each on its share of every batch.
    processes: int = 1

    def validate(self, key: str) -> None:
        _check(self.epochs >= 1, f"{key}.epochs", self.epochs, "an integer >= 1")
        _check(self.mixup_alpha >= 0, f"{key}.mixup_alpha", self.mixup_alpha, "a number >= 0 (0 = off)")
        _check(self.processes >= 1, f"{key}.processes", self.processes, "an integer >= 1")
        _check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "an integer >= 1")
        _check(self.lr > 0, f"{key}.lr", self.lr, "a number > 0")
        _check(len(self.block_config) >= 1 and all(b >= 1 for b in self.block_config),
               f"{key}.block_config", self.block_config, "a non-empty list of integers >= 1")


@dataclass(frozen=True)
class Posteriors:
    batch_size: int = 256

    def validate(self, key: str) -> None:
        _check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "an integer >= 1")


@dataclass(frozen=True)
class Bin:
    # Calibrated sampling: at most this many images per bin (paper: 5000).
    per_bin: int = 5000
    split: str = field(default="train", metadata=_choices("train", "val", "test"))

    def validate(self, key: str) -> None:
        _check(self.per_bin > 0, f"{key}.per_bin", self.per_bin, "an integer > 0")


@dataclass(frozen=True)
class Explainer:
    # Generator: input conv to widths[0], one down-sampling residual block per further width;
    # the decoder mirrors it. Paper at 128x128: [64, 128, 256, 512, 1024, 1024].
    generator_widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    # Discriminator: down-sampling SN residual blocks, then one more block at the last width.
    # Paper: [64, 128, 256, 512, 1024, 1024].
    discriminator_widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    lambda_gan: float = 5.0
    lambda_cyc: float = 79.0
    lambda_cls: float = 53.24681953553553
    # Reconstruction: lambda_rec * L1(x, G(x, c_x)), G asked for the query's own bin (0 = off, as
    # in the paper, whose losses leave G(x, c_x) = x to the cycle term alone). One more decoder
    # pass per G step; lets a weaker cycle term (larger changes) keep the reconstruction close.
    lambda_rec: float = 10.0
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.9])
    # G is updated every n_critic-th iteration, D every iteration (paper: 5).
    n_critic: int = 1
    batch_size: int = 32
    steps: int = 2000
    checkpoint_every: int = 250
    log_every: int = 50
    image_every: int = 500
    grid_queries: int = 6
    # bf16 autocast in training (the paper's GPU setting). On CPUs it pays only with native bf16
    # (AVX512-BF16, AMX): check with scripts/gpu_check.py --device cpu --cpu-bf16 first.
    amp: bool = False
    # Channels-last (NHWC) memory layout for G, D and f in training (oneDNN's faster CPU layout;
    # explain.channels_last is the same for generating series).
    channels_last: bool = False
    # The explainer's own seed (weights, sampling of pairs and target bins); null: base.seed.
    # Another value retrains only the explainer, to measure how much a short GAN run owes to luck.
    seed: Optional[int] = None
    # Differentiable augmentation of every image D sees, real and generated alike (Zhao et al.
    # 2020, "DiffAugment"): "translation" shifts each image by up to 1/8 of its size (border
    # pixels repeated), so that D cannot memorise the few real images of the middle bins.
    # "none": the paper's D.
    augment: str = field(default="translation", metadata=_choices("none", "translation"))
    # The classifier term BCE(f(x'), t(c')) reads f of x' shifted by up to 1/16 of its size
    # ("translation", a departure from the paper), so that a change counts only if f still reads
    # it after a small shift, as it reads real evidence; "none": the paper's term.
    classifier_augment: str = field(default="translation", metadata=_choices("none", "translation"))
    # An exponential moving average of G's weights (and batch-norm statistics) over G's
    # updates, decay d per G update t (warmed up as min(d, (1 + t) / (10 + t))); the average is the
    # generator written and explained with. 0: off, the paper's last weights. The CPU default
    # 0.99 won on the validation benchmark (docs/MEASUREMENTS.md, 2026-12-05).
    ema_decay: float = 0.99
    # Training processes on this machine (torchrun; gloo on CPUs, NCCL on GPUs), each on its share
    # of the global batch_size: the same steps as one process, up to float rounding.
    processes: int = 1

    def validate(self, key: str) -> None:
        _check(0.0 <= self.ema_decay < 1.0, f"{key}.ema_decay", self.ema_decay, "a number in [0, 1)")
        _check(self.processes >= 1, f"{key}.processes", self.processes, "an integer >= 1")
        _check(self.batch_size % self.processes == 0, f"{key}.batch_size", self.batch_size,
               f"a multiple of {key}.processes ({self.processes}): each process trains on an equal share")
        for name in ("generator_widths", "discriminator_widths"):
            widths = getattr(self, name)
            _check(len(widths) >= 2 and all(w >= 1 for w in widths), f"{key}.{name}", widths,
                   "a list of at least two positive integers")
        for name in ("lambda_gan", "lambda_cyc", "lambda_cls", "lambda_rec"):
            _check(getattr(self, name) >= 0, f"{key}.{name}", getattr(self, name), "a number >= 0")
        _check(len(self.betas) == 2, f"{key}.betas", self.betas, "[beta1, beta2]")
        for name in ("n_critic", "batch_size", "steps", "checkpoint_every", "log_every", "image_every"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "an integer >= 1")


@dataclass(frozen=True)
class Explain:
    split: str = field(default="test", metadata=_choices("train", "val", "test"))
    num_queries: int = 200
    strips: int = 16
    batch_size: int = 64
    # Generate series with G and f in channels-last (NHWC) layout: the explain stage, the
    # evaluate stage (both methods, so the timing stays fair) and `exaggerate explain`.
    # Same values up to float rounding, faster on CPU.
    channels_last: bool = True
    # Calibrated series: 0 = the paper's series, G(x, c) for c = 0..N-1 (one generator pass).
    # probes >= 2: a first pass generates G(x, t) at `probes` evenly spaced conditions t in
    # [0, N-1] (between bins, gamma and beta are interpolated) and f scores them; the series is
    # then generated at the conditions where the interpolated posterior crosses each bin centre.
    # A second generator pass and `probes` more images through G and f per query. Used by
    # explain, evaluate (for the explainer and its timing), tuning and `exaggerate explain`.
    probes: int = 6
    # The query's own detail kept: 0 = off (the paper). tau > 0: what G's reconstruction misses,
    # x - G(x, c_x), is added back to every image of the series with the weight
    # (1 - |G(x, t) - G(x, c_x)| / tau) * (1 - |t - c_x| / (N - 1)) per pixel (images in
    # [-1, 1]): fully where G leaves the query alone at its own bin, fading with the distance
    # from it, not where G changes the query by tau or more. One more generator pass per query.
    detail: float = 0.0

    def validate(self, key: str) -> None:
        _check(self.num_queries >= 1, f"{key}.num_queries", self.num_queries, "an integer >= 1")
        _check(self.strips >= 0, f"{key}.strips", self.strips, "an integer >= 0")
        _check(self.probes == 0 or self.probes >= 2, f"{key}.probes", self.probes, "0 (off) or an integer >= 2")
        _check(self.detail >= 0, f"{key}.detail", self.detail, "a number >= 0 (0: off)")


@dataclass(frozen=True)
class Oracle:
    """The independent classifier of all classes/attributes (its features are fid_oracle's space)."""
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    feature_dim: int = 128
    epochs: int = 6
    # At least this many training steps whatever the dataset's size: a small dataset gets more
    # epochs (epochs = max(epochs, ceil(min_steps / steps per epoch))).
    min_steps: int = 900
    batch_size: int = 128
    # Peak learning rate, decayed to 0 along a cosine over the whole run.
    lr: float = 1e-3
    # Mirror each training image left-right with probability 1/2: for classes that do not
    # depend on the side (garments, faces); not for digits or text.
    flip: bool = True
    # Cap on training images, for quick runs; 0 means all.
    max_train: int = 0

    def validate(self, key: str) -> None:
        _check(len(self.widths) >= 1 and all(w >= 1 for w in self.widths), f"{key}.widths", self.widths,
               "a non-empty list of positive integers")
        _check(self.min_steps >= 0, f"{key}.min_steps", self.min_steps, "an integer >= 0")
        _check(self.feature_dim >= 2, f"{key}.feature_dim", self.feature_dim, "an integer >= 2")
        _check(self.epochs >= 1, f"{key}.epochs", self.epochs, "an integer >= 1")


@dataclass(frozen=True)
class Evaluate:
    # The baseline (gradient search in pixel space, Wachter et al.) explains this many of the
    # explain stage's queries, each for every target bin.
    baseline_queries: int = 50
    baseline_steps: int = 300
    baseline_lr: float = 0.01
    baseline_lambda: float = 0.1
    # A baseline image stops once |f(x') - t| is below this.
    baseline_tolerance: float = 0.02
    cout_steps: int = 50
    # Local file of the standard Inception-v3 FID weights (pt_inception-2015-12-05); empty: skip.
    inception_weights: str = ""
    batch_size: int = 100
    # Queries per call at which each method is timed; each method's speed is its fastest of these
    # (the explainer was fastest near 10 queries per call on a 2-core CPU, the baseline at 1:
    # docs/MEASUREMENTS.md).
    series_batches: list[int] = field(default_factory=lambda: [1, 10, 50])
    # Timed runs of every batch of both methods (mean). The two methods take turns batch by batch.
    timing_repeats: int = 2
    # The oracle judges only if its accuracy on held-out images of the task's classes reaches
    # this; below it every oracle-based metric is refused, with the figure.
    oracle_gate: float = 0.9

    def validate(self, key: str) -> None:
        _check(self.baseline_queries >= 2, f"{key}.baseline_queries", self.baseline_queries, "an integer >= 2")
        _check(len(self.series_batches) >= 1 and all(b >= 1 for b in self.series_batches), f"{key}.series_batches",
               self.series_batches, "a non-empty list of integers >= 1")
        _check(self.timing_repeats >= 1, f"{key}.timing_repeats", self.timing_repeats, "an integer >= 1")
        _check(self.baseline_steps >= 1, f"{key}.baseline_steps", self.baseline_steps, "an integer >= 1")
        _check(0 <= self.oracle_gate <= 1, f"{key}.oracle_gate", self.oracle_gate, "an accuracy in [0, 1]")
        _check(self.cout_steps >= 2, f"{key}.cout_steps", self.cout_steps, "an integer >= 2")


@dataclass(frozen=True)
class Tune:
    """Optuna studies of the explainer's loss weights (exaggerate tune, tune/dvc.yaml)."""
    study_name: str = "explainer-weights-val256"
    # sqlite:///optuna.db (default), postgresql://user:pw@host/db, or journal:FILE
    storage: str = "sqlite:///optuna.db"
    mode: str = field(default="scalar", metadata=_choices("scalar", "multi"))
    n_trials: int = 12
    workers: int = 1
    trial_steps: int = 1200
    eval_every: int = 300
    val_queries: int = 256
    # Scalar objective: compatibility MAE + fid_weight * fid_oracle.
    fid_weight: float = 0.002
    startup_trials: int = 3
    # No trial is pruned before this many training steps: early GAN scores oscillate, so pruning
    # at the first report mostly measures noise (docs/MEASUREMENTS.md).
    prune_after: int = 600
    seed: int = 0
    # RDB storages: a worker's heartbeat period; a trial silent for twice this is failed and retried.
    heartbeat_s: int = 30
    lambda_gan: list[float] = field(default_factory=lambda: [1.0, 10.0])
    lambda_cyc: list[float] = field(default_factory=lambda: [30.0, 300.0])
    lambda_cls: list[float] = field(default_factory=lambda: [10.0, 100.0])
    tune_lr: bool = False
    lr: list[float] = field(default_factory=lambda: [1e-4, 1e-3])
    tune_n_critic: bool = False
    n_critic: list[int] = field(default_factory=lambda: [1, 5])

    def validate(self, key: str) -> None:
        for name in ("lambda_gan", "lambda_cyc", "lambda_cls", "lr"):
            b = getattr(self, name)
            _check(len(b) == 2 and 0 < b[0] < b[1], f"{key}.{name}", b, "[low, high] with 0 < low < high")
        _check(len(self.n_critic) == 2 and 1 <= self.n_critic[0] <= self.n_critic[1], f"{key}.n_critic",
               self.n_critic, "[low, high] with 1 <= low <= high")
        for name in ("n_trials", "workers", "trial_steps", "eval_every", "val_queries"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "an integer >= 1")
        _check(self.heartbeat_s >= 0, f"{key}.heartbeat_s", self.heartbeat_s, "an integer >= 0")
        _check(self.fid_weight >= 0, f"{key}.fid_weight", self.fid_weight, "a number >= 0")
        _check(0 <= self.prune_after < self.trial_steps, f"{key}.prune_after", self.prune_after,
               f"an integer >= 0 and below tune.trial_steps ({self.trial_steps})")
        _check(self.storage.startswith(("sqlite:", "postgresql", "mysql", "journal:")), f"{key}.storage",
               self.storage, "an RDB URL (sqlite:///..., postgresql://...) or journal:FILE")


@dataclass(frozen=True)
class Audit:
    """The bias audit (exaggerate audit, audit/dvc.yaml): the attribute report and the
    planted-confounder experiment (docs/AUDIT.md)."""
    # Attribute report: flag a class whose series slope exceeds its real-data slope by more.
    margin: float = 0.1
    # Planted confounder: a white square of this side (pixels at base.image_size) in the top-left
    # corner, on this share of the positives and of the negatives of the biased f's training
    # images; the clean f's have it independently of the class at the same overall rate, as have
    # the explainers' images and the test images of both.
    mark_size: int = 4
    rate_positive: float = 0.95
    rate_negative: float = 0.05
    # Share of the training partition kept from the classifiers for the explainers (and their bins).
    explainer_fraction: float = 0.5
    # Explainer seeds per classifier; steps of each explainer (0: explainer.steps).
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    explainer_steps: int = 0
    # Test queries explained per explainer.
    num_queries: int = 200
    # A series draws the mark toward the class when its highest bin's image has at least this many
    # more of the mark's pixels lit than its lowest bin's.
    change_pixels: int = 2
    # The mark detector must be at least this accurate on real test images, or the audit refuses.
    detector_gate: float = 0.95

    def validate(self, key: str) -> None:
        _check(self.margin >= 0, f"{key}.margin", self.margin, "a number >= 0")
        _check(self.mark_size >= 1, f"{key}.mark_size", self.mark_size, "an integer >= 1")
        for name in ("rate_positive", "rate_negative", "detector_gate"):
            _check(0 <= getattr(self, name) <= 1, f"{key}.{name}", getattr(self, name), "a number in [0, 1]")
        _check(0 < self.explainer_fraction < 1, f"{key}.explainer_fraction", self.explainer_fraction,
               "a number strictly between 0 and 1")
        _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), f"{key}.seeds", self.seeds,
               "a non-empty list of distinct integers")
        _check(self.explainer_steps >= 0, f"{key}.explainer_steps", self.explainer_steps, "an integer >= 0")
        _check(self.num_queries >= 2, f"{key}.num_queries", self.num_queries, "an integer >= 2")
        _check(1 <= self.change_pixels <= self.mark_size ** 2, f"{key}.change_pixels", self.change_pixels,
               f"an integer from 1 to the mark's {self.mark_size ** 2} pixels")


@dataclass(frozen=True)
class Config:
    base: Base = field(default_factory=Base)
    prepare: Prepare = field(default_factory=Prepare)
    classifier: Classifier = field(default_factory=Classifier)
    posteriors: Posteriors = field(default_factory=Posteriors)
    bin: Bin = field(default_factory=Bin)
    explainer: Explainer = field(default_factory=Explainer)
    explain: Explain = field(default_factory=Explain)
    oracle: Oracle = field(default_factory=Oracle)
    evaluate: Evaluate = field(default_factory=Evaluate)
    tune: Tune = field(default_factory=Tune)
    audit: Audit = field(default_factory=Audit)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, key: str) -> None:
        # G halves the image once per width after the first and must come back to the same size.
        halvings = len(self.explainer.generator_widths) - 1
        _check(self.base.image_size % 2 ** halvings == 0, "base.image_size", self.base.image_size,
               f"a multiple of {2 ** halvings}: explainer.generator_widths has {halvings + 1} widths, so the "
               f"generator halves the image {halvings} times and must double it back to the same size")
        _check(self.audit.mark_size + 2 <= self.base.image_size // 2, "audit.mark_size", self.audit.mark_size,
               f"at most {self.base.image_size // 2 - 2}: the mark stays in a corner of the "
               f"{self.base.image_size}-pixel image")


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting ints to floats where allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} settings, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


# Options that lost their comparison and left the code, and why (docs/MEASUREMENTS.md has the runs).
REMOVED = {
    "explainer.generator_skips": "encoder-to-decoder skips lost the bias audit: with them an explainer "
                                 "can leave a planted mark undrawn",
    "explainer.skip_dropout": "it came with explainer.generator_skips, which lost the bias audit",
}


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        key = f"{where}{unknown[0]}"
        if key in REMOVED:
            raise ConfigError(f"{key} was removed ({REMOVED[key]}); delete it from the parameters "
                              "(docs/MEASUREMENTS.md records the comparison)")
        raise ConfigError(f"unknown key {key}; allowed keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        converted = _convert(value, hints[name], key)
        choices = fields[name].metadata.get("choices")
        if choices and converted not in choices:
            raise ConfigError(f"{key}: got {converted!r}, allowed values: {', '.join(choices)}")
        kwargs[name] = converted
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def config_from_dict(raw: dict | None) -> Config:
    """A Config from a mapping; keys it leaves out take the defaults (params.yaml's values)."""
    return _build(Config, raw or {}, "")


def missing_keys(cls: type, raw: dict, prefix: str = "") -> list[str]:
    """Dotted keys of `cls` that `raw` leaves out (an explicit null counts as given)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in raw:
            out.append(key)
        elif dataclasses.is_dataclass(hints[f.name]) and isinstance(raw[f.name], dict):
            out += missing_keys(hints[f.name], raw[f.name], key)
    return out


def load_config(path: str | Path = "params.yaml", complete: bool = True) -> Config:
    """The parameters of a file. complete=False accepts a file that leaves keys out (they take
    their defaults): the resolved parameters stored in a model registered by an earlier version,
    which keys added later must not make unloadable."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file {path} not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        cfg = config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    # A parameter file is complete: a key left out would silently take a default.
    missing = [k for k in missing_keys(Config, raw or {}) if not k.startswith("classifier.external.")]
    if missing and complete:
        raise ConfigError(f"{path}: missing key {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                          else "") + "; a parameter file lists every key: see params.yaml or `exaggerate params`")
    return cfg


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for logging parameters."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out

