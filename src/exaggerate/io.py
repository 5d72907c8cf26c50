"""Atomic writes and small file helpers: a killed stage never leaves a half-written output."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import ExaggerateError



@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first (dvc repro)")
    return json.loads(path.read_text())


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def save_torch(path: str | Path, obj: Any) -> None:
    import torch

    # Through a file handle: given a path, torch.save names the archive's root folder after the
    # (random) temporary file, so the same weights would give different bytes on every run.
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


class ArtifactError(ExaggerateError, ValueError):
    """A file one stage wrote for another that cannot be read or lacks what it must hold."""


def read_torch_file(path: Path, what: str, keys: tuple[str, ...], device: Any = "cpu") -> dict:
    """A torch file written by this project, with its required keys; a named error otherwise."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated, corrupted or not a torch file at all
        raise ArtifactError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise ArtifactError(f"{path} is not an exaggerate {what} file (it holds a {type(state).__name__})")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ArtifactError(f"{what} {path} lacks the key(s) {', '.join(missing)}: not an exaggerate {what} "
                              "file, or written by another version")
    return state


def save_figure(path: str | Path, fig) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def load_npz(path: str | Path, what: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of an .npz file a stage wrote, with its required keys; a named error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found: run the stage that writes it first (dvc repro)")
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:  # truncated or not an npz archive
        raise ArtifactError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from exc
    missing = [k for k in keys if k not in data]
    if missing:
        raise ArtifactError(f"{what} {path} lacks the array(s) {', '.join(missing)}: rerun the stage that writes it")
    return data
