"""Train / validation / test id lists: the official partition where the dataset has one,
otherwise a seeded stratified split. Same parameters, same bytes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import Base, Prepare
from .datasets import DatasetError, ImageDataset
from .io import read_json, write_json

SPLITS = ("train", "val", "test")


def _stratified_take(indices: np.ndarray, strata: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split `indices` so each stratum gives `fraction` of its members to the second part."""
    taken = []
    for s in np.unique(strata[indices]):
        members = indices[strata[indices] == s]
        members = members[rng.permutation(len(members))]
        n = int(round(fraction * len(members)))
        taken.append(members[:n])
    second = np.sort(np.concatenate(taken)) if taken else np.array([], dtype=np.int64)
    first = np.setdiff1d(indices, second)
    return first, second


def make_splits(dataset: ImageDataset, base: Base, params: Prepare) -> dict[str, list[str]]:
    rng = np.random.default_rng(base.seed)
    everything = np.arange(len(dataset))
    if dataset.partition is not None:
        part = np.array(dataset.partition)
        test = everything[part == "test"]
        if (part == "val").any():  # official validation part (CelebA)
            train, val = everything[part == "train"], everything[part == "val"]
        else:
            train, val = _stratified_take(everything[part == "train"], dataset.strata, params.val_fraction, rng)
    else:
        rest, test = _stratified_take(everything, dataset.strata, params.test_fraction, rng)
        train, val = _stratified_take(rest, dataset.strata, params.val_fraction / (1 - params.test_fraction), rng)
    splits = {"train": train, "val": val, "test": test}
    if params.max_per_class:
        cap_rng = np.random.default_rng(base.seed + 1)
        for name, idx in splits.items():
            kept = []
            for s in np.unique(dataset.strata[idx]):
                members = idx[dataset.strata[idx] == s]
                kept.append(np.sort(members[cap_rng.permutation(len(members))[: params.max_per_class]]))
            splits[name] = np.sort(np.concatenate(kept)) if kept else idx
    for name, idx in splits.items():
        if len(idx) == 0:
            raise DatasetError(f"split {name!r} of {dataset.name} at {dataset.root} is empty; "
                               "the dataset is too small for the split fractions")
    return {name: [dataset.ids[i] for i in idx] for name, idx in splits.items()}


def split_counts(dataset: ImageDataset, splits: dict[str, list[str]]) -> dict:
    counts = {}
    for name, ids in splits.items():
        idx = dataset.index_of(ids)
        labels = dataset.labels[idx, 0]
        counts[name] = {"total": len(ids), dataset.label_names[0]: int(labels.sum()),
                        f"not {dataset.label_names[0]}": int(len(ids) - labels.sum())}
    return counts


def write_splits(dataset: ImageDataset, base: Base, params: Prepare, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    splits = make_splits(dataset, base, params)
    counts = split_counts(dataset, splits)
    write_json(out_dir / "splits.json", {"dataset": dataset.name, "label_names": dataset.label_names,
                                         **splits})
    write_json(out_dir / "counts.json", counts)
    return counts


def read_splits(path: str | Path, dataset: ImageDataset) -> dict[str, np.ndarray]:
    """Split name -> dataset indices; refuses splits made for another dataset or task."""
    raw = read_json(path)
    if raw.get("dataset") != dataset.name or raw.get("label_names") != dataset.label_names:
        raise DatasetError(f"{path} was made for dataset {raw.get('dataset')!r} with labels "
                           f"{raw.get('label_names')}, not {dataset.name!r} with {dataset.label_names}; "
                           "rerun the prepare stage")
    return {name: dataset.index_of(raw[name]) for name in SPLITS}
