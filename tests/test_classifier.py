import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from exaggerate.classifier import ClassifierError, install_external, load_classifier, mixup, train_classifier
from exaggerate.config import ExternalClassifier
from exaggerate.posteriors import PosteriorError, check_posteriors, posterior_stage, read_table
from helpers import TINY_CLASSIFIER


def test_training_writes_model_metrics_and_figures(trained):
    base, ds, splits, out, metrics = trained
    for name in ("model.pt", "classifier.json", "metrics.json", "reliability.png", "val_grid.png",
                 "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert set(test) >= {"roc_auc", "accuracy", "recall", "brier", "ece", "confusion_matrix"}
    assert sum(map(sum, test["confusion_matrix"])) == len(splits["test"])
    # The fake boots and sneakers are easy: one tiny epoch already ranks them far above chance.
    assert test["roc_auc"] > 0.7
    f = load_classifier(out, base)
    p = f(ds.images(splits["test"][:8]))
    assert p.shape == (8,) and torch.all((p >= 0) & (p <= 1))
    assert not any(q.requires_grad for q in f.parameters())


def test_same_seed_same_weights(trained, tmp_path):
    base, ds, splits, out, _ = trained
    train_classifier(ds, splits, base, TINY_CLASSIFIER, tmp_path)
    a = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mixup_blends_images_and_labels_by_the_same_share():
    x = torch.stack([torch.full((1, 4, 4), v) for v in (0.0, 1.0, -1.0, 0.5)])
    y = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
    mx, my = mixup(x, y, 0.4, np.random.default_rng(0))
    mx2, my2 = mixup(x, y, 0.4, np.random.default_rng(0))
    assert torch.equal(mx, mx2) and torch.equal(my, my2)  # seeded: a resumed epoch mixes alike
    rng = np.random.default_rng(0)  # the same draws, in mixup's order: shares, then partners
    m, j = rng.beta(0.4, 0.4, size=4), rng.permutation(4)
    for i in range(4):
        assert torch.allclose(mx[i], m[i] * x[i] + (1 - m[i]) * x[j[i]])
        assert my[i, 0].item() == pytest.approx(m[i] * y[i, 0].item() + (1 - m[i]) * y[j[i], 0].item())
    assert not torch.equal(mx, x)


def test_mixup_off_trains_another_classifier_with_its_own_signature(trained, tmp_path):
    import dataclasses

    from exaggerate.classifier import _train_signature
    base, ds, splits, out, _ = trained
    assert TINY_CLASSIFIER.mixup_alpha == 0.4  # params.yaml's default
    plain = dataclasses.replace(TINY_CLASSIFIER, mixup_alpha=0.0)
    assert _train_signature(plain, base, ds, splits)["mixup_alpha"] == 0.0
    assert _train_signature(TINY_CLASSIFIER, base, ds, splits)["mixup_alpha"] == 0.4
    train_classifier(ds, splits, base, plain, tmp_path)
    a = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_after_last_epoch(trained, tmp_path, capsys):
    import dataclasses
    import shutil

    base, ds, splits, out, _ = trained
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    more = dataclasses.replace(TINY_CLASSIFIER, epochs=2)
    metrics = train_classifier(ds, splits, base, more, tmp_path)
    assert "resuming classifier training after epoch 1" in capsys.readouterr().out
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]


class _Logits(nn.Module):
    def __init__(self, outputs: int = 3):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, outputs)

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1)) * 5


def _export(module, path):
    torch.jit.script(module).save(str(path))
    return path


def test_external_torchscript_runs_the_posterior_stage(trained, tmp_path):
    base, ds, splits, _, _ = trained
    path = _export(_Logits(), tmp_path / "user_model.pt")
    spec = ExternalClassifier(path=str(path), output_index=2, input_size=24, channels=3,
                              value_range=[0.0, 1.0], output="logit")
    out = tmp_path / "classifier"
    install_external(spec, base, out)
    f = load_classifier(out, base)
    x = ds.images(splits["val"][:4])
    # The wrapper resizes 32 -> 24, replicates the grey channel and maps [-1, 1] -> [0, 1].
    manual = torch.sigmoid(_reference(path)(torch.nn.functional.interpolate(
        ((x + 1) / 2).expand(-1, 3, -1, -1), size=(24, 24), mode="bilinear", align_corners=False))[:, 2])
    assert torch.allclose(f(x), manual, atol=1e-6)
    summary = posterior_stage(f, ds, splits, base, 64, tmp_path / "post")
    table = read_table(tmp_path / "post" / "posteriors.csv")
    assert len(table) == sum(len(v) for v in splits.values())
    assert all(0 <= p <= 1 and b == min(int(p * 10), 9) for p, b in zip(table["p"], table["bin"]))
    assert sum(summary["test"]["bin_counts"]) == len(splits["test"])


