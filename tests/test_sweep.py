"""exaggerate sweep: parsing settings, per-run parameters and the per-setting summary."""
from pathlib import Path

import pytest
import yaml

from exaggerate.config import ConfigError
from exaggerate.stages import PATHS
from exaggerate.sweep import Setting, run_config, run_sweep, summarise, summary_table

REPO = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((REPO / "params.yaml").read_text())


def test_setting_parses_yaml_values_and_names_bad_items():
    s = Setting.parse("g5:explainer.lambda_gan=5,explainer.augment=translation,explainer.betas=[0.5, 0.9]")
    assert s.name == "g5"
    assert s.overrides == {"explainer.lambda_gan": 5, "explainer.augment": "translation", "explainer.betas": [0.5, 0.9]}
    assert Setting.parse("plain") == Setting("plain", {})
    with pytest.raises(ConfigError, match="'lambda_gan=5' is not section.key=value"):
        Setting.parse("x:lambda_gan=5")
    with pytest.raises(ConfigError, match="expected NAME"):
        Setting.parse(":explainer.lambda_gan=5")


def test_run_config_applies_overrides_seed_and_steps_and_validates():
    raw = run_config(RAW, Setting.parse("a:explainer.lambda_cyc=79"), seed=3, steps=10)
    assert raw["explainer"]["lambda_cyc"] == 79 and raw["explainer"]["seed"] == 3 and raw["explainer"]["steps"] == 10
    assert RAW["explainer"]["seed"] is None  # the loaded parameters are not changed
    with pytest.raises(ConfigError, match="sweep setting 'b'.*explainer.augment"):
        run_config(RAW, Setting.parse("b:explainer.augment=flip"), seed=0, steps=None)
    with pytest.raises(ConfigError, match="no section 'explainr'"):
        run_config(RAW, Setting.parse("c:explainr.steps=3"), seed=0, steps=None)


def test_summary_gives_mean_min_max_per_setting_and_counts_failures():
    settings = [Setting("a", {}), Setting("b", {"explainer.lambda_gan": 5}), Setting("unused", {})]
    rows = [{"setting": "a", "seed": 0, "oracle_agreement": 0.6, "compatibility_mae": 0.04},
            {"setting": "a", "seed": 1, "oracle_agreement": 0.8, "compatibility_mae": 0.02},
            {"setting": "b", "seed": 0, "oracle_agreement": 0.7, "compatibility_mae": None},
            {"setting": "b", "seed": 1, "error": "TrainingDiverged: loss is NaN at step 5"}]
    summary = summarise(rows, settings)
    assert set(summary) == {"a", "b"}
    assert summary["a"]["metrics"]["oracle_agreement"] == pytest.approx({"mean": 0.7, "min": 0.6, "max": 0.8})
    assert summary["a"]["seeds"] == [0, 1] and summary["b"]["failed_seeds"] == [1]
    assert "compatibility_mae" not in summary["b"]["metrics"]
    table = summary_table(summary)
    assert "| a | 2 | 0.030 [0.020, 0.040]" in table
    assert "| b | 1 (+1 failed) | absent |" in table and "- b: explainer.lambda_gan=5" in table


def test_sweep_without_upstream_outputs_names_the_missing_file(tmp_path):
    paths = {k: tmp_path / Path(v).name for k, v in PATHS.items()}
    with pytest.raises(FileNotFoundError, match="splits.json not found.*dvc repro train_oracle bin"):
        run_sweep(REPO / "params.yaml", [Setting("a", {})], [0], tmp_path / "out", paths)
    with pytest.raises(ConfigError, match="distinct names"):
        run_sweep(REPO / "params.yaml", [Setting("a", {}), Setting("a", {})], [0], tmp_path / "out", paths)
    assert not (tmp_path / "out").exists()


def test_setting_refuses_a_value_that_is_not_yaml():
    with pytest.raises(ConfigError, match="explainer.betas: '\\[0.5' is not a YAML value"):
        Setting.parse("x:explainer.betas=[0.5")
