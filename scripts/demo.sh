#!/usr/bin/env bash
# The README's main job: set up (scripts/setup.sh), then `mage demo` on the embedded default data
# (Fashion-MNIST from Debian): tokenizer + small MAGE trained on the CPU, then a report folder.
# Extra arguments go to `mage demo` (e.g. --quick, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${MAGE_VENV:-.venv}
"$VENV/bin/mage" demo "$@"
