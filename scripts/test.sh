#!/usr/bin/env bash
# The test suite, slow end-to-end tests included (-m "not slow" skips them locally), one file per
# worker process on each core (pytest-xdist; at most 4: most end-to-end tests run single-threaded
# subprocesses). EXAGGERATE_TEST_WORKERS=0 runs everything in this process, one test at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
source .venv/bin/activate
exec python -m pytest -n "${EXAGGERATE_TEST_WORKERS:-auto}" --maxprocesses 4 --dist loadfile "$@"
