import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

from fakes import make_celeba, make_fashion, make_image_folder  # noqa: E402

from exaggerate.config import Base  # noqa: E402


@pytest.fixture(autouse=True)
def _mlflow_in_tmp(tmp_path, monkeypatch):
    """No test writes into the repository's mlflow.db."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture(scope="session")
def fashion_root(tmp_path_factory) -> Path:
    return make_fashion(tmp_path_factory.mktemp("fashion") / "fashion-mnist")


@pytest.fixture(scope="session")
def celeba_root(tmp_path_factory) -> Path:
    return make_celeba(tmp_path_factory.mktemp("celeba") / "celeba")


@pytest.fixture
def image_folder_root(tmp_path) -> Path:
    return make_image_folder(tmp_path / "folder")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, fashion_root):
    """A tiny classifier trained once per session on the fake Fashion-MNIST (tests only read it):
    (base, dataset, splits, its folder, its metrics)."""
    from exaggerate.classifier import train_classifier
    from helpers import TINY_CLASSIFIER, dataset_and_splits

    base = Base(data_root=str(fashion_root))
    ds, splits = dataset_and_splits(base)
    out = tmp_path_factory.mktemp("clf")
    metrics = train_classifier(ds, splits, base, TINY_CLASSIFIER, out)
    return base, ds, splits, out, metrics


@pytest.fixture
def fashion_base(fashion_root) -> Base:
    return Base(data_root=str(fashion_root))
