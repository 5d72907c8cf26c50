
import numpy as np
import pytest
import torch
import torch.nn as nn

from exaggerate.classifier import BlackBox
from exaggerate.posteriors import bin_centre
from exaggerate.inference import explain_batch
from exaggerate.series import series_metrics, strip_names


class _IdentityGenerator(nn.Module):
    """G(x, c) writes the target posterior into the image: a perfect generator for f = mean pixel."""

    def forward(self, x, c):
        return torch.full_like(x, 0.0) + ((c.float() + 0.5) / 10 * 2 - 1)[:, None, None, None]


def _mean_pixel_f():
    class M(nn.Module):
        def forward(self, x):
            return ((x.mean(dim=(1, 2, 3)) + 1) / 2)[:, None]
    return BlackBox(M(), ["t"], 8, 1, output="probability")


def test_perfect_generator_scores_perfectly():
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    out = explain_batch(_IdentityGenerator(), _mean_pixel_f(), x, 10)
    assert out["series"].shape == (3, 10, 1, 8, 8)
    assert torch.allclose(out["p_series"], torch.from_numpy(bin_centre(np.arange(10), 10)).float().expand(3, -1), atol=1e-6)
    m = series_metrics(out["p_series"].numpy(), x.numpy(), x.numpy())
    assert m["compatibility_mae"] == pytest.approx(0, abs=1e-6)
    assert m["compatibility_corr"] == pytest.approx(1)
    assert m["monotonic_share"] == 1 and m["reconstruction_l1"] == 0


def test_metrics_of_a_broken_series():
    p = np.array([[0.9, 0.8, 0.1], [0.1, 0.5, 0.9]])  # first falls: not monotonic
    q = np.zeros((2, 1, 2, 2))
    m = series_metrics(p, q, q + 0.5)
    centres = bin_centre(np.arange(3), 3)
    assert m["compatibility_mae"] == pytest.approx(np.abs(p - centres).mean())
    assert m["monotonic_share"] == 0.5
    assert m["reconstruction_l1"] == pytest.approx(0.5)


def test_strip_names_stay_unique_when_basenames_repeat():
    names = strip_names(["a/boot.png", "b/boot.png", "c/boot.jpg", "shoe 1.png"])
    assert names == ["boot_series.png", "boot-2_series.png", "boot-3_series.png", "shoe_1_series.png"]
    # A file already named like a renamed twin does not take its place either.
    assert strip_names(["boot.png", "boot-2.png", "b/boot.png"]) == ["boot_series.png", "boot-2_series.png",
                                                                     "boot-3_series.png"]


def test_series_json_says_whether_the_querys_detail_was_kept(fashion_root, tmp_path):
    import json

    from exaggerate.config import Base, Explain
    from exaggerate.datasets import open_dataset
    from exaggerate.networks import Generator
    from exaggerate.series import explain_stage

    class MeanPixel(nn.Module):
        def forward(self, x):
            return ((x.mean(dim=(1, 2, 3)) + 1) / 2)[:, None]

    base = Base(data_root=str(fashion_root))
    ds = open_dataset(base)
    f = BlackBox(MeanPixel(), ["t"], base.image_size, 1, output="probability")
    torch.manual_seed(0)
    g = Generator(1, [8, 16], 10).eval()
    for detail in (0.0, 0.5):
        out = tmp_path / f"detail-{detail}"
        explain_stage(ds, np.arange(20), f, g, base, Explain(num_queries=4, strips=1, batch_size=4, detail=detail), out)
        meta = json.loads((out / "series.json").read_text())
        assert meta["probes"] == Explain().probes and len(meta["queries"]) == 4
        # Off (the default), series.json is as before the option existed; on, it names tau.
        assert meta.get("detail") == (0.5 if detail else None)
