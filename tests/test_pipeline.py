"""End to end: the real DVC pipeline on a tiny fake Fashion-MNIST, MLflow runs, an S3 remote
(moto's server on 127.0.0.1), killing and resuming training, and the notebooks."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fakes import make_fashion

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "base": {"threads": 1},
    "classifier": {"growth_rate": 4, "block_config": [1, 1], "num_init_features": 8, "epochs": 1,
                   "batch_size": 32, "grid_images": 4},
    "bin": {"per_bin": 60},
    "explainer": {"generator_widths": [8, 16], "discriminator_widths": [8, 16], "n_critic": 1, "batch_size": 8,
                  "steps": 6, "checkpoint_every": 2, "log_every": 2, "image_every": 3, "grid_queries": 2},
    "explain": {"num_queries": 12, "strips": 2, "batch_size": 8},
    # A higher peak rate than the default: the cosine decay leaves 60 steps too little to learn at 1e-3.
    "oracle": {"widths": [8, 16], "feature_dim": 16, "epochs": 1, "min_steps": 60, "batch_size": 64, "max_train": 200,
               "lr": 0.003},
    "evaluate": {"baseline_queries": 6, "baseline_steps": 20, "cout_steps": 5, "batch_size": 6},
    "tune": {"study_name": "explainer-weights", "n_trials": 3, "workers": 2, "trial_steps": 4, "eval_every": 2,
             "val_queries": 8, "startup_trials": 1, "prune_after": 0, "heartbeat_s": 1, "tune_lr": False},
}


def tiny_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    return params


def run(cmd, cwd, env, check=True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w]+)'", output))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    e["DVC_NO_ANALYTICS"] = "1"
    e["GIT_AUTHOR_NAME"] = e["GIT_COMMITTER_NAME"] = "test"
    e["GIT_AUTHOR_EMAIL"] = e["GIT_COMMITTER_EMAIL"] = "test@example.invalid"
    return e


def make_project(root: Path, env: dict, params: dict) -> Path:
    """A git + DVC project laid out like this repository, with the given params and fake data."""
    for name in ("dvc.yaml", ".dvcignore", "src", "notebooks"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    (root / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copy(REPO / ".dvc" / ".gitignore", root / ".dvc" / ".gitignore")
    (root / ".gitignore").write_text("mlflow.db\n__pycache__/\n")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    make_fashion(root / "data" / "fashion-mnist")
    run(["git", "init", "-q", "-b", "main"], root, env)
    run(["dvc", "add", "-q", "data"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tiny project"], root, env)
    return root


def project_tracking_uri(root: Path) -> str:
    return f"sqlite:///{root.parent / 'project-mlflow.db'}"


@pytest.fixture(scope="module")
def project(tmp_path_factory, env) -> Path:
    """The tiny project after a full `dvc repro`."""
    root = make_project(tmp_path_factory.mktemp("project"), env, tiny_params())
    # The pipeline's own MLflow store: runs that other tests make elsewhere never mix with it.
    out = run(["dvc", "repro"], root, {**env, "MLFLOW_TRACKING_URI": project_tracking_uri(root)})
    assert ran_stages(out.stdout) == {"prepare", "train_classifier", "posteriors", "bin", "train_explainer", "explain",
                                      "train_oracle", "evaluate", "register"}
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "pipeline run"], root, env)
    return root


def test_pipeline_outputs(project):
    for path in ("outputs/prepare/splits.json", "outputs/classifier/model.pt", "outputs/classifier/metrics.json",
                 "outputs/posteriors/posteriors.csv", "outputs/bin/explainer_inputs.csv",
                 "outputs/bin/reliability.png", "outputs/explainer/generator.pt",
                 "outputs/explainer/series_grid.png", "outputs/explain/series.npz",
                 "outputs/explain/series.json", "outputs/explain/metrics.json", "outputs/explain/series_grid.png"):
        assert (project / path).is_file(), path
    assert len(list((project / "outputs/explain/strips").glob("*.png"))) == 2
    import json
    m = json.loads((project / "outputs/explain/metrics.json").read_text())
    assert m["queries"] == 12 and 0 <= m["compatibility_mae"] <= 1
    # Calibrated series (explain.probes in params.yaml): each generated at recorded conditions,
    # non-decreasing along the series and inside the generator's range of bins.
    table = json.loads((project / "outputs/explain/series.json").read_text())
    assert table["probes"] == tiny_params()["explain"]["probes"] >= 2
    for q in table["queries"]:
        t = q["conditions"]
        assert len(t) == 10 and 0 <= t[0] and t[-1] <= 9 and all(a <= b for a, b in zip(t, t[1:]))


def test_second_repro_does_nothing(project, env):
    out = run(["dvc", "repro"], project, env)
    assert ran_stages(out.stdout) == set()
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project, env).stdout


def test_metrics_show_lists_stage_metrics(project, env):
    out = run(["dvc", "metrics", "show"], project, env).stdout
    assert "outputs/classifier/metrics.json" in out and "compatibility_mae" in out


def _pipeline_runs(env):
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["exaggerate"], output_format="list")
    parents = [r for r in runs if "exaggerate.pipeline" in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_mlflow_runs_are_recorded(project, env):
    import mlflow

    parents, children = _pipeline_runs({**env, "MLFLOW_TRACKING_URI": project_tracking_uri(project)})
    # One parent run for the pipeline execution, the eight stages' runs nested under it.
    assert len(parents) == 1
    parent = parents[0]
    stages = {r.data.tags["dvc_stage"]: r for r in children if r.data.tags["mlflow.parentRunId"] == parent.info.run_id}
    assert set(stages) == {"train_classifier", "posteriors", "bin", "train_explainer", "explain", "train_oracle",
                           "evaluate", "register"}
    assert len(parent.data.tags["git_commit"]) >= 40 and parent.data.tags["dvc_experiment"] == "workspace"
    assert parent.data.params["explainer.steps"] == "6"  # every parameter, for the UI's comparison table
    # The headline metrics on the parent, equal to evaluate's.
    import json
    m = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    assert parent.data.metrics["mae"] == pytest.approx(m["explainer"]["compatibility_mae"])
    assert parent.data.metrics["speedup"] == pytest.approx(m["speedup_explainer_vs_baseline"])
    assert {"monotone", "oracle_agreement", "fid_oracle", "reconstruction_l1"} <= set(parent.data.metrics)
    clf = stages["train_classifier"]
    assert {"train_loss", "val_loss", "val_roc_auc", "test_roc_auc", "test_brier"} <= set(clf.data.metrics)
    assert clf.data.params["classifier.epochs"] == "1"
    client = mlflow.MlflowClient()
    assert {"reliability.png", "val_grid.png", "params.yaml"} <= {a.path for a in client.list_artifacts(clf.info.run_id)}
    gan = stages["train_explainer"]
    assert {"d_adversarial", "d_total", "g_adversarial", "g_classifier", "g_classifier_cycle", "g_cycle",
            "g_embedding", "g_reconstruction", "g_total"} <= set(gan.data.metrics)
    series = {a.path for a in client.list_artifacts(gan.info.run_id, "series")}
    assert "series/step_00000003.png" in series and "series/step_00000006.png" in series
    ev = stages["evaluate"]
    assert {"explainer_compatibility_mae", "baseline_compatibility_mae", "speedup"} <= set(ev.data.metrics)
    assert {"results.md", "compatibility.png", "series_comparison.png"} <= {
        a.path for a in client.list_artifacts(ev.info.run_id)}


def test_a_rerun_stage_joins_its_pipeline_and_an_experiment_gets_its_own(project, env, tmp_path):
    work = tmp_path / "exp"
    shutil.copytree(project, work)
    e = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    run([str(BIN / "exaggerate"), "stage", "evaluate"], work, e)
    run([str(BIN / "exaggerate"), "stage", "evaluate"], work, e)
    parents, children = _pipeline_runs(e)
    assert len(parents) == 1 and len(children) == 2  # the same code and params: the same parent
    # An experiment reruns two stages; dvc.lock is rewritten between them, and both join one parent.
    out = run(["dvc", "exp", "run", "-n", "fewer", "-S", "explain.num_queries=10"], work, e)
    assert ran_stages(out.stdout) == {"explain", "evaluate", "register"}
    parents, children = _pipeline_runs(e)
    exp = [p for p in parents if p.data.tags["dvc_experiment"] == "fewer"]
    assert len(parents) == 2 and len(exp) == 1 and exp[0].data.params["explain.num_queries"] == "10"
    assert sorted(c.data.tags["dvc_stage"] for c in children
                  if c.data.tags["mlflow.parentRunId"] == exp[0].info.run_id) == ["evaluate", "explain", "register"]
    assert "mae" in exp[0].data.metrics


def test_evaluation_outputs(project):
    import json
    m = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    fid_weight = yaml.safe_load((project / "params.yaml").read_text())["tune"]["fid_weight"]
    for method in ("explainer", "baseline"):
        assert 0 <= m[method]["compatibility_mae"] <= 1 and 0 <= m[method]["flip_rate"] <= 1
        assert m[method]["seconds_per_series"] > 0
        assert m[method]["tuning_objective"] == pytest.approx(
            m[method]["compatibility_mae"] + fid_weight * m[method]["fid_oracle"])
    assert m["speedup_explainer_vs_baseline"] > 1
    assert "fva" in m["absent"] and "mnac" in m["absent"]
    table = (project / "outputs/evaluate/results.md").read_text()
    assert "| flip rate" in table and "baseline (6 queries)" in table
    # What the speed-up is made of: G's passes and the baseline's steps, with the FLOPs of both.
    cost = m["cost_per_series"]
    assert cost["explainer"]["generator_images"] > 0 and cost["explainer"]["classifier_images"] > 0
    assert cost["baseline"]["steps_per_image"] <= cost["baseline"]["steps_per_image_max"]
    assert cost["generator_mflops_per_image"] > 0 and cost["classifier_mflops_per_image"] > 0
    assert cost["flops_ratio"] > 0 and "What a series costs" in table
    assert (project / "outputs/evaluate/oracle_agreement.png").stat().st_size > 0
    # Whether G keeps the query, against one constant image's reconstruction, in both files.
    e = m["explainer"]
    assert e["query_kept"] == (e["reconstruction_l1"] < 0.5 * e["median_image_l1"]) and e["median_image_l1"] > 0
    assert ("keeps the query" if e["query_kept"] else "G does not keep the query") in table
    assert len(m["explainer"]["oracle_curve"]) == len(m["real_images"]["oracle_curve"]) == 10
    real = m["real_images"]
    assert real["split"] == "test" and sum(real["per_bin"]) == real["images"] > 0
    if real["oracle_agreement"] is not None:  # None only when f puts all real images in one bin
        assert -1 <= real["oracle_agreement"] <= 1 and "what real data reaches" in table
        # The explainer's agreement as a share of the real images', with its sentence.
        if real["oracle_agreement"] > 0 and e.get("oracle_agreement") is not None:
            assert e["oracle_agreement_share"] == pytest.approx(e["oracle_agreement"] / real["oracle_agreement"])
            assert e["oracle_reads_change"] == (e["oracle_agreement_share"] >= 0.9)
            assert ("reads the series' change as the class's" if e["oracle_reads_change"]
                    else "The oracle reads less class change than f does") in table


def test_evaluation_reports_the_papers_series_and_the_oracle_gate(project):
    import json
    m = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    paper = m["explainer_paper_series"]
    assert 0 <= paper["compatibility_mae"] <= 1 and len(paper["compatibility_curves"]) >= 1
    assert m["oracle_task_accuracy"] >= m["oracle_gate"] == 0.9 and "fid_oracle" in paper
    oracle = json.loads((project / "outputs/oracle/metrics.json").read_text())
    assert oracle["epochs"] == 15  # 200 images in batches of 64: 4 steps an epoch; min_steps 60 needs 15
    table = (project / "outputs/evaluate/results.md").read_text()
    assert "the paper's series (12 queries)" in table and "gate evaluate.oracle_gate 0.9: passed" in table


def test_a_weak_oracle_judges_nothing(project, env, tmp_path):
    import json
    work = tmp_path / "weak"
    shutil.copytree(project, work)
    path = work / "outputs/oracle/metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "task_accuracy": 0.54}))
    run([str(BIN / "exaggerate"), "stage", "evaluate"], work, env)
    m = json.loads((work / "outputs/evaluate/metrics.json").read_text())
    reason = next(v for k, v in m["absent"].items() if k.startswith("oracle-based metrics"))
    assert "0.5400, below evaluate.oracle_gate 0.9" in reason
    for method in ("explainer", "explainer_paper_series", "baseline"):
        assert not {"oracle_agreement", "fid_oracle", "sfid_oracle", "tuning_objective"} & {
            k for k, v in m[method].items() if v is not None}, method
        assert 0 <= m[method]["compatibility_mae"] <= 1  # what needs no oracle is still there
    assert m["real_images"]["oracle_agreement"] is None
    assert "FAILED: oracle-based metrics refused" in (work / "outputs/evaluate/results.md").read_text()


def test_bench_speedup_times_both_methods_at_each_batch_size(project, env):
    out = run([sys.executable, str(REPO / "scripts" / "bench_speedup.py"), "--queries", "4", "--batches", "1", "2",
               "--repeats", "1", "--unfolded"], project, env, timeout=600)
    rows = re.findall(r"^\s*(\d+) per call: explainer\s+([\d.]+) ms/series, baseline\s+([\d.]+) s/series, "
                      r"ratio\s+([\d.]+)\s+\(unfolded G\s+([\d.]+) ms/series", out.stdout, re.M)
    assert [r[0] for r in rows] == ["1", "2"]
    for _, exp_ms, base_s, ratio, unfolded_ms in rows:
        assert float(exp_ms) > 0 and float(base_s) > 0 and float(unfolded_ms) > 0
        # baseline s / explainer ms, up to the rounding of the printed figures
        assert float(ratio) == pytest.approx(float(base_s) * 1000 / float(exp_ms), rel=0.15, abs=0.5)
    assert "each at its fastest:" in out.stdout
    assert re.search(r"What a series costs .* the explainer ran G on [\d.]+ images", out.stdout)
    assert re.search(r"a ratio of \d+; the time ratio, \d+, is that times", out.stdout)


def test_changing_one_stage_parameter_reruns_it_and_descendants_only(project, env, tmp_path):
    work = tmp_path / "work"
    run(["git", "clone", "-q", str(project), str(work)], tmp_path, env)
    shutil.copytree(project / ".dvc" / "cache", work / ".dvc" / "cache")
    run(["dvc", "checkout", "-q"], work, env)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["bin"]["per_bin"] = 40
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], work, env)
    assert ran_stages(out.stdout) == {"bin", "train_explainer", "explain", "evaluate", "register"}


@pytest.fixture
def s3_server(env):
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_s3_push_pull_round_trip(project, env, s3_server, tmp_path):
    import boto3

    s3env = {**env, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="exaggerate")
    src = tmp_path / "src"
    run(["git", "clone", "-q", str(project), str(src)], tmp_path, env)
    shutil.copytree(project / ".dvc" / "cache", src / ".dvc" / "cache")
    run(["dvc", "checkout", "-q"], src, env)
    run(["dvc", "remote", "add", "-d", "store", "s3://exaggerate/cache"], src, env)
    run(["dvc", "remote", "modify", "store", "endpointurl", s3_server], src, env)
    run(["git", "commit", "-qam", "remote"], src, env)
    run(["dvc", "push"], src, s3env)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(src), str(clone)], tmp_path, env)
    assert not (clone / "outputs" / "explainer" / "generator.pt").exists()
    run(["dvc", "pull"], clone, s3env)
    tracked = [p.relative_to(src) for p in (src / "outputs").rglob("*") if p.is_file()]
    tracked += [p.relative_to(src) for p in (src / "data").rglob("*") if p.is_file()]
    assert len(tracked) > 15
    for rel in tracked:
        if "checkpoints" in rel.parts:
            continue  # persistent training state is cached, but only the last run's is pulled
        assert (clone / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env).stdout


def test_killed_training_resumes_from_last_checkpoint(project, env, tmp_path):
    work = tmp_path / "kill"
    shutil.copytree(project, work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["explainer"].update(steps=100000, checkpoint_every=3, image_every=100000, log_every=1)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # not the project's runs
    proc = subprocess.Popen([str(BIN / "exaggerate"), "stage", "train_explainer"], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = lambda: sorted(work.glob("outputs/explainer/checkpoints/*/step-*.pt"))  # noqa: E731
    original = set(ckpts())
    deadline = time.time() + 240
    while time.time() < deadline and not (set(ckpts()) - original and max(ckpts()).name > "step-00000012.pt"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    import torch

    last = max(ckpts())
    step = torch.load(last, weights_only=True)["step"]
    assert step >= 12
    params["explainer"]["steps"] = step + 3
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([str(BIN / "exaggerate"), "stage", "train_explainer"], work, env)
    assert f"resuming explainer training at step {step}" in out.stdout
    import json
    assert json.loads((work / "outputs/explainer/metrics.json").read_text())["steps"] == step + 3


def test_explain_command_on_user_files(project, env, tmp_path):
    import numpy as np
    from PIL import Image

    boot = np.zeros((60, 60), dtype=np.uint8)
    boot[10:50, 12:34] = 210
    boot[38:50, 12:50] = 220
    Image.fromarray(boot).save(tmp_path / "my boot.png")
    Image.fromarray(np.stack([boot] * 3, -1)).convert("RGB").save(tmp_path / "colour.jpg")
    out = run([str(BIN / "exaggerate"), "explain", str(tmp_path / "my boot.png"), "--out", str(tmp_path / "out")],
              project, env)
    assert "p=" in out.stdout
    import json
    res = json.loads((tmp_path / "out" / "posteriors.json").read_text())
    assert len(res["images"][0]["p_series"]) == 10 and len(res["images"][0]["conditions"]) == 10
    assert (tmp_path / "out" / "my_boot_series.png").stat().st_size > 1000
    # Two inputs with one basename keep one strip each, and posteriors.json says which is which.
    for folder, flip in (("a", False), ("b", True)):
        (tmp_path / folder).mkdir()
        Image.fromarray(boot[:, ::-1] if flip else boot).save(tmp_path / folder / "boot.png")
    run([str(BIN / "exaggerate"), "explain", str(tmp_path / "a/boot.png"), str(tmp_path / "b/boot.png"), "--out",
         str(tmp_path / "twins")], project, env)
    twins = json.loads((tmp_path / "twins" / "posteriors.json").read_text())["images"]
    assert [Path(t["strip"]).name for t in twins] == ["boot_series.png", "boot-2_series.png"]
    assert all(Path(t["strip"]).stat().st_size > 1000 for t in twins)
    assert (tmp_path / "twins/boot_series.png").read_bytes() != (tmp_path / "twins/boot-2_series.png").read_bytes()

    bad = run([str(BIN / "exaggerate"), "explain", str(tmp_path / "colour.jpg"), "--out", str(tmp_path / "o2")],
              project, env, check=False)
    assert bad.returncode == 2 and "colour.jpg: image has 3 channels" in bad.stderr and "--convert" in bad.stderr
    assert not (tmp_path / "o2").exists()
    ok = run([str(BIN / "exaggerate"), "explain", str(tmp_path / "colour.jpg"), "--convert", "--out",
              str(tmp_path / "o2")], project, env)
    assert ok.returncode == 0
    (tmp_path / "broken.png").write_bytes(b"nope")
    bad = run([str(BIN / "exaggerate"), "explain", str(tmp_path / "broken.png"), "--out", str(tmp_path / "o3")],
              project, env, check=False)
    assert bad.returncode == 2 and f"cannot read image {tmp_path / 'broken.png'}" in bad.stderr
    Image.fromarray(boot[:5, :5]).save(tmp_path / "tiny.png")
    bad = run([str(BIN / "exaggerate"), "explain", str(tmp_path / "tiny.png"), "--out", str(tmp_path / "o4")],
              project, env, check=False)
    assert bad.returncode == 2 and "tiny.png: image is 5x5 pixels" in bad.stderr


def test_notebooks_execute_against_the_run(project, env, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", project_tracking_uri(project))  # the kernel's: the run's registry

    notebooks = sorted((REPO / "notebooks").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(project)}}).execute()
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, path
        # Importing the library must leave the notebook's inline backend alone: plots are shown.
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if "image/png" in o.get("data", {})]
        assert images, f"{path.name} displayed no figure"


def test_evaluation_refuses_mismatched_runs(project, monkeypatch):
    import dataclasses

    import torch
    import torch.nn as nn

    from exaggerate.classifier import BlackBox, load_classifier
    from exaggerate.config import load_config
    from exaggerate.datasets import open_dataset
    from exaggerate.evaluate import EvaluationError, load_series

    monkeypatch.chdir(project)
    cfg = load_config("params.yaml")
    ds = open_dataset(cfg.base)
    f = load_classifier("outputs/classifier", cfg.base)
    path = project / "outputs/explain/series.npz"
    data = load_series(path, ds, f, cfg.base.num_bins, cfg.base.image_size, torch.device("cpu"))
    assert len(data["ids"]) == 12

    class Other(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 1), 0.5)
    with pytest.raises(EvaluationError, match="made with another classifier"):
        load_series(path, ds, BlackBox(Other(), ["t"], 32, 1, output="probability"), 10, 32, torch.device("cpu"))
    with pytest.raises(EvaluationError, match="series of 10 bins but base.num_bins is 5"):
        load_series(path, ds, f, 5, 32, torch.device("cpu"))
    other_task = open_dataset(dataclasses.replace(cfg.base, target="Sandal", negatives=["Sneaker"]))
    with pytest.raises(EvaluationError, match="query ids do not match the dataset"):
        load_series(path, other_task, f, 10, 32, torch.device("cpu"))


def test_sweep_repeats_the_pipeline_run_per_seed_and_resumes(project, env, tmp_path):
    import json

    out_dir = tmp_path / "sweep"
    cmd = [str(BIN / "exaggerate"), "sweep", "--setting", "same", "--setting",
           "g1:explainer.lambda_gan=1,explainer.augment=none", "--seeds", "0", "1", "--workers", "2",
           "--out", str(out_dir)]
    out = run(cmd, project, env)
    assert "2 settings x 2 seeds; 0 runs already done, 4 to run with 2 worker(s)" in out.stdout
    rows = {r["tag"]: r for r in json.loads((out_dir / "rows.json").read_text())}
    assert sorted(rows) == ["g1_s0", "g1_s1", "same_s0", "same_s1"]
    # Seed 0 with params.yaml unchanged trains the pipeline's own generator, to the bit (same threads,
    # same seeds); sweeps compare settings on validation queries, never on the test split.
    assert (out_dir / "runs/same_s0/explainer/generator.pt").read_bytes() == \
        (project / "outputs/explainer/generator.pt").read_bytes()
    for tag in rows:
        assert json.loads((out_dir / "runs" / tag / "explain/metrics.json").read_text())["split"] == "val"
        assert json.loads((out_dir / "runs" / tag / "evaluate/metrics.json").read_text())["real_images"]["split"] == "val"
    assert rows["same_s1"]["reconstruction_l1"] != rows["same_s0"]["reconstruction_l1"]
    assert rows["g1_s0"]["reconstruction_l1"] != rows["same_s0"]["reconstruction_l1"]
    g1 = yaml.safe_load((out_dir / "runs/g1_s1/params.yaml").read_text())["explainer"]
    assert g1["augment"] == "none" and g1["lambda_gan"] == 1 and g1["seed"] == 1
    summary = json.loads((out_dir / "summary.json").read_text())
    mae = [rows["same_s0"]["compatibility_mae"], rows["same_s1"]["compatibility_mae"]]
    assert summary["same"]["metrics"]["compatibility_mae"] == pytest.approx(
        {"mean": sum(mae) / 2, "min": min(mae), "max": max(mae)})
    assert "| g1 | 2 |" in (out_dir / "summary.md").read_text()
    # A rerun with one more seed runs only the new pairs.
    again = run(cmd[:-6] + ["0", "1", "2", "--workers", "1", "--out", str(out_dir)], project, env)
    assert "4 runs already done, 2 to run" in again.stdout
    assert len(json.loads((out_dir / "rows.json").read_text())) == 6
    # A finished run whose setting has changed since is run again, not reused.
    changed = run([str(BIN / "exaggerate"), "sweep", "--setting", "g1:explainer.lambda_gan=2,explainer.augment=none",
                   "--seeds", "0", "--out", str(out_dir)], project, env)
    assert "g1_s0 finished under other settings; running it again" in changed.stdout
    assert "0 runs already done, 1 to run" in changed.stdout
    rerun = {r["tag"]: r for r in json.loads((out_dir / "rows.json").read_text())}["g1_s0"]
    assert rerun["reconstruction_l1"] != rows["g1_s0"]["reconstruction_l1"]
    bad = run([str(BIN / "exaggerate"), "sweep", "--setting", "x:explainer.lambda_gann=1", "--out",
               str(tmp_path / "bad")], project, env, check=False)
    assert bad.returncode == 2 and "sweep setting 'x'" in bad.stderr and "lambda_gann" in bad.stderr

# ----------------------------------------------------------------------------- Optuna studies

def _tune(project, env, storage, *extra, check=True):
    return run([str(BIN / "exaggerate"), "tune", "--storage", storage, *extra], project, env, check=check,
               timeout=600)


def _mlflow_trial_runs(env, parent_id):
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(experiment_names=["exaggerate-tuning"], output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def _check_study(project, env, storage_url, study_name, n_trials, workers=2):
    import optuna

    from exaggerate.tune import make_storage

    study = optuna.load_study(study_name=study_name, storage=make_storage(storage_url, 0))
    finished = [t for t in study.trials if t.state.is_finished()]
    # Workers check the count after each trial: concurrent ones may each start one more.
    assert n_trials <= len(finished) <= n_trials + workers - 1
    assert len(finished) == len(study.trials)  # nothing left running
    assert study.trials[0].user_attrs.get("is_default") is True  # the current weights are trial 0
    runs = _mlflow_trial_runs(env, study.user_attrs["mlflow_parent_run_id"])
    assert len(runs) >= n_trials
    assert all("lambda_cls" in r.data.params for r in runs)
    return study


def test_tune_two_workers_journal_backend_and_resume(project, env, tmp_path):
    storage = f"journal:{tmp_path / 'study.journal'}"
    out = _tune(project, env, storage, "--study-name", "journal-study")
    assert "best:" in out.stdout
    _check_study(project, env, storage, "journal-study", 3)
    best = yaml.safe_load((project / "results/tune/best_params.yaml").read_text())
    assert set(best["explainer"]) == {"lambda_gan", "lambda_cyc", "lambda_cls"}
    assert "dvc exp run -S explainer.lambda" in (project / "results/tune/best_params.yaml").read_text()
    for name in ("trials.csv", "summary.json", "history.png", "importances.png"):
        assert (project / "results/tune" / name).is_file(), name
    # Complete trials record the oracle agreement; the objective is MAE + fid_weight x fid_oracle.
    rows = [r for r in csv.DictReader((project / "results/tune/trials.csv").open()) if r["state"] == "COMPLETE"]
    assert rows
    fid_weight = tiny_params()["tune"]["fid_weight"]
    for r in rows:
        assert -1.0 <= float(r["oracle_agreement"]) <= 1.0
        assert float(r["objective"]) == pytest.approx(float(r["compatibility_mae"]) + fid_weight * float(r["fid_oracle"]))
    assert yaml.safe_load((project / "params.yaml").read_text()) == tiny_params()  # never rewritten
    # Rerunning resumes the same study: one more trial when asked for 4.
    before = len(optuna_trials(storage, "journal-study"))
    _tune(project, env, storage, "--study-name", "journal-study", "--n-trials", str(before + 1), "--workers", "1")
    assert len(optuna_trials(storage, "journal-study")) == before + 1


def optuna_trials(storage_url, study_name):
    import optuna

    from exaggerate.tune import make_storage

    return optuna.load_study(study_name=study_name, storage=make_storage(storage_url, 0)).trials


def test_tune_two_workers_postgresql(project, env):
    url = os.environ.get("EXAGGERATE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("EXAGGERATE_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server)")
    name = f"pg-study-{os.getpid()}"
    _tune(project, env, url, "--study-name", name)
    _check_study(project, env, url, name, 3)


def test_tune_multi_objective_writes_pareto_front(project, env, tmp_path):
    import json

    work = tmp_path / "multi"
    shutil.copytree(project, work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["tune"].update(mode="multi", workers=1, n_trials=3, tune_lr=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _tune(work, env, f"sqlite:///{tmp_path / 'multi.db'}")
    summary = json.loads((work / "results/tune/summary.json").read_text())
    assert summary["pareto_front"] and (work / "results/tune/pareto.png").is_file()
    with open(work / "results/tune/trials.csv") as fh:  # the learning rate was tuned as well
        assert "lr" in fh.readline().strip().split(",")


def test_killed_worker_trial_is_failed_and_study_completes(project, env, tmp_path):
    import optuna

    from exaggerate.tune import make_storage

    work = tmp_path / "killwork"
    shutil.copytree(project, work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    # startup_trials=3: no pruning, so every trial that is not killed completes.
    params["tune"].update(trial_steps=400, eval_every=200, n_trials=3, workers=2, heartbeat_s=1, startup_trials=3)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    storage = f"sqlite:///{tmp_path / 'kill.db'}"
    main = subprocess.Popen([str(BIN / "exaggerate"), "tune", "--storage", storage], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="explainer-weights", storage=make_storage(storage, 0))
        except KeyError:
            continue
        # The worker that runs a trial (not one still starting up, which has none to fail), early in
        # it: before its first evaluation (step 200 of 400), so that it cannot finish before the kill.
        running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING
                   and "worker" in t.user_attrs and not t.intermediate_values]
        if running:
            host, pid = running[0].user_attrs["worker"].rsplit(":", 1)
            assert host == socket.gethostname() and int(pid) in _worker_pids(main.pid), running[0].user_attrs
            victim, victim_trial = int(pid), running[0].number
    assert victim, "no worker with a running trial appeared"
    os.kill(victim, signal.SIGKILL)
    killed = optuna.load_study(study_name="explainer-weights", storage=make_storage(storage, 0)).trials[victim_trial]
    assert killed.state == optuna.trial.TrialState.RUNNING, killed.state
    out, _ = main.communicate(timeout=600)
    assert main.returncode == 0, out
    study = optuna.load_study(study_name="explainer-weights", storage=make_storage(storage, 0))
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.FAIL in states, states
    assert sum(s.is_finished() for s in states) >= 3
    assert states.count(optuna.trial.TrialState.COMPLETE) >= 2
    assert "ended abnormally" in out


def _worker_pids(parent: int) -> set[int]:
    """The spawned worker processes of `parent` (not multiprocessing's resource tracker)."""
    pids = set()
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmd:
            pids.add(int(child))
    return pids


def test_failing_trial_is_recorded_and_study_goes_on(project, env, monkeypatch, tmp_path):
    import optuna

    from exaggerate import training_loop, tune
    from exaggerate.config import load_config
    from exaggerate.stages import PATHS

    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    calls = {"n": 0}
    real_fit = training_loop.fit

    def flaky_fit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise training_loop.TrainingDiverged("loss g_classifier became nan at step 3; no checkpoint was written yet")
        return real_fit(*args, **kwargs)
    monkeypatch.setattr(training_loop, "fit", flaky_fit)
    cfg = load_config("params.yaml")
    summary = tune.run_study(cfg, PATHS, workers=1, n_trials=3, storage_url=f"sqlite:///{tmp_path / 'f.db'}",
                             study_name="flaky", out_dir=tmp_path / "out")
    assert summary["states"]["FAIL"] == 1
    assert summary["states"]["COMPLETE"] + summary["states"]["PRUNED"] == 2  # the MedianPruner may stop one
    trials = optuna.load_study(study_name="flaky", storage=f"sqlite:///{tmp_path / 'f.db'}").trials
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL][0]
    assert "became nan at step 3" in failed.user_attrs["fail_reason"]
    assert "became nan" in (tmp_path / "out" / "trials.csv").read_text()


