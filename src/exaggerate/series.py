"""The explain stage (series of the split's queries, their files and figures) and
`exaggerate explain` for users' own image files."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import plots
from .classifier import BlackBox
from .config import Base, Explain
from .datasets import ImageDataset
from .inference import explain_batch
from .io import save_figure, save_npz, write_json
from .networks import Generator
from .metrics import compatibility, monotonic_share
from .tracking import Tracker
from .utils import channels_last, progress, resolve_device


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


def choose_queries(pool: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A seeded sample of `count` images of the split, in dataset order."""
    rng = np.random.default_rng(seed)
    return pool[np.sort(rng.choice(len(pool), size=min(count, len(pool)), replace=False))]


def explain_queries(dataset: ImageDataset, query_idx: np.ndarray, f: BlackBox, g: Generator, num_bins: int,
                    probes: int, batch_size: int, device: torch.device, detail: float = 0.0) -> dict[str, np.ndarray]:
    """explain_batch over the queries, in batches; arrays on the CPU."""
    parts: dict[str, list] = {}
    for start in progress(range(0, len(query_idx), batch_size), desc="explain"):
        x = dataset.images(query_idx[start:start + batch_size]).to(device)
        out = explain_batch(g, f, x, num_bins, probes, detail)
        out["query"] = x
        for k, v in out.items():
            parts.setdefault(k, []).append(v.cpu())
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def explain_stage(dataset: ImageDataset, pool: np.ndarray, f: BlackBox, g: Generator, base: Base, params: Explain,
                  out_dir: Path, tracker: Tracker = Tracker()) -> dict:
    """The explain stage: series of explain.num_queries images of the split `pool`, written as
    series.npz and series.json, strips, a grid and metrics.json."""
    device = next(g.parameters()).device
    channels_last(g, f, enabled=params.channels_last)
    query_idx = choose_queries(pool, params.num_queries, base.seed)
    arrays = explain_queries(dataset, query_idx, f, g, base.num_bins, params.probes, params.batch_size, device,
                             params.detail)
    ids = [dataset.ids[i] for i in query_idx]
    labels = dataset.labels[query_idx, 0]
    metrics = series_metrics(arrays["p_series"], arrays["query"], arrays["recon"])
    metrics["split"] = params.split
    save_npz(out_dir / "series.npz", ids=np.array(ids), labels=labels, queries=arrays["query"],
             series=arrays["series"], recon=arrays["recon"], p_query=arrays["p_query"],
             p_series=arrays["p_series"], p_recon=arrays["p_recon"], source_bin=arrays["source_bin"],
             conditions=arrays["conditions"])
    # explain.detail is named only when on: with it off, series.json stays as before the option.
    write_json(out_dir / "series.json", {"num_bins": base.num_bins, "image_size": base.image_size,
                                         "target": base.target, "probes": params.probes,
                                         **({"detail": params.detail} if params.detail else {}),
                                         "queries": series_table(ids, labels, arrays)})
    write_json(out_dir / "metrics.json", metrics)
    tracker.metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
    write_strips(out_dir / "strips", ids, arrays, params.strips, base.target)
    fig = overview_figure(arrays, base.num_bins,
                          f"progressive exaggeration of p({base.target}) on {params.split} queries")
    save_figure(out_dir / "series_grid.png", fig)
    tracker.figure(fig, "series_grid.png")
    plots.close(fig)
    print(f"{metrics['queries']} queries: compatibility MAE {metrics['compatibility_mae']:.4f}, "
          f"correlation {metrics['compatibility_corr']:.4f}, monotonic share {metrics['monotonic_share']:.3f}, "
          f"reconstruction L1 {metrics['reconstruction_l1']:.4f}")
    return metrics


