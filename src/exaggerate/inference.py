"""Generating series with a trained generator: the paper's series (one generator pass at the
bins 0..N-1), the calibrated series (conditions found by probing f), and series figures."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import plots
from .classifier import BlackBox
from .losses import bin_targets
from .networks import Generator
from .posteriors import bin_index


@torch.no_grad()
def series(g: Generator, x: torch.Tensor, num_bins: int, conditions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x_0 ... x_{N-1} for each image: one batched generator call, shape (B, N, C, H, W); at the
    bins 0..N-1, or at real-valued `conditions` of shape (B, N) (calibrated_conditions)."""
    b = x.shape[0]
    c = torch.arange(num_bins, device=x.device).repeat(b) if conditions is None else conditions.flatten()
    out = g(x.repeat_interleave(num_bins, dim=0), c)
    return out.reshape(b, num_bins, *x.shape[1:])


def keep_detail(images: torch.Tensor, queries: torch.Tensor, recon: torch.Tensor, tau: float,
                fade: torch.Tensor) -> torch.Tensor:
    """G's images with the query's own detail put back where G changed little (explain.detail).

    The detail is what G's reconstruction G(x, c_x) misses, x - G(x, c_x). It is added to
    G(x, t) with the weight (1 - |G(x, t) - G(x, c_x)| / tau) * fade per pixel (the first factor
    channel-averaged, both clamped to [0, 1]): fully where G leaves the reconstruction alone, not
    where it changes it by tau or more; `fade` (one per image) lowers it with the distance of t
    from the query's bin. images, queries, recon: (M, C, H, W) in [-1, 1]; fade: (M,)."""
    change = (images - recon).abs().mean(1, keepdim=True)
    weight = (1 - change / tau).clamp_(0, 1) * fade.clamp(0, 1)[:, None, None, None]
    return (images + weight * (queries - recon)).clamp_(-1, 1)


class Reference(NamedTuple):
    """The queries' own bins c_x (B,) and G's reconstructions G(x, c_x) (B, C, H, W)."""
    source: torch.Tensor
    recon: torch.Tensor


def reference(g: Generator, f: BlackBox, x: torch.Tensor, num_bins: int) -> Reference:
    source = torch.from_numpy(bin_index(f(x).cpu().numpy(), num_bins)).to(x.device)
    return Reference(source, g(x, source))


