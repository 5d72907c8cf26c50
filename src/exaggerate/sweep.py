"""Seed sweeps: retrain the explainer under several settings and seeds, and summarise each setting.

A 2000-step GAN run ends wherever its trajectory takes it: on the default, four explainer seeds
gave oracle agreements from 0.59 to 0.79 (docs/MEASUREMENTS.md). One run per setting therefore says
little about the setting. A sweep trains, explains and evaluates every (setting, seed) pair in
worker processes (on one GPU several at once), on the pipeline's own upstream outputs, and writes

- `rows.json`: one row of explainer metrics per finished run, rewritten atomically after each;
- `summary.md` / `summary.json`: per setting, the mean, minimum and maximum of each metric.

Run folders live under `OUT/runs/<setting>_s<seed>/`. A rerun skips finished runs and resumes
unfinished training from its checkpoints. The baseline is left out (its metrics do not depend on
the explainer); `dvc repro` remains the measurement of record.
"""
from __future__ import annotations

import copy
import hashlib
import multiprocessing as mp
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from .config import ConfigError, config_from_dict, load_config
from .io import read_json, write_json, write_text

METRICS = ("compatibility_mae", "monotonic_share", "flip_rate", "oracle_agreement", "fid_oracle", "sfid_oracle",
           "reconstruction_l1", "cycle_l1")
# What the sweep needs from `dvc repro` before it can train and evaluate.
UPSTREAM = (("prepare", "splits.json"), ("train_classifier", "model.pt"), ("posteriors", "posteriors.csv"),
            ("bin", "explainer_inputs.csv"), ("train_oracle", "oracle.pt"))


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: dict

    @staticmethod
    def parse(text: str) -> "Setting":
        """`NAME` or `NAME:section.key=value,section.key=value` (values are YAML)."""
        name, _, rest = text.partition(":")
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"sweep setting {text!r}: expected NAME or NAME:section.key=value,...")
        overrides = {}
        # Split only at commas that start the next key, so that values may be lists ("[0.5, 0.9]").
        for item in filter(None, re.split(r",(?=\s*[A-Za-z_]\w*\.[A-Za-z_]\w*=)", rest)):
            key, eq, value = item.partition("=")
            if not eq or key.count(".") != 1:
                raise ConfigError(f"sweep setting {name!r}: {item!r} is not section.key=value")
            try:
                overrides[key.strip()] = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(f"sweep setting {name!r}: {key.strip()}: {value!r} is not a YAML value") from exc
        return Setting(name, overrides)


def run_config(raw: dict, setting: Setting, seed: int, steps: Optional[int]) -> dict:
    """The parameter dict of one run: params.yaml, the setting's overrides, the explainer seed."""
    out = copy.deepcopy(raw)
    for key, value in setting.overrides.items():
        section, name = key.split(".")
        if section not in out or not isinstance(out[section], dict):
            raise ConfigError(f"sweep setting {setting.name!r}: no section {section!r} in the parameters")
        out[section][name] = value
    out["explainer"]["seed"] = seed
    if steps is not None:
        out["explainer"]["steps"] = steps
    out["evaluate"].update(baseline_queries=2, baseline_steps=1)
    out["explain"]["split"] = "val"  # settings are compared on validation queries; test is for the final report
    try:
        config_from_dict(out)
    except ConfigError as exc:
        raise ConfigError(f"sweep setting {setting.name!r}: {exc}") from exc
    return out


def settings_digest(raw: dict) -> str:
    """What a finished run was made with: a rerun with other settings does not reuse it."""
    return hashlib.sha256(yaml.safe_dump(raw, sort_keys=True).encode()).hexdigest()[:16]


def _run(job: tuple) -> dict:
    """One (setting, seed) run in a worker process: train, explain, evaluate."""
    tag, raw, paths, threads, log_path = job
    import contextlib
    import os
    os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it: no bars from parallel workers

    from . import stages
    from .utils import set_threads

    set_threads(threads)
    cfg = config_from_dict(raw)
    # Each run keeps its own MLflow store: parallel workers never contend for one SQLite file.
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(paths['evaluate']).parent.resolve() / 'mlflow.db'}"
    start = time.perf_counter()
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            stages.train_explainer(cfg, paths)
            trained = time.perf_counter()
            stages.explain(cfg, paths)
            summary = stages.evaluate(cfg, paths)
        except Exception as exc:  # a diverged seed is an outcome: record it, let the other runs go on
            import traceback
            traceback.print_exc()
            return {"tag": tag, "error": f"{type(exc).__name__}: {exc} (log: {log_path})"}
    row = {k: summary["explainer"].get(k) for k in METRICS}
    row.update(tag=tag, settings=settings_digest(raw), train_s=trained - start, total_s=time.perf_counter() - start,
               real_oracle_agreement=summary["real_images"]["oracle_agreement"])
    return row


