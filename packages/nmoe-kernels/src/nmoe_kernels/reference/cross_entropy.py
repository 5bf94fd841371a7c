"""Pure-torch reference for the fused cross-entropy rows op (loss, log-sum-exp and the logits
gradient of each row, the gradient written over the logits).

Shape letters: N rows (tokens), V vocabulary.

Per row n with target t = targets_N[n] and x = logits_NV[n] upcast to float32 (float64 for
float64 logits):

    lse_N[n]  = max(x) + log(sum(exp(x - max(x))))
    loss_N[n] = lse_N[n] - x[t]                      (0 where t == ignore_index)
    logits_NV[n, :] <- ((exp(x - lse_N[n]) - onehot(t)) * row_scale[n]).to(logits dtype)

with row_scale[n] = 0 for ignored rows and otherwise grad_scale (1 when None). These are the
float32 operations of `nmoe_core.loss`'s torch path (its backward recomputes
``exp(logits - lse)``, subtracts 1 at the target, scales, casts), so the two agree exactly when
run on the same device; the CUDA op agrees within one bf16 ulp (see its docstring).
"""

from __future__ import annotations

import torch

_LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def cross_entropy_rows(
    logits_NV: torch.Tensor,
    targets_N: torch.Tensor,
    ignore_index: int = -100,
    grad_scale: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy and log-sum-exp; overwrites ``logits_NV`` with d(loss)/d(logits).

    Args:
        logits_NV: [N, V] bfloat16, float16, float32 or float64, V >= 1, any device. Each row
            needs at least one finite logit (-inf entries are allowed). Overwritten in place with
            the gradient ``(softmax - onehot(target)) * row_scale`` rounded to its dtype.
        targets_N: [N] int64 (int32 accepted) on the same device. Entries equal to
            ``ignore_index`` mark ignored rows; every other entry must lie in [0, V) (the
            caller's job; a row whose target is out of range gets a NaN loss and no -1 in its
            gradient, here and in the CUDA op, instead of an indexing error).
        ignore_index: target value of ignored rows (loss 0, gradient exactly 0).
        grad_scale: multiplies the gradient of every counted row: None (1), a Python number, or
            a float32 tensor of shape [] or [N] on the same device (per-row weights).

    Returns:
        ``(loss_N, lse_N)``: float32 [N] (float64 for float64 logits). lse_N is computed for every
        row, ignored rows included.
    """
    op = "cross_entropy_rows"
    if not isinstance(logits_NV, torch.Tensor) or logits_NV.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"{op}: logits_NV must be a floating tensor {_LOGIT_DTYPES}")
    if logits_NV.dim() != 2 or logits_NV.shape[1] < 1:
        raise ValueError(f"{op}: logits_NV must be [N, V] with V >= 1, got "
                         f"{tuple(logits_NV.shape)}")
    num_rows, vocab = logits_NV.shape
    if not isinstance(targets_N, torch.Tensor) or targets_N.dtype not in (torch.int64,
                                                                          torch.int32):
        raise ValueError(f"{op}: targets_N must be an int64 tensor")
    if tuple(targets_N.shape) != (num_rows,):
        raise ValueError(f"{op}: targets_N must be [N] = [{num_rows}], got "
                         f"{tuple(targets_N.shape)}")
    acc = torch.promote_types(logits_NV.dtype, torch.float32)
    targets = targets_N.to(device=logits_NV.device, dtype=torch.int64)
    valid_N = targets != ignore_index
    in_range_N = (targets >= 0) & (targets < vocab)
    hit_N = valid_N & in_range_N
    safe_targets = torch.where(hit_N, targets, 0)

    x = logits_NV.to(acc)
    target_logit = x.gather(1, safe_targets[:, None]).squeeze(1)
    row_max = x.amax(dim=1, keepdim=True)
    lse_N = (x - row_max).exp().sum(dim=1, keepdim=True).log_().add_(row_max).squeeze(1)
    zero = torch.zeros((), dtype=acc, device=x.device)
    loss_N = torch.where(valid_N, torch.where(in_range_N, lse_N - target_logit, torch.nan), zero)

    probs = x.sub_(lse_N[:, None]).exp_()
    rows = torch.arange(num_rows, device=x.device)
    probs[rows, safe_targets] -= hit_N.to(acc)
    row_scale = valid_N.to(acc)
    if grad_scale is not None:
        if isinstance(grad_scale, torch.Tensor):
            if grad_scale.dim() > 1 or grad_scale.numel() not in (1, num_rows) or (
                    grad_scale.dim() == 1 and grad_scale.shape[0] != num_rows):
                raise ValueError(f"{op}: a tensor grad_scale must have shape [] or [N] = "
                                 f"[{num_rows}], got {tuple(grad_scale.shape)}")
            row_scale = row_scale * grad_scale.to(device=x.device, dtype=acc)
        else:
            row_scale = row_scale * float(grad_scale)
    probs.mul_(row_scale[:, None])
    # Ignored rows: exactly 0 even where exp overflowed (0 * inf would be NaN).
    probs.masked_fill_(~valid_N[:, None], 0.0)
    logits_NV.copy_(probs)
    return loss_N, lse_N
