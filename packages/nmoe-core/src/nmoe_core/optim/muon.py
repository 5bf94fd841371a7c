"""Muon in the Moonlight recipe (inventory §4.2; Liu et al. 2025, arXiv 2502.16982).

For each matrix (a 2D parameter ``[M, N]``, or each of the ``E`` matrices of a 3D expert stack
``[E, M, N]``, batched with one ``bmm`` per Newton-Schulz product, never a loop over experts):

1. Momentum with Nesterov look-ahead, in the dampened (EMA) form of the original kernel:
   ``buf <- mu * buf + (1 - mu) * g``;  ``u <- (1 - mu) * g + mu * buf``  (mu = 0.95).
   The term ``(1 - mu) * g`` is computed once and serves both lines; a gradient multiplier
   (``grad_coef``: the gradient-clipping coefficient, a device tensor) is folded into it, so
   clipping costs no pass of its own and no host read.
   Moonlight's reference writes the undampened ``buf <- mu * buf + g; u <- g + mu * buf``; the two
   differ only by the constant factor (1 - mu), which the Frobenius normalization of step 2
   removes, so the updates agree (up to the 1e-7 clamp).
2. Orthogonalize ``u`` with ``ns_steps`` (5) Newton-Schulz iterations with the fixed quintic
   coefficients (a, b, c) = (3.4445, -4.7750, 2.0315): ``X <- u / max(||u||_F, 1e-7)`` per
   matrix, then ``A = X X^T`` on the smaller side (tall matrices are transposed) and
   ``X <- a X + (b A + c A^2) X``.
   The original kernel clamped ``||u||_F^2`` at 1e-7 (norm 3.2e-4), which leaves small momenta
   un-normalized and their update shrunken; here the clamp is on the norm itself, at 1e-7.
3. Scale to a shape-independent RMS: ``u <- u * update_rms * sqrt(max(M, N))`` (update_rms 0.2).
4. Decoupled weight decay ``p <- p * (1 - lr * wd)``, then ``p <- p - lr * u``.

Newton-Schulz runs in float32 by default (``ns_dtype="bfloat16"`` trades accuracy for GPU speed;
float32 matmuls follow the global TF32 setting, as the original's FAST_TF32 cuBLAS kernel did).
The momentum buffer is kept in float32 whatever the parameter dtype (the original kept it in BF16,
where the (1 - mu) * g increments of a mu = 0.95 EMA are largely rounded away), and the parameter
update is computed in float32 and rounded once to the parameter dtype.

A parameter may carry an int attribute ``muon_col_blocks`` (default 1): its columns are then
dealt into that many *interleaved* blocks, column ``c`` belonging to block ``c % col_blocks``,
each orthogonalized and scaled as its own matrix. The fused expert W13 stack ``[E, D, 2F]`` stores
gate and up interleaved (column ``2j`` is gate ``j``, ``2j+1`` is up ``j``: the layout of
`nmoe_kernels.reference.interleave_w13`, which the fused SwiGLU epilogues read), so it has 2
blocks: gate ``[..., 0::2]`` and up ``[..., 1::2]``.

Gradients must already be averaged across data-parallel ranks when ``step`` runs (the original
forgot this for Muon-managed params, inventory §4.2 caveat a); that is the trainer's job.

Shape letters: E experts, C column blocks, B = E * C matrices, M rows, N columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["Muon", "NS_COEFFICIENTS", "muon_update", "newton_schulz_orthogonalize"]

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
"""Fixed quintic Newton-Schulz coefficients (a, b, c) used at every iteration (inventory §4.2)."""

_NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_NORM_EPS = 1e-7


def newton_schulz_orthogonalize(
    x_BMN: torch.Tensor, steps: int = 5, ns_dtype: str = "float32"
) -> torch.Tensor:
    """Approximate the orthogonal polar factor ``U V^T`` of each matrix of a batch.

    Args:
        x_BMN: ``[B, M, N]`` floating tensor, any dtype and device; not modified.
        steps: number of Newton-Schulz iterations (>= 1).
        ns_dtype: ``"float32"`` or ``"bfloat16"``, the dtype of the iteration's matmuls.

    Returns:
        ``[B, M, N]`` float32 tensor with the singular vectors of ``x`` and singular values
        f^steps(s / ||x||_F), f(s) = a s + b s^3 + c s^5: after 5 steps every singular value with
        s >= 2e-3 ||x||_F lands in [0.68, 1.21] (the fixed quintic oscillates around 1 instead of
        converging); smaller ones are amplified less. All-zero matrices stay 0.
    """
    if x_BMN.dim() != 3:
        raise ValueError(f"x_BMN must be 3D [B, M, N], got shape {tuple(x_BMN.shape)}")
    if ns_dtype not in _NS_DTYPES:
        raise ValueError(f"ns_dtype must be one of {sorted(_NS_DTYPES)}, got {ns_dtype!r}")
    a, b, c = NS_COEFFICIENTS
    x = x_BMN.float()
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the smaller Gram matrix: rows <= cols
        x = x.mT
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x = (x / norm.clamp_min(_NORM_EPS)).to(_NS_DTYPES[ns_dtype])
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b*A + c*A@A
        x = torch.baddbmm(x, poly, x, beta=a)  # a*X + (b*A + c*A^2) @ X
    if transposed:
        x = x.mT
    return x.float()


def _split_col_blocks(x_EMN: torch.Tensor, col_blocks: int) -> torch.Tensor:
    """[E, M, N] -> [E * col_blocks, M, N / col_blocks]: block j of matrix e (columns
    ``j, j + col_blocks, ...``) lands at index ``e * col_blocks + j``."""
    num_e, m, n = x_EMN.shape
    nb = n // col_blocks
    return x_EMN.view(num_e, m, nb, col_blocks).permute(0, 3, 1, 2).reshape(-1, m, nb)


def _merge_col_blocks(x_BMN: torch.Tensor, num_e: int, col_blocks: int) -> torch.Tensor:
    """Inverse of `_split_col_blocks`."""
    _, m, nb = x_BMN.shape
    x_EMNC = x_BMN.view(num_e, col_blocks, m, nb).permute(0, 2, 3, 1)
    return x_EMNC.reshape(num_e, m, nb * col_blocks)


def muon_update(
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    momentum: float,
    update_rms: float,
    ns_steps: int = 5,
    col_blocks: int = 1,
    ns_dtype: str = "float32",
    grad_coef: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advance the momentum buffer in place and return the scaled orthogonalized update.

    Args:
        grad: ``[M, N]`` or ``[E, M, N]`` gradient, any floating dtype.
        momentum_buffer: float32 tensor shaped like ``grad``; updated in place to
            ``momentum * buf + (1 - momentum) * grad_coef * grad``.
        momentum: mu in [0, 1).
        update_rms: target RMS of the returned update (> 0).
        ns_steps: Newton-Schulz iterations (>= 1).
        col_blocks: number of interleaved column blocks (column ``c`` in block
            ``c % col_blocks``) orthogonalized separately (must divide N).
        ns_dtype: ``"float32"`` or ``"bfloat16"``.
        grad_coef: optional 0-dim floating tensor on ``grad``'s device (the gradient-clipping
            coefficient) multiplying ``grad`` where it is read; None means 1. A coefficient of
            exactly 1.0 gives bitwise the update of None.

    Returns:
        float32 tensor shaped like ``grad``: ``update_rms * sqrt(max(M, N / col_blocks))`` times
        the orthogonalized Nesterov momentum, per matrix and column block (the lr is not applied).
    """
    if grad_coef is None:
        increment: float | torch.Tensor = 1.0 - momentum
    else:
        _check_grad_coef(grad_coef, grad)
        increment = grad_coef.float() * (1.0 - momentum)
    return _muon_update(grad, momentum_buffer, momentum, increment, update_rms, ns_steps,
                        col_blocks, ns_dtype)


