"""Chunked linear cross-entropy: the loss of ``hidden @ weight.T`` without ``[N, V]`` logits.

The forward walks the rows in chunks, keeping only each row's log-sum-exp; the backward
recomputes each chunk's logits to form ``softmax - onehot``. Peak memory is one chunk of logits
(``chunk_size x V`` float32) instead of all of them.
"""

from __future__ import annotations

import torch


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, ignore_index: int, chunk_size: int):
        num_rows = hidden_ND.shape[0]
        acc = torch.promote_types(hidden_ND.dtype, torch.float32)
        lse_N = torch.empty(num_rows, dtype=acc, device=hidden_ND.device)
        loss_sum = torch.zeros((), dtype=acc, device=hidden_ND.device)
        valid_N = targets_N != ignore_index
        safe_targets = torch.where(valid_N, targets_N, 0)
        for start in range(0, num_rows, chunk_size):
            end = min(start + chunk_size, num_rows)
            logits = (hidden_ND[start:end] @ weight_VD.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            lse_N[start:end] = lse
            target_logit = logits.gather(1, safe_targets[start:end, None]).squeeze(1)
            loss_sum += ((lse - target_logit) * valid_N[start:end]).sum()
        ctx.save_for_backward(hidden_ND, weight_VD, safe_targets, valid_N, lse_N)
        ctx.chunk_size = chunk_size
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        hidden_ND, weight_VD, targets_N, valid_N, lse_N = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden_ND) if ctx.needs_input_grad[0] else None
        acc = lse_N.dtype
        grad_weight = (
            torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device)
            if ctx.needs_input_grad[1]
            else None
        )
        for start in range(0, hidden_ND.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden_ND.shape[0])
            h = hidden_ND[start:end]
            probs = ((h @ weight_VD.t()).to(acc) - lse_N[start:end, None]).exp_()
            rows = torch.arange(end - start, device=h.device)
            probs[rows, targets_N[start:end]] -= 1.0
            probs *= (valid_N[start:end].to(acc) * grad_loss)[:, None]
            g = probs.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = g @ weight_VD
            if grad_weight is not None:
                grad_weight += (g.t() @ h).to(acc)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_VD.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` and the count it covers.

    Args:
        hidden_ND: ``[N, D]`` final hidden states (any float dtype; matmuls run in it).
        weight_VD: ``[V, D]`` output embedding (the lm head), same dtype as ``hidden_ND``.
        targets_N: int64 ``[N]`` target ids in ``[0, V)``; entries equal to ``ignore_index`` are
            excluded from the sum and the count.
        ignore_index: target value to skip.
        chunk_size: rows per chunk; peak extra memory is ``chunk_size * V`` float32.

    Returns:
        ``(loss_sum, count)``: float32 (float64 for float64 inputs) scalar sum of per-row losses
        (differentiable w.r.t. ``hidden_ND`` and ``weight_VD``) and the int64 scalar number of
        rows counted.
    """
    if hidden_ND.dim() != 2 or weight_VD.dim() != 2 or hidden_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(
            f"hidden_ND {tuple(hidden_ND.shape)} and weight_VD {tuple(weight_VD.shape)} must be "
            f"[N, D] and [V, D]"
        )
    if targets_N.shape != hidden_ND.shape[:1]:
        raise ValueError(f"targets_N {tuple(targets_N.shape)} must be [{hidden_ND.shape[0]}]")
    loss_sum = _ChunkedCrossEntropy.apply(
        hidden_ND, weight_VD, targets_N.long(), ignore_index, chunk_size
    )
    return loss_sum, (targets_N != ignore_index).sum()