def test_external_torch_export_program_is_f_and_needs_a_dynamic_batch(trained, tmp_path):
    base, ds, splits, _, _ = trained
    net = _Logits().eval()
    program = torch.export.export(net, (torch.rand(2, 3, 24, 24),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, str(tmp_path / "user.pt2"))
    spec = ExternalClassifier(path=str(tmp_path / "user.pt2"), output_index=1, input_size=24, channels=3,
                              value_range=[0.0, 1.0], output="logit")
    install_external(spec, base, tmp_path / "classifier")
    assert json.loads((tmp_path / "classifier/classifier.json").read_text())["kind"] == "torch_export"
    assert (tmp_path / "classifier/checkpoints").is_dir()  # declared by dvc.yaml, empty of training
    f = load_classifier(tmp_path / "classifier", base)
    x = ds.images(splits["val"][:5])
    with torch.no_grad():
        manual = torch.sigmoid(net(torch.nn.functional.interpolate(
            ((x + 1) / 2).expand(-1, 3, -1, -1), size=(24, 24), mode="bilinear", align_corners=False))[:, 1])
    assert torch.allclose(f(x), manual, atol=1e-6)
    f.train()  # a program refuses .train()/.eval(); f keeps working whatever its owner asks
    x.requires_grad_(True)
    f(x).sum().backward()  # gradients reach the image through the program, as the explainer needs
    assert x.grad.abs().sum() > 0
    static = torch.export.export(net, (torch.rand(2, 3, 24, 24),))
    torch.export.save(static, str(tmp_path / "static.pt2"))
    with pytest.raises(ClassifierError, match=r"static.pt2 fails on a batch of shape \(3, 3, 24, 24\).*dynamic batch"):
        install_external(ExternalClassifier(path=str(tmp_path / "static.pt2"), input_size=24, channels=3), base,
                         tmp_path / "o")
    (tmp_path / "junk.pt2").write_bytes(b"junk")
    with pytest.raises(ClassifierError, match="cannot load torch.export program .*junk.pt2"):
        install_external(ExternalClassifier(path=str(tmp_path / "junk.pt2")), base, tmp_path / "o")


def _reference(path):
    return torch.jit.load(str(path))


def test_external_errors_name_the_file(trained, tmp_path):
    base = trained[0]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ClassifierError, match=f"cannot load TorchScript classifier {garbage}"):
        install_external(ExternalClassifier(path=str(garbage)), base, tmp_path / "o")
    with pytest.raises(ClassifierError, match="not found"):
        install_external(ExternalClassifier(path=str(tmp_path / "missing.pt")), base, tmp_path / "o")
    path = _export(_Logits(outputs=2), tmp_path / "two.pt")
    with pytest.raises(ClassifierError, match=r"output_index 5 is out of range: .*two.pt has 2 output\(s\)"):
        install_external(ExternalClassifier(path=str(path), output_index=5, channels=3), base, tmp_path / "o")

    class Spatial(nn.Module):
        def forward(self, x):
            return x
    path = _export(Spatial(), tmp_path / "spatial.pt")
    with pytest.raises(ClassifierError, match=r"spatial.pt returned \(2, 1, 32, 32\).*expected \(batch,\)"):
        install_external(ExternalClassifier(path=str(path), channels=1), base, tmp_path / "o")
    assert not (tmp_path / "o" / "model.pt").exists()


def test_logits_passed_as_probabilities_are_refused(trained, tmp_path):
    base, ds, splits, _, _ = trained
    path = _export(_Logits(), tmp_path / "logits.pt")
    install_external(ExternalClassifier(path=str(path), channels=3, output="probability"), base, tmp_path / "c")
    f = load_classifier(tmp_path / "c", base)
    with pytest.raises(PosteriorError, match="outside \\[0, 1\\].*set classifier.external.output: logit"):
        posterior_stage(f, ds, splits, base, 64, tmp_path / "post")
    assert not (tmp_path / "post" / "posteriors.csv").exists()


def test_nan_posteriors_are_refused():
    with pytest.raises(PosteriorError, match="2 NaN"):
        check_posteriors(np.array([0.1, np.nan, np.nan]), "m.pt")
