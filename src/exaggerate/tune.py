"""Optuna studies of the explainer's loss weights (and optionally learning rates and n_critic).

Each trial trains an explainer for `tune.trial_steps` iterations and scores it on validation
queries with the evaluation code: compatibility MAE with f and fid_oracle of the series against
real validation images, and the oracle's agreement. Modes: "multi" (MAE and fid_oracle, Pareto
front, NSGA-II) and "scalar" (MAE + fid_weight * fid_oracle, TPE, intermediate scores with a
MedianPruner).

Storage: an RDB URL (sqlite:///optuna.db by default, postgresql://... for many machines; with
heartbeats, so a killed worker's trial is failed and retried) or "journal:FILE" (several
processes on one machine). Workers on other machines join the same study with the same
study name and storage (load_if_exists).
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import socket
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

from . import metrics as M
from .config import Config, config_from_dict
from .io import read_json, save_figure, write_json, write_text
from .tracking import tracking_uri, use_experiment

RESULTS = Path("results") / "tune"


def make_storage(url: str, heartbeat_s: int):
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeats are "experimental"

    if url.startswith("journal:"):
        path = url[len("journal:"):]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if heartbeat_s > 0:
        try:  # optuna >= 4.9
            from optuna.storages import RetryHeartbeatStaleTrialCallback

            retry = {"heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=1)}
        except ImportError:
            from optuna.storages import RetryFailedTrialCallback

            retry = {"failed_trial_callback": RetryFailedTrialCallback(max_retry=1)}
        return RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s, **retry)
    return RDBStorage(url)


def sample_params(trial, cfg: Config):
    """Explainer parameters of one trial: log-uniform loss weights within tune's bounds."""
    t, e = cfg.tune, cfg.explainer
    changes = {
        "lambda_gan": trial.suggest_float("lambda_gan", *t.lambda_gan, log=True),
        "lambda_cyc": trial.suggest_float("lambda_cyc", *t.lambda_cyc, log=True),
        "lambda_cls": trial.suggest_float("lambda_cls", *t.lambda_cls, log=True),
    }
    if t.tune_lr:
        lr = trial.suggest_float("lr", *t.lr, log=True)
        changes.update(lr_g=lr, lr_d=lr)
    if t.tune_n_critic:
        changes["n_critic"] = trial.suggest_int("n_critic", *t.n_critic)
    return dataclasses.replace(e, **changes, steps=t.trial_steps, checkpoint_every=t.eval_every,
                               image_every=t.trial_steps, log_every=min(e.log_every, t.eval_every))


class Scorer:
    """Scores a generator's series of fixed validation queries with the evaluator that the
    evaluate stage uses (compatibility MAE, fid_oracle against the real validation images in
    f's bins, oracle agreement) and the scalar objective built from them."""

    def __init__(self, cfg: Config, paths: dict, device: torch.device):
        from .classifier import load_classifier
        from .datasets import open_dataset
        from .evaluate import EvaluationError, Evaluator, oracle_refusal, real_reference_rows
        from .oracle import load_oracle
        from .posteriors import read_explainer_inputs, read_table
        from .series import choose_queries
        from .splits import read_splits

        self.cfg, self.device = cfg, device
        self.dataset = open_dataset(cfg.base)
        self.splits = read_splits(Path(paths["prepare"]) / "splits.json", self.dataset)
        self.f = load_classifier(paths["train_classifier"], cfg.base).to(device)
        refused = oracle_refusal(read_json(Path(paths["train_oracle"]) / "metrics.json"), cfg.evaluate.oracle_gate)
        if refused:
            raise EvaluationError(f"tuning scores validation series with the oracle, but {refused}")
        oracle = load_oracle(Path(paths["train_oracle"]) / "oracle.pt", cfg.base).to(device)
        self.indices, self.bins = read_explainer_inputs(Path(paths["bin"]) / "explainer_inputs.csv", self.dataset,
                                                        cfg.base.num_bins)
        self.queries = self.dataset.images(choose_queries(self.splits["val"], cfg.tune.val_queries, cfg.base.seed))
        with torch.no_grad():
            self.p_query = M.batched(lambda t: self.f(t.to(device)), self.queries).numpy()
        ids, real_bins = real_reference_rows(read_table(Path(paths["posteriors"]) / "posteriors.csv"), "val")
        self.evaluator = Evaluator(self.f, oracle, self.dataset.images(self.dataset.index_of(ids)), real_bins,
                                   cfg.base, device)

    @torch.no_grad()
    def __call__(self, g) -> dict[str, float]:
        from .inference import explain_series

        was_training = g.training
        g.eval()
        s = torch.cat([explain_series(g, self.f, self.queries[i:i + 32].to(self.device), self.cfg.base.num_bins,
                                      self.cfg.explain.probes, self.cfg.explain.detail)[0].cpu()
                       for i in range(0, len(self.queries), 32)])
        g.train(was_training)
        core = self.evaluator.core(s, self.p_query)
        scores = {k: core[k] for k in ("compatibility_mae", "fid_oracle", "oracle_agreement") if k in core}
        scores["objective"] = M.scalar_objective(core["compatibility_mae"], core["fid_oracle"],
                                                 self.cfg.tune.fid_weight)
        return scores


