"""The oracle: an independent classifier of every class or attribute of the dataset.

It differs from f in architecture (a plain CNN, not a DenseNet), seed and labels (all classes
of the dataset, or all CelebA attributes), so that its judgement of the explanations is not
f's own. Its penultimate features are the default FID feature space ("fid_oracle").
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Base, Oracle as OracleParams
from .datasets import DatasetError, ImageDataset, open_dataset
from .io import ArtifactError, read_json, read_torch_file, save_torch, write_json
from .tracking import Tracker
from .utils import progress, resolve_device, seed_everything

ORACLE_SEED_OFFSET = 7919  # a different seed from f's


class OracleNet(nn.Module):
    """conv-BN-ReLU stages with max-pooling, global average pooling, a feature layer, a head."""

    def __init__(self, channels: int, widths: list[int], feature_dim: int, num_outputs: int):
        super().__init__()
        layers, c_in = [], channels
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = w
        self.body = nn.Sequential(*layers)
        self.feature = nn.Sequential(nn.Linear(c_in, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Oracle(nn.Module):
    """Frozen oracle: `probabilities(x)` per class/attribute, `features(x)` for FID."""

    def __init__(self, net: OracleNet, names: list[str], kind: str):
        super().__init__()
        self.net, self.names, self.kind = net.eval(), list(names), kind
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def index_of(self, name: str) -> Optional[int]:
        """The output column of a class or attribute, None when the oracle has none of that name."""
        return self.names.index(name) if name in self.names else None

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return logits.softmax(1) if self.kind == "multiclass" else logits.sigmoid()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # FID's feature extractor interface
        return self.features(x)


def oracle_data(base: Base) -> tuple[ImageDataset, np.ndarray, list[str], str]:
    """All images of the dataset with all their classes (multiclass) or attributes (multilabel)."""
    if base.dataset == "celeba":
        from .datasets import _read_celeba_attributes

        names, _, _ = _read_celeba_attributes(Path(base.data_root) / "list_attr_celeba.txt")
        ds = open_dataset(dataclasses.replace(base, attributes=names))
        return ds, ds.labels, ds.label_names, "multilabel"
    ds = open_dataset(dataclasses.replace(base, negatives=[]))
    if base.dataset == "fashion_mnist":
        from .datasets import FASHION_CLASSES as names
    else:
        names = sorted(p.name for p in Path(base.data_root).iterdir() if p.is_dir() and not p.name.startswith("."))
    return ds, ds.strata, list(names), "multiclass"


def _split(ds: ImageDataset, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if ds.partition is not None:
        part = np.array(ds.partition)
        return np.flatnonzero(part == "train"), np.flatnonzero(part == "test")
    perm = np.random.default_rng(seed).permutation(len(ds))
    cut = int(0.8 * len(ds))
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def oracle_epochs(params: OracleParams, train_images: int) -> int:
    """oracle.epochs, or more when that many epochs would not reach oracle.min_steps."""
    steps_per_epoch = max(1, math.ceil(train_images / params.batch_size))
    return max(params.epochs, math.ceil(params.min_steps / steps_per_epoch))


def train_oracle(base: Base, params: OracleParams, out_dir: str | Path, tracker: Tracker = Tracker()) -> dict:
    """Train the oracle on all classes (attributes) and report its accuracy on held-out images:
    overall, and on the task's classes, which decides whether it may judge (evaluate.oracle_gate)."""
    out_dir = Path(out_dir)
    device = resolve_device(base.device)
    seed = base.seed + ORACLE_SEED_OFFSET
    seed_everything(seed)
    ds, targets, names, kind = oracle_data(base)
    train_idx, test_idx = _split(ds, seed)
    if params.max_train and len(train_idx) > params.max_train:
        train_idx = np.sort(np.random.default_rng(seed).choice(train_idx, params.max_train, replace=False))
    net = OracleNet(base.channels, list(params.widths), params.feature_dim, len(names)).to(device)
    y_all = torch.from_numpy(np.asarray(targets))
    epochs = oracle_epochs(params, len(train_idx))
    _fit(net, ds, y_all, train_idx, kind, params, epochs, seed, device)
    oracle = Oracle(net.eval(), names, kind)
    with torch.no_grad():
        p = torch.cat([oracle.probabilities(ds.images(test_idx[i:i + 512]).to(device)).cpu()
                       for i in range(0, len(test_idx), 512)])
    metrics = {"test_accuracy": _accuracy(p, y_all[test_idx], kind), "kind": kind, "classes": names,
               "epochs": epochs, "train_images": int(len(train_idx)), "test_images": int(len(test_idx)),
               **task_accuracy(p, y_all[test_idx], names, kind, base)}
    save_torch(out_dir / "oracle.pt", {"widths": list(params.widths), "feature_dim": params.feature_dim,
                                       "channels": base.channels, "image_size": base.image_size,
                                       "names": names, "kind": kind, "state_dict": net.state_dict()})
    write_json(out_dir / "metrics.json", metrics)
    tracker.metrics({"oracle_test_accuracy": metrics["test_accuracy"], "oracle_task_accuracy": metrics["task_accuracy"]})
    print(f"oracle ({kind}, {len(names)} outputs, {epochs} epochs): test accuracy {metrics['test_accuracy']:.4f}, "
          f"on the task's classes {metrics['task_accuracy']:.4f} ({metrics['task_images']} images)")
    return metrics


