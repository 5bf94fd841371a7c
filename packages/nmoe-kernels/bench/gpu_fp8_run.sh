#!/usr/bin/env bash
# One GPU iteration for the FP8 grouped GEMMs: build nmoe-kernels (sm_90a only), run the GPU
# tests of the FP8 kernels, then the benchmark. Logs and JSON go to $OUT.
#
#   OUT=/tmp/out bash packages/nmoe-kernels/bench/gpu_fp8_run.sh [tests|bench|all] [--shapes ...]
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
[ -d /root/nmoe-boot ] && export PYTHONPATH=/root/nmoe-boot${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONUNBUFFERED=1
what=${1:-all}; shift || true
PY=python3
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $card"
case "$card" in *H200*) tag=H200 ;; *H100*) tag=H100 ;; *) tag=GPU ;; esac
if ! "$PY" -c 'import nmoe_kernels._C as C; assert C.WITH_CUDA' 2>/dev/null; then
  t0=$SECONDS
  NMOE_CUDA_ARCHS=90a "$PY" -m pip install -q --no-build-isolation --no-deps --no-index \
    -e packages/nmoe-kernels > "$OUT/build.log" 2>&1 || { echo BUILD_FAILED; tail -20 "$OUT/build.log"; }
  echo "build: $((SECONDS - t0)) s"
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs \
    packages/nmoe-kernels/tests/test_grouped_gemm_fp8_gpu.py > "$OUT/test.log" 2>&1
  echo "tests rc=$?"; tail -30 "$OUT/test.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 150 "$PY" packages/nmoe-kernels/bench/bench_grouped_fp8.py \
    --json "$OUT/fp8_$tag.json" "$@" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; cat "$OUT/bench.log" | tail -30
fi
