import contextlib
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from exaggerate.classifier import BlackBox, load_classifier
from exaggerate.config import Base, ConfigError
from exaggerate.io import ArtifactError
from exaggerate.augment import augment
from exaggerate.checkpoint import (CheckpointError, architecture, build_networks, check_signature, load_generator,
                                   training_signature)
from exaggerate.inference import calibrated_conditions, explain_batch, explain_series, keep_detail, series
from exaggerate.training_loop import (PairSampler, TrainingDiverged, _update, explainer_step, fit, frozen,
                                       new_state, update_average)
from exaggerate.losses import ExplainerLoss, LossWeights
from exaggerate.metrics import compatibility
from exaggerate.networks import ConditionalBatchNorm2d
from exaggerate.networks import Discriminator, Generator
from exaggerate.posteriors import bin_index
from exaggerate.tracking import Tracker
from helpers import TINY_EXPLAINER


@pytest.fixture(scope="module")
def setup(trained):
    base, ds, splits, clf_dir, _ = trained
    f = load_classifier(clf_dir, base)
    with torch.no_grad():
        p = f(ds.images(splits["train"])).numpy()
    return base, ds, splits, f, splits["train"], bin_index(p, base.num_bins)


def test_generator_shapes_and_embedding():
    g = Generator(3, [16, 32, 64, 64], num_bins=10)
    x = torch.randn(4, 3, 64, 64)
    c = torch.tensor([0, 3, 6, 9])
    e = g.encode(x, c)
    assert e.shape == (4, 64, 8, 8)
    out = g(x, c)
    assert out.shape == x.shape and out.abs().max() <= 1


def test_paper_generator_reaches_4x4_embedding():
    g = Generator(3, [64, 128, 256, 512, 1024, 1024], num_bins=10)
    with torch.no_grad():
        e = g.eval().encode(torch.zeros(1, 3, 128, 128), torch.tensor([2]))
    assert e.shape == (1, 1024, 4, 4)


def test_conditional_norm_makes_output_depend_on_bin():
    torch.manual_seed(0)
    g = Generator(1, [8, 16], num_bins=4)
    for m in g.modules():
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight)
    g.eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(g(x, torch.tensor([0])), g(x, torch.tensor([3])))


def test_discriminator_ordinal_projection_sums_levels():
    torch.manual_seed(0)
    d = Discriminator(1, [8, 16], num_bins=5).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        phi = d.features(x)
        v = d.levels.weight  # (N-1, C): one vector per level
        outs = [d(x, torch.tensor([c])).item() for c in range(5)]
        base = d.linear(phi).item()
    assert outs[0] == pytest.approx(base, abs=1e-5)  # c = 0: no level set
    for c in range(1, 5):  # D(x, c) - D(x, c-1) = <v_c, phi>
        assert outs[c] - outs[c - 1] == pytest.approx(float(v[c - 1] @ phi[0]), abs=1e-4)


def test_pair_sampler_draws_every_binned_image_equally_often_from_its_stream(setup):
    _, ds, _, _, indices, bins = setup
    sizes = torch.bincount(torch.from_numpy(bins), minlength=10).double()
    sampler = PairSampler(ds, indices, bins, 64, torch.Generator().manual_seed(0))
    drawn = torch.cat([sampler.sample()[1] for _ in range(200)])
    assert torch.allclose(torch.bincount(drawn, minlength=10).double() / len(drawn), sizes / sizes.sum(), atol=0.02)
    # The draw is torch.randint on the run's generator: checkpointing that generator replays it.
    rng = torch.Generator().manual_seed(3)
    x, c = PairSampler(ds, indices, bins, 8, torch.Generator().manual_seed(3)).sample()
    idx = torch.randint(len(bins), (8,), generator=rng)
    assert torch.equal(c, torch.from_numpy(bins)[idx]) and torch.equal(x, ds.images(indices[idx.numpy()]))


