#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Without a GPU, Triton kernels run under
# TRITON_INTERPRET=1 (tests/conftest.py sets it). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${MAGE_VENV:-.venv}
# Run from a scratch directory so the installed package, not the source tree, is what gets tested.
exec "$VENV/bin/python" -m pytest "$PWD/tests" "$PWD/benchmarks" --rootdir "$PWD" -c "$PWD/pyproject.toml" "$@"
