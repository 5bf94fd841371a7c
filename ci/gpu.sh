#!/usr/bin/env bash
# GPU runs (H100/H200): build, GPU tests, benchmarks and training smoke runs, in stages.
#
#   bash ci/gpu.sh STAGE [STAGE ...]
#
# Stages:
#   setup        install every package editable (compiles nmoe_kernels._C with nvcc)
#   tests        pytest -m "gpu or multigpu" over the whole repository
#   bench-quant  the FP8 1x128 quantization benchmark (nmoe-kernels/bench)
#   sweep-bf16   the BF16 grouped GEMM's tile width, order and cluster at the shapes below their targets,
#                against torch._grouped_mm (nmoe-kernels/bench/sweep_bf16_tiles.py)
#   train-super  `n train super` for a few steps on the built-in corpus; reports tokens/s
#   eval-bundle  unpack .gpu-extra/eval_bundle.tgz (the offline CORE bundle built on a CPU machine
#                with `n eval prep-core`) into ~/.cache/nmoe/eval
#   tests-quick  the GPU tests of the fused path, eval, checkpoints and the FP8 quant op only
#   super-eval   train super for a few steps, save a weights-only checkpoint, `n eval` it (CORE)
#   comm-tests   nmoe-comm multi-GPU tests (every backend on 2 and 4 GPUs where present)
#   bench-comm   nmoe-comm dispatch/combine bench on 2 and 4 GPUs (nccl baseline, ipc, nvshmem)
#   train-ep     `n train super` under torchrun on all GPUs, experts split over ranks (ipc)
#   fused-verify the fused path's GPU tests (kernels' gated backward and cross-entropy rows, the
#                local dispatcher's slot sums, nmoe-core loss and fused layer, trainer), not slow
#   bench-train-ep  training bench: 1 GPU, then all GPUs expert parallel over ipc, same machine
#   fused-ep-tests  the fused layer against the torch backend, experts split over 2 and 4 GPUs
#   fp8-parity   `n train super` twice from the same seed on the fused path, recipe bf16 then fp8
#                (PARITY_STEPS, default 300); fails when FP8's final validation loss is more
#                than 1.5% above BF16's
#   hopper-train on 4 GPUs at once (one job per GPU): bench-train with --profile on GPU 0 (torch
#                bf16, fused bf16, fused fp8; micro-batches 8 and 16), fp8-parity on GPUs 1 and 2,
#                the GPU tests of the fused path and its kernels on GPU 3
#   comm-check   nmoe-comm multi-GPU tests (COMM_TESTS: a pytest -k expression), then the
#                dispatch bench on all GPUs with the sync-free, dedup and CUDA-graph variants and
#                (unless COMM_BREAKDOWN=0) the decode breakdown
#   bench-train  nmoe-train/bench/bench_train.py: torch vs fused MoE paths (BENCH_VARIANTS,
#                BENCH_MICRO, BENCH_ROUNDS); tokens/s, MFU, peak memory
#   ep-trainer-tests  `n train` expert parallel on 2 GPUs (ipc and nccl) against 1 GPU, bounded by
#                the 2-GPU data-parallel run's gap
#   fast-path-tests  the GPU tests of compile, cached expert casts, the router top-k kernel, the
#                float32 wgrad and the AdamW kernel, then the router top-k bench
#   adamw        the multi-tensor AdamW kernel: its GPU tests and nmoe-core's AdamW tests, the
#                kernel bench over super's 2.84B parameters (against torch's fused AdamW), then
#                bench-train at micro-batch 16: torch, fused, fused with bfloat16 AdamW moments
#   ncu-fp8      Nsight Compute on the FP8 grouped GEMM (NCU_CASES: "shape:epilogue:variant" list,
#                default the moonlight and dsv3-local W13 GEMMs with and without the epilogue, and
#                torch's rowwise baseline, variant "torch"); text reports (speed of light, warp
#                states, memory, instruction stats, occupancy) to $OUT/ncu-fp8.txt
#   tests-spread the single-GPU test files of the kernels and the fused path spread over every
#                visible GPU at once (one process per GPU; logs per file)
#   comm-pipelined  nmoe-comm's pipelined transport: a 2-GPU smoke run, the multi-GPU tests
#                (COMM_TESTS), the bench on all GPUs against pipelined=False (BENCH_COMM_ARGS)
#   ncu-fp8-source  per-instruction warp-stall samples (SASS page as CSV) of the FP8 grouped GEMM
#                (NCU_SOURCE_CASES) for an offline breakdown of the mainloop
#   ncu-probe    the same for bench/wgmma_probe.cu's part-2 mainloops (NCU_PROBE_CASES:
#                "variant@shape" list), no Python packages needed
#   comm-ab      the dispatch bench of this tree's nmoe-comm against a baseline copy of another
#                commit's (AB_BASE), back to back on one machine: baseline, this tree, baseline
#   ncu-bf16     the same for the BF16 grouped GEMMs and torch._grouped_mm (NCU_BF16_CASES:
#                "shape:op:ours|torch", default dsv3-local wgrad_w2 and fwd_w2) to $OUT/ncu-bf16.txt
#
# Logs and results go to $OUT (default ./gpu-out). Offline machines get the missing Python
# packages from the wheelhouse (../shared/tools/gpu-wheelhouse): run each part's stash.sh first;
# this script then puts them on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
source ci/gpu_env.sh
PY=${PYTHON:-python3}
status=0
# The fastest measured `super` configuration (nmoe-train README): a bench variant.
FAST="fused:bf16:compile=true,cache_expert_weights=true,optim.adamw_state_dtype=bfloat16"

