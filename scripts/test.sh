#!/usr/bin/env bash
# The test suite, slow end-to-end tests included (-m "not slow" skips them locally).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
source .venv/bin/activate
exec python -m pytest "$@"
