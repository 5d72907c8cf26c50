"""The explorer: a small web page over a registered explainer.

`exaggerate explore` loads the explainer from the MLflow Model Registry (the register stage's
version by default) and serves, on 127.0.0.1:

- `/`: pick one of the model's example images or upload your own, drag the slider over the bins,
  and see the exaggerated image, f's posterior and the whole series as a strip;
- `/api/info`: the target, the number of bins and the examples (JSON);
- `/api/explain`: POST {"image": base64 image file, "convert": false} -> the series (JSON). A bad
  request gets HTTP 400 (413 when too large) with {"error": reason}; the page shows the reason.
"""
import json
from pathlib import Path
from typing import Optional

from .errors import ExaggerateError

MAX_REQUEST_BYTES = 16 * 1024 * 1024


class ExplorerError(ExaggerateError):
    """The explorer cannot start (no such model, not an explainer); the message says why."""


def default_model_uri(register_dir: str | Path = "outputs/register") -> str:
    """The explainer the pipeline registered last (outputs/register/models.json)."""
    path = Path(register_dir) / "models.json"
    if not path.is_file():
        raise ExplorerError(f"{path} not found: run the pipeline (dvc repro) first, or pass --model "
                            "models:/exaggerate-explainer/<version>")
    return json.loads(path.read_text())["explainer"]["uri"]


