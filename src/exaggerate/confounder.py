"""The planted-confounder audit: does the explainer reveal a bias we put into f ourselves?

The paper's case for progressive exaggeration was a Smiling classifier trained where every man
smiles: its series changed gender, those of a normally trained classifier did not. Here the
confounder is planted with ground truth on any dataset the pipeline reads:

- the mark: a white square of `audit.mark_size` pixels in the top-left corner of the image,
  painted on the preprocessed image (so it is the same on faces, folders and Fashion-MNIST);
- the biased f is trained where the mark sits on `rate_positive` of the positives and
  `rate_negative` of the negatives; the clean f where it sits on images independently of the
  class, at the same overall rate. Both use the same settings (params.yaml's classifier section),
  images and seed;
- the explainers' images (a held-out `explainer_fraction` of the training partition) and the
  test images carry the mark independently of the class, at that rate, identically for both
  arms: the two explainers differ only by the f they explain;
- the detector is the mark's own pixels: a pixel of the square is lit when it is brighter than
  halfway between the mark's value and the square's mean on unmarked real images, and the
  mark's coverage is the share of its pixels lit. On real images the mark is there when at least
  half of it is lit; that detector's accuracy on the real test images is checked
  (audit.detector_gate) before anything is judged with it.

A series "changes the mark in the direction of the class" when its image of the highest bin has
at least `audit.change_pixels` more of the mark's pixels lit than its image of the lowest bin:
exaggerating the class draws the mark (or keeps it where less of the class erases it). An
explainer can draw part of the mark only, which a person sees at once in a corner where real
images have nothing; the stricter share, the whole mark appearing (coverage crossing one half
from the lowest bin to the highest), is reported beside it. The report gives both shares for
both arms (mean over explainer seeds, bootstrap 95% interval over the queries), the mark's
coverage per bin, f's reliance on the mark (accuracy on test images marked along the bias and
against it), and the series of both arms side by side.

Stages (audit/dvc.yaml): `classifier` per arm (f, its posteriors on the explainers' images and
the calibrated bins), `explainer` per arm and seed (G and the test series), and the report
(confounder_report.py), which changes without retraining anything.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import Bin, Config, Prepare
from .datasets import ImageDataset
from .errors import ExaggerateError
from .io import write_json

ROOT = Path("audit/confounder")
REPORT = Path("results/audit")
ARMS = ("biased", "clean")
MARK_VALUE = 1.0  # white, in the pipeline's [-1, 1] range


class ConfounderError(ExaggerateError):
    """An audit that cannot be run or judged; the message says why."""


# ----------------------------------------------------------------------------- the mark

def mark_box(image_size: int, size: int) -> tuple[slice, slice]:
    """Rows and columns of the mark: a size x size square one pixel in from the top-left corner."""
    return slice(1, 1 + size), slice(1, 1 + size)


def paint(x: torch.Tensor, size: int) -> torch.Tensor:
    """A copy of x (..., C, H, W) with the mark painted on every image."""
    rows, cols = mark_box(x.shape[-1], size)
    out = x.clone()
    out[..., rows, cols] = MARK_VALUE
    return out


def mark_scores(x: torch.Tensor | np.ndarray, size: int) -> np.ndarray:
    """The detector's score of each image (..., C, H, W): the mean of the mark's square."""
    x = torch.as_tensor(x)
    rows, cols = mark_box(x.shape[-1], size)
    return x[..., rows, cols].float().mean(dim=(-3, -2, -1)).numpy()


def detector_threshold(unmarked_scores: np.ndarray) -> float:
    """Halfway between the mark's value and the square's mean on unmarked real images."""
    return float((MARK_VALUE + float(np.mean(unmarked_scores))) / 2)


def mark_coverage(x: torch.Tensor | np.ndarray, size: int, threshold: float) -> np.ndarray:
    """Share of the mark's pixels lit (channel mean above threshold) in each image (..., C, H, W)."""
    x = torch.as_tensor(x)
    rows, cols = mark_box(x.shape[-1], size)
    return (x[..., rows, cols].float().mean(dim=-3) > threshold).float().mean(dim=(-2, -1)).numpy()


