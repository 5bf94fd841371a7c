"""The CUDA `cross_entropy_rows` against its torch reference and a float64 formula (one GPU).

Against the reference on the same GPU (the float32 operations of nmoe_core.loss's torch path):
the kernel sums exp in another order and uses exp2f (2 ulp), so p = exp(x - lse) differs by far
less than 2^-13 relative (sum of <= 2^8 terms per thread, then a tree: < 2^-16; the lse's few
float32 ulps scaled by |x - lse| <= 2^7: < 2^-15), hence every bf16 gradient element is at most
ONE bf16 ulp from the reference's (two values closer than one ulp round to neighbours at most),
except at the target, where p - 1 cancels: there |diff| <= 2^-13 absolute is allowed. Float32
logits: 2^-13 relative (2^-13 absolute at the target). Loss and lse: 2^-15 + 2^-20 |lse|.

Against float64 (exact up to float64 rounding): the bounds of test_reference_cross_entropy.py,
derived there. Ignored rows: exactly 0. Inputs are drawn fresh each run (seed printed).
"""

from __future__ import annotations

import pytest
import torch

import nmoe_kernels
import nmoe_kernels._C as C
from nmoe_kernels import reference as ref

pytestmark = pytest.mark.gpu

IGNORE = -100
VOCABS = [50257, 201088, 1000, 7]
ROWS = [0, 1, 333, 4096]
TARGET_ATOL = 2.0**-13
RTOL = {torch.bfloat16: 2**-8 + 2**-13, torch.float32: 2**-13}
TINY = 2.0**-120


@pytest.fixture(autouse=True)
def _require_cuda_build():
    assert C.WITH_CUDA, (
        "nmoe_kernels._C was built without nvcc; install the CUDA toolkit >= 12.8 and rebuild "
        "(pip install --no-build-isolation -e packages/nmoe-kernels)"
    )


