#!/usr/bin/env bash
# The one-call GPU check (run on a lent H100/H200 with the `device` tool): build with CUDA in place,
# run the test suite on the GPU, run compute-sanitizer over every op, run the GPU benchmarks.
# Everything is written under ${OUT:-out/gpu} (logs, CSV). Uses the machine's python3 (torch with CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/python
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
"$PY" -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> "$OUT/gpu.txt"

{ cmake -S . -B build/gpu -G Ninja -DMAGE_CUDA=ON -DMAGE_INPLACE=ON -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES=90a-real -DPython_EXECUTABLE="$(command -v "$PY")" && cmake --build build/gpu; } \
  > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
"$PY" -c "import mage_kernels, json; print(json.dumps(mage_kernels.build_info(), indent=1))" | tee "$OUT/build_info.json"

timeout 240 "$PY" -m pytest tests -x -q -p no:cacheprovider ${GPU_TEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -15

if command -v compute-sanitizer >/dev/null; then
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" benchmarks/sanitize.py \
    > "$OUT/sanitizer.log" 2>&1; echo "compute-sanitizer rc=$?" | tee -a "$OUT/sanitizer.log"
fi

timeout 240 "$PY" benchmarks/run.py --device cuda --out "$OUT/gpu.csv" 2>&1 | tee "$OUT/bench.log" | tail -40

# End-to-end sampling, ViT-B at batch 32, 20 steps: eager-ref vs mage vs mage with a CUDA graph, fp32 and bf16.
timeout 200 "$PY" benchmarks/bench_sampling.py --model base --batch 32 --steps 20 --repeat 2 2>&1 \
  | tee "$OUT/sampling.log" | tail -8
