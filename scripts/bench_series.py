"""Benchmark: seconds per explanation series of the generator under inference settings.

Times the same generator producing series for the same queries, in this process, under each
setting, and prints the time per series, the speed ratio against plain float32 (the setting
the evaluate stage timed until now) and how far each setting's images and f's posteriors
move from float32's. Uses the trained generator of the current run when there is one
(outputs/explainer/generator.pt), random weights otherwise (speed does not depend on
them).

    python scripts/bench_series.py                      # default params.yaml, 50 queries
    python scripts/bench_series.py --queries 100 --repeats 5
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from exaggerate.classifier import load_classifier
    from exaggerate.config import load_config
    from exaggerate.datasets import DatasetError, open_dataset
    from exaggerate.checkpoint import build_networks, load_generator
    from exaggerate.inference import series
    from exaggerate.stages import PATHS
    from exaggerate.utils import channels_last, resolve_device, set_threads

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--batch", type=int, default=100, help="queries per generator call")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (the best is kept)")
    args = ap.parse_args()

    cfg = load_config(args.params)
    base = cfg.base
    set_threads(base.threads)
    device = resolve_device(base.device)
    gen_path = Path(PATHS["train_explainer"]) / "generator.pt"
    if gen_path.is_file():
        g = load_generator(gen_path, base, cfg.explainer)
        print(f"generator: {gen_path}")
    else:
        torch.manual_seed(0)
        g = build_networks(base, cfg.explainer)[0].eval()
        print("generator: random weights (no trained generator in outputs/)")
    g = g.to(device)
    f = None
    try:
        f = load_classifier(PATHS["train_classifier"], base).to(device)
    except (FileNotFoundError, OSError) as exc:
        print(f"classifier not found ({exc}): posterior differences are not reported")
    try:
        x = open_dataset(base).images(np.arange(args.queries)).to(device)
    except (DatasetError, OSError) as exc:
        print(f"dataset not found ({exc}): random queries")
        torch.manual_seed(1)
        x = (torch.rand(args.queries, base.channels, base.image_size, base.image_size) * 2 - 1).to(device)
    print(f"{args.queries} queries x {base.num_bins} bins, {base.image_size}x{base.image_size}, "
          f"G widths {cfg.explainer.generator_widths}, {torch.get_num_threads()} threads, device {device}")

    def run(model, inputs, precision):
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with ctx, torch.inference_mode():
            return torch.cat([series(model, inputs[i:i + args.batch], base.num_bins).float()
                              for i in range(0, len(inputs), args.batch)])

    g_nhwc = copy.deepcopy(g)
    channels_last(g_nhwc)
    settings = {"float32": (g, "fp32"), "float32 channels_last": (g_nhwc, "fp32"),
                "bf16 autocast": (g, "bf16"), "bf16 autocast channels_last": (g_nhwc, "bf16")}
    reference = None
    for name, (model, precision) in settings.items():
        out = run(model, x, precision)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = run(model, x, precision)
            best = min(best, time.perf_counter() - start)
        per_series = best / args.queries
        if reference is None:
            reference = (per_series, out)
        line = (f"{name:30s} {per_series * 1000:8.2f} ms/series  x{reference[0] / per_series:5.2f} vs float32  "
                f"max |pixel diff| {float((out - reference[1]).abs().max()):.4f}")
        if f is not None:
            with torch.inference_mode():
                p = f(out.flatten(0, 1)).float()
                p_ref = f(reference[1].flatten(0, 1)).float()
            line += f"  max |f diff| {float((p - p_ref).abs().max()):.4f}  mean {float((p - p_ref).abs().mean()):.5f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