# ----------------------------------------------------------------------------- registry, serving, explorer

def _registered(project) -> dict:
    import json

    return json.loads((project / "outputs/register/models.json").read_text())


def _example_pngs(project, count: int = 3) -> list[bytes]:
    """Real test images of the project's data, as the PNG files a user would send."""
    from exaggerate.config import load_config
    from exaggerate.datasets import open_dataset
    from exaggerate.models import example_images
    from exaggerate.splits import read_splits

    base = load_config(project / "params.yaml").base
    base = type(base)(**{**base.__dict__, "data_root": str(project / base.data_root)})
    ds = open_dataset(base)
    test = read_splits(project / "outputs/prepare/splits.json", ds)["test"]
    return [b for _, b in example_images(ds, test[:count])]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"{url} did not answer within {timeout} s")


def _post(url: str, body: bytes) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_pipeline_registers_both_models_with_signature_and_tags(project):
    import mlflow

    mlflow.set_tracking_uri(project_tracking_uri(project))
    client = mlflow.MlflowClient()
    reg = _registered(project)
    for key in ("classifier", "explainer"):
        v = client.get_model_version(reg[key]["name"], reg[key]["version"])
        assert len(v.tags["git_commit"]) >= 40 and v.tags["dvc_experiment"] == "workspace"
        info = mlflow.models.get_model_info(reg[key]["uri"])
        assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image"]
        assert info.signature.params is not None and "convert" in [p.name for p in info.signature.params]
    assert "metric.mae" in client.get_model_version(reg["explainer"]["name"], reg["explainer"]["version"]).tags
    # Loaded from the registry the way a user would, the explainer gives the CLI's series.
    import base64
    import pandas as pd

    model = mlflow.pyfunc.load_model(reg["explainer"]["uri"])
    pngs = _example_pngs(project, 2)
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(b).decode() for b in pngs]}))
    assert len(out) == 2 and all(len(s) == 10 for s in out["series"])
    classifier = mlflow.pyfunc.load_model(reg["classifier"]["uri"])
    p = classifier.predict(pd.DataFrame({"image": [base64.b64encode(b).decode() for b in pngs]}))["p"]
    assert list(p) == pytest.approx(list(out["p_query"]), abs=1e-5)


