"""The commit a run records: dirty only for changes other than the pipeline's own products."""
import subprocess

from exaggerate.config import Config
from exaggerate.tracking import git_commit, pipeline_key


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@example.invalid", "PATH": "/usr/bin:/bin"})


def test_git_commit_ignores_dvc_lock_and_outputs(tmp_path):
    (tmp_path / "outputs").mkdir()
    for name in ("dvc.lock", "outputs/metrics.json", "code.py"):
        (tmp_path / name).write_text("a\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "x")
    head = git_commit(tmp_path)
    assert len(head) == 40
    (tmp_path / "dvc.lock").write_text("b\n")
    (tmp_path / "outputs/metrics.json").write_text("b\n")
    assert git_commit(tmp_path) == head  # what the stages rewrite as they run
    (tmp_path / "code.py").write_text("b\n")
    assert git_commit(tmp_path) == head + "-dirty"


def test_pipeline_key_follows_code_params_and_experiment_not_the_dirty_flag():
    cfg = Config()
    key = pipeline_key(cfg, "abc", "code1", "workspace")
    assert key == pipeline_key(cfg, "abc-dirty", "code1", "workspace")
    other = Config(explain=cfg.explain.__class__(num_queries=10))
    assert len({key, pipeline_key(cfg, "abc", "code2", "workspace"), pipeline_key(cfg, "abc", "code1", "exp-1"),
                pipeline_key(other, "abc", "code1", "workspace"), pipeline_key(cfg, "abd", "code1", "workspace")}) == 5


STAGE = """
import sys
from exaggerate.config import Config
from exaggerate.tracking import stage_run
with stage_run(sys.argv[1], Config(), ("base",)) as tracker:
    tracker.metrics({"done": 1.0})
"""


def test_stages_started_together_on_a_new_store_all_run_under_one_parent(tmp_path):
    # What `dvc queue start -j 3` or the parallel runner does on a machine whose store does not
    # exist yet: without the store lock all but one process died in MLflow's schema migrations,
    # and those that lived could each create their own parent run.
    import os
    import subprocess
    import sys

    import mlflow

    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "EXAGGERATE_EXPERIMENT": "race"}
    procs = [subprocess.Popen([sys.executable, "-c", STAGE, f"stage{i}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outs)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    parents = [r for r in runs if "exaggerate.pipeline" in r.data.tags]
    stages = [r for r in runs if r.data.tags.get("dvc_stage")]
    assert len(parents) == 1
    assert sorted(r.data.tags["dvc_stage"] for r in stages) == ["stage0", "stage1", "stage2"]
    assert {r.data.tags["mlflow.parentRunId"] for r in stages} == {parents[0].info.run_id}
    assert all(r.data.metrics["done"] == 1.0 for r in stages)
