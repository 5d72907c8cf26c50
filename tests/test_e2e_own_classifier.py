"""End to end: the pipeline through `dvc repro` on a user's own classifier, another architecture,
input size and channel count than ours, as TorchScript and as a torch.export program."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from test_pipeline import env, make_project, ran_stages, run, tiny_params  # noqa: F401 (env: a fixture)

pytestmark = pytest.mark.slow


class UserNet(nn.Module):
    """A user's own classifier, unlike ours: plain convolutions, 3 channels at 48x48 in [0, 1],
    two logits of which the second is explained."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Sequential(nn.Conv2d(3, 6, 5, 2), nn.ReLU(), nn.Conv2d(6, 8, 3, 2), nn.ReLU())
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3))) * 20


@pytest.mark.parametrize("kind", ["torchscript", "torch_export"])
def test_pipeline_runs_on_a_users_own_classifier(tmp_path, env, kind):
    net = UserNet().eval()
    if kind == "torchscript":
        model = tmp_path / "user.pt"
        torch.jit.script(net).save(str(model))
    else:
        model = tmp_path / "user.pt2"
        program = torch.export.export(net, (torch.rand(2, 3, 48, 48),),
                                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        torch.export.save(program, str(model))
    params = tiny_params()
    params["classifier"]["external"] = {"path": str(model), "output_index": 1, "input_size": 48, "channels": 3,
                                        "value_range": [0.0, 1.0], "output": "logit"}
    (tmp_path / "project").mkdir()
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # not the project's runs
    root = make_project(tmp_path / "project", env, params)
    out = run(["dvc", "repro", "explain"], root, env)
    assert ran_stages(out.stdout) == {"prepare", "train_classifier", "posteriors", "bin", "train_explainer", "explain"}
    assert json.loads((root / "outputs/classifier/classifier.json").read_text())["kind"] == kind
    series = json.loads((root / "outputs/explain/series.json").read_text())["queries"]
    assert len(series) == 12 and all(len(q["p_series"]) == 10 for q in series)
    # f is the user's network, seen through the adapter: resized to 48, grey to 3 channels, [0, 1].
    x = torch.zeros(1, 1, 32, 32)
    want = torch.sigmoid(net(torch.full((1, 3, 48, 48), 0.5)))[0, 1]
    assert abs(want.item() - _user_f(root, x)) < 1e-5
    assert "up to date" in run(["dvc", "status", "explain"], root, env).stdout


def _user_f(root: Path, x) -> float:
    from exaggerate.classifier import load_classifier
    from exaggerate.config import load_config

    return load_classifier(root / "outputs/classifier", load_config(root / "params.yaml").base)(x).item()