def test_mlflow_models_serve_answers_with_series_and_clear_errors(project, env, tmp_path):
    import base64
    import io
    import json

    from PIL import Image

    reg = _registered(project)
    port = free_port()
    e = {**env, "MLFLOW_TRACKING_URI": project_tracking_uri(project)}
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", reg["explainer"]["uri"], "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port)], cwd=project, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", proc)
        url = f"http://127.0.0.1:{port}/invocations"
        pngs = _example_pngs(project, 3)
        files = []
        for k, b in enumerate(pngs):
            files.append(tmp_path / f"q{k}.png")
            files[-1].write_bytes(b)

        def frame(values, **extra):
            return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}, **extra}).encode()
        status, body = _post(url, frame([base64.b64encode(b).decode() for b in pngs]))
        assert status == 200, body
        rows = body["predictions"]
        assert len(rows) == 3  # one series per image
        # The served series are the ones `exaggerate explain` makes of the same files.
        run([str(BIN / "exaggerate"), "explain", *map(str, files), "--out", str(tmp_path / "cli")], project, env)
        cli = json.loads((tmp_path / "cli" / "posteriors.json").read_text())["images"]
        for row, ref in zip(rows, cli):
            assert len(row["series"]) == 10 and row["p_query"] == pytest.approx(ref["p"], abs=1e-5)
            assert row["p_series"] == pytest.approx(ref["p_series"], abs=1e-4)
            img = Image.open(io.BytesIO(base64.b64decode(row["series"][0])))
            assert img.size == (32, 32)
        # Bad requests: HTTP 400 with the reason, never a stack trace.
        rgb = io.BytesIO()
        Image.new("RGB", (28, 28), (200, 20, 20)).save(rgb, format="PNG")
        for body_bytes, reason in ((frame([base64.b64encode(b"not an image").decode()]), "not an image file"),
                                   (frame([]), "no image"),
                                   (b"", "valid JSON"),
                                   (frame([base64.b64encode(rgb.getvalue()).decode()]), "3 channels")):
            status, body = _post(url, body_bytes)
            assert status == 400 and reason in body["message"] and "Traceback" not in body["message"], body
        status, body = _post(url, frame([base64.b64encode(rgb.getvalue()).decode()], params={"convert": True}))
        assert status == 200 and len(body["predictions"]) == 1
    finally:
        proc.terminate()
        proc.wait(30)
    # A model version that does not exist: the server says so and stops.
    out = run([str(BIN / "mlflow"), "models", "serve", "-m", "models:/exaggerate-explainer/99", "--env-manager",
               "local", "-p", str(free_port())], project, e, check=False, timeout=120)
    assert out.returncode != 0 and "not found" in (out.stdout + out.stderr).lower()


