"""Benchmark: seconds per series of the explainer and of the pixel-space baseline, at several
queries per call, in one process on the same queries.

The evaluate stage times both methods at each of evaluate.series_batches and compares each at
its own fastest. This script does the same over any batch sizes given, which is how the
defaults of evaluate.series_batches were found, and then says what the ratio is made of (G's
and f's passes, the baseline's steps, FLOPs and FLOP rates, counted as evaluate counts them).
Batches of the two methods
are timed alternately, so that a slow spell of a shared machine falls on both; the explainer's
batch, about 100 times shorter, is repeated --repeats times (mean). Needs a trained run
(outputs/classifier, outputs/explainer/generator.pt, outputs/explain/series.npz).

    python scripts/bench_speedup.py                            # params.yaml, 50 queries
    python scripts/bench_speedup.py --batches 1 5 10 --queries 20
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from exaggerate.classifier import load_classifier
    from exaggerate.config import load_config
    from exaggerate.evaluate import COST_QUERIES, add_flop_rates, series_cost, time_in_turns
    from exaggerate.report import cost_text
    from exaggerate.baseline import pixel_search
    from exaggerate.checkpoint import load_generator
    from exaggerate.inference import explain_series
    from exaggerate.stages import PATHS
    from exaggerate.utils import channels_last, resolve_device, set_threads

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 5, 10, 25])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each explainer batch (mean)")
    ap.add_argument("--unfolded", action="store_true",
                    help="also time the generator without folding resampling into its convolutions")
    args = ap.parse_args()

    cfg = load_config(args.params)
    base, ev = cfg.base, cfg.evaluate
    set_threads(base.threads)
    device = resolve_device(base.device)
    series_path = Path(PATHS["explain"]) / "series.npz"
    for p in (series_path, Path(PATHS["train_explainer"]) / "generator.pt"):
        if not p.is_file():
            raise SystemExit(f"{p} not found: run `dvc repro explain` first")
    f = load_classifier(PATHS["train_classifier"], base).to(device)
    g = load_generator(Path(PATHS["train_explainer"]) / "generator.pt", base, cfg.explainer).to(device)
    channels_last(g, f, enabled=cfg.explain.channels_last)
    with np.load(series_path) as z:
        x = torch.from_numpy(z["queries"][:args.queries]).to(device)
    nq, probes = len(x), cfg.explain.probes
    print(f"{nq} queries x {base.num_bins} bins, explain.probes {probes}, baseline {ev.baseline_steps} steps at "
          f"most, {torch.get_num_threads()} threads, device {device}")

    g_unfolded = copy.deepcopy(g).fold_resampling(False)

    def explainer(xb, gen=g):
        return explain_series(gen, f, xb, base.num_bins, probes)[0]

    def explainer_unfolded(xb):
        return explainer(xb, g_unfolded)

    def baseline(xb, steps=ev.baseline_steps):
        return pixel_search(f, xb, base.num_bins, steps, ev.baseline_lr, ev.baseline_lambda, ev.baseline_tolerance)

    methods = {"explainer": (explainer, args.repeats)}
    if args.unfolded:
        methods["unfolded"] = (explainer_unfolded, args.repeats)
    methods["baseline"] = (baseline, 1)
    # Untimed warm-up at every batch size (first calls with new shapes pay one-off set-up).
    for b in args.batches:
        explainer(x[:b])
        if args.unfolded:
            explainer_unfolded(x[:b])
        baseline(x[:b], steps=2)
    rows = []
    for b in args.batches:
        t = time_in_turns(methods, x, b)[1]
        rows.append((b, t["explainer"], t["baseline"]))
        line = (f"{b:4d} per call: explainer {t['explainer'] * 1000:7.2f} ms/series, baseline "
                f"{t['baseline']:6.3f} s/series, ratio {t['baseline'] / t['explainer']:6.1f}")
        if args.unfolded:
            line += (f"  (unfolded G {t['unfolded'] * 1000:7.2f} ms/series, "
                     f"x{t['unfolded'] / t['explainer']:.2f})")
        print(line, flush=True)
    best_exp = min(rows, key=lambda r: r[1])
    best_base = min(rows, key=lambda r: r[2])
    ratio = best_base[2] / best_exp[1]
    print(f"each at its fastest: explainer {best_exp[1] * 1000:.2f} ms at {best_exp[0]} per call, baseline "
          f"{best_base[2]:.3f} s at {best_base[0]} per call: {ratio:.1f} times faster")
    # What that ratio is made of, counted as evaluate counts it (evaluate.series_cost).
    cost = series_cost(lambda xb, g, f: explain_series(g, f, xb, base.num_bins, probes)[0],
                       lambda xb, steps=ev.baseline_steps, f=f, return_steps=False: pixel_search(
                           f, xb, base.num_bins, steps, ev.baseline_lr, ev.baseline_lambda, ev.baseline_tolerance,
                           return_steps=return_steps),
                       g, f, x[:COST_QUERIES], base.num_bins, {})
    print(cost_text(add_flop_rates(cost, {"explainer": best_exp[1], "baseline": best_base[2]}), ratio))


if __name__ == "__main__":
    main()
