#!/usr/bin/env bash
# The one command that installs everything and runs the CPU test suite (what CI runs):
#
#   bash ci/test.sh
#
# GPU tests (marker `gpu`, `multigpu`) are skipped with a reason where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export CUTE_DSL_ARCH=${CUTE_DSL_ARCH:-sm_90a}
echo "[test] ruff"
ruff check .
echo "[test] pytest"
python -m pytest -q --timeout=900 "$@"
