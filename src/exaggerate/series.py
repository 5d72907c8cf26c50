"""Counterfactual series: the explain stage and `exaggerate explain` for users' files."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import plots
from .classifier import BlackBox
from .config import Config
from .explainer import explain_series
from .io import save_figure, save_npz, write_json
from .networks import Generator
from .metrics import compatibility, monotonic_share
from .posteriors import bin_index
from .tracking import Tracker
from .utils import channels_last, resolve_device

@torch.no_grad()
def explain_batch(g: Generator, f: BlackBox, x: torch.Tensor, num_bins: int, probes: int = 0) -> dict[str, torch.Tensor]:
    """Series (calibrated when probes > 0, explain.probes), the conditions it was generated at,
    reconstruction G(x, c_x) and f of everything, for a batch of queries."""
    p_query = f(x)
    source = torch.from_numpy(bin_index(p_query.cpu().numpy(), num_bins)).to(x.device)
    s, conditions = explain_series(g, f, x, num_bins, probes)
    p_series = f(s.flatten(0, 1)).reshape(s.shape[:2])
    recon = g(x, source)
    return {"series": s, "conditions": conditions, "p_series": p_series, "recon": recon, "p_recon": f(recon),
            "p_query": p_query, "source_bin": source}


def series_metrics(p_series: np.ndarray, queries: np.ndarray, recon: np.ndarray) -> dict:
    """Compatibility with f, monotonicity of f along the series, reconstruction error."""
    return {**compatibility(p_series), "monotonic_share": monotonic_share(p_series),
            "reconstruction_l1": float(np.abs(recon - queries).mean()), "queries": int(p_series.shape[0])}


def strip_figure(query: torch.Tensor, s: torch.Tensor, p_series: Sequence[float], p_query: float,
                 title: str):
    row = torch.cat([query[None], s])[None]
    titles = [[f"query\nf={p_query:.2f}"] + [f"bin {k}\nf={v:.2f}" for k, v in enumerate(p_series)]]
    return plots.image_grid(row, titles, suptitle=title)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"


def explain_stage(cfg: Config, paths: dict, tracker: Tracker = Tracker()) -> dict:
    from .classifier import load_classifier
    from .datasets import open_dataset
    from .explainer import load_generator
    from .splits import read_splits

    base, params = cfg.base, cfg.explain
    out_dir = Path(paths["explain"])
    device = resolve_device(base.device)
    dataset = open_dataset(base)
    splits = read_splits(Path(paths["prepare"]) / "splits.json", dataset)
    f = load_classifier(paths["train_classifier"], base).to(device)
    g = load_generator(Path(paths["train_explainer"]) / "generator.pt", base, cfg.explainer).to(device)
    channels_last(g, f, enabled=cfg.explain.channels_last)

    pool = splits[params.split]
    rng = np.random.default_rng(base.seed)
    chosen = np.sort(rng.choice(len(pool), size=min(params.num_queries, len(pool)), replace=False))
    query_idx = pool[chosen]
    parts: dict[str, list] = {}
    for start in tqdm(range(0, len(query_idx), params.batch_size), desc="explain", mininterval=1.0):
        x = dataset.images(query_idx[start:start + params.batch_size]).to(device)
        out = explain_batch(g, f, x, base.num_bins, params.probes)
        out["query"] = x
        for k, v in out.items():
            parts.setdefault(k, []).append(v.cpu())
    arrays = {k: torch.cat(v).numpy() for k, v in parts.items()}
    ids = [dataset.ids[i] for i in query_idx]
    labels = dataset.labels[query_idx, 0]
    metrics = series_metrics(arrays["p_series"], arrays["query"], arrays["recon"])
    metrics["split"] = params.split

    save_npz(out_dir / "series.npz", ids=np.array(ids), labels=labels, queries=arrays["query"],
             series=arrays["series"], recon=arrays["recon"], p_query=arrays["p_query"],
             p_series=arrays["p_series"], p_recon=arrays["p_recon"], source_bin=arrays["source_bin"],
             conditions=arrays["conditions"])
    table = [{"id": i, "label": int(y), "p": float(pq), "source_bin": int(sb),
              "p_series": [round(float(v), 6) for v in ps], "conditions": [round(float(v), 4) for v in cs],
              "p_recon": float(pr), "reconstruction_l1": float(np.abs(r - q).mean())}
             for i, y, pq, sb, ps, cs, pr, r, q in zip(ids, labels, arrays["p_query"], arrays["source_bin"],
                                                       arrays["p_series"], arrays["conditions"], arrays["p_recon"],
                                                       arrays["recon"], arrays["query"])]
    write_json(out_dir / "series.json", {"num_bins": base.num_bins, "image_size": base.image_size,
                                         "target": base.target, "probes": params.probes, "queries": table})
    write_json(out_dir / "metrics.json", metrics)
    tracker.metrics({k: v for k, v in metrics.items() if isinstance(v, float)})

    strips_dir = out_dir / "strips"
    strips_dir.mkdir(parents=True, exist_ok=True)
    for k in range(min(params.strips, len(ids))):
        fig = strip_figure(torch.from_numpy(arrays["query"][k]), torch.from_numpy(arrays["series"][k]),
                           arrays["p_series"][k], float(arrays["p_query"][k]),
                           f"{ids[k]}: p({base.target}) along the series")
        save_figure(strips_dir / f"{k:03d}_{_safe_name(ids[k])}.png", fig)
        plots.close(fig)
    # The overview: queries spread over the posterior range, as rows.
    order = np.argsort(arrays["p_query"])
    rows = order[np.linspace(0, len(order) - 1, min(8, len(order))).round().astype(int)]
    grid = np.concatenate([arrays["query"][rows][:, None], arrays["series"][rows]], axis=1)
    titles = [[f"query f={arrays['p_query'][r]:.2f}"] + [f"f={v:.2f}" for v in arrays["p_series"][r]] for r in rows]
    fig = plots.image_grid(torch.from_numpy(grid), titles,
                           col_labels=["query"] + [f"bin {k}" for k in range(base.num_bins)],
                           suptitle=f"progressive exaggeration of p({base.target}) on {params.split} queries")
    save_figure(out_dir / "series_grid.png", fig)
    tracker.figure(fig, "series_grid.png")
    plots.close(fig)
    print(f"{metrics['queries']} queries: compatibility MAE {metrics['compatibility_mae']:.4f}, "
          f"correlation {metrics['compatibility_corr']:.4f}, monotonic share {metrics['monotonic_share']:.3f}, "
          f"reconstruction L1 {metrics['reconstruction_l1']:.4f}")
    return metrics


def explain_files(images: Sequence[str], out: str, params_path: str = "params.yaml",
                  classifier_dir: str = "outputs/classifier", generator_path: str = "outputs/explainer/generator.pt",
                  convert: bool = False) -> list[dict]:
    """Explain users' image files: one strip PNG per image and one JSON of posteriors."""
    from .classifier import load_classifier
    from .config import load_config
    from .datasets import preprocess_for, read_image_file
    from .explainer import load_generator

    cfg = load_config(params_path)
    device = resolve_device(cfg.base.device)
    preprocess = preprocess_for(cfg.base)
    # Read and check every image before any work, so one bad file fails fast and writes nothing.
    tensors = []
    for name in images:
        path = Path(name)
        if not path.is_file():
            from .datasets import DatasetError
            raise DatasetError(f"image file {path} not found")
        tensors.append(preprocess(read_image_file(path), str(path), convert=convert))
    f = load_classifier(classifier_dir, cfg.base).to(device)
    g = load_generator(generator_path, cfg.base, cfg.explainer).to(device)
    channels_last(g, f, enabled=cfg.explain.channels_last)
    out_dir = Path(out)
    results = []
    for name, x in zip(images, tensors):
        r = explain_batch(g, f, x[None].to(device), cfg.base.num_bins, cfg.explain.probes)
        p_series = r["p_series"][0].cpu().numpy()
        stem = _safe_name(Path(name).stem)
        fig = strip_figure(x, r["series"][0].cpu(), p_series, float(r["p_query"][0]),
                           f"{Path(name).name}: p({cfg.base.target}) along the series")
        save_figure(out_dir / f"{stem}_series.png", fig)
        plots.close(fig)
        results.append({"image": str(name), "strip": str(out_dir / f"{stem}_series.png"),
                        "p": float(r["p_query"][0]), "source_bin": int(r["source_bin"][0]),
                        "p_series": [float(v) for v in p_series],
                        "conditions": [round(float(v), 4) for v in r["conditions"][0]],
                        "p_recon": float(r["p_recon"][0])})
        print(f"{name}: p={results[-1]['p']:.3f}; along the series " + " ".join(f"{v:.2f}" for v in p_series))
    write_json(out_dir / "posteriors.json", {"target": cfg.base.target, "num_bins": cfg.base.num_bins,
                                              "probes": cfg.explain.probes, "images": results})
    return results
