"""What a series costs each method (evaluate.series_cost): the images G and f see per series, the
baseline's steps, and the FLOPs they add up to."""
import numpy as np
import pytest
import torch

from exaggerate.baseline import pixel_search
from exaggerate.evaluate import add_flop_rates, forward_flops, series_cost
from exaggerate.inference import explain_series
from exaggerate.networks import Generator
from exaggerate.posteriors import bin_centre
from exaggerate.report import cost_text

NUM_BINS, PROBES = 10, 4


class ConvF(torch.nn.Module):
    """f: a 3x3 mean filter, averaged, through a sigmoid (2 x 9 x 6 x 6 FLOPs on 8x8 images)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, bias=False)
        torch.nn.init.constant_(self.conv.weight, 1 / 9)

    def forward(self, x):
        return torch.sigmoid(4 * self.conv(x).mean(dim=(1, 2, 3)))


def test_pixel_search_says_how_many_steps_each_image_took():
    f = ConvF()
    x = torch.full((2, 1, 8, 8), -0.3)
    s, taken, reached = pixel_search(f, x, NUM_BINS, steps=300, lr=0.05, lam=0.0, tolerance=0.01, return_steps=True)
    assert s.shape == (2, NUM_BINS, 1, 8, 8) and taken.shape == reached.shape == (2, NUM_BINS)
    assert bool(reached.all()) and int(taken.max()) < 300
    # The two queries are the same image: the same steps bin by bin; the bin nearest f(x) before
    # the farthest.
    assert torch.equal(taken[0], taken[1])
    nearest = int(np.abs(bin_centre(np.arange(NUM_BINS), NUM_BINS) - float(f(x[:1]).detach())).argmin())
    assert nearest == 2 and taken[0, nearest] < taken[0, NUM_BINS - 1]
    # An image that cannot reach its bin in 3 steps is counted at 3, and not reached.
    _, taken, reached = pixel_search(f, x, NUM_BINS, steps=3, lr=0.05, lam=0.0, tolerance=1e-4, return_steps=True)
    assert not bool(reached.all()) and bool((taken[~reached] == 3).all())


def test_finished_images_leave_the_search_without_changing_the_others():
    """Each image's search is its own: searching them one by one finds the same images and steps."""
    f = ConvF()
    x = torch.stack([torch.full((1, 8, 8), -0.3), torch.full((1, 8, 8), 0.2)])
    together, taken, reached = pixel_search(f, x, NUM_BINS, 300, 0.05, 0.0, 0.01, return_steps=True)
    for i in range(2):
        alone, taken_alone, _ = pixel_search(f, x[i:i + 1], NUM_BINS, 300, 0.05, 0.0, 0.01, return_steps=True)
        assert torch.allclose(alone[0], together[i], atol=1e-6) and torch.equal(taken_alone[0], taken[i])
    passes = []
    counted = lambda img: passes.append(len(img)) or f(img)  # noqa: E731
    pixel_search(counted, x, NUM_BINS, 300, 0.05, 0.0, 0.01)
    assert bool(reached.all()) and sum(passes) == int((taken + 1).sum()) < 2 * NUM_BINS * (int(taken.max()) + 1)


def test_a_stalled_search_stops_unreached_and_the_reachable_bins_are_unchanged():
    """With patience, an image whose distance to its bin stops falling leaves the search early,
    unreached; every image the full search reaches is reached at the same step, as the same image."""
    f = ConvF()
    # lam 1: the distance term outweighs the probability error before the farthest bins are reached.
    x = torch.stack([torch.full((1, 8, 8), -0.3), torch.full((1, 8, 8), 0.2)])
    full, taken, reached = pixel_search(f, x, NUM_BINS, 300, 0.05, 1.0, 0.02, return_steps=True, patience=0)
    assert 0 < int(reached.sum()) < reached.numel() and bool((taken[~reached] == 300).all())
    stopped, taken_p, reached_p = pixel_search(f, x, NUM_BINS, 300, 0.05, 1.0, 0.02, return_steps=True,
                                               patience=20, min_improvement=1e-4)
    assert torch.equal(reached_p, reached) and torch.equal(taken_p[reached], taken[reached])
    assert torch.allclose(stopped[reached], full[reached], atol=1e-6)
    assert bool((taken_p[~reached] < 300).all()) and bool((taken_p[~reached] >= 20).all())
    # The stopped images are billed only their own steps: fewer f passes in all.
    passes = {}
    for patience in (0, 20):
        count = []
        pixel_search(lambda img: count.append(len(img)) or f(img), x, NUM_BINS, 300, 0.05, 1.0, 0.02,
                     patience=patience)
        passes[patience] = sum(count)
    assert passes[20] == int((taken_p + 1).sum()) < passes[0]


