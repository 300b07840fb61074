#!/usr/bin/env bash
# Compile the CUDA sources against a CUDA build of torch (2.14.1, from local wheels) in a second venv,
# with MAGE_CUDA=ON and one architecture, so a .cu that does not compile fails CI. Nothing is run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MAGE_CUDA_VENV:-.venv-cu}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 "scikit-build-core>=0.11" ninja numpy
BUILD=${MAGE_CUDA_BUILD:-build/cuda-check}
cmake -S . -B "$BUILD" -G Ninja -DMAGE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real \
  -DPython_EXECUTABLE="$VENV/bin/python" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD"
echo "CUDA sources compiled: $(ls csrc/*.cu | tr '\n' ' ')"
