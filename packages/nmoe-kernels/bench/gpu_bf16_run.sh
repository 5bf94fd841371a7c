#!/usr/bin/env bash
# One GPU iteration for the CuTeDSL BF16 grouped GEMMs: a smoke check of each op (stops early on
# a hang or a wrong result), the GPU tests, then the benchmark. Needs no build of nmoe_kernels._C
# (the package is put on PYTHONPATH). Logs and JSON go to $OUT.
#
#   OUT=/tmp/out bash packages/nmoe-kernels/bench/gpu_bf16_run.sh [smoke|tests|bench|all] [bench args]
#   OUT=/tmp/out bash packages/nmoe-kernels/bench/gpu_bf16_run.sh sweep [sweep_bf16_tiles.py args]
set -uo pipefail
cd "$(dirname "$0")/../../.."
source ci/gpu_env.sh
export PYTHONPATH=$PWD/packages/nmoe-kernels/src${PYTHONPATH:+:$PYTHONPATH}
what=${1:-all}; shift || true
PY=python3
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$card" in *H200*) tag=H200 ;; *H100*) tag=H100 ;; *) tag=GPU ;; esac
echo "card: $card; $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"

smoke() {
  timeout 80 "$PY" - <<'EOF'
import faulthandler, sys, time
faulthandler.dump_traceback_later(60, exit=True)
import torch
import nmoe_kernels
t0 = time.time()
torch.manual_seed(0)
E, K, N = 5, 256, 512
lengths = [0, 1, 129, 300, 64]
offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32).cuda()
M = int(offsets[-1]) + 17
x = torch.randn(M, K, device="cuda").bfloat16()
w = (torch.randn(E, K, N, device="cuda") / K**0.5).bfloat16()
bounds = offsets.tolist()
def ref(a, b, transpose):
    y = torch.zeros(a.shape[0], b.shape[1] if transpose else b.shape[2], device="cuda", dtype=torch.float64)
    for e in range(E):
        s, t = bounds[e], bounds[e + 1]
        if t > s:
            y[s:t] = a[s:t].double() @ (b[e].double().t() if transpose else b[e].double())
    return y
def report(name, got, want):
    err = (got.double() - want).abs()
    rel = (err.pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()
    bad = (err > 0.02 * want.abs() + 0.02).nonzero()
    print(f"{name}: rel rms {rel:.2e}, nan {got.isnan().sum().item()}, bad {bad.shape[0]}"
          f" first bad {bad[:4].tolist()}  ({time.time() - t0:.1f} s)", flush=True)
    return rel < 4e-3 and bad.shape[0] == 0
ok = True
print("fwd ...", flush=True)
y = nmoe_kernels.grouped_gemm_bf16(x, w, offsets, out=torch.full((M, N), float("nan"), device="cuda").bfloat16())
torch.cuda.synchronize(); ok &= report("fwd", y, ref(x, w, False))
print("dgrad ...", flush=True)
dy = torch.randn(M, N, device="cuda").bfloat16()
dx = nmoe_kernels.grouped_gemm_bf16_dgrad(dy, w, offsets)
torch.cuda.synchronize(); ok &= report("dgrad", dx, ref(dy, w, True))
print("swiglu ...", flush=True)
a = nmoe_kernels.grouped_gemm_bf16_swiglu(x, w, offsets)
torch.cuda.synchronize()
h = ref(x, w, False)
ok &= report("swiglu", a, torch.nn.functional.silu(h[:, 0::2]) * h[:, 1::2])
print("wgrad ...", flush=True)
dw = nmoe_kernels.grouped_gemm_bf16_wgrad(x, dy, offsets)
torch.cuda.synchronize()
want = torch.zeros(E, K, N, device="cuda", dtype=torch.float64)
for e in range(E):
    s, t = bounds[e], bounds[e + 1]
    want[e] = x[s:t].double().t() @ dy[s:t].double()
ok &= report("wgrad", dw, want)
# Launch overhead (host) of one small call.
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20):
    nmoe_kernels.grouped_gemm_bf16(x, w, offsets)
torch.cuda.synchronize(); print(f"host+launch per small call: {(time.perf_counter() - t) / 20 * 1e6:.0f} us")
sys.exit(0 if ok else 1)
EOF
}

rc=0
if [ "$what" = smoke ] || [ "$what" = all ]; then
  smoke 2>&1 | tee "$OUT/smoke.log" | tail -30
  rc=${PIPESTATUS[0]}
  echo "smoke rc=$rc"
fi
if { [ "$what" = tests ] || [ "$what" = all ]; } && [ "$rc" = 0 ]; then
  timeout 300 "$PY" -m pytest -q -p no:cacheprovider -rs --timeout=60 --timeout-method=thread \
    packages/nmoe-kernels/tests/test_grouped_gemm_bf16_gpu.py \
    packages/nmoe-kernels/tests/test_cute_compile.py > "$OUT/test.log" 2>&1
  echo "tests rc=$?"; grep -E "passed|failed|Error|assert" "$OUT/test.log" | tail -25
fi
if { [ "$what" = bench ] || [ "$what" = all ]; } && [ "$rc" = 0 ]; then
  timeout 540 "$PY" packages/nmoe-kernels/bench/bench_grouped_bf16.py \
    --json "$OUT/bf16_$tag.json" "$@" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; tail -50 "$OUT/bench.log"
fi
if [ "$what" = sweep ] && [ "$rc" = 0 ]; then
  (cd packages/nmoe-kernels/bench && timeout 540 "$PY" sweep_bf16_tiles.py \
    --json "$OUT/sweep_bf16_$tag.json" "$@") > "$OUT/sweep.log" 2>&1
  echo "sweep rc=$?"; cat "$OUT/sweep.log" | tail -60
fi
