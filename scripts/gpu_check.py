"""GPU check: a few explainer training steps at the paper's 128x128 settings on CUDA.

Builds the paper-scale generator and discriminator (widths 64..1024), a paper-style DenseNet
classifier f (blocks 6/12/24/16, random weights: the check measures speed, not quality),
and runs full iterations (D update every iteration, G update every n_critic-th) on random
images, then prints iterations per second, with and without bf16 autocast, and optionally
compiled with torch.compile. It also counts the FLOPs of one iteration (forward and backward of
G, D and f, torch.utils.flop_counter) and prints the achieved TFLOP/s and, where the device's peak is
known (H100/H200, or --peak-tflops), the model FLOPs utilisation (MFU).

    python scripts/gpu_check.py                    # CUDA, paper settings
    python scripts/gpu_check.py --compile          # + each precision with G, D and f compiled
    python scripts/gpu_check.py --device cpu --image-size 32 --widths 8 16 --steps 2   # smoke test
    python scripts/gpu_check.py --params params.yaml --device cpu --cpu-bf16 --channels-last  # the CPU default
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time

import torch


def main() -> None:
    from exaggerate.classifier import BlackBox, build_densenet
    from exaggerate.config import Base, load_config
    from exaggerate.augment import augment
    from exaggerate.checkpoint import TrainState, build_networks
    from exaggerate.losses import ExplainerLoss, LossWeights
    from exaggerate.training_loop import explainer_step
    from exaggerate.utils import channels_last

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="configs/paper-celeba.yaml")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=20, help="timed iterations per precision")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--widths", type=int, nargs="+", default=None, help="override G and D widths")
    ap.add_argument("--channels-last", action="store_true", help="G, D and f in NHWC layout")
    ap.add_argument("--cpu-bf16", action="store_true",
                    help="on CPU, time bf16 autocast too (worth it on CPUs with native bf16)")
    ap.add_argument("--compile", nargs="*", choices=["g", "d", "f"], default=None,
                    help="time each precision again with these networks compiled (torch.compile; default g f)")
    ap.add_argument("--peak-tflops", type=float, nargs=2, default=None, metavar=("FP32", "BF16"),
                    help="the device's dense peak TFLOP/s for MFU (default: known for H100/H200)")
    args = ap.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU (or pass --device cpu for a smoke test)")
    cfg = load_config(args.params)
    base: Base = dataclasses.replace(cfg.base, device=args.device, image_size=args.image_size or cfg.base.image_size)
    params = cfg.explainer
    if args.widths:
        params = dataclasses.replace(params, generator_widths=args.widths, discriminator_widths=args.widths)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    clf_params = cfg.classifier
    net = build_densenet(clf_params, base.channels, max(1, len(base.attributes)))
    f = BlackBox(net, base.attributes or [base.target], base.image_size, base.channels).to(device)

    results = {}
    channels_last(f, enabled=args.channels_last)
    peak = args.peak_tflops or known_peak(device)
    flops = None
    runs = [(amp, False) for amp in ([False, True] if device.type == "cuda" or args.cpu_bf16 else [False])]
    to_compile = (args.compile or ["g", "f"]) if args.compile is not None else []
    runs += [(amp, True) for amp, _ in runs] if to_compile else []
    for amp, compiled in runs:
        torch.manual_seed(0)
        g, d = build_networks(base, params)
        g, d = g.to(device), d.to(device)
        channels_last(g, d, enabled=args.channels_last)
        f_run = f
        if compiled:  # the parameters stay the same objects: the optimisers below see them
            g, d, f_run = (torch.compile(m) if k in to_compile else m for k, m in (("g", g), ("d", d), ("f", f)))
        state = TrainState(g, d, torch.optim.Adam(g.parameters(), lr=params.lr_g, betas=tuple(params.betas)),
                           torch.optim.Adam(d.parameters(), lr=params.lr_d, betas=tuple(params.betas)),
                           torch.Generator().manual_seed(0))
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
        loss = ExplainerLoss(g, d, f_run, base.num_bins,
                             LossWeights(params.lambda_gan, params.lambda_cyc, params.lambda_cls, params.lambda_rec),
                             lambda img, rng=state.sampler_rng: augment(img, params.augment, rng))
        x = torch.rand(params.batch_size, base.channels, base.image_size, base.image_size, device=device) * 2 - 1
        c = torch.randint(base.num_bins, (params.batch_size,), device=device)
        if flops is None:  # one iteration, counted once (the same operations at either precision)
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                explainer_step(state, loss, x, c, params.n_critic, autocast)
            flops = counter.get_total_flops()
            print(f"FLOPs per iteration (forward and backward of G, D and f): {flops / 1e9:.1f} GFLOP")
        for _ in range(args.warmup):
            explainer_step(state, loss, x, c, params.n_critic, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            losses = explainer_step(state, loss, x, c, params.n_critic, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        mem = (f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
               if device.type == "cuda" else "")
        name = ("bf16 autocast" if amp else "float32") + (", channels-last" if args.channels_last else "") + \
            (f", compiled ({' '.join(to_compile)})" if compiled else "")
        rate = args.steps / elapsed
        results[name] = rate
        achieved = flops * rate / 1e12
        mfu = f", MFU {achieved / peak[int(amp)]:.1%} of {peak[int(amp)]:g}" if peak else ""
        print(f"{name}: {rate:.2f} iterations/s at {base.image_size}x{base.image_size}, "
              f"batch {params.batch_size}, n_critic {params.n_critic}, G widths {params.generator_widths}; "
              f"{achieved:.3f} TFLOP/s{mfu}{mem}; last losses finite: "
              f"{all(torch.isfinite(torch.tensor(v)) for v in losses.values())}")
    plain = [v for k, v in results.items() if ", compiled" not in k]
    if len(plain) == 2:
        fp32, bf16 = plain
        print(f"bf16 / float32 speed ratio: {bf16 / fp32:.2f}")
    for name, rate in results.items():
        if ", compiled" in name:
            eager = name.split(", compiled")[0]
            print(f"compiled / eager speed ratio, {eager}: {rate / results[eager]:.2f}")


# Dense peak TFLOP/s (float32 without tensor cores, bf16 tensor cores) from NVIDIA's data sheets.
PEAKS = {"H200": (66.9, 989.4), "H100": (66.9, 989.4)}


def known_peak(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAKS.items() if key in name), None)


if __name__ == "__main__":
    main()
