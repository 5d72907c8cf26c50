#!/usr/bin/env bash
# Set-up on a fresh machine (root, Python 3.11, package registries only): a virtual
# environment in .venv with this package, and the embedded Fashion-MNIST data in data/.
# Idempotent: a second run reuses what is there. Usage: scripts/setup.sh [extras, e.g. test]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

python=""
for candidate in python3.11 python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
    python="$candidate"; break
  fi
done
[ -n "$python" ] || { echo "setup: Python >= 3.11 is needed" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv

# Reinstall only when the project's requirements (or the extras asked for) change.
stamp=".venv/.exaggerate-installed"
want="$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16) extras=[${extras}]"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
  # torch's CUDA build and its libraries take about 6.7 GB in .venv: say so before pip fails
  # with a bare "No space left on device".
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ "${free_kb:-0}" -lt $((8 * 1024 * 1024)) ] && ! compgen -G ".venv/lib/python3*/site-packages/torch" >/dev/null; then
    echo "setup: warning: $((free_kb / 1024)) MB free on the disk holding $(pwd); installing the" \
      "packages needs about 7 GB" >&2
  fi
  spec="."
  [ -n "$extras" ] && spec=".[${extras}]"
  # torch/torchvision are pinned (2.14.1 / 0.29.1) in pyproject.toml so pip takes them from local disk;
  # requirements.lock fixes every other version (no resolver backtracking, the versions tested).
  # (pip warns about local index folders this machine's pip.conf names but does not have: drop those lines)
  .venv/bin/pip install --quiet --disable-pip-version-check -c requirements.lock -e "$spec" 2>&1 \
    | { grep -v "is neither a file nor a directory" || true; }
  echo "$want" >> "$stamp"
fi

# The embedded default dataset: Debian's dataset-fashion-mnist, copied into data/ (tracked by data.dvc).
debian_dir=/usr/share/datasets/fashion-mnist
if [ ! -f "$debian_dir/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "setup: install the Debian package dataset-fashion-mnist (as root: apt-get install dataset-fashion-mnist)" >&2
    exit 1
  fi
fi
mkdir -p data/fashion-mnist
for f in "$debian_dir"/*-ubyte.gz; do
  [ -f "data/fashion-mnist/$(basename "$f")" ] || cp "$f" data/fashion-mnist/
done

# The tests drive the explorer page in Debian's headless Chromium.
if [[ ",${extras}," == *",test,"* ]] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null
  else
    echo "setup: the browser test needs Debian's chromium and chromium-driver (as root: apt-get install" \
      "chromium chromium-driver); without them it is skipped" >&2
  fi
fi
