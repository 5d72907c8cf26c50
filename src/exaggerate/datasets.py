"""Datasets behind one interface: images scaled to [-1, 1], labels, and stable ids.

- fashion_mnist: the original IDX files (as Debian's dataset-fashion-mnist ships them).
- celeba: the standard layout (img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt).
- image_folder: one sub-folder per class (users' own data).

`open_dataset(base)` builds the dataset for the task in the `base` parameters: which images
take part and which label columns the classifier predicts (column 0 is always the target).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .config import Base
from .errors import ExaggerateError

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
PARTITION_NAMES = {0: "train", 1: "val", 2: "test"}
MIN_IMAGE_SIDE = 8


class DatasetError(ExaggerateError, ValueError):
    """Missing, malformed or unreadable data; the message names the file or name."""


def safe_join(root: str | Path, name: str) -> Path:
    """root/name, refusing names that would escape root (absolute paths, '..')."""
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")):
        raise DatasetError(f"file name {name!r} is absolute or empty; names must be relative to {root}")
    parts = Path(name).parts
    if ".." in parts:
        raise DatasetError(f"file name {name!r} escapes the data root {root}")
    path = Path(root) / name
    root_resolved = Path(root).resolve()
    if root_resolved not in path.resolve().parents and path.resolve() != root_resolved:
        raise DatasetError(f"file name {name!r} escapes the data root {root} (through a link)")
    return path


def to_unit_range(array: np.ndarray) -> torch.Tensor:
    """uint8 HxW or HxWxC -> float tensor CxHxW in [-1, 1]."""
    t = torch.from_numpy(np.array(array, dtype=np.float32))
    if t.ndim == 2:
        t = t[None]
    else:
        t = t.permute(2, 0, 1)
    return t / 127.5 - 1.0


def fit_to_size(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Bring a CxHxW (or NxCxHxW) image to size x size: pad (centred, black) or resize."""
    batched = x.ndim == 4
    if not batched:
        x = x[None]
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        if mode == "pad" and h <= size and w <= size:
            top, left = (size - h) // 2, (size - w) // 2
            x = F.pad(x, (left, size - w - left, top, size - h - top), value=-1.0)
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x if batched else x[0]


