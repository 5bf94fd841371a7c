#!/usr/bin/env bash
# One GPU iteration for the fused cross-entropy rows op: build _C (sm_90a only, for speed), run
# its GPU tests and nmoe-core's fused-loss GPU test, then the benchmark. Logs and JSON go to $OUT.
#
#   OUT=/tmp/out bash packages/nmoe-kernels/bench/gpu_cross_entropy.sh [bench args]
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
[ -d /root/nmoe-boot ] && export PYTHONPATH=/root/nmoe-boot${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$SECONDS
NMOE_CUDA_ARCHS=90a "$PY" -m pip install -q --no-build-isolation --no-deps --no-index \
  -e packages/nmoe-kernels > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - t0)) s"
t0=$SECONDS
"$PY" -m pytest -q -s -m gpu -p no:cacheprovider \
  packages/nmoe-kernels/tests/test_cross_entropy_gpu.py \
  packages/nmoe-core/tests/test_loss_gpu.py > "$OUT/tests.log" 2>&1
rc=$?
echo "tests: rc $rc in $((SECONDS - t0)) s"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -30
"$PY" packages/nmoe-kernels/bench/bench_cross_entropy.py --json "$OUT/bench_cross_entropy.json" \
  "$@" 2>&1 | tee "$OUT/bench_cross_entropy.log"
exit $rc
