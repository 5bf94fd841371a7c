# Sourced from the repository root by the GPU scripts (ci/gpu.sh, packages/*/bench/gpu_*_run.sh):
# $OUT (default ./gpu-out) created, the wheelhouse's packages (../shared/tools/gpu-wheelhouse,
# stashed under /root/nmoe-boot) on PYTHONPATH, NVLink multicast off (shared machines),
# unbuffered Python, offline datasets.
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
[ -d /root/nmoe-boot ] && export PYTHONPATH=/root/nmoe-boot${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1
