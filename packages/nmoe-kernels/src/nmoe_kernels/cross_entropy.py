"""Fused cross-entropy over rows of logits on the GPU (CUDA kernel in `_C`).

Shape letters: N rows (tokens), V vocabulary.

One kernel per call replaces the chain of float32 passes of a chunked linear cross-entropy (upcast,
max, subtract-exp, sum, divide, gather, and in the backward exp, the -1 at the target, the scale,
the cast back): it reads each row of logits once (plus a partial re-read, mostly from shared
memory or L2) and writes the logits gradient over it. Reference:
`nmoe_kernels.reference.cross_entropy_rows`.
"""

from __future__ import annotations

import torch

from nmoe_kernels import _extension

__all__ = ["cross_entropy_rows"]


def cross_entropy_rows(
    logits_NV: torch.Tensor,
    targets_N: torch.Tensor,
    ignore_index: int = -100,
    grad_scale: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy and log-sum-exp (CUDA); overwrites ``logits_NV`` with its gradient.

    Per row n with target t and x = logits_NV[n] in float32:
    ``lse_N[n] = max(x) + log(sum(exp(x - max(x))))``, ``loss_N[n] = lse_N[n] - x[t]`` and, in
    place, ``logits_NV[n] = ((exp(x - lse_N[n]) - onehot(t)) * row_scale[n])`` rounded to the
    logits dtype (RNE); row_scale is 0 for ignored rows (their loss and gradient are exactly 0)
    and ``grad_scale`` (1 when None) otherwise. The float32 sums run in another order than torch's
    and exp is exp2f (2 ulp), so against `nmoe_kernels.reference.cross_entropy_rows` on the same
    GPU the bf16 gradient is within one bf16 ulp (or 2^-20 absolute at the target, where
    p - 1 cancels) and loss / lse within a few float32 ulps of |lse|.

    Args:
        logits_NV: [N, V] bfloat16 or float32 CUDA tensor, contiguous, N < 2^31, V >= 1 (any V:
            rows need not start 16-byte aligned). Each row needs at least one finite logit
            (-inf entries are allowed). Overwritten with the gradient (autograd does not see
            this write: pass a tensor that no graph saved).
        targets_N: [N] int64, contiguous, same device. Entries equal to ``ignore_index`` mark
            ignored rows; every other entry must lie in [0, V) -- the caller's job, not checked
            (that would synchronise with the host): a row whose target is out of range gets a NaN
            loss and no -1 in its gradient (never an out-of-bounds access).
        ignore_index: target value of ignored rows.
        grad_scale: multiplies every counted row's gradient before rounding: None (1), a Python
            number, or a float32 tensor of shape [] or [N] on the same device (per-row weights;
            a [] tensor is expanded to [N] here, with no host synchronisation).

    Returns:
        ``(loss_N, lse_N)``: float32 [N] each; lse_N for every row, ignored rows included.
    """
    op = "cross_entropy_rows"
    device = _extension.check_cuda_tensors(op, logits_NV=logits_NV, targets_N=targets_N)
    if logits_NV.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(
            f"{op}: logits_NV must be bfloat16 or float32, got {logits_NV.dtype}; cast it, or use "
            f"nmoe_kernels.reference.{op} for other dtypes"
        )
    if logits_NV.dim() != 2 or logits_NV.shape[1] < 1:
        raise ValueError(f"{op}: logits_NV must be [N, V] with V >= 1, got shape "
                         f"{tuple(logits_NV.shape)}")
    if not logits_NV.is_contiguous():
        raise ValueError(f"{op}: logits_NV must be contiguous (it is written in place); call "
                         ".contiguous() first and use the result")
    num_rows = logits_NV.shape[0]
    if num_rows >= 2**31:
        raise ValueError(f"{op}: logits_NV must have N < 2^31 rows, got {num_rows}; split it")
    if targets_N.dtype != torch.int64:
        raise ValueError(f"{op}: targets_N must be int64, got {targets_N.dtype}; use .long()")
    if tuple(targets_N.shape) != (num_rows,):
        raise ValueError(f"{op}: targets_N must be [N] = [{num_rows}], got "
                         f"{tuple(targets_N.shape)}")
    if not targets_N.is_contiguous():
        raise ValueError(f"{op}: targets_N must be contiguous; call .contiguous() first")
    row_scale, scale_value = None, 1.0
    if isinstance(grad_scale, torch.Tensor):
        _extension.check_cuda_tensors(op, logits_NV=logits_NV, grad_scale=grad_scale)
        if grad_scale.dtype != torch.float32:
            raise ValueError(f"{op}: a tensor grad_scale must be float32, got {grad_scale.dtype}")
        if grad_scale.dim() == 0:
            row_scale = grad_scale.expand(num_rows).contiguous()
        elif tuple(grad_scale.shape) == (num_rows,):
            row_scale = grad_scale.contiguous()
        else:
            raise ValueError(f"{op}: a tensor grad_scale must have shape [] or [N] = "
                             f"[{num_rows}], got {tuple(grad_scale.shape)}")
    elif grad_scale is not None:
        scale_value = float(grad_scale)
    compiled = _extension.compiled_module(op)

    loss_N = torch.empty(num_rows, dtype=torch.float32, device=device)
    lse_N = torch.empty(num_rows, dtype=torch.float32, device=device)
    compiled.cross_entropy_rows(
        _extension.capsule(logits_NV),
        _extension.capsule(targets_N),
        _extension.capsule(loss_N),
        _extension.capsule(lse_N),
        int(ignore_index),
        None if row_scale is None else _extension.capsule(row_scale),
        scale_value,
        _extension.stream_handle(device),
    )
    return loss_N, lse_N
