"""The fused branch of `chunked_cross_entropy` (CUDA op `nmoe_kernels.cross_entropy_rows`) against
the torch branch on one GPU, bf16.

Tolerances: the branches compute the same bf16 logits GEMM; the kernel's softmax - onehot is
within one bf16 ulp of the torch branch's (test_cross_entropy_gpu.py), and the fused branch
applies the incoming gradient after the gradient GEMMs (one more bf16 rounding of grad_hidden)
where the torch branch applies it before rounding. test_loss.py bounds that rounding difference
by 2^-7 relative Frobenius (measured ~4e-3); the extra one-ulp differences are rare and
unbiased, so the same bound holds here. Loss: float32 sums in different orders and lse within a
few float32 ulps: 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

import nmoe_core.loss as loss_module
from nmoe_core.loss import chunked_cross_entropy

pytestmark = pytest.mark.gpu

IGNORE = -100


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _run(hidden, weight, targets, chunk_size, grad_scale):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    loss_sum, count = chunked_cross_entropy(h, w, targets, IGNORE, chunk_size)
    grads = torch.autograd.grad(loss_sum * grad_scale, [h, w])
    return loss_sum.detach(), count, grads


@pytest.mark.parametrize("vocab", [50257, 201088])
@pytest.mark.parametrize("grad_scale", [1.0, 1.0 / 2411])
def test_fused_branch_matches_torch_branch(vocab, grad_scale, monkeypatch):
    seed = torch.seed()
    num_rows, dim, chunk_size = 3000, 256, 1024  # two full chunks and a partial one
    hidden = torch.randn(num_rows, dim, device="cuda").to(torch.bfloat16)
    weight = (torch.randn(vocab, dim, device="cuda") * 0.2).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (num_rows,), device="cuda")
    targets[torch.rand(num_rows, device="cuda") < 0.2] = IGNORE
    assert loss_module._fused_rows_op(hidden, weight) is not None, (
        "the fused branch needs nmoe_kernels.cross_entropy_rows compiled with CUDA; rebuild "
        "nmoe-kernels (pip install --no-build-isolation -e packages/nmoe-kernels)"
    )
    loss, count, grads = _run(hidden, weight, targets, chunk_size, grad_scale)
    monkeypatch.setattr(loss_module, "_fused_rows_op", lambda hidden, weight: None)
    want_loss, want_count, want_grads = _run(hidden, weight, targets, chunk_size, grad_scale)
    assert count == want_count
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item()), f"seed {seed}"
    for name, got, want in zip(("hidden", "weight"), grads, want_grads, strict=True):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert _rel(got, want) <= 2**-7, f"seed {seed}: grad {name} rel error {_rel(got, want)}"


def test_fused_branch_under_no_grad_gives_the_loss():
    seed = torch.seed()
    hidden = torch.randn(700, 128, device="cuda").to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(5000, 128, device="cuda") * 0.2).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 5000, (700,), device="cuda")
    with torch.no_grad():
        loss, _ = chunked_cross_entropy(hidden, weight, targets, IGNORE, 256)
        want = torch.nn.functional.cross_entropy(
            (hidden @ weight.T).float(), targets, reduction="sum")
    assert not loss.requires_grad
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item()), f"seed {seed}"
