"""Each bad input a user or a damaged file can bring is refused with an error that names the
file, key or value, never a raw traceback."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exaggerate.classifier import load_classifier
from exaggerate.config import Base, ConfigError, Oracle as OracleParams, config_from_dict
from exaggerate.io import ArtifactError, load_npz
from exaggerate.oracle import load_oracle, train_oracle
from exaggerate.posteriors import PosteriorError, read_table

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classifier_dir(trained):
    base, _, _, out, _ = trained
    return base, out


def damaged_copy(src: Path, dst: Path, name: str, content) -> Path:
    shutil.copytree(src, dst)
    if callable(content):
        content = content((dst / name).read_bytes())
    if isinstance(content, bytes):
        (dst / name).write_bytes(content)
    else:
        torch.save(content, dst / name)
    return dst


@pytest.mark.parametrize("content,message", [
    (lambda data: data[: len(data) // 3], r"cannot read classifier .*model.pt"),
    (b"not a torch file", r"cannot read classifier .*model.pt"),
    ({"state_dict": {}}, r"classifier .*model.pt lacks the key.s. arch"),
    ({"arch": {"growth_rate": 4}, "state_dict": {}}, r"model.pt: its 'arch' record lacks block_config"),
])
def test_damaged_classifier_file_is_named(classifier_dir, tmp_path, content, message):
    base, src = classifier_dir
    bad = damaged_copy(src, tmp_path / "bad", "model.pt", content)
    with pytest.raises(ArtifactError, match=message):
        load_classifier(bad, base)


def test_classifier_weights_that_do_not_fit_are_named(classifier_dir, tmp_path):
    base, src = classifier_dir
    state = torch.load(src / "model.pt", weights_only=True)
    state["state_dict"] = {k: v for k, v in list(state["state_dict"].items())[1:]}
    bad = damaged_copy(src, tmp_path / "bad", "model.pt", state)
    with pytest.raises(ArtifactError, match="model.pt: its weights do not fit"):
        load_classifier(bad, base)


@pytest.fixture(scope="module")
def oracle_file(tmp_path_factory, fashion_root):
    base = Base(data_root=str(fashion_root))
    out = tmp_path_factory.mktemp("oracle")
    train_oracle(base, OracleParams(widths=[4], feature_dim=8, epochs=1, batch_size=64, max_train=64), out)
    return base, out / "oracle.pt"


def test_damaged_oracle_file_is_named(oracle_file, tmp_path):
    base, path = oracle_file
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="cannot read oracle .*cut.pt"):
        load_oracle(cut, base)
    state = torch.load(path, weights_only=True)
    del state["names"]
    torch.save(state, tmp_path / "nonames.pt")
    with pytest.raises(ArtifactError, match="oracle .*nonames.pt lacks the key.s. names"):
        load_oracle(tmp_path / "nonames.pt", base)


def test_posterior_table_without_a_column_or_with_a_bad_value_is_named(tmp_path):
    path = tmp_path / "posteriors.csv"
    path.write_text("id,split,bin\nim1,train,3\n")
    with pytest.raises(PosteriorError, match=r"posteriors.csv lacks the column.s. p \(has: id, split, bin\)"):
        read_table(path)
    path.write_text("id,split,p,bin\nim1,train,0.3,3\nim2,train,high,9\n")
    with pytest.raises(PosteriorError, match=r"posteriors.csv, line 3: p=.high. is not a number"):
        read_table(path)


def test_series_file_without_a_key_or_truncated_is_named(tmp_path):
    path = tmp_path / "series.npz"
    np.savez(path, ids=np.array(["a"]), series=np.zeros((1, 10, 1, 4, 4)))
    with pytest.raises(ArtifactError, match=r"series file .*series.npz lacks the array.s. queries"):
        load_npz(path, "series file", ("ids", "series", "queries"))
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ArtifactError, match="cannot read series file .*series.npz"):
        load_npz(path, "series file", ("ids",))


def test_image_size_the_generator_cannot_halve_is_named():
    with pytest.raises(ConfigError, match=r"base.image_size: got 30, expected a multiple of 4: .*3 widths"):
        config_from_dict({"base": {"image_size": 30}})
    config_from_dict({"base": {"image_size": 36}})  # 36 = 4 x 9: fine for three widths
    with pytest.raises(ConfigError, match="multiple of 8"):
        config_from_dict({"base": {"image_size": 36}, "explainer": {"generator_widths": [8, 16, 32, 64]}})


def test_command_line_reports_a_damaged_classifier_in_one_line(classifier_dir, tmp_path, capsys):
    from exaggerate.cli import main

    _, src = classifier_dir
    bad = damaged_copy(src, tmp_path / "bad", "model.pt", b"junk")
    image = tmp_path / "boot.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    code = main(["explain", str(image), "--out", str(tmp_path / "out"), "--params", str(REPO / "params.yaml"),
                 "--classifier", str(bad), "--generator", str(tmp_path / "none.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("exaggerate: error: cannot read classifier") and "model.pt" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
