"""Benchmark: seconds per series of the explainer and of the pixel-space baseline, at several
queries per call, in one process on the same queries.

The evaluate stage times both methods at each of evaluate.series_batches and compares each at
its own fastest. This script does the same over any batch sizes given, which is how the
defaults of evaluate.series_batches were found, and then says what the ratio is made of (G's
and f's passes, the baseline's steps, FLOPs and FLOP rates, counted as evaluate counts them).
Batches of the two methods
are timed alternately, so that a slow spell of a shared machine falls on both; the explainer's
batch, about 100 times shorter, is repeated --repeats times (mean). Needs a trained run
(outputs/classifier, outputs/explainer/generator.pt, outputs/explain/series.npz), or, with
--task, a benchmark task's classifier (its upstream stage) and queries of its --split.

A series' cost depends on G's architecture and on how many bins its probes already show, not
on what G learned: --generator times another run's G of the same architecture in its place
(e.g. the default task's for a task whose own explainer is not trained here). The baseline
needs only f. The G passes per series are printed, so a stand-in's count can be checked.

    python scripts/bench_speedup.py                            # params.yaml, 50 queries
    python scripts/bench_speedup.py --batches 1 5 10 --queries 20
    python scripts/bench_speedup.py --task bag_rest --generator \
        benchmark/runs/sneaker_boot/s0/explainer/generator.pt  # validation queries
    python scripts/bench_speedup.py --task bag_rest --stall    # the baseline's stall stop only

--stall needs no G: it runs the baseline's search with its stall stop (baseline.STALL_STEPS) and
without it on the same queries and prints what the stop saves and whether it loses bins.
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
    from exaggerate.baseline import configured_search
    from exaggerate.checkpoint import load_generator
    from exaggerate.inference import explain_series
    from exaggerate.series import choose_queries
    from exaggerate.stages import PATHS, _dataset_and_splits
    from exaggerate.utils import channels_last, resolve_device, set_threads

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--task", help="a task of the benchmark's spec (benchmark/params.yaml): its f and queries")
    ap.add_argument("--seed", type=int, default=0, help="with --task: the explainer seed whose G is timed")
    ap.add_argument("--split", default="val", choices=("val", "test"), help="with --task: the queries' split")
    ap.add_argument("--generator", type=Path, help="a G checkpoint (generator.pt) of the same architecture "
                    "to time in place of the run's own")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 5, 10, 25])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each explainer batch (mean)")
    ap.add_argument("--stall", action="store_true",
                    help="only compare the baseline's search with and without its stall stop")
    ap.add_argument("--unfolded", action="store_true",
                    help="also time the generator without folding resampling into its convolutions")
    args = ap.parse_args()

    if args.task:
        from exaggerate.benchmark import load_spec, paths_for, task_config

        spec = load_spec()
        if args.task not in spec.tasks:
            raise SystemExit(f"{spec.path}: no task {args.task!r} under tasks; tasks: {sorted(spec.tasks)}")
        cfg, paths = task_config(spec, args.task, args.seed), paths_for(spec, args.task, args.seed)
        needed, hint = [Path(paths["prepare"]) / "splits.json"], f"exaggerate benchmark-stage upstream {args.task}"
    else:
        cfg, paths = load_config(args.params), PATHS
        needed, hint = [Path(paths["explain"]) / "series.npz"], "dvc repro explain"
    base, ev = cfg.base, cfg.evaluate
    set_threads(base.threads)
    device = resolve_device(base.device)
    generator = args.generator or Path(paths["train_explainer"]) / "generator.pt"
    for p in [*needed] + ([] if args.stall else [generator]):
        if not p.is_file():
            raise SystemExit(f"{p} not found: run `{hint}` first" if p != args.generator else f"{p} not found")
    f = load_classifier(paths["train_classifier"], base).to(device)
    if args.task:
        dataset, splits = _dataset_and_splits(cfg, paths)
        x = dataset.images(choose_queries(splits[args.split], args.queries, base.seed)).to(device)
        print(f"task {args.task}: {len(x)} {args.split} queries" + ("" if args.stall else f", G from {generator}"))
    else:
        with np.load(needed[0]) as z:
            x = torch.from_numpy(z["queries"][:args.queries]).to(device)
    if args.stall:
        return stall_report(f, x, base.num_bins, ev)
    g = load_generator(generator, base, cfg.explainer).to(device)
    channels_last(g, f, enabled=cfg.explain.channels_last)
    nq, probes = len(x), cfg.explain.probes
    print(f"{nq} queries x {base.num_bins} bins, explain.probes {probes}, baseline {ev.baseline_steps} steps at "
          f"most, {torch.get_num_threads()} threads, device {device}")

    g_unfolded = copy.deepcopy(g).fold_resampling(False)

    def explainer(xb, gen=g):
        return explain_series(gen, f, xb, base.num_bins, probes)[0]

    def explainer_unfolded(xb):
        return explainer(xb, g_unfolded)

    baseline = configured_search(f, base.num_bins, ev)

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
                       baseline,
                       g, f, x[:COST_QUERIES], base.num_bins, {})
    cost = add_flop_rates(cost, {"explainer": best_exp[1], "baseline": best_base[2]})
    print(cost_text(cost, ratio))
    rate, e = cost["explainer"].get("gflop_per_s"), cost["explainer"]
    if args.generator and rate:
        # A stand-in's probes may land where the task's own G's would not (a condition equal to a
        # probe's reuses its image), so its G passes can undercount: bound them by every probe
        # and every bin.
        most = probes + base.num_bins
        gflops = (most * cost["generator_mflops_per_image"] + e["classifier_images"]
                  * cost["classifier_mflops_per_image"]) / 1e3
        print(f"G is a stand-in: {e['generator_images']:.1f} G passes per series of the {most} a series can "
              f"take; at {most}, at the rate measured, the explainer would take {gflops / rate * 1000:.2f} ms: "
              f"{best_base[2] / (gflops / rate):.1f} times faster (the bound for the task's own G)")


def stall_report(f, x: torch.Tensor, num_bins: int, ev) -> None:
    """The baseline's search with its stall stop and with none, on the same queries: the share of
    bin images each reaches, the bins the stop loses, and the Adam steps per bin image."""
    from exaggerate.baseline import STALL_IMPROVEMENT, STALL_STEPS, pixel_search

    out = {}
    for name, patience in (("no stop", 0), (f"stop after {STALL_STEPS} steps without {STALL_IMPROVEMENT:g}", STALL_STEPS)):
        _, taken, reached = pixel_search(f, x, num_bins, ev.baseline_steps, ev.baseline_lr, ev.baseline_lambda,
                                         ev.baseline_tolerance, return_steps=True, patience=patience)
        out[name] = (taken.float(), reached)
        print(f"{name:>40}: {float(reached.float().mean()):.3f} of {reached.numel()} bin images reached, "
              f"{float(out[name][0].mean()):.1f} Adam steps per bin image", flush=True)
    (t0, r0), (t1, r1) = out.values()
    lost, saved = int((r0 & ~r1).sum()), float(t1.sum() / t0.sum())
    print(f"the stop loses {lost} of the {int(r0.sum())} bin images the full search reaches and takes "
          f"{saved:.2f}x its steps")


if __name__ == "__main__":
    main()
