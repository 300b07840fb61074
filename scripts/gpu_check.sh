#!/usr/bin/env bash
# The one-call GPU check, for a lent H100/H200 (python3 with a CUDA torch, triton, nvcc, compute-sanitizer):
#   OUT=/some/dir bash scripts/gpu_check.sh            # at most GPU_CHECK_BUDGET seconds (default 480)
#   OUT=/some/dir bash scripts/gpu_check.sh --dry-run  # the same stages on the CPU, skipping what needs CUDA
# Stages, most valuable first: environment, CUDA build, the GPU tests (CUDA C++ and Triton backends against
# the reference, every dtype, no host syncs, CUDA-graph capture), compute-sanitizer memcheck over
# benchmarks/sanitize.py, the op benchmarks one family at a time (eager-ref, eager-best, compile, each mage
# backend; % of the HBM and tensor-core rooflines per row), the end-to-end ViT-B sampling and training
# benchmarks, then compute-sanitizer racecheck and synccheck.
# Each stage has a time limit and the whole run a budget: a stage that would start with too little of it left
# is skipped and said so; a failed stage is recorded and the next one still runs. Everything is written under
# $OUT (default out/gpu) as each stage ends, so a run killed from outside still returns what it did:
# summary.txt (one line per stage), build_info.json, ops.csv, sampling.csv, training.csv and logs.tar.gz
# (every stage's full log). Exit status 1 if any stage failed.
#   GPU_CHECK_BUDGET=SECONDS    the whole run's budget (default 480 on the GPU, unlimited in a dry run)
#   GPU_CHECK_ONLY="tests ops"  run only the stages whose names start with one of these (the build always
#                               runs; it is incremental on a machine that still has build/gpu)
#   GPU_TEST_ARGS="-k vq"       extra pytest arguments for the tests stage
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
  BUDGET=${GPU_CHECK_BUDGET:-100000}
else
  DEVICE=cuda
  BUDGET=${GPU_CHECK_BUDGET:-480}
  # CUDA images keep nvcc and compute-sanitizer in /usr/local/cuda/bin, not always on PATH.
  command -v nvcc > /dev/null || [ ! -x /usr/local/cuda/bin/nvcc ] || export PATH="$PATH:/usr/local/cuda/bin"
  command -v compute-sanitizer > /dev/null || [ ! -x /usr/local/cuda/bin/compute-sanitizer ] \
    || export PATH="$PATH:/usr/local/cuda/bin"
fi
ONLY=${GPU_CHECK_ONLY:-}
START=$(date +%s)
: > "$OUT/summary.txt"
FAILED=0

selected() {
  [ -z "$ONLY" ] || [ "$1" = build ] && return 0
  local want
  for want in $ONLY; do
    case "$1" in "$want"*) return 0 ;; esac
  done
  return 1
}

# stage NAME SECONDS COMMAND...: run with a time limit (cut to what is left of the budget), log to
# $LOGS/NAME.log, one summary line; the logs go to $OUT after every stage.
stage() {
  local name=$1 limit=$2
  shift 2
  selected "$name" || return 0
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    printf '%-22s %-22s\n' "$name" "skipped: budget spent (GPU_CHECK_BUDGET=$BUDGET)" | tee -a "$OUT/summary.txt"
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  local start rc status=ok
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMEOUT after ${limit} s"; elif [ "$rc" != 0 ]; then status="FAILED rc=$rc"; fi
  [ "$status" = ok ] || FAILED=1
  printf '%-22s %-22s %4d s\n' "$name" "$status" "$(( $(date +%s) - start ))" | tee -a "$OUT/summary.txt"
  [ "$status" = ok ] || tail -25 "$LOGS/$name.log" | sed 's/^/    /'
  save_logs
}