def summarise(rows: list[dict], settings: list[Setting]) -> dict:
    out = {}
    for s in settings:
        failed = sorted(r["seed"] for r in rows if r["setting"] == s.name and "error" in r)
        mine = [r for r in rows if r["setting"] == s.name and "error" not in r]
        if not mine and not failed:
            continue
        stats = {}
        for k in METRICS:
            vals = np.array([r[k] for r in mine if r.get(k) is not None], dtype=float)
            if len(vals):
                stats[k] = {"mean": float(vals.mean()), "min": float(vals.min()), "max": float(vals.max())}
        out[s.name] = {"overrides": s.overrides, "seeds": sorted(r["seed"] for r in mine), "failed_seeds": failed,
                       "metrics": stats}
    return out


def summary_table(summary: dict) -> str:
    lines = ["| setting | runs | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for name, s in summary.items():
        cells = []
        for k in METRICS:
            m = s["metrics"].get(k)
            cells.append(f"{m['mean']:.3f} [{m['min']:.3f}, {m['max']:.3f}]" if m else "absent")
        failed = f" (+{len(s['failed_seeds'])} failed)" if s["failed_seeds"] else ""
        lines.append(f"| {name} | {len(s['seeds'])}{failed} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Mean [min, max] over the explainer seeds of each setting; overrides:")
    for name, s in summary.items():
        lines.append(f"- {name}: " + (", ".join(f"{k}={v}" for k, v in s["overrides"].items()) or "params.yaml"))
    return "\n".join(lines) + "\n"


def run_sweep(params_path: str | Path, settings: list[Setting], seeds: list[int], out_dir: str | Path,
              paths: dict, workers: int = 1, threads: int = 1, steps: Optional[int] = None) -> dict:
    raw = load_config(params_path).to_dict()  # validated and resolved, as tune's workers receive it
    if len({s.name for s in settings}) != len(settings):
        raise ConfigError("sweep settings need distinct names")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"sweep seeds: got {seeds}, expected distinct integers")
    for stage, name in UPSTREAM:
        if not (Path(paths[stage]) / name).is_file():
            raise FileNotFoundError(f"{Path(paths[stage]) / name} not found: a sweep trains on the pipeline's "
                                    f"upstream outputs; run `dvc repro train_oracle bin` first")
    out_dir = Path(out_dir)
    rows_path = out_dir / "rows.json"
    # Failed runs are kept for the record until a rerun retries them.
    rows = read_json(rows_path) if rows_path.is_file() else []
    done = {r["tag"]: r.get("settings") for r in rows if "error" not in r}
    jobs, meta = [], {}
    for seed in seeds:  # seed-major: an interrupted sweep has every setting at its first seeds
        for s in settings:
            tag = f"{s.name}_s{seed}"
            run_dir = out_dir / "runs" / tag
            cfg_raw = run_config(raw, s, seed, steps)
            meta[tag] = (s.name, seed)
            if done.get(tag) == settings_digest(cfg_raw):
                continue
            if tag in done:
                print(f"sweep: {tag} finished under other settings; running it again", flush=True)
                done.pop(tag)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text(run_dir / "params.yaml", yaml.safe_dump(cfg_raw, sort_keys=False))
            run_paths = {**paths, "train_explainer": run_dir / "explainer", "explain": run_dir / "explain",
                         "evaluate": run_dir / "evaluate"}
            jobs.append((tag, cfg_raw, run_paths, threads, run_dir / "log.txt"))
    print(f"sweep: {len(settings)} settings x {len(seeds)} seeds; {len(set(done) & set(meta))} runs already done, "
          f"{len(jobs)} to run with {workers} worker(s) -> {out_dir}", flush=True)
    start = time.perf_counter()
    if jobs:
        ctx = mp.get_context("spawn")  # CUDA cannot be forked into workers
        with ctx.Pool(min(workers, len(jobs)), maxtasksperchild=1) as pool:
            for row in pool.imap_unordered(_run, jobs):
                row["setting"], row["seed"] = meta[row["tag"]]
                rows = [r for r in rows if r["tag"] != row["tag"]] + [row]
                write_json(rows_path, rows)
                what = row.get("error") or ", ".join(f"{k} {row[k]:.3f}" for k in METRICS if row.get(k) is not None)
                print(f"[{time.perf_counter() - start:6.0f} s] {row['tag']}: {what}", flush=True)
    mine = [r for r in rows if r["tag"] in meta]
    summary = summarise(mine, settings)
    write_json(out_dir / "summary.json", summary)
    table = summary_table(summary)
    write_text(out_dir / "summary.md", table)
    print(table, end="")
    return summary
