"""MLflow wiring shared by every stage.

Library functions take a `Tracker`; the stage wrappers pass an `MlflowTracker` (one
experiment per stage kind, runs tagged with the git commit, the DVC stage and the resolved
params), tests and notebooks may pass the silent `Tracker()`.
"""
from __future__ import annotations

import contextlib
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


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip() if out.returncode == 0 else "unknown"
    if commit != "unknown":
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if dirty:
            commit += "-dirty"
    return commit


@contextlib.contextmanager
def stage_run(kind: str, stage: str, config: Config, sections: tuple[str, ...]) -> Iterator[MlflowTracker]:
    """An MLflow run in experiment `exaggerate-<kind>` for one DVC stage."""
    import mlflow
    import yaml

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(f"exaggerate-{kind}")
    resolved = {s: config.to_dict()[s] for s in sections}
    with mlflow.start_run(run_name=stage) as run:
        mlflow.set_tags({"git_commit": git_commit(), "dvc_stage": stage,
                         "exaggerate.kind": kind})
        mlflow.log_params({k: str(v) for k, v in flatten(resolved).items()})
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "params.yaml"
            p.write_text(yaml.safe_dump(resolved, sort_keys=False))
            mlflow.log_artifact(str(p))
        yield MlflowTracker(mlflow, run)