def series_table(ids: list[str], labels: np.ndarray, arrays: dict[str, np.ndarray]) -> list[dict]:
    """series.json's rows: per query, f along the series and the conditions it was made at."""
    return [{"id": i, "label": int(y), "p": float(pq), "source_bin": int(sb),
             "p_series": [round(float(v), 6) for v in ps], "conditions": [round(float(v), 4) for v in cs],
             "p_recon": float(pr), "reconstruction_l1": float(np.abs(r - q).mean())}
            for i, y, pq, sb, ps, cs, pr, r, q in zip(ids, labels, arrays["p_query"], arrays["source_bin"],
                                                      arrays["p_series"], arrays["conditions"], arrays["p_recon"],
                                                      arrays["recon"], arrays["query"])]


def write_strips(folder: Path, ids: list[str], arrays: dict[str, np.ndarray], count: int, target: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(min(count, len(ids))):
        fig = strip_figure(torch.from_numpy(arrays["query"][k]), torch.from_numpy(arrays["series"][k]),
                           arrays["p_series"][k], float(arrays["p_query"][k]),
                           f"{ids[k]}: p({target}) along the series")
        save_figure(folder / f"{k:03d}_{_safe_name(ids[k])}.png", fig)
        plots.close(fig)


def overview_figure(arrays: dict[str, np.ndarray], num_bins: int, title: str):
    """Up to 8 queries spread over the posterior range, as rows."""
    order = np.argsort(arrays["p_query"])
    rows = order[np.linspace(0, len(order) - 1, min(8, len(order))).round().astype(int)]
    grid = np.concatenate([arrays["query"][rows][:, None], arrays["series"][rows]], axis=1)
    titles = [[f"query f={arrays['p_query'][r]:.2f}"] + [f"f={v:.2f}" for v in arrays["p_series"][r]] for r in rows]
    columns = ["query"] + [f"bin {k}" for k in range(num_bins)]
    return plots.image_grid(torch.from_numpy(grid), titles, col_labels=columns, suptitle=title)


def strip_names(images: Sequence[str]) -> list[str]:
    """One strip file name per input, unique even when basenames repeat (a/boot.png, b/boot.png)."""
    names: list[str] = []
    for name in images:
        stem, k = _safe_name(Path(name).stem), 1
        candidate = f"{stem}_series.png"
        while candidate in names:
            k += 1
            candidate = f"{stem}-{k}_series.png"
        names.append(candidate)
    return names


def explain_files(images: Sequence[str], out: str, params_path: str = "params.yaml",
                  classifier_dir: str = "outputs/classifier", generator_path: str = "outputs/explainer/generator.pt",
                  convert: bool = False) -> list[dict]:
    """Explain users' image files: one strip PNG per image and one JSON of posteriors."""
    from .classifier import load_classifier
    from .config import load_config
    from .datasets import preprocess_for, read_image_file
    from .checkpoint import load_generator

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
    for name, x, strip in zip(images, tensors, strip_names(images)):
        r = explain_batch(g, f, x[None].to(device), cfg.base.num_bins, cfg.explain.probes, cfg.explain.detail)
        p_series = r["p_series"][0].cpu().numpy()
        fig = strip_figure(x, r["series"][0].cpu(), p_series, float(r["p_query"][0]),
                           f"{Path(name).name}: p({cfg.base.target}) along the series")
        save_figure(out_dir / strip, fig)
        plots.close(fig)
        results.append({"image": str(name), "strip": str(out_dir / strip),
                        "p": float(r["p_query"][0]), "source_bin": int(r["source_bin"][0]),
                        "p_series": [float(v) for v in p_series],
                        "conditions": [round(float(v), 4) for v in r["conditions"][0]],
                        "p_recon": float(r["p_recon"][0])})
        print(f"{name}: p={results[-1]['p']:.3f}; along the series " + " ".join(f"{v:.2f}" for v in p_series))
    write_json(out_dir / "posteriors.json", {"target": cfg.base.target, "num_bins": cfg.base.num_bins,
                                              "probes": cfg.explain.probes,
                                              **({"detail": cfg.explain.detail} if cfg.explain.detail else {}),
                                              "images": results})
    return results
