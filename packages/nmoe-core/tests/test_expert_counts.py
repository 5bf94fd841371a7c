"""`nmoe_core.moe.expert_counts` (the sync-free per-expert load count) equals torch.bincount."""

from __future__ import annotations

import pytest
import torch

from nmoe_core.moe import expert_counts


@pytest.mark.parametrize("num_experts", [1, 4, 64])
def test_expert_counts_equals_bincount(num_experts):
    ids_TK = torch.randint(0, num_experts, (int(torch.randint(1, 300, ())), 4))
    if num_experts > 2:
        ids_TK[ids_TK == 1] = 0  # an expert with no tokens
    want = torch.bincount(ids_TK.flatten(), minlength=num_experts)
    got = expert_counts(ids_TK, num_experts)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    all_on_one = torch.full((17, 3), num_experts - 1)
    assert torch.equal(expert_counts(all_on_one, num_experts),
                       torch.bincount(all_on_one.flatten(), minlength=num_experts))
    assert torch.equal(expert_counts(ids_TK[:0], num_experts), torch.zeros(num_experts,
                                                                            dtype=torch.int64))