def make_logits(num_rows: int, vocab: int, dtype: torch.dtype):
    """Rows with spreads 0.1..8 and offsets -40..40 (float32 on the GPU, then cast), one peaked
    row, one with -inf entries, ~1/5 ignored rows (at least one when N >= 4)."""
    spread = torch.empty(num_rows, 1, device="cuda").uniform_(0.1, 8.0)
    offset = torch.empty(num_rows, 1, device="cuda").uniform_(-40.0, 40.0)
    logits = torch.randn(num_rows, vocab, device="cuda").mul_(spread).add_(offset)
    targets = torch.randint(0, vocab, (num_rows,), device="cuda")
    if num_rows >= 3 and vocab >= 3:
        logits[1, targets[1]] += 30.0
        logits[2, (targets[2] + 1) % vocab] = float("-inf")
        logits[2, (targets[2] + 2) % vocab] = float("-inf")
    ignored = torch.rand(num_rows, device="cuda") < 0.2
    if num_rows >= 4:
        ignored[3] = True
    targets[ignored] = IGNORE
    return logits.to(dtype), targets


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Integers whose differences count representable steps between floats (+0 == -0)."""
    if t.dtype == torch.bfloat16:
        bits = t.view(torch.int16).long()
        return torch.where(bits >= 0, bits, -(bits + 2**15))
    bits = t.view(torch.int32).long()
    return torch.where(bits >= 0, bits, -(bits + 2**31))


def target_mask(targets: torch.Tensor, shape) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool, device=targets.device)
    valid = targets != IGNORE
    mask[torch.arange(shape[0], device=targets.device)[valid], targets[valid]] = True
    return mask


def check_against_reference(got, want, targets, seed):
    """Gradients: <= 1 bf16 ulp (bf16) or 2^-13 relative (fp32); 2^-13 absolute at targets."""
    at_target = target_mask(targets, got.shape)
    diff = (got.double() - want.double()).abs()
    if got.dtype == torch.bfloat16:
        close = (ordered_bits(got) - ordered_bits(want)).abs() <= 1
    else:
        close = diff <= RTOL[torch.float32] * want.double().abs() + TINY
    close |= at_target & (diff <= TARGET_ATOL)
    bad = (~close).nonzero()
    assert bad.numel() == 0, (
        f"seed {seed}: {bad.shape[0]} gradient elements beyond the bound, first at "
        f"{bad[0].tolist()}: {got[tuple(bad[0])].item()} vs reference {want[tuple(bad[0])].item()}"
    )


def check_against_float64(logits_in, targets, got, loss, lse, scale_N, seed, rows_per_step=256):
    """The float64 formula row block by row block (bounded memory for 4096 x 201088)."""
    rtol = RTOL[got.dtype]
    for start in range(0, logits_in.shape[0], rows_per_step):
        end = min(start + rows_per_step, logits_in.shape[0])
        x = logits_in[start:end].double()
        tgt = targets[start:end]
        valid = tgt != IGNORE
        want_lse = x.max(dim=1).values
        want_lse = want_lse + (x - want_lse[:, None]).exp().sum(dim=1).log()
        rows = torch.arange(end - start, device=x.device)
        safe = torch.where(valid, tgt, 0)
        want_loss = torch.where(valid, want_lse - x[rows, safe], 0.0)
        grad = (x - want_lse[:, None]).exp_()
        grad[rows, safe] -= valid.double()
        scale = scale_N[start:end].double() * valid
        grad.mul_(scale[:, None])
        grad[~valid] = 0.0
        g = got[start:end]
        assert torch.equal(g[~valid], torch.zeros_like(g[~valid])), f"seed {seed}: ignored row"
        bound = rtol * grad.abs() + TINY
        bound[rows[valid], tgt[valid]] += TARGET_ATOL * scale.abs()[valid]
        excess = ((g.double() - grad).abs() - bound).max().item()
        assert excess <= 0, f"seed {seed}: rows {start}..{end}: gradient beyond bound by {excess}"
        limit = 2**-15 + 2**-20 * want_lse.abs()
        for name, value, want in (("loss", loss, want_loss), ("lse", lse, want_lse)):
            diff = (value[start:end].double() - want).abs()
            assert bool((diff <= limit).all()), f"seed {seed}: {name} off by {diff.max().item()}"


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("num_rows", ROWS)
def test_bf16_matches_reference_and_float64(num_rows, vocab, torch_seed):
    logits, targets = make_logits(num_rows, vocab, torch.bfloat16)
    logits_in = logits.clone()
    want = logits.clone()
    loss, lse = nmoe_kernels.cross_entropy_rows(logits, targets, IGNORE)
    want_loss, want_lse = ref.cross_entropy_rows(want, targets, IGNORE)
    check_against_reference(logits, want, targets, torch_seed)
    limit = 2**-15 + 2**-20 * want_lse.abs()
    assert bool(((loss - want_loss).abs() <= limit).all()), f"seed {torch_seed}: loss"
    assert bool(((lse - want_lse).abs() <= limit).all()), f"seed {torch_seed}: lse"
    del want
    check_against_float64(logits_in, targets, logits, loss, lse,
                          torch.ones(num_rows, device="cuda"), torch_seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [201088, 50257, 7, 1000])
def test_rows_not_16_byte_aligned(dtype, vocab, torch_seed):
    # A view one element into its storage: every row starts off the 16-byte grid (head path).
    num_rows = 37
    logits, targets = make_logits(num_rows, vocab, dtype)
    storage = torch.empty(num_rows * vocab + 1, dtype=dtype, device="cuda")
    shifted = storage[1:].view(num_rows, vocab)
    shifted.copy_(logits)
    loss, lse = nmoe_kernels.cross_entropy_rows(shifted, targets, IGNORE)
    want_loss, want_lse = ref.cross_entropy_rows(logits, targets, IGNORE)
    check_against_reference(shifted, logits, targets, torch_seed)
    limit = 2**-15 + 2**-20 * want_lse.abs()
    assert bool(((loss - want_loss).abs() <= limit).all()), f"seed {torch_seed}: loss"


@pytest.mark.parametrize("kind", ["number", "scalar_tensor", "row_tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grad_scale(kind, dtype, torch_seed):
    num_rows, vocab = 129, 50257
    logits, targets = make_logits(num_rows, vocab, dtype)
    logits_in = logits.clone()
    if kind == "number":
        grad_scale = 0.37
        scale_N = torch.full((num_rows,), 0.37, device="cuda")
    elif kind == "scalar_tensor":
        grad_scale = torch.rand((), device="cuda") + 0.5
        scale_N = grad_scale.expand(num_rows)
    else:
        grad_scale = torch.randn(num_rows, device="cuda")
        scale_N = grad_scale
    loss, lse = nmoe_kernels.cross_entropy_rows(logits, targets, IGNORE, grad_scale)
    check_against_float64(logits_in, targets, logits, loss, lse, scale_N, torch_seed)


def test_bitwise_deterministic_and_out_of_range_targets(torch_seed):
    logits, targets = make_logits(64, 201088, torch.bfloat16)
    targets[5], targets[6] = 201088, -1  # out of range: NaN loss, no -1, no fault
    again = logits.clone()
    loss, lse = nmoe_kernels.cross_entropy_rows(logits, targets, IGNORE)
    loss2, lse2 = nmoe_kernels.cross_entropy_rows(again, targets, IGNORE)
    torch.cuda.synchronize()
    assert torch.equal(logits, again) and torch.equal(lse, lse2), f"seed {torch_seed}"
    assert torch.equal(loss.isnan(), loss2.isnan()), f"seed {torch_seed}"
    assert bool(loss[5:7].isnan().all()) and not bool(loss[7:].isnan().any()), f"seed {torch_seed}"
    assert bool((logits[5:7].float() >= 0).all()), f"seed {torch_seed}: no -1 for bad targets"


def test_wrapper_checks_on_gpu():
    logits = torch.zeros(4, 9, dtype=torch.bfloat16, device="cuda")
    targets = torch.zeros(4, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="logits_NV must be bfloat16 or float32"):
        nmoe_kernels.cross_entropy_rows(logits.half(), targets)
    with pytest.raises(ValueError, match="logits_NV must be contiguous"):
        nmoe_kernels.cross_entropy_rows(logits.t(), targets)
    with pytest.raises(ValueError, match="targets_N must be int64"):
        nmoe_kernels.cross_entropy_rows(logits, targets.int())
    with pytest.raises(ValueError, match=r"targets_N must be \[N\] = \[4\]"):
        nmoe_kernels.cross_entropy_rows(logits, targets[:3])
    with pytest.raises(ValueError, match="grad_scale must be float32"):
        nmoe_kernels.cross_entropy_rows(logits, targets, grad_scale=torch.ones((), device="cuda",
                                                                               dtype=torch.float64))
    with pytest.raises(ValueError, match=r"grad_scale must have shape \[\] or \[N\] = \[4\]"):
        nmoe_kernels.cross_entropy_rows(logits, targets, grad_scale=torch.ones(3, device="cuda"))
