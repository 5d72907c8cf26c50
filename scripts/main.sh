#!/usr/bin/env bash
# The main job: set up, then run the whole DVC pipeline on the embedded default (Fashion-MNIST),
# and end with the results table and where to look next.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
# Put the dataset in DVC's cache too (data.dvc stays as committed when the files are the same),
# so that `dvc push` can send it to a remote.
dvc commit --force --quiet data.dvc
dvc repro "$@"

cat <<SUMMARY

== Results (outputs/evaluate/results.md, test split) ==
$(cat outputs/evaluate/results.md)

== Where to look ==
- the series:        outputs/explain/series_grid.png, one strip per query in outputs/explain/strips/
- evaluation plots:  outputs/evaluate/compatibility.png, oracle_agreement.png, series_comparison.png
- all metrics:       dvc metrics show (dvc metrics diff against another commit or experiment)
- MLflow UI:         .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   (http://127.0.0.1:5000)
SUMMARY