def test_forward_flops_counts_convolutions_and_says_when_it_cannot():
    flops, why = forward_flops(ConvF(), torch.zeros(1, 1, 8, 8))
    assert flops == 2 * 9 * 6 * 6 and why is None
    flops, why = forward_flops(lambda x: x.mean(dim=(1, 2, 3)), torch.zeros(1, 1, 8, 8))
    assert flops is None and "no convolution" in why


def test_series_cost_counts_both_methods_passes_and_flops():
    torch.manual_seed(0)
    g, f = Generator(1, [4, 8], NUM_BINS).eval(), ConvF()
    x = torch.rand(3, 1, 8, 8) * 2 - 1

    def explainer(xb, g=g, f=f):
        return explain_series(g, f, xb, NUM_BINS, PROBES)[0]

    def baseline(xb, steps=40, f=f, return_steps=False):
        return pixel_search(f, xb, NUM_BINS, steps, 0.05, 0.0, 0.02, return_steps=return_steps)
    absent = {}
    cost = series_cost(explainer, baseline, g, f, x, NUM_BINS, absent)
    e, b = cost["explainer"], cost["baseline"]
    # The probes, then each bin no probe already shows.
    conditions = explain_series(g, f, x, NUM_BINS, PROBES)[1]
    shown = (conditions[..., None] == torch.linspace(0, NUM_BINS - 1, PROBES)).any(-1)
    assert e["generator_images"] == PROBES + (~shown).sum().item() / len(x) and e["classifier_images"] == PROBES
    # f sees each image once per step until it reaches its bin (at step s: s + 1 passes), or
    # at every one of the 40 steps when it does not.
    _, taken, reached = baseline(x, return_steps=True)
    passes = torch.where(reached, taken + 1, torch.full_like(taken, 40)).sum().item()
    assert b["classifier_images"] == pytest.approx(passes / len(x))
    assert b["steps_per_image"] == pytest.approx(taken.float().mean().item())
    assert b["steps_per_image"] <= b["steps_per_image_max"] <= 40
    assert cost["classifier_mflops_per_image"] == pytest.approx(2 * 9 * 36 / 1e6)
    g_flops = cost["generator_mflops_per_image"] * 1e6
    assert g_flops > cost["classifier_mflops_per_image"] * 1e6
    assert e["gflops"] * 1e9 == pytest.approx(e["generator_images"] * g_flops + PROBES * 2 * 9 * 36)
    assert b["gflops"] * 1e9 == pytest.approx(3 * b["classifier_images"] * 2 * 9 * 36)
    assert cost["flops_ratio"] == pytest.approx(b["gflops"] / e["gflops"]) and absent == {}
    text = cost_text(cost, 42.0)
    assert f"ran G on {e['generator_images']:.1f} images" in text and "GFLOPs per series" in text
    add_flop_rates(cost, {"explainer": e["gflops"] / 30, "baseline": b["gflops"] / 20})
    assert (e["gflop_per_s"], b["gflop_per_s"]) == (pytest.approx(30.0), pytest.approx(20.0))
    assert "the time ratio, 42, is that times the quotient of the rates the two ran at (30 GFLOP/s against 20)" \
        in cost_text(cost, 42.0)


def test_series_cost_leaves_flops_absent_for_a_model_it_cannot_count():
    g = Generator(1, [4, 8], NUM_BINS).eval()

    def f(x):
        return torch.sigmoid(x.mean(dim=(1, 2, 3)))

    def explainer(xb, g=g, f=f):
        return explain_series(g, f, xb, NUM_BINS, PROBES)[0]

    def baseline(xb, steps=5, f=f, return_steps=False):
        return pixel_search(f, xb, NUM_BINS, steps, 0.05, 0.0, 0.02, return_steps=return_steps)
    absent = {}
    cost = series_cost(explainer, baseline, g, f, torch.zeros(2, 1, 8, 8), NUM_BINS, absent)
    assert cost["flops_ratio"] is None and cost["explainer"]["gflops"] is None
    assert "cost_per_series: classifier_mflops_per_image" in absent
    assert "GFLOPs" not in cost_text(cost, 10.0)
