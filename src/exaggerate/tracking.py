"""MLflow wiring shared by every stage.

Library functions take a `Tracker`; the stage wrappers pass an `MlflowTracker`, tests and
notebooks may pass the silent `Tracker()`. Every stage run is nested under one parent run per
pipeline execution (same commit, DVC experiment and parameters) in experiment "exaggerate";
the parent carries the tags, all parameters and the headline metrics.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from .config import Config, flatten

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class Tracker:
    """Does nothing; the interface the library logs through."""

    run_id: Optional[str] = None
    parent_run_id: Optional[str] = None

    def metrics(self, values: dict[str, float], step: Optional[int] = None) -> None:
        pass

    def figure(self, fig, name: str) -> None:
        pass

    def artifact(self, path: str | Path, folder: Optional[str] = None) -> None:
        pass

    def tags(self, values: dict[str, Any]) -> None:
        pass


class MlflowTracker(Tracker):
    def __init__(self, mlflow_module, run):
        self._mlflow = mlflow_module
        self.run_id = run.info.run_id

    def metrics(self, values: dict[str, float], step: Optional[int] = None) -> None:
        clean = {k.replace("/", "_"): float(v) for k, v in values.items() if v is not None}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def figure(self, fig, name: str) -> None:
        self._mlflow.log_figure(fig, name)

    def artifact(self, path: str | Path, folder: Optional[str] = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), folder)
        else:
            self._mlflow.log_artifact(str(path), folder)

    def tags(self, values: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in values.items()})


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


@contextlib.contextmanager
def store_lock(uri: Optional[str] = None) -> Iterator[None]:
    """Holds, across the processes of this machine, what must happen once per store: a new SQLite
    store's schema migrations, an experiment's creation, a pipeline execution's parent run. Stages
    started at the same moment on one store (`--jobs`, stages run by hand, tuning workers) would otherwise
    each migrate the same file or create the same row, and all but one fail or a duplicate is
    left. The lock file sits beside a SQLite store, in the temporary folder for other stores."""
    import fcntl

    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):].split("?")[0] + ".lock")
    else:
        path = Path(tempfile.gettempdir()) / f"exaggerate-mlflow-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def use_experiment(mlflow, name: str) -> None:
    """Point `mlflow` at this project's store and at experiment `name`, created under the lock."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        mlflow.set_experiment(name)


def prepare_store() -> str:
    """Open the tracking store once, so that a new SQLite store gets its tables here and not in
    several stages started at the same moment. Returns the store's URI."""
    import mlflow

    uri = tracking_uri()
    with store_lock(uri):
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return uri


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD's commit, with "-dirty" when tracked files other than the pipeline's own products
    (dvc.lock, outputs/, which the stages rewrite as they run) differ from it."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip() if out.returncode == 0 else "unknown"
    if commit != "unknown":
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)dvc.lock", ":(exclude)outputs"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if dirty:
            commit += "-dirty"
    return commit


EXPERIMENT = "exaggerate"
# The benchmark's runs (one parent per task and seed, and the report) go to an experiment of
# their own, so that the pipeline's table in the UI holds pipeline executions only.
BENCHMARK_EXPERIMENT = "exaggerate-benchmark"


def experiment_name() -> str:
    return os.environ.get("EXAGGERATE_EXPERIMENT") or EXPERIMENT
# What evaluate puts on the pipeline's parent run, so that the UI compares executions in one table.
HEADLINE = {"explainer_compatibility_mae": "mae", "explainer_monotonic_share": "monotone",
            "explainer_oracle_agreement": "oracle_agreement", "explainer_fid_oracle": "fid_oracle",
            "explainer_reconstruction_l1": "reconstruction_l1", "speedup": "speedup"}