def _objective(trial, cfg: Config, paths: dict, scorer: Scorer, parent_run_id: Optional[str]):
    import mlflow
    import optuna

    from .training_loop import fit
    from .tracking import MlflowTracker

    params = sample_params(trial, cfg)
    multi = cfg.tune.mode == "multi"
    # Which process on which machine runs the trial: a study spans machines, and a trial failed by
    # heartbeat is then traced to the worker that stopped beating.
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_name=f"trial {trial.number}", nested=True, parent_run_id=parent_run_id) as run:
        mlflow.set_tags({"optuna.study": trial.study.study_name, "optuna.trial": trial.number})
        mlflow.log_params({**trial.params, "trial_steps": params.steps})
        tracker = MlflowTracker(mlflow, run)
        scores: dict[str, float] = {}

        def report(step, g):
            scores.update(scorer(g))
            tracker.metrics({f"val_{k}": v for k, v in scores.items()}, step=step)
            if not multi:
                trial.report(scores["objective"], step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step} (objective {scores['objective']:.4f})")

        try:
            with tempfile.TemporaryDirectory(prefix="exaggerate-trial-") as tmp:
                fit(scorer.dataset, scorer.indices, scorer.bins, scorer.splits["val"], scorer.f, cfg.base, params,
                    Path(tmp), tracker, on_checkpoint=report)
        except optuna.TrialPruned:
            mlflow.set_tag("optuna.state", "PRUNED")
            raise
        except Exception as exc:  # recorded as a failed trial with its reason; the study goes on
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            mlflow.set_tag("optuna.state", "FAIL")
            mlflow.set_tag("fail_reason", str(exc)[:5000])
            raise
        mlflow.set_tag("optuna.state", "COMPLETE")
    for k, v in scores.items():
        trial.set_user_attr(k, v)
    return (scores["compatibility_mae"], scores["fid_oracle"]) if multi else scores["objective"]


def worker(config: dict, paths: dict, storage_url: str, study_name: str, n_trials: int, parent_run_id: Optional[str],
           worker_index: int) -> None:
    """One worker process: loads the study and runs trials until the study has n_trials."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from .utils import resolve_device, set_threads

    cfg = config_from_dict(config)
    set_threads(cfg.base.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(storage_url, cfg.tune.heartbeat_s)
    study = optuna.load_study(study_name=study_name, storage=storage,
                              sampler=_sampler(cfg, worker_index), pruner=_pruner(cfg))
    scorer = Scorer(cfg, paths, resolve_device(cfg.base.device))
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    if len(study.get_trials(deepcopy=False, states=done)) >= n_trials:
        return
    study.optimize(lambda t: _objective(t, cfg, paths, scorer, parent_run_id), catch=(Exception,),
                   callbacks=[MaxTrialsCallback(n_trials, states=done)], gc_after_trial=True)


def worker_threads(threads: int, workers: int) -> int:
    """Torch threads per worker: base.threads when set, else the usable cores shared out, so
    that parallel workers do not oversubscribe the CPU (0 keeps torch's default)."""
    if threads > 0 or workers == 1:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def _sampler(cfg: Config, worker_index: int):
    import optuna

    seed = cfg.tune.seed + worker_index
    if cfg.tune.mode == "multi":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.tune.startup_trials)


def _pruner(cfg: Config):
    import optuna

    if cfg.tune.mode == "multi":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.tune.startup_trials,
                                       n_warmup_steps=cfg.tune.prune_after)