def _chromium():
    from shutil import which

    binary, driver = which("chromium"), which("chromedriver")
    if not binary or not driver:
        why = "Debian's chromium and chromium-driver are not installed (scripts/setup.sh test installs them as root)"
        if os.environ.get("EXAGGERATE_REQUIRE_BROWSER"):
            pytest.fail(why)  # CI: the browser test must run
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,900"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_the_explorer_page_in_headless_chromium(project, env, tmp_path):
    import base64
    import io
    import json

    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    e = {**env, "MLFLOW_TRACKING_URI": project_tracking_uri(project)}
    # A version that does not exist: one line naming it, exit 2.
    out = run([str(BIN / "exaggerate"), "explore", "--model", "models:/exaggerate-explainer/99"], project, e,
              check=False, timeout=120)
    assert out.returncode == 2 and "models:/exaggerate-explainer/99" in out.stderr and "not found" in out.stderr
    assert "Traceback" not in out.stderr
    proc = subprocess.Popen([str(BIN / "exaggerate"), "explore", "--port", str(port)], cwd=project, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver = None
    try:
        base_url = f"http://127.0.0.1:{port}/"
        _wait_http(base_url + "api/info", proc)
        query = tmp_path / "query.png"
        query.write_bytes(_example_pngs(project, 1)[0])
        status, expected = _post(base_url + "api/explain",
                                 json.dumps({"image": base64.b64encode(query.read_bytes()).decode()}).encode())
        assert status == 200
        for body_bytes, code, reason in ((b"", 400, "empty request"), (b"{not json", 400, "not JSON"),
                                         (b'{"convert": true}', 400, "no image"),
                                         (b"x" * (16 * 1024 * 1024 + 1), 413, "at most")):
            status, body = _post(base_url + "api/explain", body_bytes)
            assert status == code and reason in body["error"], body
        driver = _chromium()
        wait = WebDriverWait(driver, 60)
        driver.get(base_url)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "loaded")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#examples img")) == 8
        driver.find_element(By.ID, "upload").send_keys(str(query))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
        slider = driver.find_element(By.ID, "slider")
        assert int(slider.get_attribute("value")) == expected["source_bin"]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#strip img")) == 10
        slider.send_keys(Keys.HOME)
        shown = []
        for k in range(10):  # the shown posterior follows the slider, bin by bin
            assert int(slider.get_attribute("value")) == k
            assert driver.find_element(By.ID, "bin").text == str(k)
            shown.append(float(driver.find_element(By.ID, "posterior").text))
            assert driver.find_element(By.ID, "exaggerated").get_attribute("src").endswith(expected["series"][k])
            slider.send_keys(Keys.ARROW_RIGHT)
        assert shown == pytest.approx(expected["p_series"], abs=6e-4)
        artifacts = REPO / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        slider.send_keys(Keys.HOME)
        for _ in range(7):
            slider.send_keys(Keys.ARROW_RIGHT)
        driver.save_screenshot(str(artifacts / "explorer.png"))
        assert Image.open(artifacts / "explorer.png").size[0] > 500
        # Bad uploads: a visible message, no series shown.
        for name, data, reason in (("notes.txt", b"hello", "not an image file"),
                                   ("colour.png", None, "3 channels")):
            path = tmp_path / name
            if data is None:
                buf = io.BytesIO()
                Image.new("RGB", (28, 28), (200, 20, 20)).save(buf, format="PNG")
                data = buf.getvalue()
            path.write_bytes(data)
            driver.find_element(By.ID, "upload").send_keys(str(path))
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
            error = driver.find_element(By.ID, "error")
            assert error.is_displayed() and reason in error.text and "Traceback" not in error.text
            assert not driver.find_element(By.ID, "result").is_displayed()
            driver.execute_script("document.body.dataset.state = 'loaded'")
        driver.find_element(By.ID, "convert").click()  # with conversion the colour image is explained
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(30)