save_logs() {
  tar czf "$OUT/logs.tar.gz.tmp" -C "$LOGS" . && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

skip() {
  selected "$1" || return 0
  printf '%-22s %-22s\n' "$1" "skipped: $2" | tee -a "$OUT/summary.txt"
}

# add_ops PART: a family's CSV onto $OUT/ops.csv (which this run's first family starts afresh).
OPS_ROWS=0
add_ops() {
  [ -s "$1" ] || return 0
  if [ "$OPS_ROWS" = 0 ]; then cp "$1" "$OUT/ops.csv"; else tail -n +2 "$1" >> "$OUT/ops.csv"; fi
  OPS_ROWS=1
}

stage env 60 sh -c "(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo 'no nvidia-smi'); \
  $PY -c 'import sys, torch, triton; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"gpus\", torch.cuda.device_count())'; \
  echo nproc \$(nproc); (command -v nvcc && nvcc --version | tail -2 || echo 'no nvcc'); \
  (command -v compute-sanitizer && compute-sanitizer --version | tail -1 || echo 'no compute-sanitizer'); cmake --version | head -1"

if [ "$DRY" = 1 ]; then
  # The same in-place build without CUDA, so every later stage imports the library it would on the GPU.
  stage build 600 sh -c "cmake -S . -B build/gpu-dry -G Ninja -DMAGE_CUDA=OFF -DMAGE_INPLACE=ON -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE=\"$(command -v "$PY")\" && cmake --build build/gpu-dry"
else
  stage build 300 sh -c "cmake -S . -B build/gpu -G Ninja -DMAGE_CUDA=ON -DMAGE_INPLACE=ON -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES=90-real -DPython_EXECUTABLE=\"$(command -v "$PY")\" && cmake --build build/gpu -j $(nproc)"
fi
stage build_info 60 sh -c "$PY -c 'import mage_kernels, json; print(json.dumps(mage_kernels.build_info(), indent=1))' \
  > '$OUT/build_info.json'"

GPU_TESTS="tests/test_vq_cuda.py tests/test_vq.py tests/test_masking.py tests/test_remask.py tests/test_sampler.py \
  tests/test_triton_launch.py tests/test_cuda_plan.py"
if [ "$DRY" = 1 ]; then
  # The same test files and options, collected; the launch-plan tests run; and the Triton tests as a GPU
  # machine runs them, without the interpreter (a test that hands Triton CPU tensors must skip there, not fail).
  stage tests 300 sh -c "$PY -m pytest $GPU_TESTS -q -p no:cacheprovider --co > /dev/null && \
    $PY -m pytest tests/test_cuda_plan.py -q -p no:cacheprovider && \
    TRITON_INTERPRET=0 $PY -m pytest $GPU_TESTS -q -p no:cacheprovider -rs -k 'triton or launch or 64bit'"
  stage tests_triton 300 env MAGE_KERNELS_BACKEND=triton $PY -m pytest tests/test_vq_cuda.py -q -p no:cacheprovider --co
else
  # Every CUDA test (the native backend on CUDA tensors), then the op-level CUDA tests on the Triton backend.
  stage tests 180 $PY -m pytest $GPU_TESTS -q -p no:cacheprovider -rfEs --durations=15 ${GPU_TEST_ARGS:-}
  stage tests_triton 120 env MAGE_KERNELS_BACKEND=triton $PY -m pytest tests/test_vq_cuda.py tests/test_masking.py \
    tests/test_remask.py -q -p no:cacheprovider -rfEs --durations=10 -k "cuda or sync or graph"
fi

# compute-sanitizer: memcheck without torch's caching allocator, so an access past a tensor's end is outside
# every allocation instead of inside a cached block.
sanitize() {
  if [ "$DRY" = 1 ]; then
    [ "$1" = memcheck ] && stage sanitize_cpu 300 "$PY" benchmarks/sanitize.py --device cpu
  elif command -v compute-sanitizer > /dev/null; then
    local caching=-uPYTORCH_NO_CUDA_MEMORY_CACHING  # torch reads the variable's presence, not its value
    [ "$1" = memcheck ] && caching=PYTORCH_NO_CUDA_MEMORY_CACHING=1
    stage "sanitize_$1" "$2" env "$caching" \
      compute-sanitizer --tool "$1" --error-exitcode 1 --print-limit 50 "$PY" benchmarks/sanitize.py
  else
    skip "sanitize_$1" "compute-sanitizer not found"
  fi
}
sanitize memcheck 90

# The op benchmarks one family at a time (benchmarks/run.py writes its CSV at the end), appended to ops.csv.
if [ "$DRY" = 1 ]; then
  stage ops_vq 300 "$PY" benchmarks/run.py --device cpu --quick --threads 2 --only bench_vq --out "$LOGS/ops_vq.csv"
  add_ops "$LOGS/ops_vq.csv"
else
  for family in vq:60 remask:60 masking:60 vectorquantize:45 sampling:45; do
    name=${family%%:*}
    stage "ops_$name" "${family##*:}" "$PY" benchmarks/run.py --device cuda --only "bench_$name" \
      --out "$LOGS/ops_$name.csv"
    add_ops "$LOGS/ops_$name.csv"
  done
fi

if [ "$DRY" = 1 ]; then
  stage bench_sampling 300 "$PY" benchmarks/bench_sampling.py --device cpu --model tiny --batch 1 --steps 2 \
    --dtype fp32 --no-warmup --csv "$OUT/sampling.csv"
  stage bench_training 300 "$PY" benchmarks/bench_training.py --device cpu --model tiny --batch 2 --steps 1 \
    --csv "$OUT/training.csv"
else
  # ViT-B at batch 32, 20 steps: eager-ref vs mage vs mage with a CUDA graph, fp32 and bf16.
  stage bench_sampling 90 "$PY" benchmarks/bench_sampling.py --device cuda --model base --batch 32 --steps 20 \
    --repeat 2 --csv "$OUT/sampling.csv"
  # MAGE ViT-B training steps at batch 64, bf16: images/s with mage's ops and with the reference ops.
  stage bench_training 60 "$PY" benchmarks/bench_training.py --device cuda --model base --batch 64 --steps 10 \
    --csv "$OUT/training.csv"
fi

sanitize racecheck 60
sanitize synccheck 60

[ -n "$ONLY" ] || for f in ops.csv sampling.csv training.csv build_info.json; do
  [ -s "$OUT/$f" ] || { echo "missing output: $f" | tee -a "$OUT/summary.txt"; FAILED=1; }
done
save_logs
rm -rf "$LOGS"
echo "gpu_check: $([ $FAILED = 0 ] && echo 'all stages passed' || echo 'some stages failed'); results in $OUT" \
  "($(( $(date +%s) - START )) s)"
exit $FAILED
