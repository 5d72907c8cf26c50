"""The multi-task benchmark: its spec, its DVC graph, the digits folder, and a tiny run end to end."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from exaggerate import benchmark as B
from exaggerate import benchmark_report as R
from exaggerate.config import load_config

REPO = Path(__file__).resolve().parents[1]


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage 'benchmark/dvc.yaml:(\w+)'", output))


def planned(output: str) -> list[str]:
    """The stages `exaggerate benchmark --dry-run` lists."""
    return re.findall(r"^  (\w+)$", output, flags=re.M)


def write_spec(path: Path, spec: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def spec_dict() -> dict:
    return {
        "split": "val", "seeds": [0, 1],
        "oracles": {"fashion_mnist": {"data": "data/fashion-mnist"},
                    "digits": {"data": "benchmark/data/digits",
                               "base": {"dataset": "image_folder", "target": "8", "negatives": ["3"],
                                        "resize": "resize"},
                               "oracle": {"flip": False}}},
        "tasks": {"boots": {"oracle": "fashion_mnist", "data": "data/fashion-mnist"},
                  "boots_no_mixup": {"oracle": "fashion_mnist", "data": "data/fashion-mnist",
                                     "classifier": {"mixup_alpha": 0.0}},
                  "digits": {"oracle": "digits", "data": "benchmark/data/digits",
                             "prepare": {"val_fraction": 0.2, "test_fraction": 0.2}}},
    }


def test_the_repository_spec_is_valid_and_its_dvc_yaml_is_the_one_it_writes(tmp_path):
    spec = B.load_spec(REPO / "benchmark" / "params.yaml")
    assert len(spec.tasks) >= 6 and len(spec.seeds) >= 2 and spec.split in ("val", "test")
    text = B.HEADER + yaml.safe_dump(B.dvc_yaml(spec), sort_keys=False, width=120)
    assert (REPO / "benchmark" / "dvc.yaml").read_text() == text, \
        "benchmark/dvc.yaml is stale: run `python -m exaggerate.benchmark --write-dvc`"


def test_tasks_override_params_over_their_oracle_and_runs_get_the_seed_and_split(tmp_path):
    spec = B.load_spec(write_spec(tmp_path / "b.yaml", spec_dict()))
    cfg = B.task_config(spec, "digits", seed=1, params_path=REPO / "params.yaml")
    default = load_config(REPO / "params.yaml")
    assert cfg.base.dataset == "image_folder" and cfg.base.data_root == "benchmark/data/digits"
    assert cfg.base.target == "8" and cfg.base.resize == "resize" and cfg.prepare.val_fraction == 0.2
    assert cfg.explainer.seed == 1 and cfg.explain.split == "val"
    assert cfg.explainer.steps == default.explainer.steps  # untouched keys keep params.yaml's values
    no_mixup = B.task_config(spec, "boots_no_mixup", params_path=REPO / "params.yaml")
    assert no_mixup.classifier.mixup_alpha == 0.0 and no_mixup.base.target == default.base.target
    assert B.paths_for(spec, "boots", 1)["train_oracle"] == B.paths_for(spec, "boots_no_mixup", 0)["train_oracle"]
    assert B.paths_for(spec, "boots", 1)["prepare"] == B.paths_for(spec, "boots", 0)["prepare"]
    # An oracle's own `oracle` section reaches its training and every task it judges.
    assert not B.oracle_config(spec, "digits", REPO / "params.yaml").oracle.flip and not cfg.oracle.flip
    assert B.oracle_config(spec, "fashion_mnist", REPO / "params.yaml").oracle.flip


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(split="train"), "split"),
    (lambda s: s.update(seeds=[0, 0]), "seeds"),
    (lambda s: s["tasks"]["boots"].update(oracle="nope"), "tasks.boots.oracle"),
    (lambda s: s["tasks"]["boots"].pop("data"), "tasks.boots: missing key data"),
    (lambda s: s["tasks"]["boots"].update(classifier={"epochz": 3}), "'epochz'"),
    (lambda s: s["tasks"]["boots"].update(base={"image_size": 30}), "tasks.boots"),
    (lambda s: s["tasks"].update({"a/b": {"oracle": "digits", "data": "x"}}), "'a/b'"),
])
def test_a_bad_spec_is_refused_naming_the_file_and_key(tmp_path, change, message):
    s = spec_dict()
    change(s)
    path = write_spec(tmp_path / "b.yaml", s)
    with pytest.raises(B.BenchmarkError) as err:
        B.load_spec(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_the_dvc_graph_shares_upstream_per_task_and_the_oracle_per_dataset(tmp_path):
    spec = B.load_spec(write_spec(tmp_path / "b.yaml", spec_dict()))
    stages = B.dvc_yaml(spec)["stages"]
    assert {n for n in stages if n.startswith("run_")} == {f"run_{t}_s{s}" for t in spec.tasks for s in (0, 1)}
    assert {n for n in stages if n.startswith("oracle_")} == {"oracle_fashion_mnist", "oracle_digits"}
    run = stages["run_boots_s1"]
    assert "benchmark/runs/boots/classifier" in run["deps"]
    assert "benchmark/oracles/fashion_mnist/oracle.pt" in run["deps"]
    assert run["cmd"] == "exaggerate benchmark-stage run boots 1"
    assert "digits" in stages and stages["digits"]["outs"] == ["benchmark/data/digits"]
    # The report reads each task's bins (how many training images each holds).
    assert {f"benchmark/runs/{t}/bin" for t in spec.tasks} <= set(stages["report"]["deps"])
    # Switching val <-> test reruns the runs only, never a task's classifier and bins.
    spec_params = lambda st: [p for p in st["params"] if isinstance(p, dict)][0]["benchmark/params.yaml"]  # noqa: E731
    assert "split" in spec_params(run)
    assert "split" not in spec_params(stages["upstream_boots"])
    # The explainer's checkpoints outlive a rerun of its series; the series and scores do not.
    assert {"benchmark/runs/boots/s1/explainer": {"persist": True}} in run["outs"]
    assert {"benchmark/runs/boots/s1/explain", "benchmark/runs/boots/s1/evaluate"} <= {o for o in run["outs"] if isinstance(o, str)}


def test_the_digits_folder_holds_the_real_digits(tmp_path):
    counts = B.write_digits(tmp_path / "digits")
    assert counts == {str(d): 500 for d in range(10)}
    eights = sorted((tmp_path / "digits" / "8").iterdir())
    img = np.stack([np.asarray(Image.open(p)) for p in eights[:50]])
    assert img.shape == (50, 28, 28) and img.dtype == np.uint8 and img.max() == 255 and img.min() == 0
    # MNIST's digits are centred in their 28x28 frame: the border rows and columns are blank.
    assert img[:, :2].max() == 0 and img[:, :, :2].max() == 0 and img[:, 10:18, 10:18].mean() > 60
    B.write_digits(tmp_path / "digits")  # rewriting replaces the folder whole
    assert len(list((tmp_path / "digits" / "8").iterdir())) == counts["8"]
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no temporary folder left behind


def test_the_report_takes_mean_and_range_over_seeds_and_checks_each_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    spec = B.load_spec(write_spec(tmp_path / "b.yaml", spec_dict()))
    for seed, mae in ((0, 0.02), (1, 0.04)):
        m = {"explainer": {"compatibility_mae": mae, "monotonic_share": 1.0, "oracle_agreement": 0.8,
                           "fid_oracle": 5.0, "reconstruction_l1": 0.06},
             "baseline": {"fid_oracle": 9.0}, "real_images": {"oracle_agreement": 0.85},
             "speedup_explainer_vs_baseline": 150.0, "oracle_task_accuracy": 0.95}
        path = B.run_dir("boots", seed) / "evaluate" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(m))
    summary = R.summarise(spec)
    boots = summary["tasks"]["boots"]
    assert boots["seeds"] == [0, 1]
    assert boots["metrics"]["mae"] == {"mean": pytest.approx(0.03), "min": 0.02, "max": 0.04, "n": 2}
    assert boots["checks"]["MAE <= 0.05"] is True and boots["checks"]["recon L1 <= 0.05"] is False
    assert boots["checks"]["agreement >= 0.9 x real"] is True and boots["checks"]["speed-up >= 100x"] is True
    assert summary["tasks"]["digits"]["seeds"] == [] and summary["tasks"]["digits"]["checks"]["MAE <= 0.05"] is None
    text = R.table(summary)
    assert "| boots | 2 | 0.030 [0.020, 0.040] |" in text and "| digits | 0 | absent |" in text
    assert "| boots | 1 | 0.800 (0.94x) | 0.040 | 0.060 | 5 |" in text
    assert boots["seeds_split"] is False and "split" not in text.split("Seed by seed")[1]


def test_the_report_warns_when_the_seeds_split_and_shows_every_seeds_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    spec = B.load_spec(write_spec(tmp_path / "b.yaml", {**spec_dict(), "tasks": {
        "digits": spec_dict()["tasks"]["digits"]}}))
    for seed, agreement in ((0, 0.515), (1, 0.133)):  # the digits' test report of 2026-12-01
        run = B.run_dir("digits", seed)
        (run / "evaluate").mkdir(parents=True)
        (run / "evaluate" / "metrics.json").write_text(json.dumps(
            {"explainer": {"oracle_agreement": agreement}, "real_images": {"oracle_agreement": 0.68}}))
        Image.new("L", (8, 8), 40 * seed).save(run / "series_grid.png")
    monkeypatch.setattr(R, "REPORT", tmp_path / "report")
    monkeypatch.setattr("exaggerate.tracking.benchmark_run", _NoTracker)
    summary = R.report(spec)
    assert summary["tasks"]["digits"]["seeds_split"] is True
    text = (tmp_path / "report" / "report.md").read_text()
    assert "**digits: the seeds split.** Their oracle agreement spans 0.133 to 0.515" in text
    assert "| digits | 1 | 0.133 (0.20x) | absent | absent | absent |" in text
    assert sorted(p.name for p in (tmp_path / "report" / "grids").iterdir()) == ["digits.png", "digits_s1.png"]
    assert "[digits seed 1](grids/digits_s1.png)" in text
    # A spread below a quarter of the real images' agreement is no split.
    assert R.seeds_split({"agreement": {"min": 0.63, "max": 0.74, "n": 2}, "real_agreement": {"mean": 0.81}}) is False


def test_the_report_names_a_seed_that_does_not_keep_the_query(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    spec = B.load_spec(write_spec(tmp_path / "b.yaml", {**spec_dict(), "tasks": {
        "boots": spec_dict()["tasks"]["boots"]}}))
    # T-shirt/shirt in the test report of 2026-12-05; the median image's L1 as on its test images.
    for seed, recon in ((0, 0.088), (1, 0.319)):
        path = B.run_dir("boots", seed) / "evaluate" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"explainer": {"oracle_agreement": 0.77, "reconstruction_l1": recon,
                                                  "median_image_l1": 0.261, "query_kept": recon < 0.5 * 0.261},
                                    "real_images": {"oracle_agreement": 0.70}}))
    summary = R.summarise(spec)
    assert summary["tasks"]["boots"]["query_lost"] == [1] and summary["tasks"]["boots"]["seeds_split"] is False
    text = R.table(summary)
    assert ("**boots: seed 1 does not keep the query.** G reconstructs the queries at L1 0.319, 1.22 of the 0.261 "
            "that one constant image") in text
    assert "seed 0 does not keep" not in text
    # Read back from summary.json (seed keys become strings), the warning is the same.
    assert R.table(json.loads(json.dumps(summary))) == text


def test_the_report_counts_each_bins_training_images_and_names_empty_bins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    spec = B.load_spec(write_spec(tmp_path / "b.yaml", spec_dict()))
    # The upstream bin stage's metrics: the digits as f binned MNIST's 8s and 3s on 2026-12-07.
    for task, counts in (("boots", [3987, 20, 25, 26, 17, 24, 16, 31, 58, 5000]),
                         ("digits", [300, 0, 0, 0, 0, 0, 0, 0, 0, 285])):
        path = B.task_dir(task) / "bin" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"bins": [{"bin": k, "selected": c} for k, c in enumerate(counts)]}))
    summary = R.summarise(spec)
    assert summary["tasks"]["digits"]["bin_images"] == [300, 0, 0, 0, 0, 0, 0, 0, 0, 285]
    assert summary["tasks"]["boots_no_mixup"]["bin_images"] is None  # no bin stage run yet
    text = R.table(summary)
    assert "| boots | 3987 | 20 | 25 | 26 | 17 | 24 | 16 | 31 | 58 | 5000 |" in text
    assert "**digits: bins 1-8 hold no training image.** The bin stage kept none: f puts none" in text
    bins_part = text.split("Training images per")[1].split("What a series costs")[0]
    assert "boots: bin" not in text and "boots_no_mixup |" not in bins_part
    assert R.bins_text([4]) == "bin 4" and R.bins_text([1, 2, 3, 6, 8, 9]) == "bins 1-3, 6 and 8-9"


class _NoTracker:
    """benchmark_run without an MLflow store: the report's files are what this test reads."""
    def __init__(self, *args):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def metrics(self, values):
        pass

    def artifact(self, *args):
        pass