class _Render:
    """G(x_i, t) for query indices i and conditions t; with the query's detail kept when
    detail > 0 (keep_detail, fading linearly to nothing at N - 1 bins from the query's own)."""

    def __init__(self, g: Generator, f: BlackBox, x: torch.Tensor, num_bins: int, detail: float,
                 ref: Optional[Reference] = None):
        self.g, self.x, self.detail, self.num_bins = g, x, detail, num_bins
        self.ref = reference(g, f, x, num_bins) if detail > 0 and ref is None else ref

    def __call__(self, idx: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = self.g(self.x[idx], c)
        if self.detail > 0:
            fade = 1 - (c.float() - self.ref.source[idx].float()).abs() / max(self.num_bins - 1, 1)
            out = keep_detail(out, self.x[idx], self.ref.recon[idx], self.detail, fade)
        return out


@torch.no_grad()
def calibrated_conditions(g: Generator, f: BlackBox, x: torch.Tensor, num_bins: int, probes: int,
                          return_probes: bool = False, detail: float = 0.0, ref: Optional[Reference] = None):
    """Per image, the generator conditions t_0 <= ... <= t_{N-1} in [0, N-1] at which f's
    posterior should sit at the bin centres (shape (B, N)); with return_probes, also the probe
    images G(x, t) at the probe conditions (B, probes, C, H, W).

    G(x, t) is generated at `probes` evenly spaced conditions and f scores each; f as a function
    of t is taken piecewise linear between them (made non-decreasing along t), and inverted at
    every bin centre. Centres below the first probe's posterior get t = 0, above the last
    t = N - 1: the generator has no condition beyond its end bins. With detail > 0 the probes
    are the images the series shows, the query's detail kept (keep_detail; ref: the queries' bins
    and reconstructions, when the caller has them).
    """
    b, dev = x.shape[0], x.device
    grid = probe_grid(num_bins, probes, dev)
    render = _Render(g, f, x, num_bins, detail, ref)
    images = render(torch.arange(b, device=dev).repeat_interleave(probes), grid.repeat(b))
    p = f(images).reshape(b, probes).float()
    # Non-decreasing, then strictly increasing by a negligible ramp so that no segment is flat.
    p = torch.cummax(p, dim=1).values + torch.arange(probes, device=dev) * 1e-6
    centres = bin_targets(torch.arange(num_bins, device=dev), num_bins).expand(b, num_bins).contiguous()
    hi = torch.searchsorted(p, centres).clamp(1, probes - 1)
    p_lo, p_hi = p.gather(1, hi - 1), p.gather(1, hi)
    share = ((centres - p_lo) / (p_hi - p_lo)).clamp(0, 1)
    conditions = torch.lerp(grid[hi - 1], grid[hi], share)
    if return_probes:
        return conditions, images.reshape(b, probes, *x.shape[1:])
    return conditions


def probe_grid(num_bins: int, probes: int, device=None) -> torch.Tensor:
    """The probe conditions of calibrated_conditions: evenly spaced over [0, N-1]."""
    return torch.linspace(0, num_bins - 1, probes, device=device)


@torch.no_grad()
def explain_series(g: Generator, f: BlackBox, x: torch.Tensor, num_bins: int, probes: int = 0,
                   detail: float = 0.0, ref: Optional[Reference] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The series (B, N, C, H, W) and the conditions it was generated at (B, N): the bins
    themselves when probes is 0 (the paper), calibrated ones otherwise (explain.probes); with
    the query's detail kept when detail > 0 (keep_detail, explain.detail; ref: the queries' bins
    and G(x, c_x) when the caller has them, made here otherwise).

    A calibrated condition that equals a probe's (mostly the end bins, when f's posterior at an
    end condition does not reach that end bin's centre) takes the probe's image instead of
    generating it again."""
    b = x.shape[0]
    if not probes:
        bins = torch.arange(num_bins, device=x.device, dtype=torch.float32).expand(b, num_bins)
        if detail <= 0:
            return series(g, x, num_bins), bins
        render = _Render(g, f, x, num_bins, detail, ref)
        out = render(torch.arange(b, device=x.device).repeat_interleave(num_bins), bins.flatten())
        return out.reshape(b, num_bins, *x.shape[1:]), bins
    if detail > 0 and ref is None:
        ref = reference(g, f, x, num_bins)
    conditions, probe_images = calibrated_conditions(g, f, x, num_bins, probes, return_probes=True,
                                                     detail=detail, ref=ref)
    match = conditions[..., None] == probe_grid(num_bins, probes, x.device)  # (B, N, probes)
    reuse = match.any(-1)
    query = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(reuse)
    out = probe_images.new_empty(x.shape[0], num_bins, *x.shape[1:])
    out[reuse] = probe_images[query[reuse], match.int().argmax(-1)[reuse]]
    if not bool(reuse.all()):
        out[~reuse] = _Render(g, f, x, num_bins, detail, ref)(query[~reuse], conditions[~reuse])
    return out, conditions


def series_figure(g: Generator, f: BlackBox, x: torch.Tensor, num_bins: int, title: str):
    was_training = g.training
    g.eval()
    with torch.no_grad():
        s = series(g, x, num_bins)
        p = f(s.flatten(0, 1)).reshape(s.shape[:2]).cpu()
        p_query = f(x).cpu()
    g.train(was_training)
    grid = torch.cat([x[:, None].cpu(), s.cpu()], dim=1)
    titles = [[f"query p={pq:.2f}"] + [f"f={v:.2f}" for v in row] for pq, row in zip(p_query, p)]
    cols = ["query"] + [f"bin {k}" for k in range(num_bins)]
    return plots.image_grid(grid, titles, col_labels=cols, suptitle=title)


@torch.no_grad()
def explain_batch(g: Generator, f: BlackBox, x: torch.Tensor, num_bins: int, probes: int = 0,
                  detail: float = 0.0) -> dict[str, torch.Tensor]:
    """Series (calibrated when probes > 0, explain.probes; the query's detail kept when
    detail > 0, explain.detail), the conditions it was generated at, G's own reconstruction
    G(x, c_x) and f of everything, for a batch of queries."""
    p_query = f(x)
    source = torch.from_numpy(bin_index(p_query.cpu().numpy(), num_bins)).to(x.device)
    recon = g(x, source)
    s, conditions = explain_series(g, f, x, num_bins, probes, detail, Reference(source, recon))
    p_series = f(s.flatten(0, 1)).reshape(s.shape[:2])
    return {"series": s, "conditions": conditions, "p_series": p_series, "recon": recon, "p_recon": f(recon),
            "p_query": p_query, "source_bin": source}