def read_image_file(path: Path) -> Image.Image:
    """Open and fully decode an image; any failure names the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def pil_channels(img: Image.Image) -> int:
    return len(img.getbands())


def pil_to_tensor(img: Image.Image, channels: int, source: str, convert: bool = True) -> torch.Tensor:
    """PIL image -> CxHxW in [-1, 1] with `channels` channels.

    With convert=False an image whose channel count differs from `channels` is refused
    (colour photographs silently turned grey can mislead an audit)."""
    have = pil_channels(img)
    grey_modes = {"L", "LA", "1", "I", "I;16", "F", "P"}
    if channels == 1:
        if img.mode not in grey_modes and not convert:
            raise DatasetError(f"{source}: image has {have} channels ({img.mode}); the model expects 1 "
                               "(grey). Convert it first or pass --convert.")
        img = img.convert("L")
    else:
        if img.mode in grey_modes and img.mode != "P" and not convert:
            raise DatasetError(f"{source}: image has 1 channel ({img.mode}); the model expects 3 (RGB). "
                               "Convert it first or pass --convert.")
        img = img.convert("RGB")
    return to_unit_range(np.asarray(img, dtype=np.uint8))


@dataclass(frozen=True)
class Preprocess:
    """A PIL image (a dataset file or a user's file) -> CxSxS tensor in [-1, 1], the same way
    for training data and for images explained later."""

    image_size: int
    channels: int
    resize: str
    center_crop: int = 0
    native_size: Optional[int] = None  # fashion_mnist: 28 (other images are fitted to this first)

    def __call__(self, img: Image.Image, source: str, convert: bool = True) -> torch.Tensor:
        if min(img.size) < MIN_IMAGE_SIDE:
            raise DatasetError(f"{source}: image is {img.size[0]}x{img.size[1]} pixels; "
                               f"at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} is needed")
        if self.center_crop and min(img.size) >= self.center_crop:
            w, h = img.size
            left, top = (w - self.center_crop) // 2, (h - self.center_crop) // 2
            img = img.crop((left, top, left + self.center_crop, top + self.center_crop))
        x = pil_to_tensor(img, self.channels, source, convert=convert)
        if self.native_size and tuple(x.shape[-2:]) != (self.native_size, self.native_size):
            x = fit_to_size(x, self.native_size, "resize")
        return fit_to_size(x, self.image_size, self.resize)


def preprocess_for(base: Base) -> Preprocess:
    """The preprocessing of `base`'s dataset, without reading the dataset."""
    if base.dataset == "fashion_mnist":
        return Preprocess(base.image_size, 1, base.resize, 0, 28)
    if base.dataset == "celeba":
        return Preprocess(base.image_size, base.channels, "resize", base.center_crop)
    return Preprocess(base.image_size, base.channels, base.resize)


@dataclass
class ImageDataset:
    """Images of one task. labels[:, 0] is the explained target."""

    name: str
    root: Path
    ids: list[str]
    label_names: list[str]
    labels: np.ndarray            # (n, L) float32 in {0, 1}
    strata: np.ndarray            # (n,) int: what stratified splits balance (class index)
    partition: Optional[list[str]]  # official split per image, or None
    image_size: int
    channels: int
    resize: str
    center_crop: int = 0
    native_size: Optional[int] = None  # fashion_mnist: 28 (user images are fitted to this first)
    _pixels: Optional[np.ndarray] = None  # in-memory uint8 images (fashion_mnist)
    _paths: Optional[list[Path]] = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def in_memory(self) -> bool:
        """Whether the pixels are held in memory (fashion_mnist) rather than read from files."""
        return self._pixels is not None

    def index_of(self, ids: Sequence[str]) -> np.ndarray:
        lookup = {i: k for k, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in lookup]
        if missing:
            raise DatasetError(f"{len(missing)} ids are not in dataset {self.name} at {self.root} "
                               f"(first: {missing[0]!r}); were the splits made from other data?")
        return np.array([lookup[i] for i in ids], dtype=np.int64)

    @property
    def preprocess(self) -> "Preprocess":
        return Preprocess(self.image_size, self.channels, self.resize, self.center_crop, self.native_size)

    def image(self, index: int) -> torch.Tensor:
        if self._pixels is not None:
            return fit_to_size(to_unit_range(self._pixels[index]), self.image_size, self.resize)
        path = self._paths[index]
        return self.preprocess(read_image_file(path), str(path))

    def images(self, indices: Sequence[int]) -> torch.Tensor:
        if self._pixels is not None:
            x = torch.from_numpy(self._pixels[np.asarray(indices)]).float()[:, None] / 127.5 - 1.0
            return fit_to_size(x, self.image_size, self.resize)
        return torch.stack([self.image(int(i)) for i in indices]) if len(indices) else \
            torch.empty(0, self.channels, self.image_size, self.image_size)

    def torch_dataset(self, indices: Sequence[int]) -> torch.utils.data.Dataset:
        """(image, labels) pairs; in memory where the data is small enough."""
        indices = np.asarray(indices, dtype=np.int64)
        labels = torch.from_numpy(self.labels[indices])
        if self._pixels is not None:
            return torch.utils.data.TensorDataset(self.images(indices), labels)
        return _LazyImages(self, indices, labels)


class _LazyImages(torch.utils.data.Dataset):
    def __init__(self, dataset: ImageDataset, indices: np.ndarray, labels: torch.Tensor):
        self.dataset, self.indices, self.labels = dataset, indices, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        return self.dataset.image(int(self.indices[k])), self.labels[k]


# ----------------------------------------------------------------------------- fashion_mnist

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DatasetError(f"{path}: header says {dims} ({expected} bytes) but the file holds "
                           f"{len(data) - offset} bytes; the file is truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"Fashion-MNIST file {root / (stem + '.gz')} not found. Install the Debian package "
        f"(apt-get install dataset-fashion-mnist, files in {FASHION_DEBIAN_DIR}) and copy its files "
        f"into {root}, or run scripts/main.sh, which does both.")


def _class_task(base: Base, class_names: list[str], class_index: np.ndarray):
    """Select the images of the task and build the binary target labels."""
    if base.target not in class_names:
        raise DatasetError(f"unknown class {base.target!r} (base.target); valid classes: {', '.join(class_names)}")
    for neg in base.negatives:
        if neg not in class_names:
            raise DatasetError(f"unknown class {neg!r} (base.negatives); valid classes: {', '.join(class_names)}")
        if neg == base.target:
            raise DatasetError(f"base.negatives contains the target class {neg!r}")
    pos = class_names.index(base.target)
    if base.negatives:
        allowed = [pos] + [class_names.index(n) for n in base.negatives]
        keep = np.isin(class_index, allowed)
    else:
        keep = np.ones(len(class_index), dtype=bool)
    labels = (class_index == pos).astype(np.float32)[:, None]
    return keep, labels


def open_fashion_mnist(base: Base) -> ImageDataset:
    root = Path(base.data_root)
    if not root.is_dir():
        raise DatasetError(
            f"Fashion-MNIST folder {root} not found. Install the Debian package dataset-fashion-mnist "
            f"(files in {FASHION_DEBIAN_DIR}) and copy them to {root}, or run scripts/main.sh.")
    pixels, classes, ids, partition = [], [], [], []
    for part, (img_stem, lbl_stem) in FASHION_FILES.items():
        img_path, lbl_path = _find_idx(root, img_stem), _find_idx(root, lbl_stem)
        imgs, lbls = _read_idx(img_path), _read_idx(lbl_path)
        if imgs.ndim != 3 or lbls.ndim != 1 or len(imgs) != len(lbls):
            raise DatasetError(f"{img_path} and {lbl_path} disagree: {imgs.shape} images, {lbls.shape} labels")
        if lbls.size and lbls.max() >= len(FASHION_CLASSES):
            raise DatasetError(f"{lbl_path}: label {int(lbls.max())} is not a Fashion-MNIST class (0-9)")
        pixels.append(imgs)
        classes.append(lbls.astype(np.int64))
        ids += [f"{part}-{i:05d}" for i in range(len(lbls))]
        partition += ["train" if part == "train" else "test"] * len(lbls)
    pixels_all, class_all = np.concatenate(pixels), np.concatenate(classes)
    keep, labels = _class_task(base, FASHION_CLASSES, class_all)
    idx = np.flatnonzero(keep)
    return ImageDataset(
        name="fashion_mnist", root=root, ids=[ids[i] for i in idx], label_names=[base.target],
        labels=labels[idx], strata=class_all[idx], partition=[partition[i] for i in idx],
        image_size=base.image_size, channels=1, resize=base.resize, native_size=pixels_all.shape[-1],
        _pixels=np.ascontiguousarray(pixels_all[idx]))


# ----------------------------------------------------------------------------- celeba

def _read_celeba_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"CelebA attribute file {path} not found (expected the standard layout: "
                           "img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt)")
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise DatasetError(f"{path}: expected a count line and an attribute-name line")
    names = lines[1].split()
    files, rows = [], []
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise DatasetError(f"{path}:{lineno}: expected a file name and {len(names)} values, got {len(parts)} fields")
        try:
            values = [int(v) for v in parts[1:]]
        except ValueError as exc:
            raise DatasetError(f"{path}:{lineno}: attribute values must be -1 or 1 ({exc})") from exc
        files.append(parts[0])
        rows.append(values)
    return names, files, np.array(rows, dtype=np.int64).reshape(len(rows), len(names))


