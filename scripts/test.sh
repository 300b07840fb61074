#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Without a GPU, Triton kernels run under
# TRITON_INTERPRET=1 (tests/conftest.py sets it). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=$(cd "${MAGE_VENV:-.venv}" && pwd)
ROOT=$PWD
# Run from a scratch directory so that the installed package, not the source tree, is under test.
cd "$(mktemp -d)"
exec "$VENV/bin/python" -m pytest "$ROOT/tests" "$ROOT/benchmarks" --rootdir "$ROOT" -c "$ROOT/pyproject.toml" "$@"
