"""The ``nccl`` backend over gloo (CPU), 2 and 3 processes, bitwise against the reference.

Each rank runs `nmoe_comm.testing.gloo_worker`: every `GROUP_CASES` case (random routing, slots
naming one expert twice, a rank that receives nothing, every row on one expert, K = 1 and 8, D
not a multiple of 128, a rank without tokens) in bfloat16 and float32, float64 rows, an FP8
dispatch, forward, both backwards, explicit gates, and a capacity error raised on every rank.
Inputs are drawn per rank from a fresh seed (printed; replay with ``NMOE_TEST_SEED``).
Run: ``pytest packages/nmoe-comm/tests/test_nccl_gloo.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nmoe_comm
from nmoe_comm import BackendUnavailableError
from nmoe_comm.testing import gloo_worker

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


@pytest.mark.parametrize("world_size", [2, 3])
def test_nccl_over_gloo_equals_reference(gen, tmp_path, world_size):
    seed = int(gen.initial_seed())
    mp.spawn(gloo_worker, args=(world_size, str(tmp_path / "init"), seed), nprocs=world_size,
             join=True)


def test_nccl_needs_an_initialised_group():
    assert "nccl" in nmoe_comm.available_backends()
    with pytest.raises(BackendUnavailableError, match="init_process_group"):
        nmoe_comm.create_dispatcher("nccl", num_experts=8, capacity=64, world_size=2, rank=0)
    hint = nmoe_comm.buffer_size_hint("nccl", capacity=1024, hidden=256, dtype=torch.bfloat16)
    assert hint >= 2 * 1024 * 256 * 2  # landing rows and x_RD at least
