"""The fused MoE layer against the torch backend with the experts split over 2 and 4 GPUs
(marker multigpu): launches ``fused_multigpu_worker.py`` under torchrun with a fresh seed and a
timeout; see that file for the cases and tolerances.

    pytest -m multigpu packages/nmoe-core/tests/test_fused_multigpu.py -ra

The same worker also runs in the CPU suite on 2 CPU processes (gloo, the nccl dispatcher, the
reference expert kernels).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("fused_multigpu_worker.py")
ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1",
       "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
TIMEOUT_S = 400


def _launch(dispatcher: str, world_size: int, *extra: str, timeout_s: int = TIMEOUT_S) -> None:
    seed = torch.seed() % 2**31
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(world_size), str(WORKER), "--dispatcher", dispatcher,
               "--seed", str(seed), *extra]
    # Own process group: a timeout kills torchrun AND its workers (a hung collective).
    proc = subprocess.Popen(command, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"fused over {dispatcher} on {world_size} ranks timed out after {timeout_s} s "
                    f"(seed {seed}); output tail:\n{output[-4000:]}")
    assert proc.returncode == 0, (
        f"fused over {dispatcher} on {world_size} ranks failed (seed {seed}):\n{output[-8000:]}")
    print(output[-2000:])


@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dispatcher", ["ipc", "nccl", "ipc+owner"])
def test_fused_matches_torch_backend_expert_parallel(dispatcher, world_size):
    """``ipc+owner``: ipc with ``dedup_rows`` and ``reduce_on_owner`` (sums on the owners)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world_size > count:
        pytest.skip(f"needs {world_size} GPUs, {count} visible")
    backend, _, owner = dispatcher.partition("+")
    _launch(backend, world_size, *(["--reduce-on-owner"] if owner else []))


def test_fused_matches_torch_backend_expert_parallel_on_cpu_processes():
    _launch("nccl", 2, "--device", "cpu", timeout_s=180)