def _fit(net: OracleNet, ds: ImageDataset, y_all: torch.Tensor, train_idx: np.ndarray, kind: str,
         params: OracleParams, epochs: int, seed: int, device: torch.device) -> None:
    """Adam with a cosine decay of the learning rate over all steps; oracle.flip mirrors images."""
    opt = torch.optim.Adam(net.parameters(), lr=params.lr)
    train_set = torch.utils.data.TensorDataset(torch.from_numpy(train_idx))
    total = epochs * math.ceil(len(train_idx) / params.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed + epoch)
        loader = torch.utils.data.DataLoader(train_set, batch_size=params.batch_size, shuffle=True, generator=g)
        net.train()
        bar = progress(loader, desc=f"oracle epoch {epoch + 1}/{epochs}", leave=False)
        for (idx,) in bar:
            x = ds.images(idx.numpy())
            if params.flip:
                mirrored = torch.rand(len(idx), generator=g) < 0.5
                x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
            x = x.to(device)
            y = y_all[idx].to(device)
            logits = net(x)
            loss = F.cross_entropy(logits, y.long()) if kind == "multiclass" else \
                F.binary_cross_entropy_with_logits(logits, y.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def _accuracy(p: torch.Tensor, y: torch.Tensor, kind: str) -> float:
    """Share of correct classes (multiclass), or of correct attribute decisions (multilabel)."""
    if not len(y):
        return 0.0
    if kind == "multiclass":
        return (p.argmax(1) == y).sum().item() / len(y)
    return ((p >= 0.5).float() == y).double().mean(1).sum().item() / len(y)


def task_accuracy(p: torch.Tensor, y: torch.Tensor, names: list[str], kind: str, base: Base) -> dict:
    """The oracle's accuracy on the explained decision, on held-out images of the task's
    classes: the target against base.negatives (against all other classes when empty), by the
    largest probability among those classes; for attributes, the target attribute at 0.5."""
    target = names.index(base.target)
    if kind == "multilabel":
        return {"task_accuracy": ((p[:, target] >= 0.5).float() == y[:, target]).sum().item() / max(len(y), 1),
                "task_images": int(len(y)), "task_classes": [base.target]}
    classes = [base.target, *base.negatives] if base.negatives else list(names)
    columns = torch.tensor([names.index(c) for c in classes])
    mine = torch.isin(y, columns)
    decided = columns[p[mine][:, columns].argmax(1)] == target
    correct = int((decided == (y[mine] == target)).sum())
    return {"task_accuracy": correct / max(int(mine.sum()), 1), "task_images": int(mine.sum()),
            "task_classes": classes}


def load_oracle(path: str | Path, base: Base) -> Oracle:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"oracle {path} not found: run the train_oracle stage first (dvc repro)")
    state = read_torch_file(path, "oracle", ("widths", "feature_dim", "channels", "image_size", "names", "kind",
                                             "state_dict"))
    if state["image_size"] != base.image_size or state["channels"] != base.channels:
        raise DatasetError(f"oracle {path} was trained on {state['channels']}x{state['image_size']}px images, "
                           f"params say {base.channels}x{base.image_size}")
    net = OracleNet(state["channels"], state["widths"], state["feature_dim"], len(state["names"]))
    try:
        net.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise ArtifactError(f"oracle {path}: its weights do not fit its recorded widths: {exc}") from exc
    return Oracle(net, state["names"], state["kind"])


def judge_task(oracle_dir: str | Path, base: Base) -> dict:
    """An oracle trained for one task (train_oracle) judged on another task of the same dataset:
    its metrics.json with the task accuracy recomputed on the held-out images of base's classes.
    The oracle trains on every class of the dataset, so tasks that share a dataset share it."""
    oracle_dir = Path(oracle_dir)
    metrics = read_json(oracle_dir / "metrics.json")
    oracle = load_oracle(oracle_dir / "oracle.pt", base)
    device = resolve_device(base.device)
    oracle.net.to(device)
    ds, targets, names, kind = oracle_data(base)
    if names != oracle.names:
        raise DatasetError(f"oracle {oracle_dir / 'oracle.pt'} was trained on classes {oracle.names}, "
                           f"this task's dataset has {names}")
    _, test_idx = _split(ds, base.seed + ORACLE_SEED_OFFSET)
    with torch.no_grad():
        p = torch.cat([oracle.probabilities(ds.images(test_idx[i:i + 512]).to(device)).cpu()
                       for i in range(0, len(test_idx), 512)])
    y = torch.from_numpy(np.asarray(targets))[test_idx]
    return {**metrics, **task_accuracy(p, y, names, kind, base)}
