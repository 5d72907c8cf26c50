"""The black box f: a DenseNet-style classifier we train, or the user's TorchScript model.

Every later stage sees f through `BlackBox`: images in [-1, 1] at the project's size in,
posterior of the explained target out (sigmoid outputs), frozen, differentiable.
"""
from __future__ import annotations

import hashlib
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, recall_score, roc_auc_score
from torchvision.models import DenseNet

from . import plots
from .config import Base, Classifier as ClassifierParams, ExternalClassifier
from .datasets import ImageDataset
from .errors import ExaggerateError
from .io import ArtifactError, read_json, read_torch_file, save_figure, save_torch, write_json
from .tracking import Tracker
from .utils import progress as progress_bar, resolve_device, seed_everything


class ClassifierError(ExaggerateError, ValueError):
    """A classifier file or its outputs cannot be used; the message names the file."""


def build_densenet(params: ClassifierParams, channels: int, num_outputs: int) -> nn.Module:
    net = DenseNet(growth_rate=params.growth_rate, block_config=tuple(params.block_config),
                   num_init_features=params.num_init_features, bn_size=params.bn_size,
                   num_classes=num_outputs)
    if params.stem == "small":
        # 32x32 inputs: a 3x3 stride-1 stem and one 2x2 pool instead of ImageNet's 7x7/2 + 3x3/2.
        net.features.conv0 = nn.Conv2d(channels, params.num_init_features, 3, 1, 1, bias=False)
        net.features.pool0 = nn.MaxPool2d(2)
    elif channels != 3:
        net.features.conv0 = nn.Conv2d(channels, params.num_init_features, 7, 2, 3, bias=False)
    return net


class BlackBox(nn.Module):
    """f(x): posteriors of a frozen classifier for images in [-1, 1] at `image_size`."""

    def __init__(self, model: nn.Module, label_names: list[str], image_size: int, channels: int,
                 input_size: Optional[int] = None, input_channels: Optional[int] = None,
                 value_range: tuple[float, float] = (-1.0, 1.0), output: str = "logit",
                 output_index: int = 0, source: str = "classifier"):
        super().__init__()
        self.model = model
        self.label_names = list(label_names)
        self.image_size, self.channels = image_size, channels
        self.input_size = input_size or image_size
        self.input_channels = input_channels or channels
        self.value_range = tuple(value_range)
        self.output = output
        self.output_index = output_index
        self.source = source
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # f stays frozen in eval mode whatever its owner does
        return super().train(False)

    def _adapt(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.input_channels:
            x = x.mean(1, keepdim=True) if self.input_channels == 1 else x.expand(-1, self.input_channels, -1, -1)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        lo, hi = self.value_range
        if (lo, hi) != (-1.0, 1.0):
            x = (x + 1) / 2 * (hi - lo) + lo
        return x

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """All outputs as probabilities, shape (B, K)."""
        out = self.model(self._adapt(x))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 1:
            out = out[:, None]
        return torch.sigmoid(out) if self.output == "logit" else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)[:, self.output_index]


# ----------------------------------------------------------------------------- metrics

def classification_metrics(p: np.ndarray, y: np.ndarray, num_bins: int = 10) -> dict:
    pred = (p >= 0.5).astype(int)
    y = y.astype(int)
    both = len(np.unique(y)) == 2
    rel = plots.reliability(p, y, num_bins)
    return {
        "roc_auc": float(roc_auc_score(y, p)) if both else None,
        "accuracy": float((pred == y).mean()),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "brier": rel["brier"],
        "ece": rel["ece"],
        "confusion_matrix": confusion_matrix(y, pred, labels=[0, 1]).tolist(),
    }


