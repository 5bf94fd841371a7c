"""`nmoe_kernels.reference.cross_entropy_rows` against a float64 evaluation of the formula.

Tolerances (per element, against the exact float64 value e):
- gradient, bf16 logits: |g - e| <= (2^-8 + 2^-13) |e|: round-to-nearest-even to bf16 (8
  significant bits) is off by at most 2^-8 relative, and the float32 work before it by < 2^-13
  (exp within 2 ulp, an lse off by at most a few float32 ulps of |lse| <= 64, each scaled by
  |x - lse| <= 2^7; the sum of V <= 2^13 terms in float32). At the target g = p - 1 cancels, so
  there the float32 error of p (< 2^-13 p <= 2^-13) is allowed as an absolute term 2^-13.
- gradient, float32 logits: the float32 term alone, 2^-13 relative (2^-13 absolute at the target).
- float64 logits run in float64: 1e-12.
- loss and lse (float32): 2^-15 absolute plus 2^-20 relative to |lse| (the float32 sum's and
  log's errors; lse is at most ~50 here).
Ignored rows must be exactly 0 (torch.equal), whatever their logits.
"""

from __future__ import annotations

import pytest
import torch

from nmoe_kernels import reference as ref

IGNORE = -100
# dtype -> (gradient rtol, gradient atol at the target, loss/lse atol, loss/lse rtol)
TOLERANCES = {
    torch.bfloat16: (2**-8 + 2**-13, 2**-13, 2**-15, 2**-20),
    torch.float32: (2**-13, 2**-13, 2**-15, 2**-20),
    torch.float64: (1e-12, 1e-12, 1e-12, 1e-12),
}
TINY = 2.0**-120  # below float32's normal range the relative bounds do not hold


def make_logits(num_rows: int, vocab: int, dtype: torch.dtype):
    """Rows with spreads 0.1..8 and offsets -40..40, one peaked row (p_target close to 1), one
    row with -inf entries, ~1/5 ignored rows, targets anywhere in [0, V)."""
    spread = torch.empty(num_rows, 1, dtype=torch.float64).uniform_(0.1, 8.0)
    offset = torch.empty(num_rows, 1, dtype=torch.float64).uniform_(-40.0, 40.0)
    logits = torch.randn(num_rows, vocab, dtype=torch.float64) * spread + offset
    targets = torch.randint(0, vocab, (num_rows,))
    if num_rows >= 3 and vocab >= 3:
        logits[1, targets[1]] += 30.0                       # peaked: p_target ~ 1 - tiny
        logits[2, (targets[2] + 1) % vocab] = float("-inf")  # masked logit
    ignored = torch.rand(num_rows) < 0.2
    if num_rows >= 4:
        ignored[3] = True
    targets[ignored] = IGNORE
    return logits.to(dtype), targets


def float64_formula(logits, targets, scale_N):
    """lse, loss and (softmax - onehot) * scale of every row in float64 (scale 0 if ignored)."""
    x = logits.double()
    valid = targets != IGNORE
    lse = x.max(dim=1).values
    lse = lse + (x - lse[:, None]).exp().sum(dim=1).log()
    grad = (x - lse[:, None]).exp()
    safe = torch.where(valid, targets, 0)
    rows = torch.arange(x.shape[0])
    grad[rows, safe] -= valid.double()
    grad *= (scale_N.double() * valid)[:, None]
    grad[~valid] = 0.0
    loss = torch.where(valid, lse - x[rows, safe], 0.0)
    return loss, lse, grad


def check_against_float64(logits_in, targets, got_grad, loss, lse, scale_N, seed):
    dtype = logits_in.dtype
    rtol, target_atol, loss_atol, loss_rtol = TOLERANCES[dtype]
    want_loss, want_lse, want_grad = float64_formula(logits_in, targets, scale_N)
    valid = targets != IGNORE
    assert torch.equal(got_grad[~valid], torch.zeros_like(got_grad[~valid])), f"seed {seed}"
    assert torch.equal(loss[~valid], torch.zeros_like(loss[~valid])), f"seed {seed}"
    err = (got_grad.double() - want_grad).abs()
    bound = rtol * want_grad.abs() + TINY
    rows = torch.arange(logits_in.shape[0])[valid]
    bound[rows, targets[valid]] += target_atol * scale_N.double().abs()[valid]
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"seed {seed}: gradient error exceeds the bound by {worst:.3e}"
    for name, got, want in (("loss", loss, want_loss), ("lse", lse, want_lse)):
        diff = (got.double() - want).abs()
        limit = loss_atol + loss_rtol * want_lse.abs()
        assert bool((diff <= limit).all()), (
            f"seed {seed}: {name} off by {diff.max().item():.3e}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("num_rows,vocab", [(0, 7), (1, 1), (1, 7), (33, 1000), (9, 4099)])
def test_reference_matches_float64_formula(dtype, num_rows, vocab, torch_seed):
    logits, targets = make_logits(num_rows, vocab, dtype)
    logits_in = logits.clone()
    loss, lse = ref.cross_entropy_rows(logits, targets, IGNORE)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and lse.dtype == acc and logits.dtype == dtype
    check_against_float64(logits_in, targets, logits, loss, lse,
                          torch.ones(num_rows, dtype=torch.float64), torch_seed)


@pytest.mark.parametrize("kind", ["number", "scalar_tensor", "row_tensor"])
def test_reference_grad_scale(kind, torch_seed):
    num_rows, vocab = 17, 300
    logits, targets = make_logits(num_rows, vocab, torch.bfloat16)
    logits_in = logits.clone()
    if kind == "number":
        grad_scale, scale_N = 0.37, torch.full((num_rows,), 0.37, dtype=torch.float64)
    elif kind == "scalar_tensor":
        grad_scale = torch.rand(()) + 0.5
        scale_N = grad_scale.double().expand(num_rows)
    else:
        grad_scale = torch.randn(num_rows)
        scale_N = grad_scale.double()
    loss, lse = ref.cross_entropy_rows(logits, targets, IGNORE, grad_scale)
    check_against_float64(logits_in, targets, logits, loss, lse, scale_N, torch_seed)


def test_reference_out_of_range_target_gives_nan_loss_and_no_onehot(torch_seed):
    logits = torch.randn(3, 10)
    x = logits.clone().double()
    targets = torch.tensor([10, -1, 4])
    loss, lse = ref.cross_entropy_rows(logits, targets, IGNORE)
    assert torch.isnan(loss[:2]).all() and not torch.isnan(loss[2]), f"seed {torch_seed}"
    softmax = torch.softmax(x, dim=1)
    assert torch.allclose(logits[:2].double(), softmax[:2], rtol=2**-13, atol=0), (
        f"seed {torch_seed}")


def test_reference_argument_errors():
    good = torch.zeros(2, 5)
    targets = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="logits_NV must be a floating tensor"):
        ref.cross_entropy_rows(torch.zeros(2, 5, dtype=torch.long), targets)
    with pytest.raises(ValueError, match=r"logits_NV must be \[N, V\] with V >= 1, got \(2, 0\)"):
        ref.cross_entropy_rows(torch.zeros(2, 0), targets)
    with pytest.raises(ValueError, match="targets_N must be an int64 tensor"):
        ref.cross_entropy_rows(good, targets.float())
    with pytest.raises(ValueError, match=r"targets_N must be \[N\] = \[2\], got \(3,\)"):
        ref.cross_entropy_rows(good, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"grad_scale must have shape \[\] or \[N\] = \[2\]"):
        ref.cross_entropy_rows(good, targets, grad_scale=torch.ones(3))
