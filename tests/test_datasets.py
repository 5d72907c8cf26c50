import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

from exaggerate.config import Base
from exaggerate.datasets import DatasetError, open_dataset, preprocess_for, safe_join
from exaggerate.io import write_text
from fakes import CELEBA_ATTRS, make_celeba, make_fashion


def test_fashion_binary_task(fashion_base):
    ds = open_dataset(fashion_base)
    assert set(np.unique(ds.strata)) == {7, 9}  # only Sneaker and Ankle boot take part
    assert ds.label_names == ["Ankle boot"]
    assert np.array_equal(ds.labels[:, 0] == 1, ds.strata == 9)
    x = ds.images(np.arange(5))
    assert x.shape == (5, 1, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    # pad: the 28x28 picture sits in the middle of a black 32x32 canvas
    assert torch.all(x[:, :, :2, :] == -1) and torch.all(x[:, :, :, -2:] == -1)
    assert len(set(ds.ids)) == len(ds.ids)
    assert {p for p in ds.partition} == {"train", "test"}


def test_fashion_one_vs_rest_and_resize(fashion_root):
    ds = open_dataset(Base(data_root=str(fashion_root), negatives=[], resize="resize", image_size=16))
    assert set(np.unique(ds.strata)) == {0, 5, 7, 9}
    assert ds.images([0]).shape == (1, 1, 16, 16)


def test_fashion_missing_names_path_and_remedy(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'none'}.*dataset-fashion-mnist"):
        open_dataset(Base(data_root=str(tmp_path / "none")))
    (tmp_path / "partial").mkdir()
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz not found.*apt-get install"):
        open_dataset(Base(data_root=str(tmp_path / "partial")))


def test_unknown_class_lists_valid_names(fashion_root):
    with pytest.raises(DatasetError, match=r"unknown class 'Boot'.*valid classes: T-shirt/top, Trouser.*Ankle boot"):
        open_dataset(Base(data_root=str(fashion_root), target="Boot"))
    with pytest.raises(DatasetError, match=r"unknown class 'Sandals' \(base.negatives\)"):
        open_dataset(Base(data_root=str(fashion_root), negatives=["Sandals"]))


def test_truncated_idx_file_is_named(tmp_path):
    root = make_fashion(tmp_path / "fm", n_train=20, n_test=10)
    path = root / "t10k-images-idx3-ubyte.gz"
    data = gzip.open(path).read()
    with gzip.open(path, "wb") as fh:
        fh.write(data[:-100])
    with pytest.raises(DatasetError, match=f"{path}.*truncated or corrupt"):
        open_dataset(Base(data_root=str(root)))


def test_celeba_layout_multi_label(celeba_root):
    ds = open_dataset(Base(dataset="celeba", data_root=str(celeba_root), target="Smiling",
                           attributes=["Young", "Smiling"], negatives=[], channels=3, image_size=64))
    assert ds.label_names == ["Smiling", "Young"]  # the explained target is column 0
    lines = (celeba_root / "list_attr_celeba.txt").read_text().splitlines()[2:]
    smiling = [int(l.split()[1 + CELEBA_ATTRS.index("Smiling")]) > 0 for l in lines]
    assert np.array_equal(ds.labels[:, 0].astype(bool), smiling)
    assert set(ds.partition) == {"train", "val", "test"}
    x = ds.images([0, 1])
    assert x.shape == (2, 3, 64, 64) and x.min() >= -1 and x.max() <= 1


def test_celeba_center_crop_matches_manual(celeba_root):
    base = Base(dataset="celeba", data_root=str(celeba_root), target="Young", negatives=[], channels=3,
                image_size=150, center_crop=150)
    ds = open_dataset(base)
    arr = np.asarray(Image.open(celeba_root / "img_align_celeba" / ds.ids[0]).convert("RGB"))
    top, left = (218 - 150) // 2, (178 - 150) // 2
    manual = torch.from_numpy(arr[top:top + 150, left:left + 150]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(ds.image(0), manual)


def test_celeba_unknown_attribute_lists_valid(celeba_root):
    with pytest.raises(DatasetError, match=r"unknown CelebA attribute 'Smile'; valid attributes: Bangs, Smiling, Young"):
        open_dataset(Base(dataset="celeba", data_root=str(celeba_root), target="Smile", channels=3))


def test_celeba_corrupt_image_is_named(tmp_path):
    root = make_celeba(tmp_path / "c", n=6)
    bad = root / "img_align_celeba" / "000002.jpg"
    bad.write_bytes(b"not a jpeg at all")
    ds = open_dataset(Base(dataset="celeba", data_root=str(root), target="Smiling", channels=3))
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        ds.images([0, 1, 2])


@pytest.mark.parametrize("name", ["../escape.jpg", "/etc/passwd", "sub/../../x.jpg"])
def test_file_lists_escaping_the_root_are_rejected(tmp_path, name):
    root = make_celeba(tmp_path / "c", n=6)
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    lines[2] = name + lines[2][len("000001.jpg"):]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    part = (root / "list_eval_partition.txt").read_text().replace("000001.jpg", name)
    (root / "list_eval_partition.txt").write_text(part)
    with pytest.raises(DatasetError, match="escapes the data root|absolute"):
        open_dataset(Base(dataset="celeba", data_root=str(root), target="Smiling", channels=3))


def test_safe_join_rejects_symlink_escape(tmp_path):
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path, tmp_path / "root" / "link")
    with pytest.raises(DatasetError, match="escapes"):
        safe_join(tmp_path / "root", "link/secret.png")
    assert safe_join(tmp_path / "root", "a/b.png") == tmp_path / "root" / "a" / "b.png"


def test_image_folder(image_folder_root):
    ds = open_dataset(Base(dataset="image_folder", data_root=str(image_folder_root), target="dog",
                           negatives=["cat"], channels=3, image_size=32, resize="resize"))
    assert len(ds) == 24 and ds.labels[:, 0].sum() == 12
    assert ds.ids[0] == "cat/cat00.png"
    assert ds.images([0, 23]).shape == (2, 3, 32, 32)
    with pytest.raises(DatasetError, match="valid classes: cat, dog"):
        open_dataset(Base(dataset="image_folder", data_root=str(image_folder_root), target="bird",
                          negatives=[], channels=3))


def test_image_folder_corrupt_file_is_named(image_folder_root):
    bad = image_folder_root / "dog" / "dog03.png"
    bad.write_bytes(b"\x89PNG broken")
    ds = open_dataset(Base(dataset="image_folder", data_root=str(image_folder_root), target="dog",
                           negatives=[], channels=3))
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        ds.images(np.arange(len(ds)))


def test_preprocess_user_images(tmp_path):
    pre = preprocess_for(Base())
    big = Image.fromarray(np.full((100, 80), 255, dtype=np.uint8))
    x = pre(big, "big.png")
    assert x.shape == (1, 32, 32) and abs(float(x[0, 16, 16]) - 1) < 1e-4 and x[0, 0, 0] == -1
    with pytest.raises(DatasetError, match="tiny.png: image is 4x4 pixels"):
        pre(Image.new("L", (4, 4)), "tiny.png")
    with pytest.raises(DatasetError, match="photo.png: image has 3 channels \\(RGB\\); the model expects 1"):
        pre(Image.new("RGB", (30, 30)), "photo.png", convert=False)
    assert pre(Image.new("RGB", (30, 30)), "photo.png", convert=True).shape == (1, 32, 32)


def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    write_text(target, "old")
    import exaggerate.io as eio

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(eio.os, "replace", boom)
    with pytest.raises(OSError):
        write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left behind
