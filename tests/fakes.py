"""Small datasets in the real on-disk formats, made by the tests."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def _shape(kind: int, rng: np.random.Generator) -> np.ndarray:
    """28x28 uint8 drawings: class 9 (ankle boot) is tall, class 7 (sneaker) is low."""
    img = rng.integers(0, 30, size=(28, 28)).astype(np.uint8)
    jitter = int(rng.integers(-2, 3))
    if kind == 9:
        img[6 + jitter:24, 6:16] = 200
        img[18:24, 6:24] = 220
    elif kind == 7:
        img[15 + jitter:23, 3:25] = 210
    else:
        r, c = rng.integers(4, 20, size=2)
        img[r:r + 8, c:c + 8] = 180
    return img


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def make_fashion(root: Path, n_train: int = 240, n_test: int = 80, seed: int = 0) -> Path:
    """Fake Fashion-MNIST IDX files; most images are sneakers (7) or ankle boots (9)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.choice([7, 9, 0, 5], size=n, p=[0.45, 0.45, 0.05, 0.05]).astype(np.uint8)
        images = np.stack([_shape(int(k), rng) for k in labels])
        write_idx(root / f"{part}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{part}-labels-idx1-ubyte.gz", labels)
    return root


CELEBA_ATTRS = ["Bangs", "Smiling", "Young"]


def make_celeba(root: Path, n: int = 24, seed: int = 0) -> Path:
    """A tiny CelebA in the standard layout, with generated 178x218 JPEG faces."""
    rng = np.random.default_rng(seed)
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    attr_lines, part_lines = [str(n), " ".join(CELEBA_ATTRS)], []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        values = rng.choice([-1, 1], size=len(CELEBA_ATTRS))
        values[1] = 1 if i % 2 else -1  # Smiling alternates, so every split has both
        arr = rng.integers(0, 255, size=(218, 178, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "img_align_celeba" / name, quality=90)
        attr_lines.append(name + "  " + " ".join(f"{v:2d}" for v in values))
        part_lines.append(f"{name} {0 if i < n * 2 // 3 else (1 if i < n * 5 // 6 else 2)}")
    (root / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(part_lines) + "\n")
    return root


def make_image_folder(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, size=(40, 36, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{cls}{i:02d}.png")
    return root


def make_fashion_ambiguous(root: Path, n_train: int = 1200, n_test: int = 300, seed: int = 0) -> Path:
    """Fake Fashion-MNIST of sneakers (7) and ankle boots (9) told apart only by a weak cue: a bar
    of about the same area, taller than wide for boots and wider than tall for sneakers, with
    overlapping proportions (about 80% separable). A classifier offered a perfectly predictive
    mark besides (the planted-confounder audit) leans on the mark."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.choice([7, 9], size=n).astype(np.uint8)
        images = rng.integers(0, 30, size=(n, 28, 28)).astype(np.uint8)
        for img, k in zip(images, labels):
            height = int(np.clip(round(rng.normal(12 if k == 9 else 8, 2.5)), 5, 18))
            width = int(np.clip(round(96 / height), 5, 18))
            top, left = 14 - height // 2, 14 - width // 2
            img[top:top + height, left:left + width] = 200
        write_idx(root / f"{part}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{part}-labels-idx1-ubyte.gz", labels)
    return root
