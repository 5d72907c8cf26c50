import json

import numpy as np
import pytest

from exaggerate.config import Base, Prepare
from exaggerate.datasets import DatasetError, open_dataset
from exaggerate.splits import make_splits, read_splits, write_splits


def test_splits_are_deterministic_to_the_byte(fashion_base, tmp_path):
    ds = open_dataset(fashion_base)
    write_splits(ds, fashion_base, Prepare(), tmp_path / "a")
    write_splits(ds, fashion_base, Prepare(), tmp_path / "b")
    for name in ("splits.json", "counts.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_seed_changes_validation_but_not_official_test(fashion_root):
    a = make_splits(open_dataset(Base(data_root=str(fashion_root), seed=0)), Base(seed=0), Prepare())
    b = make_splits(open_dataset(Base(data_root=str(fashion_root), seed=1)), Base(seed=1), Prepare())
    assert a["val"] != b["val"]
    assert a["test"] == b["test"]  # the official t10k partition
    assert all(i.startswith("t10k-") for i in a["test"])


def test_splits_are_disjoint_and_stratified(fashion_base):
    ds = open_dataset(fashion_base)
    s = make_splits(ds, fashion_base, Prepare(val_fraction=0.25))
    sets = {k: set(v) for k, v in s.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"])
    assert len(sets["train"]) + len(sets["val"]) + len(sets["test"]) == len(ds)
    for cls in (7, 9):
        members = [i for i, k in zip(ds.ids, ds.strata) if k == cls and i.startswith("train-")]
        in_val = sum(i in sets["val"] for i in members)
        assert abs(in_val - 0.25 * len(members)) <= 1


def test_image_folder_gets_seeded_stratified_test_split(image_folder_root):
    base = Base(dataset="image_folder", data_root=str(image_folder_root), target="dog", negatives=[],
                channels=3)
    ds = open_dataset(base)
    s = make_splits(ds, base, Prepare(val_fraction=0.25, test_fraction=0.25))
    assert {len(v) for v in s.values()} and len(s["test"]) == 6
    assert sum(i.startswith("dog/") for i in s["test"]) == 3


def test_celeba_uses_official_partition(celeba_root):
    base = Base(dataset="celeba", data_root=str(celeba_root), target="Smiling", channels=3)
    ds = open_dataset(base)
    s = make_splits(ds, base, Prepare())
    part = dict(l.split() for l in (celeba_root / "list_eval_partition.txt").read_text().splitlines())
    assert all(part[i] == "1" for i in s["val"]) and all(part[i] == "2" for i in s["test"])


def test_max_per_class_caps(fashion_base):
    ds = open_dataset(fashion_base)
    s = make_splits(ds, fashion_base, Prepare(max_per_class=5))
    assert len(s["train"]) == 10 and len(s["test"]) == 10


def test_splits_from_another_task_are_refused(fashion_root, tmp_path):
    base = Base(data_root=str(fashion_root))
    write_splits(open_dataset(base), base, Prepare(), tmp_path)
    other = open_dataset(Base(data_root=str(fashion_root), target="Sneaker", negatives=["Ankle boot"]))
    with pytest.raises(DatasetError, match="rerun the prepare stage"):
        read_splits(tmp_path / "splits.json", other)
    raw = json.loads((tmp_path / "splits.json").read_text())
    assert raw["label_names"] == ["Ankle boot"]
    idx = read_splits(tmp_path / "splits.json", open_dataset(base))
    assert isinstance(idx["train"], np.ndarray)
