#!/usr/bin/env bash
# One GPU iteration for the weight / SwiGLU quantization, SwiGLU backward and permute kernels:
# build _C (sm_90a only, for speed), run their GPU tests and the benchmarks. Logs and JSON go to
# $OUT.
#
#   OUT=/tmp/out [TESTS="..."] bash packages/nmoe-kernels/bench/gpu_quant_permute.sh [bench args]
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
[ -d /root/nmoe-boot ] && export PYTHONPATH=/root/nmoe-boot${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$SECONDS
NMOE_CUDA_ARCHS=90a "$PY" -m pip install -q --no-build-isolation --no-deps --no-index \
  -e packages/nmoe-kernels > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - t0)) s"
t0=$SECONDS
TESTS=${TESTS:-"test_quant_weights_gpu.py test_permute_gpu.py test_quant_gpu.py test_swiglu_backward_gpu.py"}
# shellcheck disable=SC2086  # TESTS is a list of file names
"$PY" -m pytest -q -s -m gpu -p no:cacheprovider \
  $(printf 'packages/nmoe-kernels/tests/%s ' $TESTS) > "$OUT/tests.log" 2>&1
rc=$?
echo "tests: rc $rc in $((SECONDS - t0)) s"
grep -E "codes differing" "$OUT/tests.log" | sort | uniq -c | sort -rn | head -8
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -30
"$PY" packages/nmoe-kernels/bench/bench_quant_permute.py --json "$OUT/bench.json" "$@" 2>&1 \
  | tee "$OUT/bench.log"
"$PY" packages/nmoe-kernels/bench/bench_swiglu_bwd.py --json "$OUT/bench_swiglu_bwd.json" 2>&1 \
  | tee "$OUT/bench_swiglu_bwd.log"
exit $rc
