"""Known answers for each of the explainer's loss terms, on tiny tensors and stand-in networks
whose outputs are easy to follow by hand."""
import math

import pytest
import torch
import torch.nn as nn

from exaggerate.losses import ExplainerLoss, LossWeights, bce, bin_targets


class ShiftGenerator(nn.Module):
    """E(x, c) = x + c / 10 and a decoder that returns the embedding: G(x, c) = x + c / 10."""

    def encode(self, x, c):
        return x + c.float().view(-1, 1, 1, 1) / 10

    def decode(self, e, c):
        return e

    def forward(self, x, c):
        return self.decode(self.encode(x, c), c)


class MeanPlusBin(nn.Module):
    """D(x, c) = mean pixel of x + c."""

    def forward(self, x, c):
        return x.mean(dim=(1, 2, 3)) + c.float()


class SigmoidOfMean(nn.Module):
    """f(x) = sigmoid(mean pixel of x)."""

    def forward(self, x):
        return torch.sigmoid(x.mean(dim=(1, 2, 3)))


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def bce_by_hand(pairs) -> float:
    return sum(-(t * math.log(p) + (1 - t) * math.log(1 - p)) for p, t in pairs) / len(pairs)


X = torch.zeros(2, 1, 2, 2)
C_X = torch.tensor([0, 1])   # source bins
C_NEW = torch.tensor([2, 3])  # target bins c'


def make(rec: float = 7.0, augment=lambda img: img) -> ExplainerLoss:
    return ExplainerLoss(ShiftGenerator(), MeanPlusBin(), SigmoidOfMean(), 10, LossWeights(gan=2.0, cyc=5.0,
                         cls=3.0, rec=rec), augment)


def test_bin_targets_are_the_bin_centres():
    assert torch.allclose(bin_targets(torch.tensor([0, 4, 9]), 10), torch.tensor([0.05, 0.45, 0.95]))


def test_bce_matches_the_formula_and_lets_nan_through():
    p, t = torch.tensor([0.2, 0.9]), torch.tensor([0.25, 1.0])
    assert bce(p, t).item() == pytest.approx(bce_by_hand([(0.2, 0.25), (0.9, 1.0)]), rel=1e-5)
    assert torch.isnan(bce(torch.tensor([float("nan")]), torch.tensor([0.5])))


def test_discriminator_hinge_term():
    # D(x, c_x) = [0, 1]: relu(1 - .) = [1, 0]; x' = [0.2, 0.3] so D(x', c') = [2.2, 3.3]: relu(1 + .) = [3.2, 4.3]
    loss = make()
    terms = loss.discriminator_terms(X, C_X, C_NEW)
    assert set(terms) == {"adversarial"}
    assert terms["adversarial"].item() == pytest.approx(0.5 + 3.75)
    assert loss.discriminator_total(terms).item() == pytest.approx(2.0 * 4.25)


def test_generator_terms_each_have_their_paper_value():
    terms = make().generator_terms(X, C_X, C_NEW)
    # x' = x + c'/10 = [0.2, 0.3]; x'' = G(x', c_x) = [0.2, 0.4]; E(x, c_x) = [0, 0.1]; E(x', c_x) = [0.2, 0.4]
    expected = {
        "adversarial": -(2.2 + 3.3) / 2,
        "classifier": bce_by_hand([(sigmoid(0.2), 0.25), (sigmoid(0.3), 0.35)]),
        "classifier_cycle": bce_by_hand([(sigmoid(0.2), 0.5), (sigmoid(0.4), 0.5)]),
        "cycle": (0.2 + 0.4) / 2,
        "embedding": (0.2 ** 2 + 0.3 ** 2) / 2,
        "reconstruction": (0.0 + 0.1) / 2,
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name


def test_generator_total_weighs_the_terms_as_the_paper_does():
    loss = make()
    terms = loss.generator_terms(X, C_X, C_NEW)
    t = {k: v.item() for k, v in terms.items()}
    want = (2.0 * t["adversarial"] + 3.0 * (t["classifier"] + t["classifier_cycle"])
            + 5.0 * (t["cycle"] + t["embedding"]) + 7.0 * t["reconstruction"])
    assert loss.generator_total(terms).item() == pytest.approx(want, rel=1e-6)


def test_reconstruction_term_is_left_out_at_weight_zero():
    terms = make(rec=0.0).generator_terms(X, C_X, C_NEW)
    assert "reconstruction" not in terms


def test_every_image_d_sees_goes_through_the_augmentation():
    seen = []

    def record(img):
        seen.append(img.clone())
        return img

    loss = make(augment=record)
    loss.discriminator_terms(X, C_X, C_NEW)
    assert len(seen) == 2 and torch.equal(seen[0], X)  # the real images, then the generated ones
    assert torch.allclose(seen[1].mean(dim=(1, 2, 3)), torch.tensor([0.2, 0.3]))
    loss.generator_terms(X, C_X, C_NEW)
    assert len(seen) == 3  # G's adversarial term: D on the augmented x'


def test_classifier_term_reads_f_of_the_classifier_augmented_image_only():
    seen = []

    def dim_by_half(img):  # stands in for a shift: f must read this image, not x'
        seen.append(img.clone())
        return img * 0.5

    plain = make().generator_terms(X, C_X, C_NEW)
    loss = ExplainerLoss(ShiftGenerator(), MeanPlusBin(), SigmoidOfMean(), 10,
                         LossWeights(gan=2.0, cyc=5.0, cls=3.0, rec=7.0), classifier_augment=dim_by_half)
    terms = loss.generator_terms(X, C_X, C_NEW)
    # one call, on x' = G(x, c') (means 0.2 and 0.3), and f reads its halves (means 0.1 and 0.15)
    assert len(seen) == 1 and torch.allclose(seen[0].mean(dim=(1, 2, 3)), torch.tensor([0.2, 0.3]))
    assert terms["classifier"].item() == pytest.approx(bce_by_hand([(sigmoid(0.1), 0.25), (sigmoid(0.15), 0.35)]))
    # the cycle's classifier term and every other term are the paper's
    for name in plain:
        if name != "classifier":
            assert torch.equal(terms[name], plain[name]), name
    assert terms["classifier"].item() != pytest.approx(plain["classifier"].item())


def test_classifier_term_passes_gradients_through_f_to_g():
    g = nn.Conv2d(1, 1, 1)

    class ConvGenerator(ShiftGenerator):
        def encode(self, x, c):
            return g(x) + c.float().view(-1, 1, 1, 1) / 10

    f = SigmoidOfMean()
    loss = ExplainerLoss(ConvGenerator(), MeanPlusBin(), f, 10, LossWeights(0.0, 0.0, 1.0, 0.0))
    terms = loss.generator_terms(torch.randn(2, 1, 2, 2), C_X, C_NEW)
    loss.generator_total(terms).backward()
    assert g.weight.grad is not None and g.weight.grad.abs().sum() > 0