def run_study(cfg: Config, paths: dict, workers: Optional[int] = None, n_trials: Optional[int] = None,
              storage_url: Optional[str] = None, study_name: Optional[str] = None, out_dir: Path = RESULTS) -> dict:
    """Create or resume the study, run its workers, and write the summary and best parameters."""
    import mlflow
    import optuna

    t = cfg.tune
    workers = workers or t.workers
    n_trials = n_trials or t.n_trials
    storage_url = storage_url or t.storage
    study_name = study_name or t.study_name
    storage = make_storage(storage_url, t.heartbeat_s)
    directions = ["minimize", "minimize"] if t.mode == "multi" else ["minimize"]
    study = optuna.create_study(study_name=study_name, storage=storage, directions=directions,
                                sampler=_sampler(cfg, 0), pruner=_pruner(cfg), load_if_exists=True)
    if not study.trials:
        _enqueue_current_weights(study, cfg)
    use_experiment(mlflow, "exaggerate-tuning")
    parent_id = study.user_attrs.get("mlflow_parent_run_id")
    resume = parent_id is not None and _run_exists(parent_id)
    with mlflow.start_run(run_id=parent_id if resume else None, run_name=f"study {study_name}") as parent:
        if not resume:
            study.set_user_attr("mlflow_parent_run_id", parent.info.run_id)
            mlflow.log_params({"mode": t.mode, "n_trials": n_trials, "trial_steps": t.trial_steps,
                               "storage": storage_url.split("@")[-1], "workers": workers})
        config = cfg.to_dict()
        config["base"]["threads"] = worker_threads(cfg.base.threads, workers)
        args = (config, {k: str(v) for k, v in paths.items()}, storage_url, study_name, n_trials,
                parent.info.run_id)
        _run_workers(args, workers)
        if isinstance(storage, optuna.storages.RDBStorage):
            optuna.storages.fail_stale_trials(study)
        summary = summarise(study, cfg, out_dir)
        best = summary.get("best")
        if best:
            mlflow.log_metrics({f"best_{k}": v for k, v in best["values"].items()})
            mlflow.set_tags({"best_trial": best["number"], "best_params": best["params"]})
        for name in ("trials.csv", "best_params.yaml", "history.png", "pareto.png", "importances.png"):
            if (out_dir / name).is_file():
                mlflow.log_artifact(str(out_dir / name))
    return summary


def _enqueue_current_weights(study, cfg: Config) -> None:
    """The current weights are the first trial: the study then says whether it beats them."""
    t, e = cfg.tune, cfg.explainer
    default = {"lambda_gan": e.lambda_gan, "lambda_cyc": e.lambda_cyc, "lambda_cls": e.lambda_cls}
    bounds = {"lambda_gan": t.lambda_gan, "lambda_cyc": t.lambda_cyc, "lambda_cls": t.lambda_cls}
    if not all(lo <= default[k] <= hi for k, (lo, hi) in bounds.items()):
        return
    if t.tune_lr and t.lr[0] <= e.lr_g <= t.lr[1]:
        default["lr"] = e.lr_g
    if t.tune_n_critic and t.n_critic[0] <= e.n_critic <= t.n_critic[1]:
        default["n_critic"] = e.n_critic
    study.enqueue_trial(default, user_attrs={"is_default": True})


def _run_workers(args: tuple, workers: int) -> None:
    """The study's workers: this process alone, or spawned processes (each loads the study)."""
    if workers == 1:
        worker(*args, 0)
        return
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(*args, i), name=f"tune-worker-{i}") for i in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        print(f"{len(bad)} of {workers} workers ended abnormally (exit codes {bad}); "
              "their running trials are failed by heartbeat and retried")


def _run_exists(run_id: str) -> bool:
    import mlflow

    try:
        mlflow.get_run(run_id)
        return True
    except Exception:
        return False


def trials_table(study):
    """One row per trial (optuna's trials_dataframe): number, state, parameters, then the
    validation scores, whether it is the current weights and why it failed."""
    import pandas as pd

    if not study.trials:
        return pd.DataFrame(columns=["number", "state"])
    df = study.trials_dataframe(attrs=("number", "state", "params", "user_attrs"), multi_index=False)
    df = df.rename(columns=lambda c: c.removeprefix("params_").removeprefix("user_attrs_"))
    df = df.rename(columns={"is_default": "default", "fail_reason": "reason"})
    first = ["number", "state", *sorted({k for t in study.trials for k in t.params})]
    return df[first + [c for c in df.columns if c not in first]]


