"""AdamW's update over a list of tensors, in plain torch: the reference of a fused optimizer step.

``adamw_step_`` is torch's AdamW (decoupled weight decay, bias-corrected moments, no AMSGrad) on
float32 parameters and gradients, with moments stored in float32 or bfloat16 and all arithmetic
in float32. Per tensor it runs the operations of torch's single-tensor AdamW
(``torch.optim.AdamW(foreach=False)``) in their order, so with float32 moments it agrees with it
bitwise; with bfloat16 moments the moments are widened, updated and rounded back (to nearest
even) once per step, and the parameter update uses this step's unrounded values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["adamw_step_"]

_MOMENT_DTYPES = (torch.float32, torch.bfloat16)


def check_adamw_step_args(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                          exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                          step: float,
                          param_copies: Sequence[torch.Tensor | None] | None = None,
                          ) -> torch.dtype | None:
    """The argument rules ``adamw_step_`` shares with its CUDA kernel (``nmoe_kernels.adamw_step_``
    adds device and contiguity rules); raises ValueError naming the offending argument.

    Returns the moments' dtype, or None for empty lists.
    """
    op = "adamw_step_"
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n):
        raise ValueError(f"{op}: params, grads, exp_avgs, exp_avg_sqs must have equal lengths, "
                         f"got {n}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}")
    if param_copies is not None:
        if len(param_copies) != n:
            raise ValueError(f"{op}: param_copies must have one entry (a tensor or None) per "
                             f"param, got {len(param_copies)} for {n} params")
        for i, (p, c) in enumerate(zip(params, param_copies)):
            if c is None:
                continue
            if c.dtype != torch.bfloat16 or c.shape != p.shape:
                raise ValueError(f"{op}: param_copies[{i}] must be bfloat16 of the param's shape "
                                 f"{tuple(p.shape)}, got {c.dtype} of shape {tuple(c.shape)}")
            if c.device != p.device:
                raise ValueError(f"{op}: param_copies[{i}] is on {c.device}, params[{i}] on "
                                 f"{p.device}; keep the copy on the param's device")
    if step < 1:
        raise ValueError(f"{op}: step must be >= 1 (the step this update completes), got {step}")
    if n == 0:
        return None
    moment_dtype = exp_avgs[0].dtype
    if moment_dtype not in _MOMENT_DTYPES:
        raise ValueError(f"{op}: moments must be float32 or bfloat16, got {moment_dtype} "
                         "(exp_avgs[0])")
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if p.dtype != torch.float32 or g.dtype != torch.float32:
            raise ValueError(f"{op}: params[{i}] and grads[{i}] must be float32, got {p.dtype} "
                             f"and {g.dtype}")
        if m.dtype != moment_dtype or v.dtype != moment_dtype:
            raise ValueError(f"{op}: every exp_avg and exp_avg_sq must be {moment_dtype} (that "
                             f"of exp_avgs[0]); tensor {i} has {m.dtype} and {v.dtype}")
        if not (p.shape == g.shape == m.shape == v.shape):
            raise ValueError(f"{op}: tensor {i} has shapes param {tuple(p.shape)}, grad "
                             f"{tuple(g.shape)}, exp_avg {tuple(m.shape)}, exp_avg_sq "
                             f"{tuple(v.shape)}; they must be equal")
    return moment_dtype


def adamw_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
                step: float, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, grad_coef: torch.Tensor | None = None,
                param_copies: Sequence[torch.Tensor | None] | None = None) -> None:
    """One AdamW step of every tensor, in place.

    Args:
        params: float32 tensors, updated in place.
        grads: float32 tensors, one per param, same shapes; read only.
        exp_avgs, exp_avg_sqs: the first and second moments, one per param, same shapes, all
            float32 or all bfloat16 (the dtype of ``exp_avgs[0]``); updated in place.
        step: the step number this update completes (1 for the first), the same for all tensors.
        lr, beta1, beta2, eps, weight_decay: the hyperparameters (decoupled weight decay:
            ``p *= 1 - lr * weight_decay``).
        grad_coef: optional 0-dim floating tensor on the params' device; every gradient is
            multiplied by it (in float32) before use: the gradient-clipping factor.
        param_copies: optional, one entry per param: a bfloat16 tensor of the param's shape and
            device that receives the updated param rounded to nearest even (what
            ``param.to(torch.bfloat16)`` gives), or None. A training step's low-precision weight
            copy is then refreshed by the update itself.
    """
    check_adamw_step_args(params, grads, exp_avgs, exp_avg_sqs, step, param_copies)
    copies = list(param_copies) if param_copies is not None else [None] * len(params)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    step_size = lr / bias_correction1
    coef = None
    for p, g, m, v, c in zip(params, grads, exp_avgs, exp_avg_sqs, copies, strict=True):
        if grad_coef is not None:
            if coef is None:
                coef = grad_coef.to(torch.float32)
            g = g * coef
        p.mul_(1 - lr * weight_decay)
        wide = m.dtype != torch.float32
        m32 = m.float() if wide else m
        v32 = v.float() if wide else v
        m32.lerp_(g, 1 - beta1)
        v32.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v32.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m32, denom, value=-step_size)
        if wide:
            m.copy_(m32)
            v.copy_(v32)
        if c is not None:
            c.copy_(p)