def dvc_experiment() -> str:
    """The DVC experiment being run (DVC sets DVC_EXP_NAME during `dvc exp run`), else "workspace"."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def code_digest() -> str:
    """A digest of this package's source: what the runs' code is, committed or not."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def pipeline_key(config: Config, commit: str, code: str, experiment: str) -> str:
    """One pipeline execution: the commit, the package's code, the DVC experiment and the
    parameters. Every stage of one `dvc repro` or `dvc exp run` computes the same key (the
    outputs and dvc.lock that the stages rewrite on the way are left out), and so does a stage
    rerun alone under the same code and parameters."""
    text = json.dumps({"commit": commit.removesuffix("-dirty"), "code": code, "experiment": experiment,
                       "params": config.to_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pipeline_parent(mlflow, config: Config) -> str:
    """The run id of this pipeline execution's parent run, created on first use."""
    commit, code, experiment = git_commit(), code_digest(), dvc_experiment()
    key = pipeline_key(config, commit, code, experiment)
    found = mlflow.search_runs(experiment_names=[experiment_name()], output_format="list", max_results=1,
                               filter_string=f"tags.`exaggerate.pipeline` = '{key}'")
    if found:
        return found[0].info.run_id
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
    label = os.environ.get("EXAGGERATE_RUN_LABEL") or f"pipeline {experiment}"
    with mlflow.start_run(run_name=f"{label} @ {commit[:12]}") as run:
        mlflow.set_tags({"exaggerate.pipeline": key, "git_commit": commit, "code_digest": code,
                         "dvc_experiment": experiment, **({"dvc_baseline": baseline} if baseline else {})})
        mlflow.log_params({k: str(v) for k, v in flatten(config.to_dict()).items()})
    return run.info.run_id


def log_headline(run_id: str, metrics: dict[str, float]) -> None:
    """The headline metrics (HEADLINE) on the pipeline's parent run."""
    import mlflow

    client = mlflow.MlflowClient()
    for name, short in HEADLINE.items():
        if metrics.get(name) is not None:
            client.log_metric(run_id, short, float(metrics[name]))


@contextlib.contextmanager
def stage_run(stage: str, config: Config, sections: tuple[str, ...]) -> Iterator[MlflowTracker]:
    """An MLflow run for one DVC stage, nested under its pipeline execution's parent run in
    experiment "exaggerate", tagged with the git commit, the DVC stage and experiment."""
    import mlflow
    import yaml

    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 alone records the run
        tracker = Tracker()
        tracker.parent_run_id = None
        yield tracker
        return
    mlflow.set_tracking_uri(tracking_uri())
    with store_lock():  # also: two stages of one execution starting together share one parent
        mlflow.set_experiment(experiment_name())
        parent = pipeline_parent(mlflow, config)
    resolved = {s: config.to_dict()[s] for s in sections}
    with mlflow.start_run(run_name=stage, nested=True, parent_run_id=parent) as run:
        mlflow.set_tags({"git_commit": git_commit(), "dvc_stage": stage, "dvc_experiment": dvc_experiment()})
        mlflow.log_params({k: str(v) for k, v in flatten(resolved).items()})
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "params.yaml"
            p.write_text(yaml.safe_dump(resolved, sort_keys=False))
            mlflow.log_artifact(str(p))
        tracker = MlflowTracker(mlflow, run)
        tracker.parent_run_id = parent
        yield tracker


@contextlib.contextmanager
def benchmark_run(split: str, seeds: list[int], tasks: list[str]) -> Iterator[MlflowTracker]:
    """The benchmark report's MLflow run, in the benchmark's experiment."""
    import mlflow

    use_experiment(mlflow, BENCHMARK_EXPERIMENT)
    with mlflow.start_run(run_name=f"benchmark report ({split}) @ {git_commit()[:12]}") as run:
        mlflow.set_tags({"git_commit": git_commit(), "code_digest": code_digest(), "dvc_experiment": dvc_experiment(),
                         "benchmark_split": split})
        mlflow.log_params({"split": split, "seeds": str(seeds), "tasks": ",".join(tasks)})
        yield MlflowTracker(mlflow, run)
