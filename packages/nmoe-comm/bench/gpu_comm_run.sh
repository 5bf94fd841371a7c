#!/usr/bin/env bash
# One multi-GPU iteration for nmoe-comm: build it (sm_90a only), run its multi-GPU tests, then
# the dispatch bench on every visible GPU. Logs and JSON go to $OUT.
#
#   OUT=/tmp/out bash packages/nmoe-comm/bench/gpu_comm_run.sh [tests|bench|all] [bench args]
#
# COMM_TESTS: the pytest -k expression of tests/test_multigpu.py (default "ipc and 4"),
# COMM_TEST_TIMEOUT / COMM_BENCH_TIMEOUT: seconds for each (default 420 / 300).
set -uo pipefail
cd "$(dirname "$0")/../../.."
source ci/gpu_env.sh
what=${1:-all}; shift || true
PY=python3
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | sort | uniq -c
if ! "$PY" -c 'import nmoe_comm._C as C, sys; sys.exit(0 if C.WITH_CUDA and C.ABI_VERSION >= 10 else 1)' \
    2>/dev/null; then
  t0=$SECONDS
  NMOE_CUDA_ARCHS=90a "$PY" -m pip install -q --no-build-isolation --no-deps --no-index \
    -e packages/nmoe-comm > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  echo "build: $((SECONDS - t0)) s"
fi
# The FP8 dispatch quantizes with nmoe-kernels' CUDA kernel.
if ! "$PY" -c 'import nmoe_kernels._C as C, sys; sys.exit(0 if C.WITH_CUDA else 1)' 2>/dev/null; then
  t0=$SECONDS
  NMOE_CUDA_ARCHS=90a "$PY" -m pip install -q --no-build-isolation --no-deps --no-index \
    -e packages/nmoe-kernels > "$OUT/build-kernels.log" 2>&1 \
    || { tail -30 "$OUT/build-kernels.log"; exit 1; }
  echo "build nmoe-kernels: $((SECONDS - t0)) s"
fi
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  t0=$SECONDS
  timeout "${COMM_TEST_TIMEOUT:-420}" "$PY" -m pytest -q -m multigpu -p no:cacheprovider -ra \
    packages/nmoe-comm/tests/test_multigpu.py -k "${COMM_TESTS:-ipc and 4}" > "$OUT/tests.log" 2>&1
  trc=$?; [ $trc = 0 ] || rc=1
  echo "tests rc=$trc ($((SECONDS - t0)) s)"; grep -E "passed|failed|Error|error|mismatch" "$OUT/tests.log" | tail -15
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  t0=$SECONDS
  n=$(nvidia-smi -L | wc -l)
  timeout "${COMM_BENCH_TIMEOUT:-300}" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" \
    packages/nmoe-comm/bench/bench_dispatch.py --json "$OUT/bench_comm_$n.json" "$@" > "$OUT/bench.log" 2>&1
  brc=$?; [ $brc = 0 ] || rc=1
  echo "bench rc=$brc ($((SECONDS - t0)) s)"
  grep -v "^\s*$\|\*\*\*\|OMP_NUM\|UserWarning\|_warn_once" "$OUT/bench.log" | tail -60
fi
exit $rc
