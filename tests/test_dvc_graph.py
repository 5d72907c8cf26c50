"""The DVC graph reruns what changed: every stage lists exactly the code its command can import,
and `dvc status` flags a stage when any module of its import closure changes (and only then)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from exaggerate.dvc_deps import check, stage_code_deps, stage_modules

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("prepare", "train_classifier", "posteriors", "bin", "train_explainer", "explain", "train_oracle", "evaluate")


def test_dvc_yaml_lists_each_stages_import_closure():
    assert check(REPO / "dvc.yaml") == []
    assert check(REPO / "audit" / "dvc.yaml") == []


def test_the_confounder_report_can_change_without_retraining_the_audits_networks():
    from exaggerate.dvc_deps import audit_code_deps

    training = set(audit_code_deps("confounder_explainer"))
    assert "src/exaggerate/confounder.py" in training
    assert "src/exaggerate/confounder_report.py" not in training
    assert "src/exaggerate/confounder_report.py" in audit_code_deps("confounder_report")


def test_closures_follow_the_imports_and_leave_the_rest_out():
    # The explainer's training reaches losses and augmentation; the oracle's does not.
    assert {"losses", "augment", "training_loop", "networks"} <= stage_modules("train_explainer")
    assert not {"losses", "training_loop", "evaluate"} & stage_modules("train_oracle")
    assert {"evaluate", "report", "baseline", "metrics", "oracle"} <= stage_modules("evaluate")
    # Tools that no stage runs never make a stage rerun.
    for stage in STAGES:
        assert not {"tune", "sweep", "dvc_deps"} & stage_modules(stage), stage


def changed_code(status: dict) -> dict[str, set[str]]:
    out = {}
    for stage, entries in status.items():
        deps = set()
        for entry in entries:
            if isinstance(entry, dict):
                deps |= {p for p in entry.get("changed deps", {}) if p.startswith("src/")}
        out[stage] = deps
    return out


def test_dvc_status_flags_a_stage_when_a_module_it_imports_changes(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (work / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", work / ".dvc" / "config")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=work, check=True, env=env)

    def status() -> dict[str, set[str]]:
        out = subprocess.run(["dvc", "status", "--json"], cwd=work, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return changed_code(json.loads(out.stdout or "{}"))

    before = status()
    modules = sorted((work / "src" / "exaggerate").glob("*.py"))
    for path in modules:
        path.write_text(path.read_text() + "\n# changed\n")
    after = status()
    for stage in STAGES:
        # every module of the closure is flagged, and nothing outside it
        assert after.get(stage, set()) == set(stage_code_deps(stage)), stage
        assert before.get(stage, set()) <= after[stage]
