"""AdamW whose moments may be stored in bfloat16 (DeepSeek-V3's recipe), with the clipping factor
taken as a device scalar.

`AdamW` is ``torch.optim.AdamW``'s update (decoupled weight decay, bias-corrected moments, no
AMSGrad) with one addition: ``state_dtype``, the dtype of the two moments ``exp_avg`` and
``exp_avg_sq``. The parameters and gradients stay float32 and all arithmetic is float32; only
the stored moments are rounded (to nearest even) when ``state_dtype=torch.bfloat16``. That halves
the optimizer state, 8 -> 4 bytes per parameter: for `super`'s 2.84B parameters, 21.2 -> 10.6 GiB.

Why bfloat16 holds up (DeepSeek-V3 trains with it): the update reads the moments in float32 and
the rounding error of a stored moment is at most 2^-9 of it, far below the moments' own noise. The
limit is how small a change survives the store: each step moves a moment by the fraction
``1 - beta`` of the gap to its new sample, and bfloat16 resolves relative changes of about 2^-8,
so with ``beta`` above 0.99 most updates would be rounded away. `OptimizerConfig` refuses that
combination.

With float32 state the update is, operation for operation, torch's single-tensor AdamW
(``foreach=False``): the CPU tests check they agree bitwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["AdamW", "BF16_STATE_MAX_BETA", "adamw_update_"]

# The largest beta (of beta1 and every beta2) allowed with bfloat16 moments: 1 - beta must stay
# above bfloat16's relative resolution (2^-8 = 0.0039) with margin, or updates round away.
BF16_STATE_MAX_BETA = 0.99

_STATE_DTYPES = (torch.float32, torch.bfloat16)


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                  exp_avg_sq: torch.Tensor, *, step: float, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float) -> None:
    """One AdamW update of one float32 tensor, in place (the reference the kernels match).

    Args:
        param: float32 parameter, updated in place.
        grad: float32 gradient, already multiplied by any clipping factor.
        exp_avg, exp_avg_sq: the moments, float32 or bfloat16, same shape as ``param``; updated
            in place (computed in float32, rounded to their dtype when stored).
        step: the step number after this update (1 for the first).
        lr, beta1, beta2, eps, weight_decay: the group's hyperparameters.
    """
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    step_size = lr / bias_correction1
    param.mul_(1 - lr * weight_decay)
    low = exp_avg.dtype != torch.float32
    m = exp_avg.float() if low else exp_avg
    v = exp_avg_sq.float() if exp_avg_sq.dtype != torch.float32 else exp_avg_sq
    # The order of torch's single-tensor AdamW (torch/optim/adam.py), so float32 state agrees
    # bitwise.
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(m, denom, value=-step_size)
    if low:
        exp_avg.copy_(m)
    if v is not exp_avg_sq:
        exp_avg_sq.copy_(v)


class AdamW(torch.optim.Optimizer):
    """AdamW with moments in ``state_dtype`` (module docstring) and ``step(grad_coef=...)``.

    Args:
        params: float32 parameters, or param-group dicts (a group may carry ``name`` and any of
            the hyperparameters below).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        state_dtype: ``torch.float32`` or ``torch.bfloat16``: the dtype of both moments.

    The state of each parameter is ``step`` (a float tensor on the CPU, as torch's non-capturable
    AdamW keeps it), ``exp_avg`` and ``exp_avg_sq``. `load_state_dict` accepts the state of a
    ``torch.optim.AdamW`` or of this class with either moment dtype, and stores the moments in
    this optimizer's ``state_dtype``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, state_dtype: torch.dtype = torch.float32) -> None:
        if state_dtype not in _STATE_DTYPES:
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got "
                             f"{state_dtype}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        state_dtype=state_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["state_dtype"] not in _STATE_DTYPES:
                raise ValueError(f"param group {group.get('name', '?')!r}: state_dtype must be "
                                 f"torch.float32 or torch.bfloat16, got {group['state_dtype']}")
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(
                        f"param group {group.get('name', '?')!r}: AdamW keeps float32 master "
                        f"weights, got a {p.dtype} parameter of shape {tuple(p.shape)}"
                    )

    def _state_of(self, p: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype,
                                                   memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None, grad_coef: torch.Tensor | None = None):  # noqa: D417
        """Update every parameter that has a gradient.

        Args:
            closure: as torch's optimizers (re-evaluates the loss; returned).
            grad_coef: optional 0-dim floating tensor on the parameters' device multiplying every
                gradient inside the update (the gradient-clipping factor); the gradients
                themselves are left unchanged. None means 1.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self._state_of(p, group["state_dtype"])
                state["step"] += 1
                grad = p.grad if grad_coef is None else p.grad * grad_coef.to(p.grad.dtype)
                adamw_update_(p, grad, state["exp_avg"], state["exp_avg_sq"],
                              step=state["step"].item(), lr=group["lr"], beta1=beta1,
                              beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader (which casts floating state to the parameter's dtype), then the moments
        back to each group's ``state_dtype``: bfloat16 -> float32 -> bfloat16 is exact."""
        dtypes = [g["state_dtype"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, dtype in zip(self.param_groups, dtypes, strict=True):
            group["state_dtype"] = dtype  # the configured dtype wins over the checkpoint's
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state and state[key].dtype != dtype:
                        state[key] = state[key].to(dtype)