@pytest.mark.slow
def test_the_benchmark_runs_through_dvc_and_reruns_only_what_a_change_reaches(tmp_path_factory):
    from test_pipeline import make_project, run, tiny_params
    import os
    import sys

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_COMMITTER_NAME="t",
               GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_EMAIL="t@example.invalid")
    root = make_project(tmp_path_factory.mktemp("bench"), env, tiny_params())
    s = spec_dict()
    del s["tasks"]["boots_no_mixup"]
    s["tasks"]["digits"]["classifier"] = {"epochs": 3}
    write_spec(root / "benchmark" / "params.yaml", s)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "benchmark spec"], root, env)
    out = run(["exaggerate", "benchmark"], root, env)
    assert ran_stages(out.stdout) == {"digits", "oracle_fashion_mnist", "oracle_digits", "upstream_boots",
                                      "upstream_digits", "run_boots_s0", "run_boots_s1", "run_digits_s0",
                                      "run_digits_s1", "report"}
    report = (root / "benchmark" / "report" / "report.md").read_text()
    assert "| boots | 2 |" in report and "| digits | 2 |" in report
    summary = json.loads((root / "benchmark" / "report" / "summary.json").read_text())
    for task in ("boots", "digits"):
        mae = summary["tasks"][task]["metrics"]["mae"]
        assert mae["n"] == 2 and 0 <= mae["min"] <= mae["max"] <= 1
        assert (root / "benchmark" / "report" / "grids" / f"{task}.png").is_file()
    judged = json.loads((root / "benchmark" / "runs" / "digits" / "s0" / "oracle.json").read_text())
    assert judged["task_classes"] == ["8", "3"] and judged["task_images"] > 0
    # Seeds of one task share its classifier; the seeds' explainers differ.
    g0, g1 = (root / "benchmark" / "runs" / "boots" / f"s{k}" / "explainer" / "generator.pt" for k in (0, 1))
    assert g0.read_bytes() != g1.read_bytes()
    # The speed-up of one task, timed with another task's G standing in for its own (same
    # architecture), on the task's validation queries; an unknown task is refused by name.
    bench = [sys.executable, str(REPO / "scripts" / "bench_speedup.py"), "--queries", "3", "--batches", "1", "3",
             "--repeats", "1"]
    out = run([*bench, "--task", "digits", "--generator", str(g0)], root, env)
    assert f"task digits: 3 val queries, G from {g0}" in out.stdout
    assert re.findall(r"^\s*(\d+) per call: explainer", out.stdout, re.M) == ["1", "3"]
    assert re.search(r"the explainer ran G on [\d.]+ images", out.stdout)
    # A stand-in's G passes are bounded by every probe and every bin: a bound below the measured ratio.
    bound = re.search(r"G is a stand-in: ([\d.]+) G passes per series of the (\d+) a series can take; .* "
                      r"([\d.]+) times faster", out.stdout)
    measured = float(re.search(r"each at its fastest: .*: ([\d.]+) times faster", out.stdout).group(1))
    assert float(bound.group(1)) <= int(bound.group(2))
    assert float(bound.group(3)) <= measured + 0.1
    # The baseline's stall stop, checked on the task's queries without any G.
    out = run([*bench, "--task", "digits", "--stall"], root, env)
    assert "task digits: 3 val queries\n" in out.stdout
    shares = re.findall(r": ([\d.]+) of 30 bin images reached, ([\d.]+) Adam steps per bin image", out.stdout)
    assert len(shares) == 2 and float(shares[1][0]) <= float(shares[0][0]) and float(shares[1][1]) <= float(shares[0][1])
    lost = re.search(r"the stop loses (\d+) of the (\d+) bin images the full search reaches", out.stdout)
    assert int(lost.group(2)) == round(float(shares[0][0]) * 30) and int(lost.group(1)) <= int(lost.group(2))
    out = run([*bench, "--task", "shoes"], root, env, check=False)
    assert out.returncode != 0 and "no task 'shoes' under tasks" in out.stderr
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "benchmark run"], root, env)
    # A change to one task's overrides reaches that task and the report, nothing else (the dry run
    # names what a run would redo, and runs nothing).
    s["tasks"]["digits"]["classifier"] = {"epochs": 2}
    write_spec(root / "benchmark" / "params.yaml", s)
    out = run(["exaggerate", "benchmark", "--dry-run"], root, env)
    assert planned(out.stdout) == ["upstream_digits", "run_digits_s0", "run_digits_s1", "report"]
    s["tasks"]["digits"]["classifier"] = {"epochs": 3}
    # Switching to the test split redoes the series and their scores, not the training: a run
    # resumes its explainer from the checkpoints instead of training it again.
    s["split"] = "test"
    write_spec(root / "benchmark" / "params.yaml", s)
    out = run(["exaggerate", "benchmark", "--dry-run"], root, env)
    assert planned(out.stdout) == ["run_boots_s0", "run_boots_s1", "run_digits_s0", "run_digits_s1", "report"]
    out = run(["dvc", "repro", "--single-item", "benchmark/dvc.yaml:run_digits_s1"], root, env)
    assert ran_stages(out.stdout) == {"run_digits_s1"}
    assert "resuming explainer training at step" in out.stdout
    assert json.loads((root / "benchmark/runs/digits/s1/explain/metrics.json").read_text())["split"] == "test"
    # A bad spec stops with the file and key named, before DVC runs anything.
    s["tasks"]["digits"]["oracle"] = "mnist"
    write_spec(root / "benchmark" / "params.yaml", s)
    out = run(["exaggerate", "benchmark"], root, env, check=False)
    assert out.returncode == 2 and "tasks.digits.oracle" in out.stderr and "Traceback" not in out.stderr
    shutil.rmtree(root / "benchmark" / "runs")


