"""The fused branch of `chunked_cross_entropy` on CPU, with `nmoe_kernels.reference` standing in
for the CUDA op: its autograd (gradients formed in the forward, scaled in the backward) against
the torch branch and against `F.cross_entropy`.

Tolerances: float64 runs the same formulas in float64 on both branches, differing only in where
the incoming gradient is applied (before vs after the GEMMs), so 1e-10. In bf16 the branches
compute identical float32 logits, lse and probabilities (the reference performs the torch
branch's operations), so with an incoming gradient of 1 everything is bitwise equal. Otherwise
they differ in rounding: the fused branch rounds softmax - onehot to bf16 before the scale and
rounds grad_hidden once more after scaling, the torch branch rounds the scaled value once. Each
adds at most 2^-8 relative per element, so we bound the relative Frobenius error of grad_hidden /
grad_weight by 2^-7 (measured 3.5e-3 to 4e-3, the RMS of those roundings; each branch is ~7e-3
from float64); the loss is the same float32 sum, to 1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nmoe_core.loss as loss_module
from nmoe_core.loss import chunked_cross_entropy
from nmoe_kernels import reference

IGNORE = -100


@pytest.fixture
def seed():
    s = torch.seed()
    torch.manual_seed(s)
    return s


@pytest.fixture
def fused_with_reference(monkeypatch):
    """Route every call through the fused branch, with the reference op (CPU, any dtype)."""
    calls = []

    def rows_op(logits_NV, targets_N, ignore_index):
        calls.append(tuple(logits_NV.shape))
        return reference.cross_entropy_rows(logits_NV, targets_N, ignore_index)

    monkeypatch.setattr(loss_module, "_fused_rows_op", lambda hidden, weight: rows_op)
    return calls


def make_inputs(num_rows: int, dim: int, vocab: int, dtype: torch.dtype):
    hidden = (torch.randn(num_rows, dim, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    weight = torch.randn(vocab, dim, dtype=torch.float64).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (num_rows,))
    targets[torch.rand(num_rows) < 0.2] = IGNORE
    return hidden, weight, targets


def loss_and_grads(hidden, weight, targets, chunk_size, grad_scale):
    loss_sum, count = chunked_cross_entropy(hidden, weight, targets, IGNORE, chunk_size)
    grads = torch.autograd.grad(loss_sum * grad_scale, [hidden, weight])
    return loss_sum.detach(), count, grads


def test_torch_branch_is_chosen_off_cuda():
    hidden = torch.zeros(2, 4, dtype=torch.bfloat16)
    assert loss_module._fused_rows_op(hidden, torch.zeros(3, 4, dtype=torch.bfloat16)) is None


@pytest.mark.parametrize("num_rows,chunk_size", [(37, 8), (5, 64), (0, 8)])
def test_fused_branch_float64_matches_torch_branch_and_cross_entropy(
        num_rows, chunk_size, seed, fused_with_reference, monkeypatch):
    hidden, weight, targets = make_inputs(num_rows, 16, 50, torch.float64)
    loss, count, grads = loss_and_grads(hidden, weight, targets, chunk_size, 1.7)
    assert len(fused_with_reference) == -(-num_rows // chunk_size), "fused branch not taken"
    monkeypatch.setattr(loss_module, "_fused_rows_op", lambda hidden, weight: None)
    want_loss, want_count, want_grads = loss_and_grads(hidden, weight, targets, chunk_size, 1.7)
    full = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE, reduction="sum")
    full_grads = torch.autograd.grad(full * 1.7, [hidden, weight])
    assert count == want_count == (targets != IGNORE).sum()
    assert torch.allclose(loss, want_loss, atol=1e-10), f"seed {seed}"
    assert torch.allclose(loss, full, atol=1e-10), f"seed {seed}"
    for got, want, full_grad in zip(grads, want_grads, full_grads, strict=True):
        assert got.dtype == torch.float64
        assert torch.allclose(got, want, atol=1e-10), f"seed {seed}"
        assert torch.allclose(got, full_grad, atol=1e-10), f"seed {seed}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("grad_scale", [1.0, 1.0 / 53])
def test_fused_branch_bf16_matches_torch_branch(grad_scale, seed, fused_with_reference,
                                                monkeypatch):
    hidden, weight, targets = make_inputs(70, 32, 300, torch.bfloat16)
    loss, _, grads = loss_and_grads(hidden, weight, targets, 16, grad_scale)
    assert fused_with_reference, "fused branch not taken"
    monkeypatch.setattr(loss_module, "_fused_rows_op", lambda hidden, weight: None)
    want_loss, _, want_grads = loss_and_grads(hidden, weight, targets, 16, grad_scale)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want_loss.item()) <= 1e-6 * abs(want_loss.item()), f"seed {seed}"
    for name, got, want in zip(("hidden", "weight"), grads, want_grads, strict=True):
        assert got.dtype == torch.bfloat16
        if grad_scale == 1.0:
            assert torch.equal(got, want), f"seed {seed}: grad {name}"
        assert _rel(got, want) <= 2**-7, f"seed {seed}: grad {name} rel error {_rel(got, want)}"


def test_fused_branch_partial_grads_and_no_grad(seed, fused_with_reference, monkeypatch):
    hidden, weight, targets = make_inputs(23, 8, 40, torch.float64)
    frozen = hidden.detach()
    loss_sum, _ = chunked_cross_entropy(frozen, weight, targets, IGNORE, 8)
    (grad_weight,) = torch.autograd.grad(loss_sum * 0.5, [weight])
    with torch.no_grad():
        no_grad_loss, _ = chunked_cross_entropy(hidden, weight, targets, IGNORE, 8)
    monkeypatch.setattr(loss_module, "_fused_rows_op", lambda hidden, weight: None)
    want_loss, _ = chunked_cross_entropy(frozen, weight, targets, IGNORE, 8)
    (want_grad,) = torch.autograd.grad(want_loss * 0.5, [weight])
    assert torch.allclose(loss_sum, want_loss, atol=1e-10), f"seed {seed}"
    assert torch.allclose(no_grad_loss, want_loss, atol=1e-10), f"seed {seed}"
    assert not no_grad_loss.requires_grad
    assert torch.allclose(grad_weight, want_grad, atol=1e-10), f"seed {seed}"
