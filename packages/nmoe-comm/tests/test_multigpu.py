"""Every multi-rank backend on 2 and 4 GPUs, bitwise against the reference (marker multigpu).

Each test launches ``tests/multigpu_worker.py`` under torchrun (one process per GPU) with a fresh
seed and a timeout; see that file for what is checked. Run on a machine with 2+ GPUs:

    pytest -m multigpu packages/nmoe-comm/tests/test_multigpu.py -ra
    pytest -m multigpu packages/nmoe-comm/tests/test_multigpu.py -ra -k "ipc and sync_free"

``mode`` ``sync`` runs every check through the synchronous dispatch, ``sync_free`` through
``dispatch(..., sync=False)`` (``nccl``: only its refusal).

Tests needing more GPUs than are visible skip with a reason, and so does ``nvshmem`` when
nvshmem4py cannot be imported (the reason names what is missing).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("multigpu_worker.py")
ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1",
       "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
TIMEOUT_S = 600


def _nvshmem_missing() -> str | None:
    from nmoe_comm.nvshmem import _missing

    try:
        import torch.distributed as dist  # noqa: F401
    except ImportError:
        return "torch.distributed is missing"
    reason = _missing()
    # torch.distributed is initialised in the workers, not here.
    return None if reason is None or "init_process_group" in reason else reason


@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("backend", ["nccl", "ipc", "nvshmem"])
@pytest.mark.parametrize("mode", ["sync", "sync_free"])
def test_backend_equals_reference_on_gpus(gen, backend, world_size, mode):
    count = torch.cuda.device_count()
    if world_size > count:
        pytest.skip(f"needs {world_size} GPUs, {count} visible")
    if backend == "nvshmem" and (reason := _nvshmem_missing()):
        pytest.skip(f"nvshmem backend unavailable: {reason}")
    seed = int(gen.initial_seed())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(world_size), str(WORKER), "--backend", backend,
               "--seed", str(seed), "--mode", mode]
    try:
        done = subprocess.run(command, env={**os.environ, **ENV}, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-4000:]
        pytest.fail(f"{backend} ({mode}) on {world_size} GPUs timed out after {TIMEOUT_S} s "
                    f"(seed {seed}); output tail:\n{tail}")
    output = (done.stdout + done.stderr)[-8000:]
    assert done.returncode == 0, (
        f"{backend} ({mode}) on {world_size} GPUs failed (seed {seed}, replay with "
        f"NMOE_TEST_SEED={seed})"
        f":\n{output}")
    print(done.stdout[-2000:])