def test_prepare_store_creates_a_new_sqlite_store_once_for_parallel_stages(tmp_path, monkeypatch):
    # Two stages opening a store that does not exist yet race on its schema migrations; the
    # benchmark opens it first, after which any number of processes can use it.
    import sqlite3

    from exaggerate.tracking import prepare_store

    db = tmp_path / "fresh" / "mlflow.db"
    db.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert not db.exists()
    assert prepare_store() == f"sqlite:///{db}"
    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    assert {"experiments", "runs", "metrics", "alembic_version"} <= tables
    procs = [subprocess.Popen([sys.executable, "-c", "from exaggerate.tracking import prepare_store; prepare_store()"],
                              env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]


def test_the_report_says_what_holds_a_speed_up_below_100x(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    spec = B.load_spec(write_spec(tmp_path / "b.yaml", spec_dict()))
    for task, speedup, steps in (("boots", 150.0, 200.0), ("digits", 12.0, 20.0)):
        for seed in (0, 1):
            m = {"explainer": {"oracle_agreement": 0.8}, "real_images": {"oracle_agreement": 0.85},
                 "speedup_explainer_vs_baseline": speedup,
                 "explainer_on_baseline_queries": {"seconds_per_series": 0.011},
                 "baseline": {"seconds_per_series": 0.011 * speedup},
                 "cost_per_series": {"generator_mflops_per_image": 55.0, "classifier_mflops_per_image": 9.0 + seed,
                                     "explainer": {"generator_images": 12.0, "classifier_images": 4.0,
                                                   "gflop_per_s": 60.0},
                                     "baseline": {"classifier_images": 10 * (steps + 1), "steps_per_image": steps,
                                                  "gflop_per_s": 40.0},
                                     "flops_ratio": 3 * 10 * (steps + 1) * 9.0 / (12 * 55.0 + 4 * 9.0)}}
            path = B.run_dir(task, seed) / "evaluate" / "metrics.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(m))
    summary = R.summarise(spec)
    assert summary["tasks"]["digits"]["cost"]["f_mflops"] == {"mean": 9.5, "min": 9.0, "max": 10.0, "n": 2}
    text = R.table(summary)
    assert "| digits | 11 | 132 | 12.0 | 4.0 | 210 | 20 | 55 | 9.5 | 8 | 60 | 40 |" in text
    assert "**digits: 12x**, made of a FLOP ratio of 8 and FLOP rates of 60 (explainer) against 40" in text
    assert "reaches its bins in 20 Adam steps per image (210 f passes per series)" in text
    assert "G that costs 5.8x f per image" in text and "The FLOPs fall short." in text
    assert text.count("Where the FLOPs fall short:") == 1
    assert "**boots:" not in text  # 150x: nothing to explain
    # FLOPs that would allow 100x, a FLOP rate that does not.
    rates = {"metrics": {"speedup": {"mean": 80.0}}, "cost": {k: {"mean": v} for k, v in dict(
        flops_ratio=200.0, e_rate=20.0, b_rate=50.0, b_steps=90.0, b_images=900.0, g_images=12.0, g_mflops=55.0,
        f_mflops=9.0).items()}}
    assert R.speedup_limit("slow", rates).endswith("The FLOPs would allow 200x; the explainer's FLOP rate, "
                                                   "0.4x the baseline's, takes it below 100x.")
    # Two tasks short of FLOPs: the general reason is given once, after both.
    slow = dict(rates, cost={**rates["cost"], "flops_ratio": {"mean": 30.0}})
    lines = R.cost_table({"tasks": {"a": slow, "b": slow}})
    assert sum(line.endswith("The FLOPs fall short.") for line in lines) == 2
    assert lines[-1].startswith("Where the FLOPs fall short:")
    assert not any(line.startswith("Where the FLOPs") for line in R.cost_table({"tasks": {"slow": rates}}))
    # Runs evaluated before the cost figures existed: absent, and no sentence.
    assert R.speedup_limit("old", {"metrics": {"speedup": {"mean": 50.0}}, "cost": {}}) is None