def assign_marks(labels: np.ndarray, rate_positive: float, rate_negative: float, seed: int, stream: int) -> np.ndarray:
    """Which images carry the mark: each positive with probability rate_positive, each negative
    with rate_negative; a seeded stream per part of the data."""
    rng = np.random.default_rng([seed, stream])
    return rng.random(len(labels)) < np.where(np.asarray(labels) == 1, rate_positive, rate_negative)


@dataclass
class MarkedDataset(ImageDataset):
    """An ImageDataset whose images carry the mark where `marked` says. Marked images get ids
    ending in '+mark', so a checkpoint made on other marks never resumes."""

    marked: Optional[np.ndarray] = None
    mark_size: int = 4

    @classmethod
    def of(cls, dataset: ImageDataset, marked: np.ndarray, mark_size: int) -> "MarkedDataset":
        fields = {f.name: getattr(dataset, f.name) for f in dataclasses.fields(ImageDataset)}
        fields["ids"] = [i + "+mark" if m else i for i, m in zip(dataset.ids, marked)]
        return cls(**fields, marked=np.asarray(marked, dtype=bool), mark_size=mark_size)

    def image(self, index: int) -> torch.Tensor:
        x = super().image(index)
        return paint(x, self.mark_size) if self.marked[index] else x

    def images(self, indices) -> torch.Tensor:
        x = super().images(indices)
        m = torch.from_numpy(self.marked[np.asarray(indices, dtype=np.int64)])
        if m.any():
            x[m] = paint(x[m], self.mark_size)
        return x


# ----------------------------------------------------------------------------- the data of each arm

@dataclass
class ArmData:
    dataset: MarkedDataset
    splits: dict[str, np.ndarray]  # train: f's images; val: the explainers'; test: the queries
    rate: float                    # the overall rate of the mark


def arm_data(cfg: Config, arm: str) -> ArmData:
    """The marked images of one arm. Splits: `train` (f), `val` (the explainers' images and
    bins: audit.explainer_fraction of the training partition), `test` (the pipeline's test)."""
    from .datasets import open_dataset
    from .splits import make_splits

    if arm not in ARMS:
        raise ConfounderError(f"unknown arm {arm!r}; expected one of {', '.join(ARMS)}")
    a, base = cfg.audit, cfg.base
    dataset = open_dataset(base)
    prepare = Prepare(val_fraction=a.explainer_fraction, test_fraction=cfg.prepare.test_fraction,
                      max_per_class=cfg.prepare.max_per_class)
    raw = make_splits(dataset, base, prepare)
    splits = {name: dataset.index_of(ids) for name, ids in raw.items()}
    y = dataset.labels[:, 0]
    train_pos = float(y[splits["train"]].mean())
    rate = train_pos * a.rate_positive + (1 - train_pos) * a.rate_negative
    marked = np.zeros(len(dataset), dtype=bool)
    for stream, name in enumerate(("train", "val", "test")):
        idx = splits[name]
        rates = (a.rate_positive, a.rate_negative) if (name == "train" and arm == "biased") else (rate, rate)
        marked[idx] = assign_marks(y[idx], *rates, seed=base.seed, stream=stream)
    return ArmData(MarkedDataset.of(dataset, marked, a.mark_size), splits, rate)


def arm_dir(root: Path, arm: str) -> Path:
    return Path(root) / arm


def seed_dir(root: Path, arm: str, seed: int) -> Path:
    return arm_dir(root, arm) / f"seed{seed}"


def explainer_params(cfg: Config, seed: int):
    steps = cfg.audit.explainer_steps or cfg.explainer.steps
    return dataclasses.replace(cfg.explainer, seed=seed, steps=steps,
                               checkpoint_every=min(cfg.explainer.checkpoint_every, steps),
                               image_every=min(cfg.explainer.image_every, steps))


# ----------------------------------------------------------------------------- stages