def summarise(study, cfg: Config, out_dir: Path) -> dict:
    """trials.csv, best_params.yaml (never params.yaml), plots and a JSON summary."""
    from optuna.trial import TrialState

    from . import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    write_text(out_dir / "trials.csv", trials_table(study).to_csv(index=False, lineterminator="\n"))
    complete = [tr for tr in trials if tr.state == TrialState.COMPLETE]
    counts = {s.name: sum(tr.state == s for tr in trials) for s in TrialState}
    summary: dict = {"study": study.study_name, "mode": cfg.tune.mode, "trials": len(trials), "states": counts}
    if complete:
        if cfg.tune.mode == "multi":
            front = study.best_trials
            summary["pareto_front"] = [{"number": tr.number, "params": tr.params,
                                        "values": {"compatibility_mae": tr.values[0], "fid_oracle": tr.values[1]}}
                                       for tr in front]
            best = min(front, key=lambda tr: tr.values[0] + cfg.tune.fid_weight * tr.values[1])
        else:
            best = study.best_trial
        summary["best"] = {"number": best.number, "params": best.params,
                           "values": {k: best.user_attrs[k] for k in ("compatibility_mae", "fid_oracle", "objective")
                                      if k in best.user_attrs}}
        default = [tr for tr in complete if tr.user_attrs.get("is_default")]
        if default:
            summary["default"] = {"number": default[0].number, "objective": default[0].user_attrs.get("objective")}
        explainer_params = {k: v for k, v in best.params.items() if k in ("lambda_gan", "lambda_cyc", "lambda_cls",
                                                                          "n_critic")}
        if "lr" in best.params:
            explainer_params.update(lr_g=best.params["lr"], lr_d=best.params["lr"])
        sets = " ".join(f"-S explainer.{k}={v!r}" for k, v in explainer_params.items())  # exact: same training
        write_text(out_dir / "best_params.yaml",
                   f"# Best trial {best.number} of study {study.study_name} ({cfg.tune.mode}).\n"
                   f"# Reproduce it with: dvc exp run {sets}\n"
                   + yaml.safe_dump({"explainer": explainer_params}, sort_keys=True))
        _plots(study, complete, cfg, out_dir, plots)
    write_json(out_dir / "summary.json", summary)
    print(f"study {study.study_name}: {counts}; best: {summary.get('best')}")
    return summary


def _plots(study, complete, cfg: Config, out_dir: Path, plots) -> None:
    """history.png and importances.png always (DVC declares them); pareto.png in multi mode."""
    import optuna

    multi = cfg.tune.mode == "multi"
    fig, ax = plots.plt.subplots(figsize=(5, 3.5))
    xs = [tr.number for tr in complete]
    ys = [tr.values[0] + cfg.tune.fid_weight * tr.values[1] if multi else tr.value for tr in complete]
    ax.plot(xs, ys, "o", label="trial")
    ax.plot(xs, np.minimum.accumulate(ys), "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"MAE + {cfg.tune.fid_weight:g} x fid_oracle")
    ax.legend()
    save_figure(out_dir / "history.png", fig)
    plots.close(fig)
    if multi:
        fig, ax = plots.plt.subplots(figsize=(5, 4))
        front = {tr.number for tr in study.best_trials}
        for tr in complete:
            on = tr.number in front
            ax.scatter(tr.values[0], tr.values[1], c="tab:red" if on else "tab:grey", s=30 if on else 15)
            ax.annotate(str(tr.number), (tr.values[0], tr.values[1]), fontsize=6)
        ax.set_xlabel("compatibility MAE")
        ax.set_ylabel("fid_oracle")
        ax.set_title("trials (Pareto front in red)")
        save_figure(out_dir / "pareto.png", fig)
        plots.close(fig)
    fig, ax = plots.plt.subplots(figsize=(5, 3))
    try:
        if len(complete) < 2:
            raise ValueError(f"{len(complete)} complete trial(s); importances need at least 2")
        importances = optuna.importance.get_param_importances(
            study, target=(lambda tr: tr.values[0]) if multi else None)
        ax.barh(list(importances), list(importances.values()))
        ax.set_xlabel("importance (fANOVA)")
        ax.set_title("parameter importances")
    except (RuntimeError, ValueError) as exc:
        ax.text(0.5, 0.5, f"importances unavailable:\n{exc}", ha="center", va="center", fontsize=8, wrap=True)
        ax.set_axis_off()
    save_figure(out_dir / "importances.png", fig)
    plots.close(fig)