def test_augment_translates_each_image_on_its_own():
    h = w = 16
    x = (torch.arange(3 * h * w, dtype=torch.float32).view(3, 1, h, w) + 1).requires_grad_()
    rng = torch.Generator().manual_seed(0)
    assert augment(x, "none", rng) is x
    pad = h // 8
    padded = torch.nn.functional.pad(x.detach(), (pad,) * 4, mode="replicate")
    shifts = set()
    for _ in range(10):
        y = augment(x, "translation", rng)
        assert y.shape == x.shape
        for i in range(3):
            # each image is its own padded copy cropped at one offset within +-h/8
            found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                     if torch.equal(y[i, 0].detach(), padded[i, 0, dy:dy + h, dx:dx + w])]
            assert found, f"image {i} is not a translated copy"
            shifts.add(found[0])
    assert len(shifts) > 5  # offsets vary between images and calls
    # differentiable: every output pixel takes its gradient back to exactly one input pixel
    y.sum().backward()
    assert x.grad.sum().item() == pytest.approx(y.numel())
    # Another augmentation is another run: it never resumes an unaugmented run's checkpoint.
    plain = training_signature(Base(), dataclasses.replace(TINY_EXPLAINER, augment="none"))
    with pytest.raises(CheckpointError, match="augment='translation'.*augment='none'"):
        check_signature(training_signature(Base(), TINY_EXPLAINER), plain, "step-00000002.pt")
    with pytest.raises(ValueError, match="unknown augmentation 'cutout'"):
        augment(x, "cutout", rng)


