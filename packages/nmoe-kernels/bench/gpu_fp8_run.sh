#!/usr/bin/env bash
# One GPU iteration for the FP8 grouped GEMMs: build nmoe-kernels (sm_90a only) in the
# background while the GPU tests of the FP8 kernels run (they need no _C: the CuTeDSL kernels
# compile at run time), then the benchmark. Logs and JSON go to $OUT.
#
#   OUT=/tmp/out bash packages/nmoe-kernels/bench/gpu_fp8_run.sh [tests|bench|all] [bench args]
#
# NMOE_FP8_NO_BUILD=1 skips the _C build (the bench then quantizes its inputs with the torch
# reference and leaves out the mlp_fwd_fp8 rows, which time the CUDA quantizer).
set -uo pipefail
cd "$(dirname "$0")/../../.."
source ci/gpu_env.sh
what=${1:-all}; shift || true
PY=python3
SRC=$PWD/packages/nmoe-kernels/src
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $card"
case "$card" in *H200*) tag=H200 ;; *H100*) tag=H100 ;; *) tag=GPU ;; esac
build_pid=
if [ "${NMOE_FP8_NO_BUILD:-0}" != 1 ] && [ "$what" != tests ] \
  && ! "$PY" -c 'import nmoe_kernels._C as C; assert C.WITH_CUDA' 2>/dev/null; then
  ( t0=$SECONDS
    NMOE_CUDA_ARCHS=90a "$PY" -m pip install -q --no-build-isolation --no-deps --no-index \
      -e packages/nmoe-kernels > "$OUT/build.log" 2>&1 || echo BUILD_FAILED >> "$OUT/build.log"
    echo "build: $((SECONDS - t0)) s" >> "$OUT/build.log" ) &
  build_pid=$!
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  t0=$SECONDS
  PYTHONPATH=$SRC:$PYTHONPATH timeout ${NMOE_FP8_TEST_TIMEOUT:-240} "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs \
    packages/nmoe-kernels/tests/test_grouped_gemm_fp8_gpu.py > "$OUT/test.log" 2>&1
  echo "tests rc=$? ($((SECONDS - t0)) s)"; tail -30 "$OUT/test.log"
fi
if [ -n "$build_pid" ]; then wait "$build_pid"; tail -3 "$OUT/build.log"; fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  pypath=$PYTHONPATH
  "$PY" -c 'import nmoe_kernels._C as C; assert C.WITH_CUDA' 2>/dev/null || pypath=$SRC:$PYTHONPATH
  t0=$SECONDS
  PYTHONPATH=$pypath timeout ${NMOE_FP8_BENCH_TIMEOUT:-240} "$PY" packages/nmoe-kernels/bench/bench_grouped_fp8.py \
    --json "$OUT/fp8_$tag.json" "$@" > "$OUT/bench.log" 2>&1
  echo "bench rc=$? ($((SECONDS - t0)) s)"; tail -50 "$OUT/bench.log"
fi
