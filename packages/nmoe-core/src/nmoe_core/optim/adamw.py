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

The update itself is `nmoe_kernels.adamw_step_` for CUDA parameters (one launch per group: every
tensor read and written once, 20 bytes per parameter with bfloat16 moments, 28 with float32) and
`nmoe_kernels.reference.adamw_step_` elsewhere. The reference with float32 state is, operation
for operation, torch's single-tensor AdamW (``foreach=False``), and the tests check they agree
bitwise; the kernel is tested against the reference on the GPU. ``step(param_copies=...)`` lets
the update also write bf16 copies of chosen parameters (the trainer's cached expert weights).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from nmoe_kernels.reference import adamw_step_ as reference_adamw_step_

__all__ = ["AdamW", "BF16_STATE_MAX_BETA", "compiled_adamw_step"]

# The largest beta (of beta1 and every beta2) allowed with bfloat16 moments: 1 - beta must stay
# above bfloat16's relative resolution (2^-8 = 0.0039) with margin, or updates round away.
BF16_STATE_MAX_BETA = 0.99

_STATE_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def compiled_adamw_step() -> Callable | None:
    """``nmoe_kernels.adamw_step_`` when this build has it compiled with CUDA, else None."""
    try:
        import nmoe_kernels
        import nmoe_kernels._C as compiled

        op = nmoe_kernels.adamw_step_
    except (ImportError, AttributeError):
        return None
    if not compiled.WITH_CUDA or not hasattr(compiled, "adamw_step"):
        return None
    return op


def _adamw_step_for(param: torch.Tensor) -> Callable:
    """The fused CUDA step for CUDA parameters where the build has it, else the reference."""
    if param.is_cuda:
        op = compiled_adamw_step()
        if op is not None:
            return op
    return reference_adamw_step_


@functools.cache
def _kernel_takes_copies() -> bool:
    """Whether the compiled ``adamw_step`` writes bf16 parameter copies (builds since its
    ``ADAMW_COPY_COLUMN``)."""
    import nmoe_kernels._C as C

    return hasattr(C, "ADAMW_COPY_COLUMN")


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
    def step(self, closure=None, grad_coef: torch.Tensor | None = None,  # noqa: D417
             param_copies: Mapping[torch.Tensor, torch.Tensor] | None = None):
        """Update every parameter that has a gradient.

        Args:
            closure: as torch's optimizers (re-evaluates the loss; returned).
            grad_coef: optional 0-dim floating tensor on the parameters' device multiplying every
                gradient inside the update (the gradient-clipping factor); the gradients
                themselves are left unchanged. None means 1.
            param_copies: optional ``{param: bfloat16 tensor of its shape}``: the update writes
                each listed parameter's new value, rounded to nearest even (bitwise
                ``param.to(torch.bfloat16)``), into its tensor (`nmoe_kernels.adamw_step_`'s
                ``param_copies``): a training step's bf16 weight copies come out of the update
                instead of a cast that reads the masters again. Parameters of other optimizers
                or without a gradient are skipped; `refreshed_copies` lists the ones written.
        """
        copies = {id(p): c for p, c in (param_copies or {}).items()}
        self.refreshed_copies: list[torch.Tensor] = []
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            by_step: dict[float, list[tuple[torch.Tensor, ...]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self._state_of(p, group["state_dtype"])
                state["step"] += 1
                by_step.setdefault(state["step"].item(), []).append(
                    (p, p.grad, state["exp_avg"], state["exp_avg_sq"], copies.get(id(p))))
            for step, tensors in by_step.items():  # one call per step count (usually one)
                params, grads, exp_avgs, exp_avg_sqs, targets = (list(t) for t in zip(*tensors))
                op = _adamw_step_for(params[0])
                with_copies = any(c is not None for c in targets)
                if with_copies and op is not reference_adamw_step_ and not _kernel_takes_copies():
                    targets = [None] * len(targets)  # an older _C: the caller casts instead
                    with_copies = False
                op(
                    params, grads, exp_avgs, exp_avg_sqs, step=step, lr=group["lr"], beta1=beta1,
                    beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    grad_coef=grad_coef, param_copies=targets if with_copies else None)
                self.refreshed_copies += [p for p, c in zip(params, targets) if c is not None]
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader (which casts floating state to the parameter's dtype), then the moments
        back to each group's ``state_dtype`` (bfloat16 -> float32 -> bfloat16 is exact) and each
        ``step`` to a float32 CPU tensor (a fused torch AdamW saves it on the device)."""
        dtypes = [g["state_dtype"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, dtype in zip(self.param_groups, dtypes, strict=True):
            group["state_dtype"] = dtype  # the configured dtype wins over the checkpoint's
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                if isinstance(state.get("step"), torch.Tensor):
                    # torch's fused AdamW keeps it on the parameter's device; here it lives on
                    # the CPU, read without a device synchronisation.
                    state["step"] = state["step"].detach().to("cpu", torch.float32)
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state and state[key].dtype != dtype:
                        state[key] = state[key].to(dtype)