def test_classifier_augment_shifts_less_and_keeps_old_signatures():
    x = torch.randn(64, 1, 32, 32)
    rng = torch.Generator().manual_seed(1)
    padded = torch.nn.functional.pad(x, (2,) * 4, mode="replicate")
    y = augment(x, "translation", rng, divisor=16)  # up to 32 / 16 = 2 pixels
    offsets = set()
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(y[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert found, f"image {i} is not shifted by at most 2 pixels"
        offsets.add(found[0])
    assert {dy for dy, _ in offsets} == set(range(5))  # every offset within +-2 occurs
    # Off (the paper's term), the setting leaves signatures as they were before it existed, so
    # checkpoints and generators made then still load; on, it is another run.
    base = training_signature(Base(), dataclasses.replace(TINY_EXPLAINER, classifier_augment="none"))
    assert "classifier_augment" not in base
    shifted = training_signature(Base(), dataclasses.replace(TINY_EXPLAINER, classifier_augment="translation"))
    assert shifted["classifier_augment"] == "translation"
    with pytest.raises(CheckpointError, match="classifier_augment=None.*classifier_augment='translation'"):
        check_signature(base, shifted, "step-00000002.pt")


def test_conditional_norm_interpolates_between_bins_and_folds_statistics_in_eval():
    torch.manual_seed(0)
    norm = ConditionalBatchNorm2d(3, num_bins=4)
    nn.init.normal_(norm.gamma.weight)
    nn.init.normal_(norm.beta.weight)
    norm.bn.running_mean.normal_()
    norm.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 5, 5)
    whole = torch.tensor([0, 2, 3])
    for mode in (norm.train, norm.eval):
        mode()
        # A whole-number float condition is exactly the bin's; 3.7 clamps to the last bin's pair.
        assert torch.equal(norm(x, whole.float()), norm(x, whole))
        half = norm(x, torch.tensor([0.5, 2.5, 3.0]))
        lo, hi = norm(x, torch.tensor([0, 2, 3])), norm(x, torch.tensor([1, 3, 3]))
        if norm.training:  # batch statistics: the same normalised input for every condition
            assert torch.allclose(half, (lo + hi) / 2, atol=1e-5)
    norm.eval()
    plain = norm.bn(x) * norm.gamma(whole)[:, :, None, None] + norm.beta(whole)[:, :, None, None]
    assert torch.allclose(norm(x, whole), plain, atol=1e-5)
    assert torch.allclose(norm(x, torch.tensor([0.5, 2.5, 3.0])),
                          (norm(x, torch.tensor([0, 2, 3])) + norm(x, torch.tensor([1, 3, 3]))) / 2, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_folded_resampling_computes_the_plain_ops_function_in_eval_mode(channels):
    from exaggerate.networks import GeneratorBlock
    torch.manual_seed(0)
    g = Generator(channels, [8, 16, 24], num_bins=5)
    for m in g.modules():  # trained-looking statistics and bin pairs, not the identity at init
        if isinstance(m, ConditionalBatchNorm2d):
            nn.init.normal_(m.gamma.weight, 1.0, 0.3)
            nn.init.normal_(m.beta.weight, 0.0, 0.3)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    g.eval()
    x, c = torch.randn(4, channels, 16, 16), torch.tensor([0.0, 1.5, 3.25, 4.0])
    blocks = [m for m in g.modules() if isinstance(m, GeneratorBlock)]
    assert {b.resample for b in blocks} == {"down", "up"}
    with torch.no_grad():
        folded, embedding = g(x, c), g.encode(x, c)
        g.fold_resampling(False)
        plain, plain_embedding = g(x, c), g.encode(x, c)
    assert not torch.equal(folded, plain)  # other ops ran ...
    assert torch.allclose(folded, plain, atol=1e-5)  # ... computing the same function
    assert torch.allclose(embedding, plain_embedding, atol=1e-5)
    g.fold_resampling(True)
    assert all(b.fold_resampling for b in blocks)
    # With autograd, the folded path passes the same gradient to the image.
    xg = x.clone().requires_grad_(True)
    g(xg, c).square().sum().backward()
    g.fold_resampling(False)
    xp = x.clone().requires_grad_(True)
    g(xp, c).square().sum().backward()
    assert torch.allclose(xg.grad, xp.grad, atol=1e-4)



def test_training_runs_the_folded_ops_and_they_compute_the_plain_function():
    """G in training mode (batch statistics) and D (spectral norm, its power iteration held
    still in eval mode) give the plain ops' outputs and gradients, up to float rounding."""
    torch.manual_seed(0)
    g = Generator(1, [8, 16, 24], num_bins=5).train()
    d = Discriminator(1, [8, 16, 24], num_bins=5).eval()
    x, c = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 4, 2])

    def outputs_and_grads(fold):
        g.fold_resampling(fold)
        d.fold_resampling(fold)
        g.zero_grad()
        d.zero_grad()
        xi = x.clone().requires_grad_(True)
        x_new = g(xi, c)
        out = d(x_new, c)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in (*g.parameters(), *d.parameters())]
        return x_new.detach(), out.detach(), xi.grad, grads

    folded, plain = outputs_and_grads(True), outputs_and_grads(False)
    assert not torch.equal(folded[0], plain[0])  # other ops ran ...
    for a, b in zip(folded[:3], plain[:3]):  # ... computing the same function
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(folded[3], plain[3]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)
    assert all(b.fold_resampling is False for b in d.blocks)
    g.fold_resampling(True)
    d.fold_resampling(True)
    # The defaults are the folded ops.
    fresh_g, fresh_d = Generator(1, [8, 16], num_bins=3), Discriminator(1, [8, 16], num_bins=3)
    assert all(m.fold_resampling for m in (*fresh_g.encoder, *fresh_g.decoder, *fresh_d.blocks))

class FillGenerator(nn.Module):
    """G(x, t): an image filled with t, whatever x is."""

    def forward(self, x, c):
        return c.float()[:, None, None, None].expand(-1, *x.shape[1:]).clone()


