#!/usr/bin/env bash
# The README's main job: set up (scripts/setup.sh), then run the op benchmarks on this machine's CPU
# and write benchmarks/results/cpu-<host>.csv. Extra arguments go to benchmarks/run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${MAGE_VENV:-.venv}
"$VENV/bin/python" benchmarks/run.py --device cpu --threads 2 --out "benchmarks/results/cpu-$(hostname).csv" "$@"
