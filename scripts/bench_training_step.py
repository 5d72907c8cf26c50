"""Training-step benchmark: the explainer's step with G's and D's resampling folded into their
convolutions (the default) against the plain ops (upsample then conv, conv then pool), in one
process, in turns, so that both arms see the same machine load.

Builds G and D from the params file, a DenseNet f of its classifier settings (random weights:
speed, not quality) and random batches, then runs rounds of warm-up and timed steps per arm and
prints each arm's best and median seconds per step and the plain / folded ratio.

    python scripts/bench_training_step.py                       # params.yaml, torch's threads
    python scripts/bench_training_step.py --threads 1 --rounds 4
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def main() -> None:
    from exaggerate.augment import augment
    from exaggerate.checkpoint import TrainState, build_networks
    from exaggerate.classifier import BlackBox, build_densenet
    from exaggerate.config import load_config
    from exaggerate.losses import ExplainerLoss, LossWeights
    from exaggerate.training_loop import explainer_step

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per arm and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per arm and round")
    ap.add_argument("--widths", type=int, nargs="+", default=None, help="override G's and D's widths")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.params)
    base, params = cfg.base, cfg.explainer
    if args.widths:
        import dataclasses
        params = dataclasses.replace(params, generator_widths=args.widths, discriminator_widths=args.widths)
    torch.manual_seed(0)
    f = BlackBox(build_densenet(cfg.classifier, base.channels, max(1, len(base.attributes))),
                 base.attributes or [base.target], base.image_size, base.channels).eval()
    g, d = build_networks(base, params)
    rng = torch.Generator().manual_seed(0)
    state = TrainState(g, d, torch.optim.Adam(g.parameters(), lr=params.lr_g, betas=tuple(params.betas)),
                       torch.optim.Adam(d.parameters(), lr=params.lr_d, betas=tuple(params.betas)), rng)
    loss = ExplainerLoss(g, d, f, base.num_bins,
                         LossWeights(params.lambda_gan, params.lambda_cyc, params.lambda_cls, params.lambda_rec),
                         lambda img: augment(img, params.augment, rng),
                         lambda img: augment(img, params.classifier_augment, rng, divisor=16))
    x = torch.rand(params.batch_size, base.channels, base.image_size, base.image_size) * 2 - 1
    c = torch.randint(base.num_bins, (params.batch_size,), generator=rng)
    arms = {"plain ops": False, "folded (default)": True}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, fold in arms.items():
            g.fold_resampling(fold)
            d.fold_resampling(fold)
            for _ in range(args.warmup):
                explainer_step(state, loss, x, c, params.n_critic, contextlib.nullcontext)
            start = time.perf_counter()
            for _ in range(args.steps):
                explainer_step(state, loss, x, c, params.n_critic, contextlib.nullcontext)
            times[name].append((time.perf_counter() - start) / args.steps)
    print(f"{base.image_size}x{base.image_size}, batch {params.batch_size}, G widths {params.generator_widths}, "
          f"D widths {params.discriminator_widths}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds of {args.steps} steps per arm")
    for name, t in times.items():
        print(f"{name}: best {min(t):.4f} s/step, median {statistics.median(t):.4f}")
    ratio = min(times["plain ops"]) / min(times["folded (default)"])
    print(f"plain / folded time per step (best rounds): {ratio:.2f}")


if __name__ == "__main__":
    main()
