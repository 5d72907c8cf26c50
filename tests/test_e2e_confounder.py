"""End to end: the planted-confounder audit (audit/dvc.yaml) through DVC and MLflow on tiny data."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from test_pipeline import REPO, env, run, tiny_params  # noqa: F401 (env: a fixture)

pytestmark = pytest.mark.slow

# The planted-confounder audit on tiny data: sneakers and boots told apart by a weak cue, 16x16
# images, a 3x3 mark on every positive and no negative of the biased f's training images.
CONFOUNDER = {
    "base": {"image_size": 16, "resize": "resize"},
    "classifier": {"epochs": 4},
    "explainer": {"generator_widths": [16, 32], "discriminator_widths": [16, 32], "batch_size": 16, "steps": 1500,
                  "checkpoint_every": 500, "log_every": 100, "image_every": 1500},
    "explain": {"batch_size": 16},
    "audit": {"mark_size": 3, "rate_positive": 1.0, "rate_negative": 0.0, "seeds": [0], "num_queries": 30},
}


def test_the_confounder_audit_finds_the_planted_mark_through_dvc_and_mlflow(tmp_path, env):
    from fakes import make_fashion_ambiguous

    root = tmp_path / "confounder"
    root.mkdir()
    params = tiny_params()
    for section, values in CONFOUNDER.items():
        params[section].update(values)
    for name in ("dvc.yaml", ".dvcignore", "src", "audit"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, root / name)
    (root / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(REPO / ".dvc" / name, root / ".dvc" / name)
    (root / ".gitignore").write_text("mlflow.db\n__pycache__/\n")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    make_fashion_ambiguous(root / "data" / "fashion-mnist")
    for cmd in (["git", "init", "-q", "-b", "main"], ["dvc", "add", "-q", "data"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "tiny confounder project"]):
        run(cmd, root, env)
    e = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = run(["dvc", "repro", "audit/dvc.yaml:confounder_report"], root, e)
    assert sorted(re.findall(r"Running stage 'audit/dvc.yaml:(\S+)'", out.stdout)) == [
        "confounder_classifier@biased", "confounder_classifier@clean", "confounder_explainer@biased-0",
        "confounder_explainer@clean-0", "confounder_report"]
    summary = json.loads((root / "results/audit/confounder.json").read_text())
    biased, clean = summary["arms"]["biased"], summary["arms"]["clean"]
    # The biased f leans on the mark; the clean f much less.
    reliance = summary["reliance"]
    assert reliance["biased"]["accuracy_gap"] > 0.5 > reliance["clean"]["accuracy_gap"]
    # Its series draw the mark toward the class, the clean f's do not: by a stated margin.
    assert biased["share_toward"] - clean["share_toward"] >= 0.25, (biased, clean)
    assert summary["detector"]["accuracy"] == 1.0
    for name in ("confounder.md", "confounder.png", "confounder_curve.png"):
        assert (root / "results/audit" / name).stat().st_size > 0
    import mlflow

    mlflow.set_tracking_uri(e["MLFLOW_TRACKING_URI"])
    (r,) = [r for r in mlflow.search_runs(experiment_names=["exaggerate"], output_format="list")
            if r.data.tags.get("dvc_stage") == "audit_confounder"]
    assert r.data.metrics["biased_share_toward"] == pytest.approx(biased["share_toward"])
    assert {"confounder.md", "confounder.png", "confounder_curve.png"} <= {
        a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id)}
    # A change of the judgement reruns the report only.
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "audit"], root, env)
    params["audit"]["change_pixels"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "audit/dvc.yaml:confounder_report"], root, e)
    assert re.findall(r"Running stage 'audit/dvc.yaml:(\S+)'", out.stdout) == ["confounder_report"]
