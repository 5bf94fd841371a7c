"""`nmoe_kernels.reference.router_topk` against a per-row Python loop and torch.topk."""

from __future__ import annotations

import pytest
import torch

from nmoe_kernels import reference as ref


def _naive(scores_TE: torch.Tensor, bias_E: torch.Tensor, k: int) -> torch.Tensor:
    """Per row: Python's sort of (-(score + bias), expert), the biased value computed by torch."""
    rows = []
    for row in (scores_TE + bias_E).tolist():
        rows.append(sorted(range(len(row)), key=lambda e, row=row: (-row[e], e))[:k])
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), k)


@pytest.mark.parametrize("num_experts,k", [(1, 1), (8, 3), (31, 31), (64, 6), (256, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_naive_loop_with_ties(num_experts, k, dtype):
    scores = (torch.rand(40, num_experts, dtype=dtype) * 8).round() / 8
    bias = torch.randint(0, 3, (num_experts,)).to(dtype) / 8
    assert torch.equal(ref.router_topk(scores, bias, k), _naive(scores, bias, k))


def test_equals_torch_topk_without_ties():
    scores = torch.randn(300, 256).sigmoid()
    bias = torch.randn(256) * 1e-2
    biased = scores + bias
    top = torch.topk(biased, 9)
    untied = (top.values[:, 1:] != top.values[:, :-1]).all(1)
    got = ref.router_topk(scores, bias, 8)
    assert torch.equal(got[untied], top.indices[untied, :8])
    assert torch.equal(biased.gather(1, got), top.values[:, :8])


def test_float32_add_and_special_values():
    """One float32 add decides: 1 + 2^-24 rounds to 1 (to even), so expert 0 ties with expert 2
    (0.5 + 0.5) and the lower goes first, both after expert 1 (1 + 2^-23). NaN orders first,
    then +inf; -0.0 ties with +0.0."""
    scores = torch.tensor([[1.0, 1.0 + 2**-23, 0.5, float("nan"), float("inf"), -0.0, 0.0]])
    bias = torch.tensor([2**-24, 0.0, 0.5, 0.0, 0.0, -0.0, -0.0])  # -0.0 keeps the zeros' signs
    assert ref.router_topk(scores, bias, 7).tolist() == [[3, 4, 1, 0, 2, 5, 6]]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"k must be an int with 1 <= k <= E = 4, got 5"):
        ref.router_topk(torch.rand(2, 4), torch.zeros(4), 5)
    with pytest.raises(ValueError, match=r"bias_E must be \[E\] = \[4\]"):
        ref.router_topk(torch.rand(2, 4), torch.zeros(3), 2)
