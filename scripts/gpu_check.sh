#!/usr/bin/env bash
# The one-call GPU check, for a lent H100/H200 (python3 with a CUDA torch, triton, nvcc, compute-sanitizer):
#   OUT=/some/dir bash scripts/gpu_check.sh            # about 8 minutes
#   OUT=/some/dir bash scripts/gpu_check.sh --dry-run  # the same stages on the CPU, skipping what needs CUDA
# Stages: environment, CUDA build, the GPU tests (CUDA C++ and Triton backends against the reference, every
# dtype, no host syncs, CUDA-graph capture), compute-sanitizer memcheck/racecheck/synccheck over
# benchmarks/sanitize.py, the op benchmarks (eager-ref, eager-best, compile, each mage backend; % of the HBM
# and tensor-core rooflines per row) and the end-to-end ViT-B sampling and training benchmarks.
# Each stage has a time limit; a failed stage is recorded and the next one still runs. Under $OUT (default
# out/gpu): summary.txt (one line per stage), build_info.json, ops.csv, sampling.csv, training.csv and
# logs.tar.gz (every stage's full log). Exit status 1 if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/python
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1  # Triton kernels on CPU tensors
  DEVICE=cpu
else
  DEVICE=cuda
fi
: > "$OUT/summary.txt"
FAILED=0

# stage NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log, one summary line.
stage() {
  local name=$1 limit=$2
  shift 2
  local start rc
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  local status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMEOUT after ${limit} s"; elif [ "$rc" != 0 ]; then status="FAILED rc=$rc"; fi
  [ "$status" = ok ] || FAILED=1
  printf '%-22s %-22s %4d s\n' "$name" "$status" "$(( $(date +%s) - start ))" | tee -a "$OUT/summary.txt"
  [ "$status" = ok ] || tail -25 "$LOGS/$name.log" | sed 's/^/    /'
}

skip() {
  printf '%-22s %-22s\n' "$1" "skipped: $2" | tee -a "$OUT/summary.txt"
}

stage env 60 sh -c "(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo 'no nvidia-smi'); \
  $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"gpus\", torch.cuda.device_count())'; \
  (nvcc --version | tail -1 || true); (compute-sanitizer --version | tail -1 || true)"

if [ "$DRY" = 1 ]; then
  # The same in-place build without CUDA, so every later stage imports the library it would on the GPU.
  stage build 600 sh -c "cmake -S . -B build/gpu-dry -G Ninja -DMAGE_CUDA=OFF -DMAGE_INPLACE=ON -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE=\"$(command -v "$PY")\" && cmake --build build/gpu-dry"
else
  stage build 300 sh -c "cmake -S . -B build/gpu -G Ninja -DMAGE_CUDA=ON -DMAGE_INPLACE=ON -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES=90-real -DPython_EXECUTABLE=\"$(command -v "$PY")\" && cmake --build build/gpu -j 16"
fi
stage build_info 60 sh -c "$PY -c 'import mage_kernels, json; print(json.dumps(mage_kernels.build_info(), indent=1))' \
  > '$OUT/build_info.json'"

GPU_TESTS="tests/test_vq_cuda.py tests/test_vq.py tests/test_masking.py tests/test_remask.py tests/test_sampler.py \
  tests/test_triton_launch.py tests/test_cuda_plan.py"
if [ "$DRY" = 1 ]; then
  # The same test files and options, collected; the launch-plan tests run.
  stage tests 300 sh -c "$PY -m pytest $GPU_TESTS -q -p no:cacheprovider --co > /dev/null && \
    $PY -m pytest tests/test_cuda_plan.py -q -p no:cacheprovider"
  stage tests_triton 300 env MAGE_KERNELS_BACKEND=triton $PY -m pytest tests/test_vq_cuda.py -q -p no:cacheprovider --co
else
  # Every CUDA test (the native backend on CUDA tensors), then the op-level CUDA tests on the Triton backend.
  stage tests 240 $PY -m pytest $GPU_TESTS -q -p no:cacheprovider -rs ${GPU_TEST_ARGS:-}
  stage tests_triton 120 env MAGE_KERNELS_BACKEND=triton $PY -m pytest tests/test_vq_cuda.py tests/test_masking.py \
    tests/test_remask.py -q -p no:cacheprovider -k "cuda or sync or graph"
fi

if [ "$DRY" = 0 ] && command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck synccheck; do
    stage "sanitize_$tool" 90 compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" benchmarks/sanitize.py
  done
elif [ "$DRY" = 0 ]; then
  skip sanitize "compute-sanitizer not found"
else
  stage sanitize_cpu 300 "$PY" benchmarks/sanitize.py --device cpu
fi

if [ "$DRY" = 1 ]; then
  stage bench_ops 300 "$PY" benchmarks/run.py --device cpu --quick --threads 2 --only vq --out "$OUT/ops.csv"
  stage bench_sampling 300 "$PY" benchmarks/bench_sampling.py --device cpu --model tiny --batch 1 --steps 2 \
    --dtype fp32 --no-warmup --csv "$OUT/sampling.csv"
  stage bench_training 300 "$PY" benchmarks/bench_training.py --device cpu --model tiny --batch 2 --steps 1 \
    --csv "$OUT/training.csv"
else
  stage bench_ops 150 "$PY" benchmarks/run.py --device cuda --out "$OUT/ops.csv"
  # ViT-B at batch 32, 20 steps: eager-ref vs mage vs mage with a CUDA graph, fp32 and bf16.
  stage bench_sampling 90 "$PY" benchmarks/bench_sampling.py --device cuda --model base --batch 32 --steps 20 \
    --repeat 2 --csv "$OUT/sampling.csv"
  # MAGE ViT-B training steps at batch 64, bf16: images/s with mage's ops and with the reference ops.
  stage bench_training 60 "$PY" benchmarks/bench_training.py --device cuda --model base --batch 64 --steps 10 \
    --csv "$OUT/training.csv"
fi

for f in ops.csv sampling.csv training.csv build_info.json; do
  [ -s "$OUT/$f" ] || { echo "missing output: $f" | tee -a "$OUT/summary.txt"; FAILED=1; }
done
tar czf "$OUT/logs.tar.gz" -C "$LOGS" --exclude=build .
rm -rf "$LOGS"
echo "gpu_check: $([ $FAILED = 0 ] && echo 'all stages passed' || echo 'some stages failed'); results in $OUT"
exit $FAILED
