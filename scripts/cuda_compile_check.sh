#!/usr/bin/env bash
# Compile the CUDA sources against a CUDA build of torch (2.14.1, from local wheels) in a second venv,
# with MAGE_CUDA=ON and one architecture (sm_90), so a .cu that does not compile fails CI. Nothing is run.
# ptxas reports (-Xptxas -v) of that build, and sm_90 compiles of every Triton kernel configuration, then go
# through scripts/static_sm90.py, which fails on spills, stack frames or shared memory over a launch's limit
# and writes benchmarks/results/static-sm90.md.
#   MAGE_CUDA_VENV   where that venv lives (default: .venv-cu); a relative path is from the repository root
#   MAGE_CUDA_BUILD  the build folder (default: build/cuda-check), likewise
#   MAGE_T36_VENV    a third venv (default: .venv-t36) with Triton 3.6, the GPU machines' version, which compiles
#                    the same Triton configurations into benchmarks/results/static-sm90-triton3.6.md
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MAGE_CUDA_VENV:-.venv-cu}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# FindPython ignores a relative Python_EXECUTABLE and takes the first Python on PATH: make it absolute.
VENV=$(cd "$VENV" && pwd)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 "scikit-build-core>=0.11" ninja numpy
BUILD=${MAGE_CUDA_BUILD:-build/cuda-check}
cmake -S . -B "$BUILD" -G Ninja -DMAGE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real \
  -DCMAKE_CUDA_FLAGS="-Xptxas -v" -DPython_EXECUTABLE="$VENV/bin/python" -DCMAKE_BUILD_TYPE=Release >/dev/null
# Every .cu is recompiled so that its ptxas report is in this run's log.
rm -f "$BUILD"/CMakeFiles/_C.dir/csrc/*.cu.o
cmake --build "$BUILD" 2>&1 | tee "$BUILD/ptxas.log"
echo "CUDA sources compiled: $(ls csrc/*.cu | tr '\n' ' ')"
"$VENV/bin/python" scripts/static_sm90.py --cuda-log "$BUILD/ptxas.log" --cuda-lib "$(ls "$BUILD"/_C*.so | head -1)"

# The GPU machines run Triton 3.6 (torch 2.11); CI's CUDA torch brings 3.8. The Triton half again, with 3.6.
T36=${MAGE_T36_VENV:-.venv-t36}
if [ ! -x "$T36/bin/python" ]; then
  python3 -m venv "$T36"
fi
T36=$(cd "$T36" && pwd)
"$T36/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 triton==3.6.0 "numpy<2.4"
"$T36/bin/python" scripts/static_sm90.py --out benchmarks/results/static-sm90-triton3.6.md
