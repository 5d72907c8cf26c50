#!/usr/bin/env bash
# The main job: set up, then run the whole DVC pipeline on the embedded default (Fashion-MNIST).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
# Put the dataset in DVC's cache too (data.dvc stays as committed when the files are the same),
# so that `dvc push` can send it to a remote.
dvc commit --force --quiet data.dvc
dvc repro "$@"
dvc metrics show
