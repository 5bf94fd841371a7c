"""Chunked linear cross-entropy: the loss of ``hidden @ weight.T`` without ``[N, V]`` logits.

Shape letters: N rows (tokens), D hidden size, V vocabulary.

Two paths, chosen per call:

- fused (CUDA, bf16 ``hidden`` and ``weight``, an nmoe-kernels build with
  ``cross_entropy_rows``): per chunk the forward computes the bf16 logits (one GEMM), runs the
  fused kernel (loss, and ``softmax - onehot`` written over the logits in one pass) and
  immediately the two gradient GEMMs ``g @ W`` and ``g^T @ h`` (the latter summed over chunks in
  float32). The backward only scales the stored gradients by the incoming scalar: no logits
  recompute. Peak memory: one bf16 chunk of logits, plus ``grad_hidden`` [N, D] and a float32
  ``[V, D]`` accumulator held from the forward to the backward.
- torch (everything else, and the CPU reference): the forward walks the chunks keeping each row's
  log-sum-exp; the backward recomputes each chunk's logits to form ``softmax - onehot``. Peak
  memory is one chunk of logits (``chunk_size x V`` float32). Where memory is plentiful (a CPU
  run of a small model) the caller may let the forward keep the probabilities (``keep_bytes``).

Both paths compute the same float32 formulas; the fused gradient differs from the torch one by at
most one bf16 ulp per logit before the GEMMs, and the incoming gradient is applied to the bf16
``grad_hidden`` after its GEMM (one extra bf16 rounding) instead of before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def _softmax_chunk(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: ``logits`` becomes ``softmax(logits)``; returns it and the row log-sum-exp.
    One max pass, one fused subtract-exp pass, one sum, one divide: no temporaries of the
    chunk's size."""
    row_max = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(row_max).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    probs.div_(total)
    return probs, (total.log_() + row_max).squeeze(1)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, ignore_index: int, chunk_size: int,
                keep_bytes: int):
        num_rows, vocab = hidden_ND.shape[0], weight_VD.shape[0]
        acc = torch.promote_types(hidden_ND.dtype, torch.float32)
        keep = num_rows * vocab * acc.itemsize <= keep_bytes
        lse_N = torch.empty(num_rows, dtype=acc, device=hidden_ND.device)
        loss_sum = torch.zeros((), dtype=acc, device=hidden_ND.device)
        valid_N = targets_N != ignore_index
        safe_targets = torch.where(valid_N, targets_N, 0)
        kept = []
        for start in range(0, num_rows, chunk_size):
            end = min(start + chunk_size, num_rows)
            logits = (hidden_ND[start:end] @ weight_VD.t()).to(acc)
            target_logit = logits.gather(1, safe_targets[start:end, None]).squeeze(1)
            probs, lse = _softmax_chunk(logits)
            lse_N[start:end] = lse
            loss_sum += ((lse - target_logit) * valid_N[start:end]).sum()
            if keep:
                kept.append(probs)
        ctx.save_for_backward(hidden_ND, weight_VD, safe_targets, valid_N, lse_N)
        ctx.chunk_size = chunk_size
        ctx.kept = kept
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        hidden_ND, weight_VD, targets_N, valid_N, lse_N = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None
        grad_hidden = torch.empty_like(hidden_ND) if ctx.needs_input_grad[0] else None
        acc = lse_N.dtype
        grad_weight = (
            torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device)
            if ctx.needs_input_grad[1]
            else None
        )
        for index, start in enumerate(range(0, hidden_ND.shape[0], ctx.chunk_size)):
            end = min(start + ctx.chunk_size, hidden_ND.shape[0])
            h = hidden_ND[start:end]
            if kept:
                probs = kept[index]
            else:
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
        return grad_hidden, grad_weight, None, None, None, None