stage_setup() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' \
    | tee -a "$OUT/gpu.txt"
  local pkgs=()
  for p in packages/nmoe-*; do [ -f "$p/pyproject.toml" ] && pkgs+=(-e "$p"); done
  local t0=$SECONDS
  "$PY" -m pip install -q --no-build-isolation --no-deps --no-index "${pkgs[@]}" \
    > "$OUT/setup.log" 2>&1 || { tail -40 "$OUT/setup.log"; return 1; }
  echo "setup: installed ${pkgs[*]} in $((SECONDS - t0)) s" | tee -a "$OUT/gpu.txt"
  "$PY" -c 'import nmoe_kernels._C as C; print("nmoe_kernels._C abi", C.ABI_VERSION, "cuda",
C.WITH_CUDA, C.CUDA_ARCHS)' | tee -a "$OUT/gpu.txt"
}

stage_tests() {
  "$PY" -m pytest -q -m "gpu or multigpu" -p no:cacheprovider --timeout=900 \
    --junitxml="$OUT/gpu-tests.xml" packages tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
  return "${PIPESTATUS[0]}"
}

stage_sweep_bf16() {
  (cd packages/nmoe-kernels/bench && timeout 540 "$PY" sweep_bf16_tiles.py \
    --json "$OUT/sweep_bf16.json") 2>&1 | tee "$OUT/sweep_bf16.log" | tail -40
  return "${PIPESTATUS[0]}"
}

stage_bench_quant() {
  "$PY" packages/nmoe-kernels/bench/bench_quant.py --json "$OUT/bench_quant.json" 2>&1 \
    | tee "$OUT/bench_quant.log" | tail -20
  return "${PIPESTATUS[0]}"
}

stage_train_super() {
  local runs=/tmp/nmoe-runs
  rm -rf "$runs"
  n train super steps=${SUPER_STEPS:-6} global_batch=${SUPER_BATCH:-32} \
    micro_batch=${SUPER_MICRO:-8} val_every=0 checkpoints=false log_every=1 \
    runs_root=$runs run_name=super-smoke data.data_root=/tmp/nmoe-data 2>&1 \
    | tee "$OUT/train-super.log" | tail -25
  local rc=${PIPESTATUS[0]}
  cp "$runs/super-smoke/metrics.db" "$OUT/train-super-metrics.db" 2>/dev/null
  cp "$runs/super-smoke/result.json" "$OUT/train-super-result.json" 2>/dev/null
  return "$rc"
}

stage_eval_bundle() {
  mkdir -p ~/.cache/nmoe/eval && tar -C ~/.cache/nmoe/eval -xzf .gpu-extra/eval_bundle.tgz
  ls ~/.cache/nmoe/eval/eval_bundle | head -3
}

stage_tests_quick() {
  "$PY" -m pytest -q -m "gpu" -p no:cacheprovider --timeout=600 \
    --junitxml="$OUT/gpu-tests-quick.xml" \
    packages/nmoe-kernels/tests/test_quant_gpu.py packages/nmoe-core/tests/test_fused_gpu.py \
    packages/nmoe-core/tests/test_optim_builder.py packages/nmoe-core/tests/test_generate.py \
    packages/nmoe-eval/tests packages/nmoe-train/tests/test_checkpoint.py \
    packages/nmoe-train/tests/test_fused_training_gpu.py 2>&1 | tee "$OUT/gpu-tests-quick.log" \
    | tail -25
  return "${PIPESTATUS[0]}"
}

