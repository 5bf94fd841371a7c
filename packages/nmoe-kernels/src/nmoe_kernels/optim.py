"""Fused optimizer steps on CUDA: `adamw_step_`, every tensor of a group in one launch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nmoe_kernels import _extension
from nmoe_kernels.reference.optim import check_adamw_step_args

__all__ = ["adamw_step_"]


def adamw_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
                step: float, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, grad_coef: torch.Tensor | None = None,
                param_copies: Sequence[torch.Tensor | None] | None = None) -> None:
    """One AdamW step of every tensor, in place, in one CUDA launch.

    The float32 operations of `nmoe_kernels.reference.adamw_step_` (torch's single-tensor AdamW,
    decoupled weight decay, moments stored in float32 or bfloat16), per element; nvcc may fuse a
    multiply and an add into one FMA, so a result can differ from the reference on the same GPU
    in its last bits (float32 ulps; with bfloat16 moments, a stored moment that sits at a
    rounding boundary by one bfloat16 ulp). Memory traffic is one read and one write of each
    array: 28 bytes per parameter with float32 moments, 20 with bfloat16, plus 2 for each
    parameter with a bf16 copy (where a separate ``.to(torch.bfloat16)`` reads the parameter
    again: 6). The tensor list is uploaded as a small table each call (one pinned, asynchronous
    copy); nothing synchronises with the host.

    Args:
        params: float32 CUDA tensors, contiguous, updated in place.
        grads: float32, one per param, same shape and device, contiguous; read only.
        exp_avgs, exp_avg_sqs: first and second moments, one per param, same shape and device,
            contiguous, all float32 or all bfloat16; updated in place.
        step: the step number this update completes (1 for the first), the same for all tensors.
        lr, beta1, beta2, eps, weight_decay: the hyperparameters.
        grad_coef: optional 0-dim floating tensor on the same device multiplying every gradient
            (the gradient-clipping factor), read by the kernel; the gradients are not written.
        param_copies: optional, one entry per param: a contiguous bfloat16 tensor of the param's
            shape on its device that receives the updated param rounded to nearest even (bitwise
            ``param.to(torch.bfloat16)`` of the result), or None for no copy.
    """
    op = "adamw_step_"
    # The rules shared with the reference first, so they raise the same errors with or
    # without a GPU; then this kernel's own: one CUDA device, contiguous tensors.
    moment_dtype = check_adamw_step_args(params, grads, exp_avgs, exp_avg_sqs, step,
                                         param_copies)
    if moment_dtype is None:
        return
    device = None
    rows, block = [], 0
    compiled = _extension.compiled_module(op)
    per_block = int(compiled.ADAMW_BLOCK_ELEMS)
    copies = list(param_copies) if param_copies is not None else [None] * len(params)
    with_copies = any(c is not None for c in copies)
    if with_copies and not hasattr(compiled, "ADAMW_COPY_COLUMN"):
        raise RuntimeError(f"{op}: this build of nmoe_kernels._C predates param_copies; rebuild "
                           "nmoe-kernels (pip install --no-build-isolation -e "
                           "packages/nmoe-kernels) or pass param_copies=None")
    for i, (p, g, m, v, c) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, copies)):
        names = {f"params[{i}]": p, f"grads[{i}]": g, f"exp_avgs[{i}]": m,
                 f"exp_avg_sqs[{i}]": v}
        if c is not None:
            if c.data_ptr() == p.data_ptr() and p.numel():
                raise ValueError(f"{op}: param_copies[{i}] shares params[{i}]'s memory; give "
                                 "the copy its own tensor")
            names[f"param_copies[{i}]"] = c
        found = _extension.check_cuda_tensors(op, **names)
        if device is None:
            device = found
        elif found != device:
            raise ValueError(f"{op}: tensor {i} is on {found} but tensor 0 on {device}; one "
                             "call updates the tensors of one GPU")
        for name, t in names.items():
            if not t.is_contiguous():
                raise ValueError(f"{op}: {name} must be contiguous (the kernel walks it as one "
                                 "flat array); keep optimizer tensors contiguous")
        numel = p.numel()
        if numel == 0:
            continue
        row = [p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), numel, block]
        if with_copies:
            row.append(c.data_ptr() if c is not None else 0)
        rows.append(row)
        block += -(-numel // per_block)
    if not rows:
        return
    coef = None
    if grad_coef is not None:
        _extension.check_cuda_tensors(op, params_0=params[0], grad_coef=grad_coef)
        if grad_coef.dim() != 0 or not grad_coef.is_floating_point():
            raise ValueError(f"{op}: grad_coef must be a 0-dim floating tensor, got "
                             f"{grad_coef.dtype} of shape {tuple(grad_coef.shape)}")
        coef = grad_coef.detach().to(torch.float32)
    table = torch.tensor(rows, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
    compiled.adamw_step(
        _extension.capsule(table), block, moment_dtype == torch.bfloat16,
        1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, (1 - beta2**step) ** 0.5,
        -(lr / (1 - beta1**step)), eps,
        None if coef is None else _extension.capsule(coef), _extension.stream_handle(device),
    )
    # Dropping table and coef here is safe: the caching allocator hands freed memory only to
    # later work on the same stream, which runs after this kernel.