class MeanScore(nn.Module):
    """f: a given function of the image mean."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x.mean(dim=(1, 2, 3)))


def test_calibrated_conditions_land_the_posterior_on_the_bin_centres():
    x = torch.zeros(2, 1, 4, 4)
    centres = (torch.arange(10) + 0.5) / 10
    # f linear in the condition, f(t) = t / 9: the inversion is exact with any number of probes.
    linear = MeanScore(lambda m: m / 9)
    for probes in (2, 4, 10):
        t = calibrated_conditions(FillGenerator(), linear, x, 10, probes)
        assert torch.allclose(t, (9 * centres).expand(2, 10), atol=1e-3)
    s, t = explain_series(FillGenerator(), linear, x, 10, probes=4)
    p = linear(s.flatten(0, 1)).reshape(2, 10).numpy()
    assert compatibility(p)["compatibility_mae"] < 1e-3
    # Without probes: the paper's series at the bins themselves.
    s, t = explain_series(FillGenerator(), linear, x, 10, probes=0)
    assert torch.equal(t, torch.arange(10.0).expand(2, 10)) and torch.equal(s[:, 3], torch.full((2, 1, 4, 4), 3.0))
    # f covering only [0.3, 0.6] along the conditions: centres outside get the end conditions,
    # and a dip in f (not monotone) does not send the conditions backwards.
    narrow = MeanScore(lambda m: 0.3 + m / 30 - 0.05 * ((m - 4).abs() < 0.6).float())
    t = calibrated_conditions(FillGenerator(), narrow, x, 10, probes=10)[0]
    assert t[0] == 0 and t[1] == 0 and t[-1] == 9 and t[-2] == 9
    assert torch.all(t[1:] >= t[:-1])
    # Centre 0.45 lies between probe 4 (its dip to 0.383 raised to f(3) = 0.4 by the envelope)
    # and probe 5 (0.467): three quarters of the way.
    assert t[4] == pytest.approx(4.75, abs=1e-3)


class LeftHalf(nn.Module):
    """f: a given function of the mean of the image's left half."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3)))


class CountingGenerator(nn.Module):
    """Wraps G and counts the images it generates."""

    def __init__(self, g):
        super().__init__()
        self.g, self.images = g, 0

    def forward(self, x, c):
        self.images += len(x)
        return self.g(x, c)


def test_calibrated_series_takes_end_bins_from_the_probes_and_matches_regenerating_them():
    torch.manual_seed(0)
    g, _ = build_networks(Base(), TINY_EXPLAINER)
    g.eval()
    x = torch.randn(3, 1, 32, 32)
    # f's posterior spans only [0.3, 0.6] along the conditions: the first bins' centres (0.05 ...
    # 0.25) lie below it and take condition 0, the last ones' above it and take condition 9.
    f = MeanScore(lambda m: 0.3 + 0.3 * torch.sigmoid(20 * m))
    counting = CountingGenerator(g)
    s, t = explain_series(counting, f, x, 10, probes=4)
    reused = int(((t == 0) | (t == 3) | (t == 6) | (t == 9)).sum())
    assert reused >= 3 * 7  # bins 0-2 and 6-9 at least, for each query
    assert counting.images == 3 * 4 + 3 * 10 - reused
    with torch.no_grad():
        assert torch.allclose(s, series(g, x, 10, t), atol=1e-6)


