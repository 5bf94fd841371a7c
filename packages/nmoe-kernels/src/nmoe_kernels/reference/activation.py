"""Pure-torch reference for the expert MLP activation (SwiGLU) and the W13 column convention.

Shape letters: M rows, F expert intermediate dim, K input dim, E experts.

W13 convention (binding for every fused kernel in nmoe-kernels): the expert up-projection is one
weight ``w13_EK2F`` [E, K, 2F] whose columns are INTERLEAVED per output feature:

    column 2j   = gate projection (W1) of feature j
    column 2j+1 = up projection   (W3) of feature j

so the GEMM output ``h_M2F = x @ w13[e]`` holds (gate_j, up_j) in adjacent columns and
``swiglu_interleaved(h_M2F)[:, j] = silu(h[:, 2j]) * h[:, 2j+1]``. Adjacent columns land in the
same thread's accumulator registers on Hopper (wgmma) and Blackwell (tcgen05) MMAs, so a fused
epilogue can apply SwiGLU (and quantize the F/2-wide result) without exchanging data between
threads or tiles. Build it with `interleave_w13(w1_EKF, w3_EKF)`; `split_w13` undoes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in float32 and cast back to gate's dtype.

    Args:
        gate: [..., F] float tensor.
        up: [..., F] float tensor, same shape as gate.

    Returns:
        [..., F] in gate's dtype.
    """
    if not isinstance(gate, torch.Tensor) or gate.dtype not in _FLOATS:
        raise ValueError("swiglu: gate must be a floating tensor")
    if not isinstance(up, torch.Tensor) or up.shape != gate.shape:
        raise ValueError(f"swiglu: up must have gate's shape {tuple(gate.shape)}")
    compute = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


def swiglu_interleaved(h_M2F: torch.Tensor) -> torch.Tensor:
    """SwiGLU of a W13 GEMM output with interleaved (gate, up) columns (module docstring).

    Args:
        h_M2F: [..., 2F] float tensor; column 2j is gate_j, column 2j+1 is up_j.

    Returns:
        [..., F] in h's dtype: silu(h[..., 0::2]) * h[..., 1::2] computed in float32.
    """
    if not isinstance(h_M2F, torch.Tensor) or h_M2F.dim() < 1 or h_M2F.shape[-1] % 2:
        raise ValueError("swiglu_interleaved: h_M2F must be a tensor whose last dim is even (2F)")
    return swiglu(h_M2F[..., 0::2], h_M2F[..., 1::2])


def interleave_w13(w1_EKF: torch.Tensor, w3_EKF: torch.Tensor) -> torch.Tensor:
    """Stack gate (W1) and up (W3) projections into the interleaved W13 layout.

    Args:
        w1_EKF: [..., K, F] gate projection weights (e.g. [E, K, F]).
        w3_EKF: [..., K, F] up projection weights, same shape and dtype.

    Returns:
        w13_EK2F [..., K, 2F] with w13[..., 2j] = w1[..., j] and w13[..., 2j+1] = w3[..., j].
    """
    if w1_EKF.shape != w3_EKF.shape or w1_EKF.dtype != w3_EKF.dtype:
        raise ValueError(
            f"interleave_w13: w1 {w1_EKF.dtype}{tuple(w1_EKF.shape)} and w3 "
            f"{w3_EKF.dtype}{tuple(w3_EKF.shape)} must match in shape and dtype"
        )
    return torch.stack((w1_EKF, w3_EKF), dim=-1).flatten(-2)


def split_w13(w13_EK2F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `interleave_w13`: [..., K, 2F] -> (w1 [..., K, F], w3 [..., K, F]) copies."""
    if w13_EK2F.shape[-1] % 2:
        raise ValueError(f"split_w13: the last dim of w13 ({w13_EK2F.shape[-1]}) must be even")
    return w13_EK2F[..., 0::2].contiguous(), w13_EK2F[..., 1::2].contiguous()