def _muon_update(grad, momentum_buffer, momentum, increment, update_rms, ns_steps, col_blocks,
                 ns_dtype) -> torch.Tensor:
    """`muon_update` with the gradient's factor ``increment = (1 - mu) * grad_coef`` given."""
    # increment * g, once: the new momentum's increment and the first Nesterov term. A float32
    # tensor increment 1.0 * (1 - mu) equals the float32 the Python scalar (1 - mu) rounds to, so
    # a coefficient of exactly 1.0 changes no bit.
    u = grad.float().mul(increment)
    momentum_buffer.mul_(momentum).add_(u)
    u.add_(momentum_buffer, alpha=momentum)
    u_EMN = u.unsqueeze(0) if u.dim() == 2 else u
    num_e, m, n = u_EMN.shape
    if n % col_blocks != 0:
        raise ValueError(f"col_blocks={col_blocks} must divide the last dim {n}")
    blocks_BMN = _split_col_blocks(u_EMN, col_blocks) if col_blocks > 1 else u_EMN
    ortho_BMN = newton_schulz_orthogonalize(blocks_BMN, ns_steps, ns_dtype)
    ortho_BMN.mul_(update_rms * math.sqrt(max(m, n // col_blocks)))
    out = _merge_col_blocks(ortho_BMN, num_e, col_blocks) if col_blocks > 1 else ortho_BMN
    return out.view_as(grad)


def _check_grad_coef(grad_coef: torch.Tensor, grad: torch.Tensor) -> None:
    if not isinstance(grad_coef, torch.Tensor) or grad_coef.dim() != 0:
        raise ValueError(
            f"grad_coef must be a 0-dim tensor (got "
            f"{tuple(grad_coef.shape) if isinstance(grad_coef, torch.Tensor) else grad_coef!r}): "
            "pass the clipping coefficient as a device scalar, e.g. torch.tensor(c, device=...)"
        )
    if not grad_coef.is_floating_point() or grad_coef.device != grad.device:
        raise ValueError(
            f"grad_coef must be a floating tensor on the gradient's device {grad.device}, got "
            f"{grad_coef.dtype} on {grad_coef.device}"
        )


def _check_param(p: torch.Tensor, where: str) -> None:
    if p.dim() not in (2, 3):
        raise ValueError(
            f"Muon takes 2D matrices [M, N] and 3D expert stacks [E, M, N]; {where} has shape "
            f"{tuple(p.shape)}: give it to AdamW instead"
        )
    col_blocks = getattr(p, "muon_col_blocks", 1)
    if not isinstance(col_blocks, int) or col_blocks < 1 or p.shape[-1] % col_blocks != 0:
        raise ValueError(
            f"{where}: muon_col_blocks={col_blocks!r} must be a positive int dividing the last "
            f"dim of shape {tuple(p.shape)}"
        )


class Muon(torch.optim.Optimizer):
    """Muon (Moonlight recipe) for 2D matrices and 3D expert stacks; see the module docstring.

    Args:
        params: iterable of parameters or of param-group dicts (a group may carry a ``name`` and
            override any hyperparameter below).
        lr: learning rate (> 0).
        momentum: mu in [0, 1), default 0.95.
        weight_decay: decoupled weight decay (>= 0), applied as ``p *= 1 - lr * wd``.
        update_rms: target update RMS (> 0), default 0.2.
        ns_steps: Newton-Schulz iterations (>= 1), default 5.
        ns_dtype: ``"float32"`` (default) or ``"bfloat16"``.

    State per parameter: ``momentum_buffer`` (float32, shaped like the parameter).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 3.4e-4,
        momentum: float = 0.95,
        weight_decay: float = 0.1,
        update_rms: float = 0.2,
        ns_steps: int = 5,
        ns_dtype: str = "float32",
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not update_rms > 0:
            raise ValueError(f"update_rms must be > 0, got {update_rms}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        if ns_dtype not in _NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {sorted(_NS_DTYPES)}, got {ns_dtype!r}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            update_rms=update_rms,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        name = group.get("name", f"group {len(self.param_groups) - 1}")
        for i, p in enumerate(group["params"]):
            _check_param(p, f"Muon param group {name!r} param {i}")

    @torch.no_grad()
    def step(self, closure=None, grad_coef: torch.Tensor | None = None):
        """Apply one Muon update to every parameter that has a gradient.

        Args:
            closure: optional, re-evaluates the loss (torch's optimizer convention).
            grad_coef: optional 0-dim floating tensor on the parameters' device multiplying every
                gradient as the update reads it (the gradient-clipping coefficient, see
                `muon_update`); the gradients themselves are left as they are.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            increment: float | torch.Tensor = 1.0 - momentum
            if grad_coef is not None:  # one float32 device scalar per group, not per parameter
                increment = grad_coef.float() * (1.0 - momentum)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if grad_coef is not None:
                    _check_grad_coef(grad_coef, p.grad)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros(
                        p.shape, dtype=torch.float32, device=p.device
                    )
                update = _muon_update(
                    p.grad,
                    state["momentum_buffer"],
                    momentum,
                    increment,
                    update_rms=group["update_rms"],
                    ns_steps=group["ns_steps"],
                    col_blocks=getattr(p, "muon_col_blocks", 1),
                    ns_dtype=group["ns_dtype"],
                )
                if p.dtype == torch.float32:
                    p.mul_(1.0 - lr * wd).add_(update, alpha=-lr)
                else:
                    p.copy_(p.float().mul_(1.0 - lr * wd).add_(update, alpha=-lr))
        return loss
