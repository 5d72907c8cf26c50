"""The classifier and the explainer as MLflow models, registered by the pipeline's register stage.

Both are pyfunc models over the pipeline's own files (params, classifier folder, generator),
with this package's code inside the model (code_paths), a signature and an input example:

- input: a table with one column `image`, each cell an image file (PNG, JPEG, ...) encoded in
  base64: any size, preprocessed exactly as `exaggerate explain` does (the `convert` param turns
  colour images grey or grey ones colour instead of refusing them);
- the explainer returns, per image, f's posterior of the query, its bin, and the series: one
  base64 PNG per bin with f's posterior of each;
- the classifier returns f's posterior and its bin.

Bad input (not an image, the wrong channel count without `convert`, no image at all) raises an
MlflowException with the reason, which `mlflow models serve` answers with HTTP 400.
"""
from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .errors import ExaggerateError

IMAGE_COLUMN = "image"
EXPLAINER_NAME = "exaggerate-explainer"
CLASSIFIER_NAME = "exaggerate-classifier"
PACKAGE_DIR = Path(__file__).resolve().parent


class InputError(ExaggerateError, ValueError):
    """An input image that cannot be explained; the message says which and why."""


def encode_png(x: torch.Tensor) -> str:
    """A CxHxW image in [-1, 1] as base64 PNG text."""
    from PIL import Image

    arr = ((x.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    img = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(value: Any, source: str):
    """base64 text (or raw bytes) of an image file -> PIL image; InputError when it is none."""
    from PIL import Image, UnidentifiedImageError

    if value is None or (isinstance(value, float) and np.isnan(value)) or (hasattr(value, "__len__") and not len(value)):
        raise InputError(f"{source}: empty: expected an image file encoded in base64")
    if isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"{source}: not base64 text ({exc}); send the image file's bytes in base64") from exc
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise InputError(f"{source}: expected base64 text of an image file, got {type(value).__name__}")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{source}: not an image file Pillow can read ({len(data)} bytes)") from exc
    return img


def image_column(model_input: Any) -> list:
    """The images of a pyfunc input: a DataFrame or dict with column `image`, or a list."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise InputError(f"input has columns {list(model_input.columns)}; expected a column {IMAGE_COLUMN!r}")
        values = model_input[IMAGE_COLUMN].tolist()
    elif isinstance(model_input, dict):
        if IMAGE_COLUMN not in model_input:
            raise InputError(f"input has keys {sorted(model_input)}; expected a key {IMAGE_COLUMN!r}")
        values = model_input[IMAGE_COLUMN]
        values = [values] if isinstance(values, (str, bytes)) else list(values)
    elif isinstance(model_input, (list, tuple)):
        values = list(model_input)
    else:
        raise InputError(f"input of type {type(model_input).__name__}: expected a table with column {IMAGE_COLUMN!r}")
    if not values:
        raise InputError("the request holds no image")
    return values


class Explainer:
    """The trained G and f with their parameters: images in, series out (`exaggerate explain`
    without the files), for the pyfunc model and the explorer page."""

    def __init__(self, cfg, f, g, device: torch.device):
        self.cfg, self.f, self.g, self.device = cfg, f, g, device
        from .datasets import preprocess_for

        self.preprocess = preprocess_for(cfg.base)

    @classmethod
    def from_files(cls, params_path: str | Path, classifier_dir: str | Path,
                   generator_path: Optional[str | Path] = None) -> "Explainer":
        from .checkpoint import load_generator
        from .classifier import load_classifier
        from .config import load_config
        from .utils import resolve_device

        cfg = load_config(params_path, complete=False)  # keys added since the model was made: defaults
        device = resolve_device(cfg.base.device)
        f = load_classifier(classifier_dir, cfg.base).to(device)
        g = None if generator_path is None else load_generator(generator_path, cfg.base, cfg.explainer).to(device)
        return cls(cfg, f, g, device)

    @property
    def num_bins(self) -> int:
        return self.cfg.base.num_bins

    def images(self, values: Sequence[Any], convert: bool = False) -> torch.Tensor:
        """Decode and preprocess every image first, so that one bad image fails the request whole."""
        from .datasets import DatasetError

        out = []
        for k, value in enumerate(values):
            source = f"image {k}"
            try:
                out.append(self.preprocess(decode_image(value, source), source, convert=convert))
            except DatasetError as exc:
                raise InputError(str(exc).replace("pass --convert", "set the param convert to true")) from exc
        return torch.stack(out)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> list[dict]:
        from .posteriors import bin_index

        p = self.f(x.to(self.device)).cpu().numpy()
        return [{"p": float(v), "bin": int(b)} for v, b in zip(p, bin_index(p, self.num_bins))]

    @torch.no_grad()
    def explain(self, x: torch.Tensor, batch_size: int = 32) -> list[dict]:
        from .inference import explain_batch

        rows = []
        for i in range(0, len(x), batch_size):
            r = explain_batch(self.g, self.f, x[i:i + batch_size].to(self.device), self.num_bins,
                              self.cfg.explain.probes, self.cfg.explain.detail)
            for j in range(len(r["p_query"])):
                rows.append({"p_query": float(r["p_query"][j]), "source_bin": int(r["source_bin"][j]),
                             "p_series": [float(v) for v in r["p_series"][j]],
                             "series": [encode_png(img) for img in r["series"][j]]})
        return rows


# ----------------------------------------------------------------------------- pyfunc models

def _pyfunc_base():
    import warnings

    import mlflow.pyfunc

    # The models check their input themselves (image_column, Explainer.images) and say what is
    # wrong; MLflow's type-hint validation would only repeat the signature.
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")
    return mlflow.pyfunc.PythonModel


def _images_of(explainer: "Explainer", model_input, params: Optional[dict]) -> torch.Tensor:
    """The request's images, or an MlflowException that the server answers with HTTP 400."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    try:
        return explainer.images(image_column(model_input), convert=bool((params or {}).get("convert", False)))
    except InputError as exc:
        raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc


class ExplainerModel(_pyfunc_base()):
    """pyfunc: images (base64) -> f's posterior and the series per image (see the module's doc)."""

    def load_context(self, context) -> None:
        a = context.artifacts
        self.explainer = Explainer.from_files(a["params"], a["classifier"], a["generator"])
        folder = Path(a["examples"])
        self.examples = {p.name: base64.b64encode(p.read_bytes()).decode("ascii")
                         for p in sorted(folder.glob("*.png"))}

    def predict(self, context, model_input, params: Optional[dict] = None):
        import pandas as pd

        return pd.DataFrame(self.explainer.explain(_images_of(self.explainer, model_input, params)))


class ClassifierModel(_pyfunc_base()):
    """pyfunc: images (base64) -> f's posterior and its bin."""

    def load_context(self, context) -> None:
        self.explainer = Explainer.from_files(context.artifacts["params"], context.artifacts["classifier"])

    def predict(self, context, model_input, params: Optional[dict] = None):
        import pandas as pd

        return pd.DataFrame(self.explainer.classify(_images_of(self.explainer, model_input, params)))


# ----------------------------------------------------------------------------- the register stage

def example_images(dataset, indices: Sequence[int]) -> list[tuple[str, bytes]]:
    """(name, PNG bytes) of dataset images as a user would send them: the file itself, or for
    Fashion-MNIST (held in memory) its 28x28 pixels as a PNG."""
    from PIL import Image

    out = []
    for i in indices:
        name = Path(str(dataset.ids[i])).stem.replace("/", "_") + ".png"
        if dataset._paths is not None:
            img = Image.open(dataset._paths[i])
        else:
            img = Image.fromarray(np.asarray(dataset._pixels[i], dtype=np.uint8), mode="L")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append((name, buf.getvalue()))
    return out


def pip_requirements() -> list[str]:
    """The model's environment: the versions installed here of what the package imports at run time."""
    from importlib.metadata import version

    names = ("torch", "torchvision", "numpy", "pandas", "pillow", "pyyaml", "mlflow", "matplotlib", "scipy")
    return [f"{n}=={version(n)}" for n in names]


def register_models(cfg, paths: dict, dataset, example_indices: Sequence[int], metrics: dict, tags: dict) -> dict:
    """Log the classifier and the explainer as pyfunc models in the active MLflow run, register
    both, tag the new versions (commit, DVC experiment, headline metrics); return their URIs."""
    import shutil
    import tempfile

    import mlflow
    import pandas as pd
    import yaml
    from mlflow.models import infer_signature

    examples = example_images(dataset, example_indices)
    frame = pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(b).decode("ascii") for _, b in examples[:2]]})
    client = mlflow.MlflowClient()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # What the models need and nothing more (not the classifier's training checkpoints).
        params_path = tmp / "params.yaml"
        params_path.write_text(yaml.safe_dump({**cfg.to_dict(), "base": {**cfg.to_dict()["base"], "device": "auto"}},
                                              sort_keys=False))
        (tmp / "classifier").mkdir()
        for name in ("model.pt", "classifier.json"):
            shutil.copy(Path(paths["train_classifier"]) / name, tmp / "classifier" / name)
        folder = tmp / "examples"
        folder.mkdir()
        for name, data in examples:
            (folder / name).write_bytes(data)
        explainer = Explainer.from_files(params_path, tmp / "classifier", Path(paths["train_explainer"]) / "generator.pt")
        x = explainer.images(frame[IMAGE_COLUMN].tolist())
        classifier_artifacts = {"params": str(params_path), "classifier": str(tmp / "classifier")}
        for key, model, artifacts, output in (
                ("classifier", ClassifierModel(), classifier_artifacts, pd.DataFrame(explainer.classify(x))),
                ("explainer", ExplainerModel(), {**classifier_artifacts,
                                                 "generator": str(Path(paths["train_explainer"]) / "generator.pt"),
                                                 "examples": str(folder)}, pd.DataFrame(explainer.explain(x)))):
            name = CLASSIFIER_NAME if key == "classifier" else EXPLAINER_NAME
            info = mlflow.pyfunc.log_model(
                name=key, python_model=model, artifacts=artifacts, code_paths=[str(PACKAGE_DIR)],
                signature=infer_signature(frame, output, params={"convert": False}), input_example=frame,
                registered_model_name=name, pip_requirements=pip_requirements())
            version = str(info.registered_model_version)
            for k, v in {**tags, **{f"metric.{m}": v for m, v in metrics.items() if v is not None}}.items():
                client.set_model_version_tag(name, version, k, str(v))
            out[key] = {"name": name, "version": version, "uri": f"models:/{name}/{version}",
                        "run_id": info.run_id, "model_uri": info.model_uri}
            print(f"registered {key}: models:/{name}/{version}")
    return out
