"""The explainer's losses (docs/METHOD.md, "Losses"), one term per paper equation.

With x' = G(x, c') and x'' = G(x', c_x), the cycle back to the source bin:
  D:  adversarial     E[relu(1 - D(x, c_x))] + E[relu(1 + D(x', c'))]          (hinge)
  G:  adversarial     -E[D(x', c')]
      classifier      BCE(f(a(x')), t(c'))         t(c') = (c' + 0.5) / N, the bin centre; a: the
                                                   classifier_augment (identity in the paper)
      classifier_cycle BCE(f(x''), f(x))
      cycle           L1(x, x'')
      embedding       L2(E(x, c_x), E(x', c_x))
      reconstruction  L1(x, G(x, c_x))             (not in the paper; computed when lambda_rec > 0)
G's total is lambda_gan * adversarial + lambda_cls * (classifier + classifier_cycle)
+ lambda_cyc * (cycle + embedding) + lambda_rec * reconstruction; D's is lambda_gan * adversarial.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def bin_targets(c: torch.Tensor, num_bins: int) -> torch.Tensor:
    """t(c): the centre (c + 0.5) / N of bin c (the original code used the lower edge c / N)."""
    return (c.float() + 0.5) / num_bins


def bce(p: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Binary cross-entropy of probabilities. Unlike F.binary_cross_entropy it lets a NaN
    posterior through as a NaN loss (reported with its step) instead of raising."""
    p = p.clamp(eps, 1 - eps)
    return (-(target * torch.log(p) + (1 - target) * torch.log1p(-p))).mean()


@dataclass(frozen=True)
class LossWeights:
    gan: float
    cyc: float
    cls: float
    rec: float


class ExplainerLoss:
    """The conditional GAN's losses against a frozen classifier f.

    `augment` is applied to every image D sees (identity for the paper's D), `classifier_augment`
    to x' where the classifier term reads it (identity for the paper's term). The networks'
    forward passes run in a fixed order, which keeps batch-norm statistics, spectral-norm
    power iterations and the augmentation's random stream, and so training, reproducible."""

    def __init__(self, g, d, f, num_bins: int, weights: LossWeights,
                 augment: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                 classifier_augment: Callable[[torch.Tensor], torch.Tensor] = lambda x: x):
        self.g, self.d, self.f, self.num_bins, self.w, self.augment = g, d, f, num_bins, weights, augment
        self.classifier_augment = classifier_augment

    def discriminator_terms(self, x: torch.Tensor, c_x: torch.Tensor, c_new: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            x_fake = self.g(x, c_new)
        real = F.relu(1 - self.d(self.augment(x), c_x)).mean()
        fake = F.relu(1 + self.d(self.augment(x_fake), c_new)).mean()
        return {"adversarial": real + fake}

    def discriminator_total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.w.gan * terms["adversarial"]

    def generator_terms(self, x: torch.Tensor, c_x: torch.Tensor, c_new: torch.Tensor) -> dict[str, torch.Tensor]:
        g = self.g
        embed_x = g.encode(x, c_x)
        x_fake = g(x, c_new)
        embed_fake = g.encode(x_fake, c_x)
        x_cycle = g.decode(embed_fake, c_x)
        with torch.no_grad():
            p_x = self.f(x).float()
        terms = {"adversarial": -self.d(self.augment(x_fake), c_new).mean()}
        p_fake, p_cycle = self.f(self.classifier_augment(x_fake)).float(), self.f(x_cycle).float()
        terms["classifier"] = bce(p_fake, bin_targets(c_new, self.num_bins))
        terms["classifier_cycle"] = bce(p_cycle, p_x)
        terms["cycle"] = (x - x_cycle).abs().mean()
        terms["embedding"] = (embed_x - embed_fake).pow(2).mean()
        if self.w.rec > 0:  # one more decoder pass, only when the term counts
            terms["reconstruction"] = (x - g.decode(embed_x, c_x)).abs().mean()
        return terms

    def generator_total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        w = self.w
        total = (w.gan * terms["adversarial"] + w.cls * (terms["classifier"] + terms["classifier_cycle"])
                 + w.cyc * terms["cycle"] + w.cyc * terms["embedding"])
        if "reconstruction" in terms:
            total = total + w.rec * terms["reconstruction"]
        return total