stage_super_eval() {
  local runs=/tmp/nmoe-runs
  rm -rf "$runs/super-eval"
  n train super steps=${SUPER_STEPS:-8} global_batch=32 micro_batch=8 val_every=0 \
    checkpoint_optimizer=false final_eval_tasks=null log_every=4 runs_root=$runs \
    run_name=super-eval data.data_root=/tmp/nmoe-data 2>&1 | tail -4
  local t0=$SECONDS
  n eval "$runs/super-eval" --tasks core --max-examples "${EVAL_EXAMPLES:-200}" \
    --out "$OUT/super-eval.json" 2>&1 | tee "$OUT/super-eval.log" | tail -22
  local rc=${PIPESTATUS[0]}
  echo "n eval (load checkpoint + CORE) took $((SECONDS - t0)) s wall" | tee -a "$OUT/super-eval.log"
  return "$rc"
}

ngpus() { nvidia-smi -L | wc -l; }

stage_comm_tests() {
  local rc=0
  for backend in ipc nccl nvshmem; do
    "$PY" -m pytest -q -m multigpu -p no:cacheprovider --timeout=300 -ra \
      packages/nmoe-comm/tests/test_multigpu.py -k "$backend" 2>&1 \
      | tee "$OUT/comm-tests-$backend.log" | tail -8
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  done
  return $rc
}

stage_bench_comm() {
  local rc=0 n
  for n in 2 $(ngpus); do
    [ "$n" -le "$(ngpus)" ] || continue
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" \
      packages/nmoe-comm/bench/bench_dispatch.py --json "$OUT/bench_comm_$n.json" 2>&1 \
      | tee "$OUT/bench_comm_$n.log" | tail -16
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
    [ "$(ngpus)" = 2 ] && break
  done
  return $rc
}

stage_train_ep() {
  local n; n=$(ngpus)
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" -m nmoe_train train super \
    steps=${EP_STEPS:-6} global_batch=$((8 * n)) micro_batch=8 val_every=0 checkpoints=false \
    log_every=1 parallel.expert_parallel=all parallel.dispatcher=${EP_DISPATCHER:-ipc} \
    model.moe.backend=${EP_BACKEND:-fused} data.synthetic=true runs_root=/tmp/nmoe-runs \
    run_name=super-ep$n resume=false final_eval_tasks=null 2>&1 | tee "$OUT/train-ep.log" | tail -14
  return "${PIPESTATUS[0]}"
}

