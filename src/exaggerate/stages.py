"""DVC stage wrappers: read params.yaml once, open the data, call the library, log to MLflow.

Each stage writes only under outputs/<stage>/ (dvc.yaml declares exactly these paths).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .config import Config, load_config
from .utils import set_threads

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
}


def _dataset_and_splits(cfg: Config):
    from .datasets import open_dataset
    from .splits import read_splits

    dataset = open_dataset(cfg.base)
    return dataset, read_splits(PATHS["prepare"] / "splits.json", dataset)


def prepare(cfg: Config) -> None:
    from .datasets import open_dataset
    from .splits import write_splits

    dataset = open_dataset(cfg.base)
    counts = write_splits(dataset, cfg.base, cfg.prepare, PATHS["prepare"])
    for split, c in counts.items():
        print(f"{split}: {c}")


def train_classifier(cfg: Config) -> None:
    from .classifier import install_external, report_classifier, train_classifier as train
    from .tracking import stage_run

    dataset, splits = _dataset_and_splits(cfg)
    out = PATHS["train_classifier"]
    with stage_run("classifier", "train_classifier", cfg, ("base", "prepare", "classifier")) as tracker:
        if cfg.classifier.external is not None and cfg.classifier.external.path:
            print(f"classifier.external.path is set: using {cfg.classifier.external.path}, no training")
            f = install_external(cfg.classifier.external, cfg.base, out)
            metrics = report_classifier(f, dataset, splits, cfg.base, cfg.classifier, out, tracker)
        else:
            metrics = train(dataset, splits, cfg.base, cfg.classifier, out, tracker)
    t = metrics["test"]
    print(f"test ROC-AUC {t['roc_auc']}, accuracy {t['accuracy']:.4f}, Brier {t['brier']:.4f}")


def posteriors(cfg: Config) -> None:
    from .classifier import load_classifier
    from .posteriors import posterior_stage
    from .tracking import stage_run

    dataset, splits = _dataset_and_splits(cfg)
    f = load_classifier(PATHS["train_classifier"], cfg.base)
    with stage_run("classifier", "posteriors", cfg, ("base", "posteriors")) as tracker:
        summary = posterior_stage(f, dataset, splits, cfg.base, cfg.posteriors.batch_size,
                                  PATHS["posteriors"], tracker)
    for split, s in summary.items():
        print(f"{split}: images per bin {s['bin_counts']}")


def bin(cfg: Config) -> None:  # noqa: A001 - the stage's name in dvc.yaml
    from .datasets import open_dataset
    from .posteriors import bin_stage, read_table
    from .tracking import stage_run

    dataset = open_dataset(cfg.base)
    rows = read_table(PATHS["posteriors"] / "posteriors.csv")
    with stage_run("classifier", "bin", cfg, ("base", "bin")) as tracker:
        m = bin_stage(rows, dataset.label_names[0], cfg.base, cfg.bin, PATHS["bin"], tracker)
    print(f"explainer inputs: {m['images']} images; ECE before {m['before']['ece']:.4f}, "
          f"after {m['after']['ece']:.4f}; selected per bin {[b['selected'] for b in m['bins']]}")


def train_explainer(cfg: Config) -> None:
    from .explainer import train_explainer as train
    from .tracking import stage_run

    with stage_run("explainer", "train_explainer", cfg, ("base", "explainer")) as tracker:
        train(cfg, PATHS, tracker)


def explain(cfg: Config) -> None:
    from .series import explain_stage
    from .tracking import stage_run

    with stage_run("explainer", "explain", cfg, ("base", "explain")) as tracker:
        explain_stage(cfg, PATHS, tracker)


def train_oracle(cfg: Config) -> None:
    from .oracle import train_oracle as train
    from .tracking import stage_run

    with stage_run("evaluation", "train_oracle", cfg, ("base", "oracle")) as tracker:
        train(cfg.base, cfg.oracle, PATHS["train_oracle"], tracker)


def evaluate(cfg: Config) -> None:
    from .evaluate import evaluate_stage
    from .tracking import stage_run

    with stage_run("evaluation", "evaluate", cfg, ("base", "evaluate", "explain")) as tracker:
        evaluate_stage(cfg, PATHS, tracker)


STAGES: dict[str, Callable[[Config], None]] = {
    "prepare": prepare, "train_classifier": train_classifier, "posteriors": posteriors, "bin": bin,
    "train_explainer": train_explainer, "explain": explain, "train_oracle": train_oracle, "evaluate": evaluate,
}


def run_stage(name: str, params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    set_threads(cfg.base.threads)
    start = time.time()
    STAGES[name](cfg)
    print(f"stage {name} finished in {time.time() - start:.1f} s")