@torch.no_grad()
def predict(f: nn.Module, loader, device: torch.device, progress: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """All outputs (N, K) and labels (N, L) of a loader of (image, labels)."""
    outs, labels = [], []
    for x, y in progress_bar(loader, desc=progress, disable=progress is None, leave=False):
        outs.append(f(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(outs).numpy(), torch.cat(labels).numpy()


# ----------------------------------------------------------------------------- training

def _arch(params: ClassifierParams, base: Base, label_names: list[str]) -> dict:
    return {"growth_rate": params.growth_rate, "block_config": list(params.block_config),
            "num_init_features": params.num_init_features, "bn_size": params.bn_size, "stem": params.stem,
            "channels": base.channels, "image_size": base.image_size, "label_names": list(label_names)}


def train_classifier(dataset: ImageDataset, splits: dict[str, np.ndarray], base: Base,
                     params: ClassifierParams, out_dir: str | Path, tracker: Tracker = Tracker()) -> dict:
    """Train f on the train split, checkpoint every epoch (resumable), report on val and test."""
    from .distributed import init, sync_batch_norm

    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    world, device = init(resolve_device(base.device))
    seed_everything(base.seed)
    label_names = dataset.label_names
    arch = _arch(params, base, label_names)
    model = build_densenet(params, base.channels, len(label_names))
    if world.distributed:  # batch statistics of the global batch, gradients averaged by DDP
        model = sync_batch_norm(model)
    model = model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    ckpt_path = ckpt_dir / "last.pt"
    signature = _train_signature(params, base, dataset, splits)
    start_epoch, history = _resume(ckpt_path, arch, signature, model, optimiser, device)
    train_set = dataset.torch_dataset(splits["train"])
    val_loader = torch.utils.data.DataLoader(dataset.torch_dataset(splits["val"]), batch_size=256)
    trained = model
    if world.distributed:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    for epoch in range(start_epoch, params.epochs):
        train_loss = _train_epoch(trained, optimiser, train_set, params, base.seed, epoch, device, world)
        if not world.is_main:  # rank 0 validates, checkpoints and reports
            continue
        model.eval()
        logits, labels = predict(model, val_loader, device)
        val_loss = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(labels)))
        val = classification_metrics(1 / (1 + np.exp(-logits[:, 0])), labels[:, 0], base.num_bins)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
               **{f"val_{k}": v for k, v in val.items() if k != "confusion_matrix"}}
        history.append(row)
        print(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, val loss {val_loss:.4f}, "
              f"val AUC {val['roc_auc']}, val accuracy {val['accuracy']:.4f}")
        tracker.metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        save_torch(ckpt_path, {"arch": arch, "train": signature, "epoch": epoch + 1,
                               "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                               "history": history})

    if not world.is_main:
        return {}
    save_torch(out_dir / "model.pt", {"kind": "densenet", "arch": arch, "state_dict": model.state_dict()})
    write_json(out_dir / "classifier.json", {"kind": "densenet", **arch})
    f = load_classifier(out_dir, base)
    return report_classifier(f, dataset, splits, base, params, out_dir, tracker, history)


def _resume(path: Path, arch: dict, signature: dict, model: nn.Module, optimiser, device) -> tuple[int, list[dict]]:
    """The epoch to start from and the history so far: from the last checkpoint when it was made
    with the same settings, else from scratch."""
    if not path.is_file():
        return 0, []
    state = read_torch_file(path, "classifier checkpoint", ("arch", "train", "model", "optimiser", "epoch", "history"),
                            device)
    if state["arch"] != arch or state["train"] != signature:
        print(f"ignoring {path}: it was made with other settings; training from scratch")
        return 0, []
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    print(f"resuming classifier training after epoch {state['epoch']} from {path}")
    return state["epoch"], state["history"]


def _train_epoch(model: nn.Module, optimiser, train_set, params: ClassifierParams, seed: int, epoch: int,
                 device, world=None) -> float:
    """One epoch over the training split; its mean loss. With several processes each draws the
    same global batches and trains on its share (torch.tensor_split), its loss scaled so that
    DDP's mean of the gradients is the gradient of the global batch's mean loss."""
    # One generator per epoch, seeded from (seed, epoch): a resumed run sees the same order.
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    loader = torch.utils.data.DataLoader(train_set, batch_size=params.batch_size, shuffle=True, generator=g)
    mix_rng = np.random.default_rng([seed, epoch, 1]) if params.mixup_alpha > 0 else None
    model.train()
    total, count = 0.0, 0
    distributed = world is not None and world.distributed
    bar = progress_bar(loader, desc=f"classifier epoch {epoch + 1}/{params.epochs}", leave=False,
                       disable=distributed and not world.is_main)
    for x, y in bar:
        if mix_rng is not None:
            x, y = mixup(x, y, params.mixup_alpha, mix_rng)
        if distributed:
            n = len(x)
            x, y = torch.tensor_split(x, world.size)[world.rank], torch.tensor_split(y, world.size)[world.rank]
            x, y = x.to(device), y.to(device)
            loss = F.binary_cross_entropy_with_logits(model(x), y, reduction="sum") * world.size / (n * y.shape[1])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() * n / world.size  # this process's summed loss
            count += len(x)
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
            continue
        x, y = x.to(device), y.to(device)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total += loss.item() * len(x)
        count += len(x)
        bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    return total / count


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each image and its labels with another of the batch, by m ~ Beta(alpha, alpha)."""
    m = torch.from_numpy(rng.beta(alpha, alpha, size=len(x))).to(x.dtype)
    j = torch.from_numpy(rng.permutation(len(x)))
    mx = m.view(-1, *([1] * (x.dim() - 1)))
    my = m.view(-1, *([1] * (y.dim() - 1))).to(y.dtype)
    return mx * x + (1 - mx) * x[j], my * y + (1 - my) * y[j]


def _train_signature(params: ClassifierParams, base: Base, dataset: ImageDataset, splits) -> dict:
    """What a checkpoint depends on: settings (more epochs may continue a run) and the data."""
    d = asdict(params)
    d.pop("epochs")
    d.pop("grid_images")
    d.pop("processes")  # a run resumes in any number of processes
    ids = hashlib.sha256("\n".join(dataset.ids[i] for i in splits["train"]).encode()).hexdigest()[:16]
    return {**d, "seed": base.seed, "train_ids": ids, "labels": list(dataset.label_names)}


def report_classifier(f: BlackBox, dataset: ImageDataset, splits: dict[str, np.ndarray], base: Base,
                      params: ClassifierParams, out_dir: Path, tracker: Tracker,
                      history: Optional[list[dict]] = None) -> dict:
    """Test metrics, reliability curve and a posterior-titled validation grid."""
    device = resolve_device(base.device)
    f = f.to(device)
    results = {}
    for split in ("val", "test"):
        loader = torch.utils.data.DataLoader(dataset.torch_dataset(splits[split]), batch_size=256)
        p, y = predict(f, loader, device, progress=f"f on {split}")
        results[split] = (p, y[:, 0])
    test = classification_metrics(*results["test"], base.num_bins)
    metrics = {"test": test, "val": classification_metrics(*results["val"], base.num_bins),
               "label_names": dataset.label_names, "epochs": history or []}
    write_json(out_dir / "metrics.json", metrics)
    tracker.metrics({f"test_{k}": v for k, v in test.items() if k != "confusion_matrix" and v is not None})
    tracker.tags({"test_confusion_matrix": test["confusion_matrix"]})

    fig = plots.reliability_figure({"test": plots.reliability(*results["test"], base.num_bins)},
                                   f"reliability of f: p({dataset.label_names[0]})")
    save_figure(out_dir / "reliability.png", fig)
    tracker.figure(fig, "reliability.png")
    plots.close(fig)

    n = min(params.grid_images, len(splits["val"]))
    if n:
        idx = splits["val"][:n]
        imgs = dataset.images(idx)
        p_grid = results["val"][0][:n]
        cols = min(8, n)
        rows = (n + cols - 1) // cols
        pad = rows * cols - n
        imgs = torch.cat([imgs, -torch.ones(pad, *imgs.shape[1:])]).reshape(rows, cols, *imgs.shape[1:])
        titles = [f"p={v:.2f} y={int(t)}" for v, t in zip(p_grid, results["val"][1][:n])] + [""] * pad
        fig = plots.image_grid(imgs, [titles[r * cols:(r + 1) * cols] for r in range(rows)],
                               suptitle=f"validation images, posterior p({dataset.label_names[0]}), label y")
        save_figure(out_dir / "val_grid.png", fig)
        tracker.figure(fig, "val_grid.png")
        plots.close(fig)
    return metrics


# ----------------------------------------------------------------------------- loading

def install_external(spec: ExternalClassifier, base: Base, out_dir: str | Path) -> BlackBox:
    """Bring-your-own classifier: check the TorchScript or torch.export file and record it as f."""
    out_dir = Path(out_dir)
    src = Path(spec.path)
    kind = external_kind(src)
    f = load_external(src, kind, spec, base)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .io import atomic_path
    with atomic_path(out_dir / "model.pt") as tmp:
        shutil.copyfile(src, tmp)
    # dvc.yaml declares the training checkpoints folder: here it only says why it is empty.
    (out_dir / "checkpoints").mkdir(exist_ok=True)
    (out_dir / "checkpoints" / "README.txt").write_text(f"f is the external classifier {src}; nothing was trained.\n")
    write_json(out_dir / "classifier.json", {"kind": kind, "source": str(src), "external": asdict(spec),
                                              "label_names": [base.target], "image_size": base.image_size,
                                              "channels": base.channels})
    return f


def external_kind(path: Path) -> str:
    """"torch_export" for a torch.export program (.pt2), else "torchscript"."""
    return "torch_export" if path.suffix == ".pt2" else "torchscript"


class _Exported(nn.Module):
    """A torch.export program as f's model. Its train/eval behaviour was fixed when it was
    exported (the program refuses .eval()), so switching modes here changes nothing."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def _read_external(path: Path, kind: str) -> nn.Module:
    what = "torch.export program" if kind == "torch_export" else "TorchScript classifier"
    if not path.is_file():
        raise ClassifierError(f"{what} {path} not found (classifier.external.path)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "torch_export":
                return _Exported(torch.export.load(str(path)).module())
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, ValueError, zipfile errors...
        raise ClassifierError(f"cannot load {what} {path}: {type(exc).__name__}: {exc}") from exc


def load_external(path: Path, kind: str, spec: ExternalClassifier, base: Base) -> BlackBox:
    """A user's classifier file as f, checked on probe batches: it must return (batch,) or
    (batch, outputs), with output_index in range, for batches of any size."""
    model = _read_external(path, kind)
    f = BlackBox(model, [base.target], base.image_size, base.channels, input_size=spec.input_size,
                 input_channels=spec.channels, value_range=tuple(spec.value_range), output=spec.output,
                 output_index=spec.output_index, source=str(path))
    for batch in (2, 3):  # two sizes: a program exported for one batch size fails the other
        probe = torch.zeros(batch, base.channels, base.image_size, base.image_size)
        try:
            with torch.no_grad():
                out = f.model(f._adapt(probe))
        except Exception as exc:
            hint = (" (export it with a dynamic batch dimension: dynamic_shapes={'x': {0: torch.export.Dim('batch')}})"
                    if kind == "torch_export" else "")
            raise ClassifierError(f"classifier {path} fails on a batch of shape ({batch}, {spec.channels}, "
                                  f"{spec.input_size}, {spec.input_size}) (classifier.external.input_size/channels)"
                                  f"{hint}: {type(exc).__name__}: {str(exc)[:300]}") from exc
        _check_external_output(out, batch, path, spec)
    return f


def _check_external_output(out, batch: int, path: Path, spec: ExternalClassifier) -> None:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim not in (1, 2) or out.shape[0] != batch:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ClassifierError(f"classifier {path} returned {shape} for a batch of {batch}; "
                              "expected (batch,) or (batch, outputs)")
    n_out = 1 if out.ndim == 1 else out.shape[1]
    if spec.output_index >= n_out:
        raise ClassifierError(f"classifier.external.output_index {spec.output_index} is out of range: "
                              f"{path} has {n_out} output(s) (valid indices 0..{n_out - 1})")


_ARCH_KEYS = ("growth_rate", "block_config", "num_init_features", "bn_size", "stem", "channels", "label_names")


def load_classifier(out_dir: str | Path, base: Base) -> BlackBox:
    """f as recorded by the train_classifier stage (trained or external)."""
    out_dir = Path(out_dir)
    meta = read_json(out_dir / "classifier.json")
    if meta["image_size"] != base.image_size or meta["channels"] != base.channels:
        raise ClassifierError(f"{out_dir / 'classifier.json'}: classifier expects {meta['channels']}x"
                              f"{meta['image_size']}px images, params say {base.channels}x{base.image_size}")
    if meta["kind"] in ("torchscript", "torch_export"):
        spec = ExternalClassifier(**{**meta["external"], "path": str(out_dir / "model.pt")})
        return load_external(out_dir / "model.pt", meta["kind"], spec, base)
    state = read_torch_file(out_dir / "model.pt", "classifier", ("arch", "state_dict"))
    arch = state["arch"]
    missing = [k for k in _ARCH_KEYS if k not in arch]
    if missing:
        raise ArtifactError(f"classifier {out_dir / 'model.pt'}: its 'arch' record lacks {', '.join(missing)}")
    params = ClassifierParams(growth_rate=arch["growth_rate"], block_config=arch["block_config"],
                              num_init_features=arch["num_init_features"], bn_size=arch["bn_size"],
                              stem=arch["stem"])
    net = build_densenet(params, arch["channels"], len(arch["label_names"]))
    try:
        net.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise ArtifactError(f"classifier {out_dir / 'model.pt'}: its weights do not fit its 'arch' record: "
                            f"{exc}") from exc
    return BlackBox(net, arch["label_names"], base.image_size, base.channels, output="logit",
                    output_index=0, source=str(out_dir / "model.pt"))