stage_fp8_parity() {
  # PARITY_GPUS="1 2": run the two trainings at once, bf16 on the first GPU, fp8 on the second.
  local runs=/tmp/nmoe-runs steps=${PARITY_STEPS:-300} recipe i=0
  local -a gpus=(${PARITY_GPUS:-})
  : > "$OUT/fp8-parity.log"
  for recipe in bf16 fp8; do
    rm -rf "$runs/parity-$recipe"
    local cmd=(timeout "${PARITY_TIMEOUT:-540}" n train super steps="$steps" global_batch=8 micro_batch=8 val_every=$((steps / 3))
      val_sequences=32 checkpoints=false log_every=25 final_eval_tasks=null
      model.moe.backend=fused model.moe.recipe="$recipe" runs_root=$runs
      run_name="parity-$recipe" data.data_root=/tmp/nmoe-data-$recipe)
    if [ ${#gpus[@]} -ge 2 ]; then
      CUDA_VISIBLE_DEVICES=${gpus[$i]} "${cmd[@]}" > "$OUT/parity-$recipe.log" 2>&1 &
    else
      "${cmd[@]}" > "$OUT/parity-$recipe.log" 2>&1
    fi
    i=$((i + 1))
  done
  wait
  for recipe in bf16 fp8; do
    grep -E "^step|val|completed|Error|error" "$OUT/parity-$recipe.log" | tail -8 \
      | sed "s/^/[$recipe] /" | tee -a "$OUT/fp8-parity.log"
  done
  "$PY" - "$runs" <<'PYEOF' 2>&1 | tee -a "$OUT/fp8-parity.log"
import json, sys
runs = sys.argv[1]
res = {r: json.load(open(f"{runs}/parity-{r}/result.json")) for r in ("bf16", "fp8")}
val = {r: res[r]["final_val_loss"] for r in res}
tps = {r: res[r]["tokens_per_s"] for r in res}
gap = val["fp8"] / val["bf16"] - 1
print(f"fp8 parity: val loss bf16 {val['bf16']:.4f}, fp8 {val['fp8']:.4f} ({gap:+.2%}; limit "
      f"+1.5%); tokens/s bf16 {tps['bf16']:.0f}, fp8 {tps['fp8']:.0f}")
sys.exit(0 if gap <= 0.015 else 1)
PYEOF
  return "${PIPESTATUS[0]}"
}

stage_bench_train() {
  # shellcheck disable=SC2086
  "$PY" packages/nmoe-train/bench/bench_train.py --json "$OUT/bench_train.json" \
    --variants ${BENCH_VARIANTS:-torch:bf16 fused:bf16 $FAST} \
    --micro-batches ${BENCH_MICRO:-16 32 48 64} \
    --steps "${BENCH_STEPS:-5}" --rounds "${BENCH_ROUNDS:-1}" \
    ${BENCH_PROFILE:+--profile "$BENCH_PROFILE"} 2>&1 | tee "$OUT/bench_train.log" | tail -30
  return "${PIPESTATUS[0]}"
}

stage_hopper_train() {
  # Four CPU-heavy processes at once (model initialisation, data preparation, compilation): give
  # each a quarter of the cores; oversubscribed OpenMP threads spin and stall them all.
  export OMP_NUM_THREADS=$(( $(nproc) / 4 > 0 ? $(nproc) / 4 : 1 ))
  CUDA_VISIBLE_DEVICES=0 timeout 540 "$PY" packages/nmoe-train/bench/bench_train.py \
    --json "$OUT/bench_train.json" --variants torch:bf16 fused:bf16 fused:fp8 \
    --micro-batches ${BENCH_MICRO:-8 16} --steps "${BENCH_STEPS:-6}" --profile "$OUT/profile" \
    > "$OUT/bench_train.log" 2>&1 &
  local bench=$!
  (PARITY_GPUS="1 2" stage_fp8_parity > "$OUT/fp8-parity-stage.log" 2>&1) &
  local parity=$!
  CUDA_VISIBLE_DEVICES=3 timeout 540 "$PY" -m pytest -q -m "gpu or slow" -p no:cacheprovider \
    -rfEs packages/nmoe-kernels/tests/test_swiglu_backward_gpu.py \
    packages/nmoe-kernels/tests/test_grouped_gemm_fp8_gpu.py \
    packages/nmoe-core/tests/test_fused_gpu.py packages/nmoe-train/tests/test_fused_training_gpu.py \
    > "$OUT/gpu-tests.log" 2>&1
  local rc=$?
  tail -25 "$OUT/gpu-tests.log"
  wait $parity || rc=1
  tail -6 "$OUT/fp8-parity.log"
  wait $bench || rc=1
  tail -40 "$OUT/bench_train.log"
  return $rc
}

stage_fused_verify() {
  # The fused path and its kernels on one GPU, each file under its own time limit (a crash in
  # one does not hide the others' results).
  local rc=0 f name
  for f in packages/nmoe-kernels/tests/test_swiglu_backward_gpu.py \
           packages/nmoe-kernels/tests/test_cross_entropy_gpu.py \
           packages/nmoe-comm/tests/test_local_gpu.py \
           packages/nmoe-core/tests/test_loss_gpu.py \
           packages/nmoe-core/tests/test_fused_gpu.py \
           packages/nmoe-train/tests/test_fused_training_gpu.py; do
    name=$(basename "$f" .py)
    timeout "${VERIFY_TIMEOUT:-240}" "$PY" -m pytest -q -m "gpu and not slow" -p no:cacheprovider \
      -rfEs -x "$f" > "$OUT/$name.log" 2>&1 || rc=1
    echo "--- $name"; tail -8 "$OUT/$name.log"
  done
  return $rc
}

stage_bench_train_ep() {
  # 1 GPU, then all GPUs expert parallel (ipc), on the same machine: per-GPU ratio to 1 GPU.
  local n; n=$(ngpus)
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=0 timeout 280 "$PY" packages/nmoe-train/bench/bench_train.py \
    --json "$OUT/bench_train_1gpu.json" --variants ${EP_VARIANTS:-fused:bf16 $FAST} \
    --micro-batches ${EP_MICRO:-16} --steps "${BENCH_STEPS:-6}" > "$OUT/bench_train_1gpu.log" 2>&1
  tail -4 "$OUT/bench_train_1gpu.log"
  # shellcheck disable=SC2086
  timeout 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" \
    packages/nmoe-train/bench/bench_train.py --expert-parallel --compare "$OUT/bench_train_1gpu.json" \
    --json "$OUT/bench_train_ep$n.json" --variants ${EP_VARIANTS:-fused:bf16 $FAST} \
    --micro-batches ${EP_MICRO:-16} --steps "${BENCH_STEPS:-6}" > "$OUT/bench_train_ep$n.log" 2>&1
  local rc=$?
  grep -v "^\s*$\|\*\*\*\|OMP_NUM" "$OUT/bench_train_ep$n.log" | tail -12
  return $rc
}

stage_fused_ep_tests() {
  timeout 500 "$PY" -m pytest -q -m multigpu -p no:cacheprovider -rfEs \
    packages/nmoe-core/tests/test_fused_multigpu.py > "$OUT/fused-ep-tests.log" 2>&1
  local rc=$?
  tail -12 "$OUT/fused-ep-tests.log"
  return $rc
}

stage_ep_trainer_tests() {
  timeout 900 "$PY" -m pytest -q -m multigpu -p no:cacheprovider -rfEs \
    packages/nmoe-train/tests/test_trainer.py -k two_gpus 2>&1 | tee "$OUT/ep-trainer-tests.log" \
    | tail -12
  return "${PIPESTATUS[0]}"
}

stage_adamw() {
  local rc=0
  timeout "${VERIFY_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider -rfEs \
    packages/nmoe-kernels/tests/test_adamw_gpu.py packages/nmoe-kernels/tests/test_adamw_args.py \
    packages/nmoe-kernels/tests/test_reference_optim.py packages/nmoe-core/tests/test_adamw.py \
    > "$OUT/adamw-tests.log" 2>&1 || rc=1
  tail -8 "$OUT/adamw-tests.log"
  timeout 300 "$PY" packages/nmoe-kernels/bench/bench_adamw.py --json "$OUT/bench_adamw.json" \
    2>&1 | tee "$OUT/bench_adamw.log" || rc=1
  timeout 420 "$PY" packages/nmoe-train/bench/bench_train.py --micro-batches 16 --steps 6 \
    --variants torch:bf16 fused:bf16 fused:bf16:optim.adamw_state_dtype=bfloat16 \
    --json "$OUT/bench_train_adamw.json" > "$OUT/bench_train_adamw.log" 2>&1 || rc=1
  tail -8 "$OUT/bench_train_adamw.log"
  return $rc
}

stage_fast_path_tests() {
  local rc=0 P=("$PY" -m pytest -q -p no:cacheprovider -rfEs)
  timeout 200 "${P[@]}" packages/nmoe-kernels/tests/test_router_topk_gpu.py \
    packages/nmoe-core/tests/test_router_gpu.py packages/nmoe-kernels/tests/test_adamw_gpu.py \
    packages/nmoe-core/tests/test_adamw.py packages/nmoe-core/tests/test_optim_builder.py \
    > "$OUT/fast-kernels.log" 2>&1 || rc=1
  tail -3 "$OUT/fast-kernels.log"
  timeout 150 "${P[@]}" packages/nmoe-kernels/tests/test_grouped_gemm_bf16_gpu.py -k wgrad \
    > "$OUT/fast-wgrad.log" 2>&1 || rc=1
  tail -3 "$OUT/fast-wgrad.log"
  timeout 400 "${P[@]}" -m "gpu and not slow" packages/nmoe-core/tests/test_fused_gpu.py \
    packages/nmoe-train/tests/test_fused_training_gpu.py > "$OUT/fast-training.log" 2>&1 || rc=1
  tail -3 "$OUT/fast-training.log"
  timeout 60 "$PY" packages/nmoe-kernels/bench/bench_router_topk.py \
    --json "$OUT/router_topk.json" 2>&1 | tail -8
  return $rc
}

# One Nsight Compute text report per case, appended to $1: "case name" script args... (the
# script's last argument picks the kernel filter: torch's ops run cutlass::device_kernel).
ncu_report() {
  local out=$1 name=$2; shift 2
  local regex=kernel_cutlass; [ "${*: -1}" = torch ] && regex=device_kernel
  echo "##### $name" >> "$out"
  # --clock-control none: leave the clocks as they are (METHOD.md); one launch after warm-up
  timeout 240 ncu --clock-control none -k "regex:$regex" --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis --section InstructionStats --section SchedulerStats \
    --section LaunchStats --section Occupancy "$PY" "$@" >> "$out" 2>&1 \
    || { echo "ncu failed: $name" >> "$out"; return 1; }
}

ncu_summary() {
  grep -E "^#####|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|DRAM Throughput|Issue Slots Busy|Registers Per|ncu failed" "$1"
}

# Nsight Compute over "a:b:c" cases of one profile script (its three arguments), into $1.
ncu_stage() {
  command -v ncu >/dev/null || { echo "ncu not found"; return 1; }
  local out=$1 script=$2 rc=0 case a b c; shift 2
  : > "$out"
  for case in "$@"; do
    IFS=: read -r a b c <<< "$case"
    ncu_report "$out" "$case" "packages/nmoe-kernels/bench/$script" "$a" "$b" "$c" || rc=1
  done
  ncu_summary "$out"
  return $rc
}

stage_ncu_fp8() {
  # shellcheck disable=SC2086
  ncu_stage "$OUT/ncu-fp8.txt" profile_fp8_variant.py ${NCU_CASES:-moonlight:bf16:1x1oe \
    moonlight:bf16:1x1oes moonlight:bf16:torch dsv3-local:bf16:1x1oe moonlight:swiglu_quant:1x1oef}
}

# The pages of the report $OUT/$1.ncu-rep that the source stages keep: the SASS page as CSV
# ($1.sass.csv), the details ($1.details.txt) and the per-opcode stall summary ($1.summary.txt).
ncu_source_pages() {
  local name=$1 rc=0
  ncu -i "$OUT/$name.ncu-rep" --page source --csv --print-source sass > "$OUT/$name.sass.csv" \
    2>> "$OUT/$name.log" || ncu -i "$OUT/$name.ncu-rep" --page source --csv \
    > "$OUT/$name.sass.csv" 2>> "$OUT/$name.log" || rc=1
  ncu -i "$OUT/$name.ncu-rep" --page details > "$OUT/$name.details.txt" 2>> "$OUT/$name.log"
  "$PY" packages/nmoe-kernels/bench/ncu_source_summary.py "$OUT/$name.sass.csv" \
    > "$OUT/$name.summary.txt" 2>> "$OUT/$name.log" || rc=1
  return $rc
}

stage_ncu_fp8_source() {
  # Per-instruction warp-stall samples of the FP8 grouped GEMM (NCU_SOURCE_CASES, default the
  # moonlight and dsv3-local W13 kernels without the fused epilogue): one report per case, then
  # its SASS page as CSV ($OUT/<case>.sass.csv: each instruction with its stall samples by
  # reason), for an offline breakdown of where the mainloop's issue slots go.
  command -v ncu >/dev/null || { echo "ncu not found"; return 1; }
  local rc=0 case a b c name
  for case in ${NCU_SOURCE_CASES:-moonlight:bf16:1x1oe dsv3-local:bf16:1x1oe}; do
    IFS=: read -r a b c <<< "$case"
    name=${case//:/_}
    timeout 300 ncu --clock-control none -k "regex:kernel_cutlass" --launch-skip 2 \
      --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SourceCounters \
      --import-source no -f -o "$OUT/$name" "$PY" packages/nmoe-kernels/bench/profile_fp8_variant.py \
      "$a" "$b" "$c" > "$OUT/$name.log" 2>&1 || { echo "ncu failed: $case"; rc=1; continue; }
    ncu_source_pages "$name" || rc=1
    echo "##### $case"; head -24 "$OUT/$name.summary.txt"
  done
  return $rc
}

stage_ncu_probe() {
  # Per-instruction warp-stall samples of wgmma_probe's mainloops (NCU_PROBE_CASES, default the
  # serial and slot-scaled 128 x 256 loops at dsv3-local's W13): the probe runs only that
  # variant (its third argument), ncu samples the launch after the warm-up.
  command -v ncu >/dev/null || { echo "ncu not found"; return 1; }
  local rc=0 case name bin=/tmp/wgmma_probe
  nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
    packages/nmoe-kernels/bench/wgmma_probe.cu -o "$bin" || return 1
  local cases=${NCU_PROBE_CASES:-serial_128x256_n128@dsv3-local smemscaled_128x256_n128@dsv3-local}
  for case in $cases; do
    name=probe_${case//@/_}
    "$bin" 0 5 "$case" | tail -1
    timeout 200 ncu --clock-control none -k regex:probe_kernel --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section SourceCounters --import-source no \
      -f -o "$OUT/$name" "$bin" 0 1 "$case" > "$OUT/$name.log" 2>&1 \
      || { echo "ncu failed: $case"; rc=1; continue; }
    ncu_source_pages "$name" || rc=1
    rm -f "$OUT/$name.ncu-rep"
    echo "##### $case"; head -24 "$OUT/$name.summary.txt"
  done
  return $rc
}

stage_ncu_bf16() {
  # shellcheck disable=SC2086
  ncu_stage "$OUT/ncu-bf16.txt" profile_bf16_op.py ${NCU_BF16_CASES:-dsv3-local:wgrad_w2:ours \
    dsv3-local:wgrad_w2:torch dsv3-local:fwd_w2:ours dsv3-local:fwd_w2:torch}
}

stage_comm_check() {
  local rc=0
  "$PY" -m pytest -q -m multigpu -p no:cacheprovider --timeout=300 -rfEs \
    packages/nmoe-comm/tests/test_multigpu.py -k "${COMM_TESTS:-ipc or (nvshmem and 4 and not free)}" \
    > "$OUT/comm-tests.log" 2>&1 || rc=1
  tail -12 "$OUT/comm-tests.log"
  local n; n=$(ngpus)
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" \
    packages/nmoe-comm/bench/bench_dispatch.py --sync-free --dedup --graph --owner \
    --json "$OUT/bench_comm_$n.json" > "$OUT/bench_comm_$n.log" 2>&1 || rc=1
  grep -v "^\s*$\|\*\*\*\|OMP_NUM" "$OUT/bench_comm_$n.log" | tail -80
  [ "${COMM_BREAKDOWN:-1}" = 1 ] || return $rc
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" \
    packages/nmoe-comm/bench/bench_dispatch.py --backends ipc --breakdown --dedup \
    > "$OUT/breakdown_$n.log" 2>&1 || rc=1
  grep -v "^\s*$\|\*\*\*\|OMP_NUM" "$OUT/breakdown_$n.log" | tail -40
  return $rc
}

stage_comm_pipelined() {
  # The pipelined transport (nmoe-comm dispatch_stream / combine_stream): a 2-GPU smoke run of
  # the ipc worker (stops early on a hang: a stuck flag traps after the dispatcher's timeout),
  # the multi-GPU tests (COMM_TESTS), then the bench on all GPUs against the two-kernel path in
  # the same run (BENCH_COMM_ARGS adds e.g. --grids).
  local rc=0 n; n=$(ngpus)
  timeout 200 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
    packages/nmoe-comm/tests/multigpu_worker.py --backend ipc --seed "$RANDOM" --mode sync \
    > "$OUT/comm-smoke.log" 2>&1 || rc=1
  grep -v "^\s*$\|\*\*\*\|OMP_NUM" "$OUT/comm-smoke.log" | tail -12
  ((rc == 0)) || return 1
  timeout "${COMM_TEST_TIMEOUT:-480}" "$PY" -m pytest -q -m multigpu -p no:cacheprovider \
    --timeout=300 -rfEs packages/nmoe-comm/tests/test_multigpu.py \
    -k "${COMM_TESTS:-ipc or (nvshmem and 4 and not free)}" > "$OUT/comm-tests.log" 2>&1 || rc=1
  tail -8 "$OUT/comm-tests.log"
  timeout "${BENCH_COMM_TIMEOUT:-300}" "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node "$n" packages/nmoe-comm/bench/bench_dispatch.py --backends ipc \
    --two-kernel --sync-free --graph ${BENCH_COMM_ARGS:-} --json "$OUT/bench_pipelined_$n.json" \
    > "$OUT/bench_pipelined_$n.log" 2>&1 || rc=1
  grep -v "^\s*$\|\*\*\*\|OMP_NUM" "$OUT/bench_pipelined_$n.log" | tail -90
  return $rc
}

stage_comm_ab() {
  # The dispatch bench of this checkout's nmoe-comm against a baseline build of another commit's
  # (AB_BASE, default .ab/packages/nmoe-comm: make it with
  # `git archive BASE packages/nmoe-comm | tar -x -C .ab` and carry .ab), back to back on the
  # same machine: baseline, this tree, baseline again (AB_ARGS: the bench arguments). The
  # baseline is installed as a regular package in place of the editable one, which is restored
  # (incremental rebuild) for the run of this tree and at the end.
  local base=${AB_BASE:-.ab/packages/nmoe-comm} rc=0 n run tag
  n=$(ngpus)
  [ -f "$base/pyproject.toml" ] || { echo "comm-ab: no baseline package at $base"; return 1; }
  for run in base new base2; do
    if [ "$run" = new ]; then
      "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e packages/nmoe-comm \
        > "$OUT/ab-install.log" 2>&1 || { tail -20 "$OUT/ab-install.log"; return 1; }
    else
      "$PY" -m pip install -q --no-build-isolation --no-deps --no-index "$base" \
        > "$OUT/ab-install.log" 2>&1 || { tail -20 "$OUT/ab-install.log"; return 1; }
    fi
    tag=$("$PY" -c 'import nmoe_comm, os; print(os.path.dirname(nmoe_comm.__file__))')
    echo "== $run: nmoe_comm from $tag"
    timeout "${BENCH_COMM_TIMEOUT:-300}" "$PY" -m torch.distributed.run --standalone \
      --nproc_per_node "$n" packages/nmoe-comm/bench/bench_dispatch.py \
      ${AB_ARGS:---backends nccl ipc --sync-free --graph} --json "$OUT/ab_${run}_$n.json" \
      > "$OUT/ab_${run}_$n.log" 2>&1 || rc=1
    grep -v "^\s*$\|\*\*\*\|OMP_NUM\|UserWarning\|_warn_once" "$OUT/ab_${run}_$n.log" | tail -60
  done
  "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e packages/nmoe-comm \
    > "$OUT/ab-install.log" 2>&1 || rc=1
  return $rc
}

stage_tests_spread() {
  # The single-GPU test files (the kernels' GPU tests and the fused path's), spread over every
  # visible GPU: one worker per GPU takes the next file from a shared queue (heavy files first),
  # each file under its own time limit (SPREAD_TIMEOUT) with its own log. SPREAD_FILES replaces
  # the list, SPREAD_MARK the marker expression (default "gpu and not slow"), SPREAD_GPUS the
  # GPU indices (default all).
  local files=(${SPREAD_FILES:-packages/nmoe-kernels/tests/test_grouped_gemm_bf16_gpu.py
    packages/nmoe-kernels/tests/test_grouped_gemm_fp8_gpu.py
    packages/nmoe-core/tests/test_fused_gpu.py
    packages/nmoe-train/tests/test_fused_training_gpu.py
    packages/nmoe-kernels/tests/test_quant_gpu.py
    packages/nmoe-kernels/tests/test_quant_weights_gpu.py
    packages/nmoe-kernels/tests/test_permute_gpu.py
    packages/nmoe-kernels/tests/test_swiglu_backward_gpu.py
    packages/nmoe-kernels/tests/test_cross_entropy_gpu.py
    packages/nmoe-kernels/tests/test_adamw_gpu.py
    packages/nmoe-kernels/tests/test_router_topk_gpu.py
    packages/nmoe-comm/tests/test_local_gpu.py
    packages/nmoe-core/tests/test_loss_gpu.py})
  local g pids=() rc=0 queue="$OUT/.spread-queue"
  echo 0 > "$queue"
  for g in ${SPREAD_GPUS:-$(seq 0 $(($(ngpus) - 1)))}; do
    (
      while true; do
        local i
        i=$(flock "$queue" bash -c 'i=$(cat "$1"); echo $((i + 1)) > "$1"; echo "$i"' _ "$queue")
        ((i < ${#files[@]})) || break
        local name; name=$(basename "${files[$i]}" .py)
        CUDA_VISIBLE_DEVICES=$g timeout "${SPREAD_TIMEOUT:-480}" "$PY" -m pytest -q \
          -m "${SPREAD_MARK:-gpu and not slow}" -p no:cacheprovider -rfEs "${files[$i]}" \
          > "$OUT/$name.log" 2>&1
        echo "gpu $g $name rc=$? $(tail -1 "$OUT/$name.log")"
      done
    ) &
    pids+=($!)
  done
  for g in "${pids[@]}"; do wait "$g"; done
  local f name
  for f in "${files[@]}"; do
    name=$(basename "$f" .py)
    if ! tail -1 "$OUT/$name.log" 2>/dev/null | grep -q " passed" \
       || tail -1 "$OUT/$name.log" | grep -q "failed\|error"; then
      echo "tests-spread: $name did not pass"; rc=1
    fi
  done
  return $rc
}

for stage in "$@"; do
  echo "=== $stage ==="
  fn="stage_${stage//-/_}"
  if ! declare -F "$fn" >/dev/null; then echo "unknown stage $stage" >&2; exit 2; fi
  "$fn" || { echo "stage $stage FAILED"; status=1; }
done
exit $status
