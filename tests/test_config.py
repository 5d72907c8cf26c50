from pathlib import Path

import pytest

from exaggerate.config import ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_load_and_match_defaults_shape():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.base.dataset == "fashion_mnist"
    assert cfg.base.target == "Ankle boot" and cfg.base.negatives == ["Sneaker"]
    assert cfg.base.num_bins == 10
    # Round trip: the resolved dict rebuilds the same config.
    assert config_from_dict(cfg.to_dict()) == cfg


def test_params_yaml_is_the_one_set_of_defaults():
    from exaggerate.config import Config

    # The dataclasses' defaults (what code and tests build without a file) are params.yaml's values.
    assert load_config(REPO / "params.yaml") == Config()


def test_a_partial_parameter_file_is_refused_by_key(tmp_path):
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    del raw["explainer"]["n_critic"]
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"partial.yaml: missing key explainer\.n_critic; a parameter file lists"):
        load_config(partial)
    del raw["oracle"]
    partial.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"missing key explainer\.n_critic \(and 1 more\)"):
        load_config(partial)


def test_paper_parameter_set_loads():
    cfg = load_config(REPO / "configs" / "paper-celeba.yaml")
    assert cfg.base.image_size == 128
    assert cfg.explainer.generator_widths == [64, 128, 256, 512, 1024, 1024]
    assert cfg.classifier.block_config == [6, 12, 24, 16]


def test_unknown_key_is_named_with_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown key explainer\.lambda_cycle; allowed keys: .*lambda_cyc"):
        config_from_dict({"explainer": {"lambda_cycle": 10}})


def test_removed_option_is_named_with_why():
    with pytest.raises(ConfigError, match=r"explainer\.generator_skips was removed \(.*bias audit.*delete it"):
        config_from_dict({"explainer": {"generator_skips": False}})
    with pytest.raises(ConfigError, match=r"explainer\.skip_dropout was removed"):
        config_from_dict({"explainer": {"skip_dropout": 0.0}})


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"unknown key trainer; allowed keys: base, prepare"):
        config_from_dict({"trainer": {}})


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"classifier\.epochs: expected an integer, got '3'"):
        config_from_dict({"classifier": {"epochs": "3"}})
    with pytest.raises(ConfigError, match=r"base\.negatives: expected a list"):
        config_from_dict({"base": {"negatives": "Sneaker"}})


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"base\.dataset: got 'mnist', allowed values: fashion_mnist, celeba, image_folder"):
        config_from_dict({"base": {"dataset": "mnist"}})


@pytest.mark.parametrize("raw,key", [
    ({"base": {"num_bins": 1}}, "base.num_bins"),
    ({"bin": {"per_bin": 0}}, "bin.per_bin"),
    ({"explainer": {"generator_widths": [32]}}, "explainer.generator_widths"),
    ({"explainer": {"augment": "translation_cutout"}}, "explainer.augment"),
    ({"explainer": {"classifier_augment": "rotate"}}, "explainer.classifier_augment"),
    ({"explainer": {"ema_decay": 1.0}}, "explainer.ema_decay"),
    ({"explain": {"detail": -0.1}}, "explain.detail"),
    ({"classifier": {"external": {"path": "m.pt", "value_range": [1, 0]}}}, "classifier.external.value_range"),
])
def test_out_of_range_values_are_named(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(raw)


def test_ints_accepted_where_floats_expected():
    cfg = config_from_dict({"explainer": {"lambda_cyc": 10}})
    assert cfg.explainer.lambda_cyc == 10.0 and isinstance(cfg.explainer.lambda_cyc, float)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_a_registered_models_parameters_load_with_keys_added_later(tmp_path):
    import yaml

    from exaggerate.config import ConfigError, load_config

    raw = load_config(REPO / "params.yaml").to_dict()
    del raw["explainer"]["processes"]  # a model registered before the key existed
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="missing key explainer.processes"):
        load_config(path)
    assert load_config(path, complete=False).explainer.processes == 1
