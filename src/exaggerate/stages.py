"""The eight DVC stages, one thin entry point each: read params.yaml once, open the stage's
inputs (the outputs of the stages before it), call the library, write outputs/<stage>/ only
(dvc.yaml declares exactly these paths) and log the run to MLflow."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from .config import Config, load_config
from .utils import resolve_device, set_threads

OUT = Path("outputs")
PATHS = {
    "prepare": OUT / "prepare",
    "train_classifier": OUT / "classifier",
    "posteriors": OUT / "posteriors",
    "bin": OUT / "bin",
    "train_explainer": OUT / "explainer",
    "explain": OUT / "explain",
    "train_oracle": OUT / "oracle",
    "evaluate": OUT / "evaluate",
    "register": OUT / "register",
}


def _dataset_and_splits(cfg: Config, paths: dict):
    from .datasets import open_dataset
    from .splits import read_splits

    dataset = open_dataset(cfg.base)
    return dataset, read_splits(Path(paths["prepare"]) / "splits.json", dataset)


def _classifier(cfg: Config, paths: dict):
    from .classifier import load_classifier

    return load_classifier(paths["train_classifier"], cfg.base).to(resolve_device(cfg.base.device))


def _generator(cfg: Config, paths: dict):
    from .checkpoint import load_generator

    return load_generator(Path(paths["train_explainer"]) / "generator.pt", cfg.base, cfg.explainer).to(
        resolve_device(cfg.base.device))


def prepare(cfg: Config, paths: dict = PATHS) -> None:
    from .datasets import open_dataset
    from .splits import write_splits

    counts = write_splits(open_dataset(cfg.base), cfg.base, cfg.prepare, Path(paths["prepare"]))
    for split, c in counts.items():
        print(f"{split}: {c}")


def train_classifier(cfg: Config, paths: dict = PATHS) -> None:
    from .classifier import install_external, report_classifier, train_classifier as train
    from .tracking import stage_run

    dataset, splits = _dataset_and_splits(cfg, paths)
    out, external = Path(paths["train_classifier"]), cfg.classifier.external
    with stage_run("train_classifier", cfg, ("base", "prepare", "classifier")) as tracker:
        if external is not None and external.path:
            print(f"classifier.external.path is set: using {external.path}, no training")
            f = install_external(external, cfg.base, out)
            metrics = report_classifier(f, dataset, splits, cfg.base, cfg.classifier, out, tracker)
        else:
            metrics = train(dataset, splits, cfg.base, cfg.classifier, out, tracker)
    if not metrics:  # a torchrun process other than rank 0
        return
    t = metrics["test"]
    print(f"test ROC-AUC {t['roc_auc']}, accuracy {t['accuracy']:.4f}, Brier {t['brier']:.4f}")


def posteriors(cfg: Config, paths: dict = PATHS) -> None:
    from .posteriors import posterior_stage
    from .tracking import stage_run

    dataset, splits = _dataset_and_splits(cfg, paths)
    with stage_run("posteriors", cfg, ("base", "posteriors")) as tracker:
        summary = posterior_stage(_classifier(cfg, paths), dataset, splits, cfg.base, cfg.posteriors.batch_size,
                                  Path(paths["posteriors"]), tracker)
    for split, s in summary.items():
        print(f"{split}: images per bin {s['bin_counts']}")


def bin(cfg: Config, paths: dict = PATHS) -> None:  # noqa: A001 - the stage's name in dvc.yaml
    from .datasets import open_dataset
    from .posteriors import POSTERIOR_COLUMNS, bin_stage, read_table
    from .tracking import stage_run

    dataset = open_dataset(cfg.base)
    rows = read_table(Path(paths["posteriors"]) / "posteriors.csv",
                      (*POSTERIOR_COLUMNS, f"label_{dataset.label_names[0]}"))
    with stage_run("bin", cfg, ("base", "bin")) as tracker:
        m = bin_stage(rows, dataset.label_names[0], cfg.base, cfg.bin, Path(paths["bin"]), tracker)
    print(f"explainer inputs: {m['images']} images; ECE before {m['before']['ece']:.4f}, "
          f"after {m['after']['ece']:.4f}; selected per bin {[b['selected'] for b in m['bins']]}")


def train_explainer(cfg: Config, paths: dict = PATHS) -> None:
    from .posteriors import read_explainer_inputs
    from .tracking import stage_run
    from .training_loop import fit

    dataset, splits = _dataset_and_splits(cfg, paths)
    f = _classifier(cfg, paths)
    indices, bins = read_explainer_inputs(Path(paths["bin"]) / "explainer_inputs.csv", dataset, cfg.base.num_bins)
    with stage_run("train_explainer", cfg, ("base", "explainer")) as tracker:
        fit(dataset, indices, bins, splits["val"], f, cfg.base, cfg.explainer, Path(paths["train_explainer"]), tracker)


def explain(cfg: Config, paths: dict = PATHS) -> None:
    from .series import explain_stage
    from .tracking import stage_run

    dataset, splits = _dataset_and_splits(cfg, paths)
    with stage_run("explain", cfg, ("base", "explain")) as tracker:
        explain_stage(dataset, splits[cfg.explain.split], _classifier(cfg, paths), _generator(cfg, paths),
                      cfg.base, cfg.explain, Path(paths["explain"]), tracker)


def train_oracle(cfg: Config, paths: dict = PATHS) -> None:
    from .oracle import train_oracle as train
    from .tracking import stage_run

    with stage_run("train_oracle", cfg, ("base", "oracle")) as tracker:
        train(cfg.base, cfg.oracle, Path(paths["train_oracle"]), tracker)


def evaluate(cfg: Config, paths: dict = PATHS) -> dict:
    from .evaluate import ORACLE_METRICS, Evaluator, compare_methods, load_series, oracle_refusal, real_reference_rows
    from .io import read_json
    from .oracle import load_oracle
    from .posteriors import read_table
    from .report import results_table, summarise, write_report
    from .tracking import log_headline, stage_run
    from .utils import channels_last

    base, split, device, out = cfg.base, cfg.explain.split, resolve_device(cfg.base.device), Path(paths["evaluate"])
    dataset, _ = _dataset_and_splits(cfg, paths)
    f, g = _classifier(cfg, paths), _generator(cfg, paths)
    channels_last(g, f, enabled=cfg.explain.channels_last)  # both methods run through the same f
    oracle = load_oracle(Path(paths["train_oracle"]) / "oracle.pt", base).to(device)
    data = load_series(Path(paths["explain"]) / "series.npz", dataset, f, base.num_bins, base.image_size, device)
    ids, real_bins = real_reference_rows(read_table(Path(paths["posteriors"]) / "posteriors.csv"), split)
    # An oracle shared by several tasks (the benchmark's) comes with this task's own judgement.
    oracle_metrics = read_json(paths.get("oracle_metrics") or Path(paths["train_oracle"]) / "metrics.json")
    refused = oracle_refusal(oracle_metrics, cfg.evaluate.oracle_gate)
    if refused:
        print(f"evaluate: oracle-based metrics refused: {refused}")
    evaluator = Evaluator(f, None if refused else oracle, dataset.images(dataset.index_of(ids)), real_bins, base,
                          device)
    with stage_run("evaluate", cfg, ("base", "evaluate", "explain")) as tracker:
        compared = compare_methods(g, f, data, evaluator, cfg, device)
        if refused:
            compared["absent"]["oracle-based metrics (" + ", ".join(ORACLE_METRICS) + ")"] = refused
        summary = summarise(compared, evaluator.reference(), split, oracle_metrics, cfg.evaluate.oracle_gate,
                            cfg.explain.probes, cfg.explain.detail)
        write_report(out, summary, compared, base, tracker)
        if tracker.parent_run_id:
            log_headline(tracker.parent_run_id, {f"explainer_{k}": v for k, v in summary["explainer"].items()}
                         | {"speedup": summary["speedup_explainer_vs_baseline"]})
    print(results_table(summary))
    return summary


def register(cfg: Config, paths: dict = PATHS) -> dict:
    """The classifier and the explainer as MLflow models in the Model Registry, tagged with the
    commit, the DVC experiment and the evaluation's headline figures."""
    import os

    from .io import read_json, write_json
    from .models import register_models
    from .tracking import HEADLINE, dvc_experiment, git_commit, stage_run

    dataset, splits = _dataset_and_splits(cfg, paths)
    summary = read_json(Path(paths["evaluate"]) / "metrics.json")
    flat = {f"explainer_{k}": v for k, v in summary["explainer"].items()} | \
        {"speedup": summary.get("speedup_explainer_vs_baseline")}
    metrics = {short: flat.get(name) for name, short in HEADLINE.items()}
    with stage_run("register", cfg, ("base", "explainer", "explain")) as tracker:
        tags = {"git_commit": git_commit(), "dvc_experiment": dvc_experiment(),
                "dvc_baseline": os.environ.get("DVC_EXP_BASELINE_REV", ""), "mlflow_pipeline_run": tracker.parent_run_id}
        models = register_models(cfg, paths, dataset, splits["test"][:8], metrics, tags)
        tracker.tags({f"registered_{k}": v["uri"] for k, v in models.items()})
    write_json(Path(paths["register"]) / "models.json", models)
    return models


STAGES: dict[str, Callable[[Config, dict], object]] = {
    "prepare": prepare, "train_classifier": train_classifier, "posteriors": posteriors, "bin": bin,
    "train_explainer": train_explainer, "explain": explain, "train_oracle": train_oracle, "evaluate": evaluate,
    "register": register,
}


def run_stage(name: str, params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    processes = {"train_explainer": cfg.explainer.processes, "train_classifier": cfg.classifier.processes}.get(name, 1)
    if processes > 1:
        from .distributed import launch, under_torchrun

        if not under_torchrun():  # start this stage again in that many processes
            launch(name, processes, params_path)
            return
    set_threads(cfg.base.threads)
    if cfg.base.threads == 0 and "LOCAL_WORLD_SIZE" in os.environ:  # share the cores among the processes
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    start = time.time()
    STAGES[name](cfg)
    print(f"stage {name} finished in {time.time() - start:.1f} s")