class BlurAndMark(nn.Module):
    """G(x, t): x with its fine detail lost (each 2x2 block averaged) and the left half raised by
    0.1 t: the reconstruction misses the detail, the change sits in one half."""

    def forward(self, x, c):
        smooth = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
        half = torch.zeros_like(x)
        half[..., : x.shape[-1] // 2] = 1
        return smooth + 0.1 * c.float()[:, None, None, None] * half


def test_kept_detail_is_the_query_where_g_changes_nothing_and_gs_image_where_it_changes_much():
    torch.manual_seed(0)
    x = 0.3 * torch.randn(2, 1, 8, 8)
    g = BlurAndMark()
    recon = g(x, torch.zeros(2))
    far = g(x, torch.full((2,), 9.0))  # the left half changed by 0.9, the right half not at all
    kept = keep_detail(far, x, recon, 0.5, torch.ones(2))
    assert torch.allclose(kept[..., 4:], x[..., 4:].clamp(-1, 1), atol=1e-6)  # detail back where G kept still
    assert torch.equal(kept[..., :4], far[..., :4].clamp(-1, 1))  # G's image where it changed by >= tau
    near = g(x, torch.full((2,), 2.0))  # changed by 0.2: weight 1 - 0.2 / 0.5 of the detail
    half = keep_detail(near, x, recon, 0.5, torch.ones(2))[..., :4]
    assert torch.allclose(half, (near + 0.6 * (x - recon))[..., :4].clamp(-1, 1), atol=1e-6)
    # The fade scales the weight image by image: none of the detail at 0, a quarter at 0.25.
    faded = keep_detail(far, x, recon, 0.5, torch.tensor([0.0, 0.25]))
    assert torch.equal(faded[0], far[0].clamp(-1, 1))
    assert torch.allclose(faded[1, ..., 4:], (far + 0.25 * (x - recon))[1, ..., 4:].clamp(-1, 1), atol=1e-6)


def test_series_with_kept_detail_is_calibrated_on_the_images_it_shows():
    torch.manual_seed(0)
    x = 0.3 * torch.randn(3, 1, 8, 8)
    g = BlurAndMark()
    # f reads only the left half's mean, which the detail (zero mean over each 2x2 block) leaves alone.
    f = LeftHalf(lambda m: (m / 0.9).clamp(0, 1))
    s0, _ = explain_series(g, f, x, 10, probes=4)
    s, t = explain_series(g, f, x, 10, probes=4, detail=0.5)
    p = f(s.flatten(0, 1)).reshape(3, 10).numpy()
    assert compatibility(p)["compatibility_mae"] < 0.05
    # The right half, which G never changes, is G's blurred copy without the detail, and with it
    # the query's own fading into G's copy with the distance from the query's bin c_x.
    source = torch.from_numpy(bin_index(f(x).numpy(), 10))
    fade = 1 - (t - source[:, None]).abs() / 9
    smooth = g(x, source)[:, None]
    expected = (smooth + fade[..., None, None, None] * (x[:, None] - smooth)).clamp(-1, 1)
    assert torch.allclose(s[..., 4:], expected[..., 4:], atol=1e-6)
    assert torch.allclose(s0[..., 4:], smooth[..., 4:].expand_as(s0[..., 4:]), atol=1e-6)
    assert float((s[..., 4:] - s0[..., 4:]).abs().max()) > 0.1
    # explain_batch passes its own c_x and G(x, c_x) to the series: the same images.
    out = explain_batch(g, f, x, 10, probes=4, detail=0.5)
    assert torch.allclose(out["series"], s, atol=1e-6)
    assert torch.equal(out["source_bin"], source)


def test_calibrated_series_of_an_image_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    g, _ = build_networks(Base(), TINY_EXPLAINER)
    g.train()
    with torch.no_grad():  # move the running statistics away from their initial values
        g(torch.randn(16, 1, 32, 32), torch.randint(10, (16,)))
    g.eval()
    f = MeanScore(torch.sigmoid)
    x = torch.randn(5, 1, 32, 32)
    alone, t_alone = explain_series(g, f, x[2:3], 10, probes=4)
    batch, t_batch = explain_series(g, f, x, 10, probes=4)
    assert torch.allclose(t_alone[0], t_batch[2], atol=1e-5)
    assert torch.allclose(alone[0], batch[2], atol=1e-5)


def test_explanation_does_not_depend_on_batch():
    torch.manual_seed(0)
    g, _ = build_networks(Base(), TINY_EXPLAINER)
    g.train()
    with torch.no_grad():  # put some non-trivial running statistics in place
        for _ in range(3):
            g(torch.randn(8, 1, 32, 32), torch.randint(10, (8,)))
    g.eval()
    x = torch.randn(5, 1, 32, 32)
    alone = series(g, x[2:3], 10)
    batch = series(g, x, 10)
    assert torch.allclose(alone[0], batch[2], atol=1e-5)


def test_fit_writes_generator_and_resumes(setup, tmp_path, capsys):
    base, ds, splits, f, idx, bins = setup
    m = fit(ds, idx, bins, splits["val"], f, base, TINY_EXPLAINER, tmp_path)
    assert m["steps"] == 4
    assert (tmp_path / "generator.pt").is_file() and (tmp_path / "series_grid.png").is_file()
    ckpts = sorted((tmp_path / "checkpoints").glob("*/step-*.pt"))
    assert [p.name for p in ckpts] == ["step-00000002.pt", "step-00000004.pt"]
    g1 = load_generator(tmp_path / "generator.pt", base, TINY_EXPLAINER)

    # More steps continue from the last checkpoint instead of starting over.
    longer = dataclasses.replace(TINY_EXPLAINER, steps=6)
    m = fit(ds, idx, bins, splits["val"], f, base, longer, tmp_path)
    assert "resuming explainer training at step 4" in capsys.readouterr().out
    assert m["steps"] == 6 and m["steps_this_run"] == 2

    # Resuming reproduces an uninterrupted run bit for bit.
    fresh = tmp_path / "fresh"
    fit(ds, idx, bins, splits["val"], f, base, longer, fresh)
    a = torch.load(tmp_path / "generator.pt", weights_only=True)["generator"]
    b = torch.load(fresh / "generator.pt", weights_only=True)["generator"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in g1.state_dict().items())


def test_weight_average_follows_g_and_resumes_bit_for_bit(setup, tmp_path, capsys):
    base, ds, splits, f, idx, bins = setup
    # The average's arithmetic: w = min(decay, (1 + t) / (10 + t)) of the old, the rest of the new.
    avg, cur = nn.Linear(2, 1), nn.Linear(2, 1)
    old = avg.weight.detach().clone()
    update_average(avg, cur, 0.99, step=90)  # warm-up: w = 91 / 100
    assert torch.allclose(avg.weight, 0.91 * old + 0.09 * cur.weight, atol=1e-6)
    update_average(avg, cur, 0.5, step=10 ** 6)
    assert torch.allclose(avg.weight, 0.5 * (0.91 * old + 0.09 * cur.weight) + 0.5 * cur.weight, atol=1e-6)

    off = dataclasses.replace(TINY_EXPLAINER, ema_decay=0.0)  # the paper's last weights
    params = dataclasses.replace(TINY_EXPLAINER, ema_decay=0.9)
    fit(ds, idx, bins, splits["val"], f, base, off, tmp_path / "plain")
    fit(ds, idx, bins, splits["val"], f, base, params, tmp_path / "a")
    plain = torch.load(tmp_path / "plain" / "generator.pt", weights_only=True)["generator"]
    a = torch.load(tmp_path / "a" / "generator.pt", weights_only=True)["generator"]
    # The written generator is the average, not G's last weights (which training left as without it).
    ckpt = torch.load(sorted((tmp_path / "a" / "checkpoints").glob("*/step-*.pt"))[-1], weights_only=False)
    assert all(torch.equal(ckpt["generator"][k], plain[k]) for k in plain)
    assert all(torch.equal(ckpt["generator_ema"][k], a[k]) for k in a)
    assert not all(torch.equal(a[k], plain[k]) for k in a)
    # Its own checkpoint folder; a longer run resumes the average with the rest.
    assert training_signature(base, params, "d") != training_signature(base, off, "d")
    longer = dataclasses.replace(params, steps=6)
    fit(ds, idx, bins, splits["val"], f, base, longer, tmp_path / "a")
    assert "resuming explainer training at step 4" in capsys.readouterr().out
    fit(ds, idx, bins, splits["val"], f, base, longer, tmp_path / "b")
    a, b = (torch.load(tmp_path / k / "generator.pt", weights_only=True)["generator"] for k in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_generator(tmp_path / "a" / "generator.pt", base, longer).training is False


def test_explainer_seed_defaults_to_base_seed_and_changes_the_run(setup, tmp_path):
    base, ds, splits, f, idx, bins = setup
    same = dataclasses.replace(TINY_EXPLAINER, seed=base.seed)
    assert training_signature(base, TINY_EXPLAINER, "d") == training_signature(base, same, "d")
    other = dataclasses.replace(TINY_EXPLAINER, seed=base.seed + 1)
    assert training_signature(base, other, "d")["seed"] == base.seed + 1
    fit(ds, idx, bins, splits["val"], f, base, TINY_EXPLAINER, tmp_path / "a")
    fit(ds, idx, bins, splits["val"], f, base, same, tmp_path / "b")
    fit(ds, idx, bins, splits["val"], f, base, other, tmp_path / "c")
    a, b, c = (torch.load(tmp_path / k / "generator.pt", weights_only=True)["generator"] for k in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # Its own checkpoint folder: another seed never resumes this seed's checkpoints.
    assert {p.name for p in (tmp_path / "a" / "checkpoints").iterdir()} != {
        p.name for p in (tmp_path / "c" / "checkpoints").iterdir()}


def test_reconstruction_term_trains_g_towards_the_query_at_its_own_bin(setup, tmp_path):
    base, ds, splits, f, idx, bins = setup
    no_rec = dataclasses.replace(TINY_EXPLAINER, lambda_rec=0.0)
    rec = dataclasses.replace(TINY_EXPLAINER, lambda_rec=50.0)
    assert training_signature(base, rec)["lambda_rec"] == 50.0 and training_signature(base, no_rec)["lambda_rec"] == 0
    class Recorder(Tracker):
        def __init__(self):
            self.logged = []

        def metrics(self, values, step=None):
            self.logged.append(values)

    off, on = Recorder(), Recorder()
    fit(ds, idx, bins, splits["val"], f, base, no_rec, tmp_path / "off", tracker=off)
    fit(ds, idx, bins, splits["val"], f, base, rec, tmp_path / "on", tracker=on)
    assert off.logged and all("g_reconstruction" not in v for v in off.logged)
    assert on.logged and all(v["g_reconstruction"] > 0 for v in on.logged)
    a, b = (torch.load(tmp_path / k / "generator.pt", weights_only=True)["generator"] for k in ("off", "on"))
    assert not all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="explainer.lambda_rec"):
        dataclasses.replace(TINY_EXPLAINER, lambda_rec=-1.0).validate("explainer")


def test_generator_update_skips_ds_weight_gradients_and_keeps_gs_to_the_bit(setup):
    base, ds, splits, f, idx, bins = setup
    x = ds.images(idx[:8])
    c_x, c_new = torch.as_tensor(bins[:8]), torch.arange(8) % base.num_bins
    grads = []
    for freeze in (False, True):
        state = new_state(base, TINY_EXPLAINER, f, torch.device("cpu"))
        loss = ExplainerLoss(state.g, state.d, f, base.num_bins, LossWeights(1.0, 10.0, 1.0, 5.0))
        with frozen(state.d) if freeze else contextlib.nullcontext():
            _update(state.opt_g, loss.generator_terms, loss.generator_total, (x, c_x, c_new),
                    contextlib.nullcontext)
        grads.append([p.grad.clone() for p in state.g.parameters()])
        d_grads = [p.grad for p in state.d.parameters()]
        assert all(p.requires_grad for p in state.d.parameters())  # restored after the block
        if freeze:
            assert all(g is None for g in d_grads)
        else:
            assert any(g is not None and g.abs().sum() > 0 for g in d_grads)
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    # The training step uses it: after a step D holds its own update's gradients, nothing added by G's.
    states = [new_state(base, TINY_EXPLAINER, f, torch.device("cpu")) for _ in range(2)]
    losses = [ExplainerLoss(s.g, s.d, f, base.num_bins, LossWeights(1.0, 10.0, 1.0, 5.0)) for s in states]
    explainer_step(states[0], losses[0], x, c_x, 1, contextlib.nullcontext)
    c_new = torch.randint(base.num_bins, c_x.shape, generator=states[1].sampler_rng)
    _update(states[1].opt_d, losses[1].discriminator_terms, losses[1].discriminator_total, (x, c_x, c_new),
            contextlib.nullcontext)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(states[0].d.parameters(), states[1].d.parameters()))


def test_generator_from_other_settings_is_refused(setup, tmp_path):
    base, ds, splits, f, idx, bins = setup
    fit(ds, idx, bins, splits["val"], f, base, TINY_EXPLAINER, tmp_path)
    wider = dataclasses.replace(TINY_EXPLAINER, generator_widths=[16, 32])
    with pytest.raises(CheckpointError, match=r"generator_widths=\[8, 16\].*generator_widths=\[16, 32\]"):
        load_generator(tmp_path / "generator.pt", base, wider)
    with pytest.raises(CheckpointError, match="num_bins=10.*num_bins=5"):
        load_generator(tmp_path / "generator.pt", dataclasses.replace(base, num_bins=5), TINY_EXPLAINER)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="cannot read generator .*junk.pt"):
        load_generator(tmp_path / "junk.pt", base, TINY_EXPLAINER)
    # Truncated, and a torch file without the generator's keys: named errors, not tracebacks.
    data = (tmp_path / "generator.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="cannot read generator .*cut.pt"):
        load_generator(tmp_path / "cut.pt", base, TINY_EXPLAINER)
    torch.save({"architecture": architecture(base, TINY_EXPLAINER)}, tmp_path / "nokey.pt")
    with pytest.raises(ArtifactError, match="nokey.pt lacks the key.s. generator"):
        load_generator(tmp_path / "nokey.pt", base, TINY_EXPLAINER)


def test_nan_loss_stops_with_step_and_checkpoint(setup, tmp_path):
    base, ds, splits, f, idx, bins = setup

    class Poisoned(nn.Module):
        """f that turns NaN once training has run a few steps."""
        calls = 0

        def forward(self, x):
            Poisoned.calls += 1
            out = f.outputs(x)[:, :1]
            return out * float("nan") if Poisoned.calls > 12 else out

    bad = BlackBox(Poisoned(), ["Ankle boot"], 32, 1, output="probability")
    params = dataclasses.replace(TINY_EXPLAINER, steps=50)
    with pytest.raises(TrainingDiverged, match=r"loss g_classifier\w* became nan at step \d+; the last good checkpoint is .*step-0000000\d.pt"):
        fit(ds, idx, bins, splits["val"], bad, base, params, tmp_path)


def test_architecture_records_what_weights_depend_on():
    arch = architecture(Base(), TINY_EXPLAINER)
    assert arch == {"image_size": 32, "channels": 1, "num_bins": 10, "generator_widths": [8, 16],
                    "discriminator_widths": [8, 16]}


def test_channels_last_layout_gives_the_same_series():
    from exaggerate.utils import channels_last
    torch.manual_seed(0)
    g, _ = build_networks(Base(), TINY_EXPLAINER)
    g.eval()
    x = torch.randn(3, 1, 32, 32)
    plain = series(g, x, 10)
    channels_last(g)
    w = g.encoder[0].conv1.weight  # (16, 8, 3, 3): the two layouts differ
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert torch.allclose(series(g, x, 10), plain, atol=1e-5)


def test_fit_in_bf16_and_channels_last_on_cpu_resumes_bit_for_bit(setup, tmp_path, capsys):
    import copy
    base, ds, splits, f, idx, bins = setup
    f = copy.deepcopy(f)  # fit puts f in channels-last layout; keep the fixture's as it is
    params = dataclasses.replace(TINY_EXPLAINER, amp=True, channels_last=True)
    fit(ds, idx, bins, splits["val"], f, base, params, tmp_path / "a")
    longer = dataclasses.replace(params, steps=6)
    m = fit(ds, idx, bins, splits["val"], f, base, longer, tmp_path / "a")
    assert "resuming explainer training at step 4" in capsys.readouterr().out and m["steps_this_run"] == 2
    fit(ds, idx, bins, splits["val"], f, base, longer, tmp_path / "b")
    a = torch.load(tmp_path / "a" / "generator.pt", weights_only=True)["generator"]
    b = torch.load(tmp_path / "b" / "generator.pt", weights_only=True)["generator"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The weights stay float32 (autocast computes in bf16, the parameters are not cast).
    assert all(v.dtype != torch.bfloat16 for v in a.values())
    # The saved generator loads into a plain float32, contiguous generator.
    g = load_generator(tmp_path / "a" / "generator.pt", base, longer)
    assert g.encoder[0].conv1.weight.is_contiguous()
    # bf16 training differs from float32 training (the option is not silently ignored on CPU).
    fit(ds, idx, bins, splits["val"], copy.deepcopy(f), base, dataclasses.replace(longer, amp=False), tmp_path / "c")
    c = torch.load(tmp_path / "c" / "generator.pt", weights_only=True)["generator"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