def load_explainer_model(uri: str):
    """The pyfunc explainer at `uri`, or ExplorerError naming the URI and the reason."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from .models import ExplainerModel
    from .tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        model = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise ExplorerError(f"cannot load model {uri} from {tracking_uri()}: {message}") from exc
    inner = model.unwrap_python_model()
    if not isinstance(inner, ExplainerModel) and type(inner).__name__ != "ExplainerModel":
        raise ExplorerError(f"model {uri} is a {type(inner).__name__}, not an exaggerate explainer")
    return model, inner


def create_app(uri: str):
    import pandas as pd
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from mlflow.exceptions import MlflowException

    from .models import IMAGE_COLUMN

    model, inner = load_explainer_model(uri)
    cfg = inner.explainer.cfg
    info = {"model": uri, "target": cfg.base.target, "num_bins": cfg.base.num_bins,
            "examples": [{"name": n, "image": b} for n, b in inner.examples.items()]}
    app = FastAPI(title="exaggerate explorer", docs_url=None, redoc_url=None)

    def bad(status: int, reason: str) -> JSONResponse:
        return JSONResponse({"error": reason}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/api/info")
    def get_info() -> dict:
        return info

    @app.post("/api/explain")
    async def explain(request: Request):
        body = await request.body()
        if len(body) > MAX_REQUEST_BYTES:
            return bad(413, f"request of {len(body)} bytes; at most {MAX_REQUEST_BYTES} are accepted")
        if not body:
            return bad(400, "empty request: send JSON {\"image\": <base64 image file>}")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return bad(400, f"request is not JSON: {exc}")
        if not isinstance(payload, dict) or not payload.get("image"):
            return bad(400, "request has no image: send JSON {\"image\": <base64 image file>}")
        if not isinstance(payload["image"], str):
            return bad(400, "image: expected base64 text of an image file")
        try:
            out = model.predict(pd.DataFrame({IMAGE_COLUMN: [payload["image"]]}),
                                params={"convert": bool(payload.get("convert", False))})
        except MlflowException as exc:
            return bad(400, exc.message.split("Error: ", 1)[-1])
        row = out.iloc[0]
        return {"p_query": float(row["p_query"]), "source_bin": int(row["source_bin"]),
                "p_series": [float(v) for v in row["p_series"]], "series": list(row["series"])}

    return app


def serve(uri: Optional[str], host: str = "127.0.0.1", port: int = 8050) -> None:
    import uvicorn

    uri = uri or default_model_uri()
    app = create_app(uri)
    print(f"exaggerate explorer: {uri} at http://{host}:{port}/ (Ctrl+C stops it)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>exaggerate explorer</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 980px; }
  h1 { font-size: 1.3rem; margin: 0 0 .3rem; }
  .muted { color: #666; font-size: .9rem; }
  #examples img { width: 56px; height: 56px; image-rendering: pixelated; border: 2px solid transparent;
                  cursor: pointer; margin: 2px; background: #000; }
  #examples img:hover { border-color: #888; }
  #error { display: none; background: #fde8e8; color: #8a1111; border: 1px solid #e0a0a0; padding: .6rem;
           margin: .8rem 0; white-space: pre-wrap; }
  #result { display: none; margin-top: 1rem; }
  .pair { display: flex; gap: 2rem; align-items: flex-start; }
  .pair figure { margin: 0; text-align: center; }
  .pair img { width: 192px; height: 192px; image-rendering: pixelated; background: #000; }
  #slider { width: 420px; }
  #strip { display: flex; gap: 4px; margin-top: 1rem; }
  #strip figure { margin: 0; text-align: center; font-size: .75rem; }
  #strip img { width: 64px; height: 64px; image-rendering: pixelated; border: 3px solid transparent; background: #000; }
  #strip img.current { border-color: #d0641b; }
  #posterior { font-size: 1.4rem; font-weight: 600; }
</style>
</head>
<body>
<h1>exaggerate explorer</h1>
<div class="muted">Model <span id="model">...</span>: the classifier's posterior of <b id="target">...</b>,
  exaggerated bin by bin from 0 to 1.</div>
<h2 style="font-size:1rem">1. Pick an image or upload one</h2>
<div id="examples"></div>
<p><input type="file" id="upload" accept="image/*">
  <label><input type="checkbox" id="convert"> convert colour to grey / grey to colour</label></p>
<div id="error" role="alert"></div>
<div id="result">
  <h2 style="font-size:1rem">2. Drag over the bins</h2>
  <p><input type="range" id="slider" min="0" max="9" step="1" value="0">
     <span>bin <span id="bin">0</span></span></p>
  <div class="pair">
    <figure><img id="query" alt="query"><figcaption>query: f = <span id="p-query"></span></figcaption></figure>
    <figure><img id="exaggerated" alt="exaggerated"><figcaption>exaggerated:
      f = <span id="posterior"></span><br><span class="muted">target bin <span id="bin-range"></span></span>
    </figcaption></figure>
  </div>
  <div id="strip"></div>
</div>
<script>
let current = null, numBins = 10, lastImage = null;
const $ = (id) => document.getElementById(id);
function showError(text) { $("error").textContent = text; $("error").style.display = "block";
  $("result").style.display = "none"; document.body.dataset.state = "error"; }
function show(k) {
  k = Number(k);
  $("exaggerated").src = "data:image/png;base64," + current.series[k];
  $("posterior").textContent = current.p_series[k].toFixed(3);
  $("bin").textContent = k;
  $("bin-range").textContent = "[" + (k / numBins).toFixed(2) + ", " + ((k + 1) / numBins).toFixed(2) + ")";
  document.querySelectorAll("#strip img").forEach((img, i) => img.classList.toggle("current", i === k));
}
async function explain(b64) {
  lastImage = b64;
  document.body.dataset.state = "busy";
  $("error").style.display = "none";
  let response, body;
  try {
    response = await fetch("api/explain", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({image: b64, convert: $("convert").checked})});
    body = await response.json();
  } catch (e) { showError("The server did not answer: " + e); return; }
  if (!response.ok) { showError(body.error || ("HTTP " + response.status)); return; }
  current = body;
  $("query").src = "data:image/png;base64," + b64;
  $("p-query").textContent = body.p_query.toFixed(3);
  const strip = $("strip"); strip.innerHTML = "";
  body.series.forEach((s, k) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img"); img.src = "data:image/png;base64," + s;
    img.onclick = () => { $("slider").value = k; show(k); };
    const cap = document.createElement("figcaption"); cap.textContent = body.p_series[k].toFixed(2);
    fig.append(img, cap); strip.append(fig);
  });
  $("slider").max = body.series.length - 1;
  $("slider").value = body.source_bin;
  show(body.source_bin);
  $("result").style.display = "block";
  document.body.dataset.state = "ready";
}
$("slider").addEventListener("input", (e) => show(e.target.value));
$("upload").addEventListener("change", (e) => {
  const file = e.target.files[0]; if (!file) return;
  const reader = new FileReader();
  reader.onload = () => explain(String(reader.result).split(",")[1] || "");
  reader.readAsDataURL(file);
  e.target.value = "";  // choosing the same file again explains it again
});
$("convert").addEventListener("change", () => { if (lastImage !== null) explain(lastImage); });
fetch("api/info").then((r) => r.json()).then((info) => {
  numBins = info.num_bins; $("model").textContent = info.model; $("target").textContent = info.target;
  info.examples.forEach((ex) => {
    const img = document.createElement("img"); img.src = "data:image/png;base64," + ex.image;
    img.title = ex.name; img.alt = ex.name; img.onclick = () => explain(ex.image);
    $("examples").append(img);
  });
  document.body.dataset.state = "loaded";
});
</script>
</body>
</html>
"""