def open_celeba(base: Base) -> ImageDataset:
    root = Path(base.data_root)
    if not root.is_dir():
        raise DatasetError(f"CelebA folder {root} not found; point base.data_root at a folder with "
                           "img_align_celeba/, list_attr_celeba.txt and list_eval_partition.txt")
    names, files, values = _read_celeba_attributes(root / "list_attr_celeba.txt")
    attributes = list(base.attributes) or [base.target]
    if base.target not in attributes:
        attributes = [base.target] + attributes
    # The target always comes first: it is column 0 for every later stage.
    attributes = [base.target] + [a for a in attributes if a != base.target]
    for attr in attributes:
        if attr not in names:
            raise DatasetError(f"unknown CelebA attribute {attr!r}; valid attributes: {', '.join(names)}")
    cols = [names.index(a) for a in attributes]
    labels = (values[:, cols] > 0).astype(np.float32)
    part_path = root / "list_eval_partition.txt"
    if not part_path.is_file():
        raise DatasetError(f"CelebA partition file {part_path} not found")
    partition_of = {}
    for lineno, line in enumerate(part_path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DatasetError(f"{part_path}:{lineno}: expected '<file> <0|1|2>', got {line!r}")
        safe_join(root / "img_align_celeba", parts[0])
        partition_of[parts[0]] = PARTITION_NAMES[int(parts[1])]
    image_dir = root / "img_align_celeba"
    paths = [safe_join(image_dir, f) for f in files]
    missing = [f for f in files if f not in partition_of]
    if missing:
        raise DatasetError(f"{part_path} has no partition for {len(missing)} images (first: {missing[0]})")
    return ImageDataset(
        name="celeba", root=root, ids=files, label_names=attributes, labels=labels,
        strata=labels[:, 0].astype(np.int64), partition=[partition_of[f] for f in files],
        image_size=base.image_size, channels=base.channels, resize="resize",
        center_crop=base.center_crop, _paths=paths)


# ----------------------------------------------------------------------------- image_folder

def open_image_folder(base: Base) -> ImageDataset:
    root = Path(base.data_root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} not found; expected one sub-folder per class")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise DatasetError(f"image folder {root} has no class sub-folders")
    ids, class_index, paths = [], [], []
    for k, cls in enumerate(class_names):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                ids.append(f"{cls}/{f.name}")
                class_index.append(k)
                paths.append(safe_join(root, f"{cls}/{f.name}"))
    class_arr = np.array(class_index, dtype=np.int64)
    keep, labels = _class_task(base, class_names, class_arr)
    idx = np.flatnonzero(keep)
    return ImageDataset(
        name="image_folder", root=root, ids=[ids[i] for i in idx], label_names=[base.target],
        labels=labels[idx], strata=class_arr[idx], partition=None, image_size=base.image_size,
        channels=base.channels, resize=base.resize, _paths=[paths[i] for i in idx])


OPENERS = {"fashion_mnist": open_fashion_mnist, "celeba": open_celeba, "image_folder": open_image_folder}


def open_dataset(base: Base) -> ImageDataset:
    if base.dataset == "fashion_mnist" and base.channels != 1:
        raise DatasetError(f"base.channels: Fashion-MNIST is grey (1 channel), got {base.channels}")
    return OPENERS[base.dataset](base)