def reliance(f, data: ArmData, cfg: Config) -> dict:
    """f's accuracy on the test images with the marks as drawn (independent of the class), with
    the mark on every positive and no negative (along the bias) and the reverse (against it)."""
    from .utils import resolve_device

    device = resolve_device(cfg.base.device)
    base = dataclasses.replace(data.dataset, marked=np.zeros(len(data.dataset), dtype=bool))
    idx = data.splits["test"]
    y = data.dataset.labels[idx, 0]
    plain = base.images(idx)
    marked_all = paint(plain, cfg.audit.mark_size)
    pos = torch.from_numpy(y == 1)[:, None, None, None]
    variants = {"independent": data.dataset.images(idx),
                "along": torch.where(pos, marked_all, plain), "against": torch.where(pos, plain, marked_all)}
    out = {}
    with torch.no_grad():
        for name, x in variants.items():
            p = torch.cat([f(x[i:i + 256].to(device)).cpu() for i in range(0, len(x), 256)]).numpy()
            out[f"accuracy_{name}"] = float(((p >= 0.5) == (y == 1)).mean())
            out[f"mean_p_{name}"] = float(p.mean())
    out["accuracy_gap"] = out["accuracy_along"] - out["accuracy_against"]
    out["test_images"] = int(len(idx))
    return out


def classifier_stage(cfg: Config, arm: str, root: Path = ROOT) -> dict:
    """f of one arm, its posteriors on the explainers' and the test images, the bins, and its
    reliance on the mark."""
    from .classifier import load_classifier, train_classifier
    from .posteriors import POSTERIOR_COLUMNS, bin_stage, posterior_stage, read_table

    data = arm_data(cfg, arm)
    out = arm_dir(root, arm)
    train = data.splits["train"]
    marked, positive = data.dataset.marked[train], data.dataset.labels[train, 0] == 1
    print(f"confounder audit, {arm} f: the mark on {marked[positive].mean():.3f} of its positive and "
          f"{marked[~positive].mean():.3f} of its negative training images")
    train_classifier(data.dataset, data.splits, cfg.base, cfg.classifier, out / "classifier")
    f = load_classifier(out / "classifier", cfg.base)
    explainer_splits = {"val": data.splits["val"], "test": data.splits["test"]}
    posterior_stage(f, data.dataset, explainer_splits, cfg.base, cfg.posteriors.batch_size, out / "posteriors")
    table = read_table(out / "posteriors" / "posteriors.csv", (*POSTERIOR_COLUMNS, f"label_{data.dataset.label_names[0]}"))
    bin_stage(table, data.dataset.label_names[0], cfg.base, Bin(per_bin=cfg.bin.per_bin, split="val"), out / "bin")
    result = {"arm": arm, "mark_rate": data.rate, **reliance(f, data, cfg)}
    write_json(out / "reliance.json", result)
    print(f"{arm} f on test images: accuracy {result['accuracy_independent']:.3f} with the mark independent of "
          f"the class, {result['accuracy_along']:.3f} along the bias, {result['accuracy_against']:.3f} against it")
    return result


def explainer_stage(cfg: Config, arm: str, seed: int, root: Path = ROOT) -> dict:
    """G against one arm's f on the explainers' images, then its series of the test queries."""
    from .checkpoint import load_generator
    from .classifier import load_classifier
    from .posteriors import read_explainer_inputs
    from .series import explain_stage
    from .training_loop import fit
    from .utils import resolve_device

    data = arm_data(cfg, arm)
    device = resolve_device(cfg.base.device)
    f = load_classifier(arm_dir(root, arm) / "classifier", cfg.base).to(device)
    indices, bins = read_explainer_inputs(arm_dir(root, arm) / "bin" / "explainer_inputs.csv", data.dataset,
                                          cfg.base.num_bins)
    params = explainer_params(cfg, seed)
    out = seed_dir(root, arm, seed)
    fit(data.dataset, indices, bins, data.splits["val"], f, cfg.base, params, out / "explainer")
    g = load_generator(out / "explainer" / "generator.pt", cfg.base, params).to(device)
    explain = dataclasses.replace(cfg.explain, split="test", num_queries=cfg.audit.num_queries, strips=0)
    return explain_stage(data.dataset, data.splits["test"], f, g, cfg.base, explain, out / "explain")