@functools.cache
def _compiled_cross_entropy_rows() -> Callable | None:
    """``nmoe_kernels.cross_entropy_rows`` when this build has it compiled with CUDA, else None."""
    try:
        import nmoe_kernels
        import nmoe_kernels._C as compiled

        op = nmoe_kernels.cross_entropy_rows
    except (ImportError, AttributeError):
        return None
    if not compiled.WITH_CUDA or not hasattr(compiled, "cross_entropy_rows"):
        return None
    return op


def _fused_rows_op(hidden_ND: torch.Tensor, weight_VD: torch.Tensor) -> Callable | None:
    """The per-row fused cross-entropy op where the fused path applies (CUDA bf16 operands and a
    kernels build that has it), else None (the torch path). Tests substitute the reference."""
    if not (hidden_ND.is_cuda and hidden_ND.dtype == torch.bfloat16
            and weight_VD.dtype == torch.bfloat16):
        return None
    return _compiled_cross_entropy_rows()


class _FusedChunkedCrossEntropy(torch.autograd.Function):
    """The fused path (module docstring): gradients are formed in the forward, per chunk."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, ignore_index: int, chunk_size: int,
                rows_op: Callable, need_hidden: bool, need_weight: bool):
        num_rows = hidden_ND.shape[0]
        acc = torch.promote_types(hidden_ND.dtype, torch.float32)
        loss_sum = torch.zeros((), dtype=acc, device=hidden_ND.device)
        grad_hidden = torch.empty_like(hidden_ND) if need_hidden else None
        grad_weight = (
            torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device)
            if need_weight
            else None
        )
        for start in range(0, num_rows, chunk_size):
            end = min(start + chunk_size, num_rows)
            h = hidden_ND[start:end]
            logits = h @ weight_VD.t()
            loss_n, _ = rows_op(logits, targets_N[start:end], ignore_index)
            loss_sum += loss_n.sum()
            g = logits  # now (softmax - onehot) * valid, in the logits dtype
            if grad_hidden is not None:
                grad_hidden[start:end] = g @ weight_VD
            if grad_weight is not None:
                grad_weight += (g.t() @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden_ND.dtype, weight_VD.dtype)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None and ctx.needs_input_grad[0]:
            grad_hidden = (grad_hidden * grad_loss).to(hidden_dtype)
        else:
            grad_hidden = None
        if grad_weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (grad_weight * grad_loss).to(weight_dtype)
        else:
            grad_weight = None
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = 8192,
    keep_bytes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` and the count it covers.

    CUDA bf16 operands take the fused path when nmoe-kernels has ``cross_entropy_rows`` (module
    docstring); everything else the torch path.

    Args:
        hidden_ND: ``[N, D]`` final hidden states (any float dtype; matmuls run in it).
        weight_VD: ``[V, D]`` output embedding (the lm head), same dtype as ``hidden_ND``.
        targets_N: int64 ``[N]`` target ids in ``[0, V)``; entries equal to ``ignore_index`` are
            excluded from the sum and the count.
        ignore_index: target value to skip.
        chunk_size: rows per chunk; peak extra memory is ``chunk_size * V`` float32.
        keep_bytes: torch path only: when all ``N * V`` probabilities fit in this many bytes,
            the forward keeps them for the backward instead of recomputing the logits there (one
            matmul and two elementwise passes fewer; worth it on CPU). 0 always recomputes.

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
    rows_op = _fused_rows_op(hidden_ND, weight_VD)
    if rows_op is not None:
        grad_on = torch.is_grad_enabled()
        loss_sum = _FusedChunkedCrossEntropy.apply(
            hidden_ND, weight_VD, targets_N.long().contiguous(), ignore_index, chunk_size, rows_op,
            grad_on and hidden_ND.requires_grad, grad_on and weight_VD.requires_grad,
        )
    else:
        loss_sum = _ChunkedCrossEntropy.apply(
            hidden_ND, weight_VD, targets_N.long(), ignore_index, chunk_size, keep_bytes
        )
    return loss_sum, (targets_N != ignore_index).sum()
