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