# ----------------------------------------------------------------------------- several processes

def _generator_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["generator"]


def _two_process_copy(project, tmp_path, name: str, **explainer) -> Path:
    work = tmp_path / name
    shutil.copytree(project, work)
    shutil.rmtree(work / "outputs/explainer")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["explainer"].update(processes=2, **explainer)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


def test_two_gloo_processes_take_the_steps_of_one(project, env, tmp_path):
    work = _two_process_copy(project, tmp_path, "ddp")
    e = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = run([str(BIN / "exaggerate"), "stage", "train_explainer"], work, e, timeout=600)
    assert "2 processes" in out.stdout
    one, two = _generator_state(project / "outputs/explainer/generator.pt"), \
        _generator_state(work / "outputs/explainer/generator.pt")
    assert one.keys() == two.keys()
    # The same global batch (8) and seeds: the same weights as one process, up to float rounding
    # (batch statistics and gradient means summed in another order). The biases of convolutions
    # that feed a batch norm are the exception: their true gradient is zero (the norm removes
    # them), so Adam turns rounding noise into steps of up to lr, and the running means follow.
    def pre_norm_bias(k):
        return k.endswith(".bias") and not k.startswith("out_") and ".bn" not in k
    worst = max((one[k].float() - two[k].float()).abs().max().item() for k in one
                if "running" not in k and not pre_norm_bias(k))
    # How far rounding carries depends on the CPU's kernels: weights below 1e-6 apart and outputs
    # below 1e-5 with AVX-512; on an AVX2-only CPU up to 3.9e-6 and 7.7e-5. Adam moves a weight by
    # up to lr per step, so processes that did not average their halves' gradients would be expected
    # (not measured) to part by that order, ten times this bound.
    lr = yaml.safe_load((work / "params.yaml").read_text())["explainer"]["lr_g"]
    assert worst < 0.1 * lr, (worst, lr)
    from exaggerate.networks import Generator
    g1, g2 = Generator(1, [8, 16], 10), Generator(1, [8, 16], 10)
    g1.load_state_dict(one)
    g2.load_state_dict(two)
    x, c = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1, torch.arange(16) % 10
    with torch.no_grad():
        assert (g1.train()(x, c) - g2.train()(x, c)).abs().max() < 1e-3  # batch statistics: the function itself
        assert (g1.eval()(x, c) - g2.eval()(x, c)).abs().max() < 1e-2   # running statistics: the biases' drift
    # Rank 0 alone wrote the outputs and the MLflow run.
    import mlflow
    mlflow.set_tracking_uri(e["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["exaggerate"], output_format="list")
    assert [r.data.tags.get("dvc_stage") for r in runs if "dvc_stage" in r.data.tags] == ["train_explainer"]


def test_a_killed_two_process_run_resumes(project, env, tmp_path):
    work = _two_process_copy(project, tmp_path, "ddp-kill", steps=40, checkpoint_every=4, image_every=100)
    e = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.Popen([str(BIN / "exaggerate"), "stage", "train_explainer"], cwd=work, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not list((work / "outputs/explainer/checkpoints").glob("*/step-00000008.pt")):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.wait(30)
    assert not (work / "outputs/explainer/generator.pt").exists()
    out = run([str(BIN / "exaggerate"), "stage", "train_explainer"], work, e, timeout=600)
    resumed = re.findall(r"resuming explainer training at step (\d+)", out.stdout + out.stderr)
    assert resumed and int(resumed[0]) >= 8
    metrics = json.loads((work / "outputs/explainer/metrics.json").read_text())
    assert metrics["steps"] == 40 and metrics["steps_this_run"] == 40 - int(resumed[0])


def test_two_gloo_processes_train_the_classifier_of_one(project, env, tmp_path):
    work = tmp_path / "ddp-f"
    shutil.copytree(project, work)
    shutil.rmtree(work / "outputs/classifier")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["classifier"]["processes"] = 2
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    e = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = run([str(BIN / "exaggerate"), "stage", "train_classifier"], work, e, timeout=600)
    assert "2 processes" in out.stdout and out.stdout.count("test ROC-AUC") == 1  # rank 0 reports
    one = torch.load(project / "outputs/classifier/model.pt", weights_only=False)["state_dict"]
    two = torch.load(work / "outputs/classifier/model.pt", weights_only=False)["state_dict"]
    assert one.keys() == two.keys()
    # DDP with batch statistics of the global batch and mixup drawn for it: the weights of one
    # process with the same batches, up to float rounding (which Adam magnifies for weights whose
    # gradients are near zero), and the same posteriors.
    worst = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert worst < 2e-4, worst
    from exaggerate.classifier import load_classifier
    from exaggerate.config import load_config

    base = load_config(project / "params.yaml").base
    x = torch.from_numpy(np.load(project / "outputs/explain/series.npz")["queries"])
    with torch.no_grad():
        p1, p2 = load_classifier(project / "outputs/classifier", base)(x), load_classifier(
            work / "outputs/classifier", base)(x)
    assert (p1 - p2).abs().max() < 1e-5


def test_the_attribute_audit_runs_through_dvc_and_mlflow(project, env, tmp_path):
    work = tmp_path / "audit"
    shutil.copytree(project, work)
    shutil.copytree(REPO / "audit", work / "audit")
    e = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    metrics_path = work / "outputs/oracle/metrics.json"
    good = metrics_path.read_text()
    metrics_path.write_text(json.dumps({**json.loads(good), "task_accuracy": 0.5}))  # a judge below the gate
    out = run([str(BIN / "exaggerate"), "audit", "attributes"], work, e, check=False)
    assert out.returncode == 2 and "below evaluate.oracle_gate" in out.stderr and "Traceback" not in out.stderr
    metrics_path.write_text(good)
    out = run(["dvc", "repro", "audit/dvc.yaml:attributes"], work, e)
    assert "Running stage 'audit/dvc.yaml:attributes'" in out.stdout
    rows = list(csv.DictReader(open(work / "results/audit/attributes.csv")))
    # every oracle class but the task's own (the target and its negative, for scale in the .md)
    assert len(rows) == 8 and not {"Ankle boot", "Sneaker"} & {r["class"] for r in rows}
    assert "task's own classes" in (work / "results/audit/attributes.md").read_text()
    assert (work / "results/audit/attributes.png").is_file()
    import mlflow
    mlflow.set_tracking_uri(e["MLFLOW_TRACKING_URI"])
    runs = [r for r in mlflow.search_runs(experiment_names=["exaggerate"], output_format="list")
            if r.data.tags.get("dvc_stage") == "audit_attributes"]
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]  # the refused one is kept as failed
    runs = [r for r in runs if r.info.status == "FINISHED"]
    assert {"attributes.md", "attributes.png", "attributes.csv"} <= {
        a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
