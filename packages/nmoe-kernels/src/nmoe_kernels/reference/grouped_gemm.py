"""Pure-torch reference for grouped (per-expert) GEMMs over a contiguous expert-sorted layout.

Shape letters: M rows (tokens routed to this device, sorted by expert), K input dim, N output dim,
E experts. ``offsets_E1`` is an integer tensor [E + 1] with offsets[0] == 0, non-decreasing,
offsets[E] <= M: rows offsets[e]:offsets[e+1] belong to expert e (a segment may be empty); rows
from offsets[E] to M are padding and produce zero output rows (and contribute nothing to wgrad).

Expert weights are [E, K, N] (y = x @ w[e]). All products accumulate in float32 (TF32 must be off,
which is torch's default for matmul); outputs are rounded once to the output dtype.
"""

from __future__ import annotations

import torch

from nmoe_kernels.reference.quantization import dequantize_fp8_1x128, dequantize_fp8_128x128

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def expert_segments(offsets_E1: torch.Tensor, num_rows: int, num_experts: int, op: str):
    """Validate ``offsets_E1`` and return [(start, end)] per expert (Python ints)."""
    if not isinstance(offsets_E1, torch.Tensor) or offsets_E1.dtype not in (
        torch.int32,
        torch.int64,
    ):
        raise ValueError(f"{op}: offsets_E1 must be an int32 or int64 tensor")
    if offsets_E1.shape != (num_experts + 1,):
        raise ValueError(
            f"{op}: offsets_E1 must have shape [E + 1] = [{num_experts + 1}] for {num_experts} "
            f"experts, got {tuple(offsets_E1.shape)}"
        )
    bounds = offsets_E1.tolist()
    if bounds[0] != 0 or any(b < a for a, b in zip(bounds, bounds[1:])) or bounds[-1] > num_rows:
        raise ValueError(
            f"{op}: offsets_E1 must start at 0, be non-decreasing and end at <= M={num_rows}, "
            f"got {bounds}"
        )
    return list(zip(bounds[:-1], bounds[1:]))


def _check_matrix(op: str, name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS or t.dim() != ndim:
        desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be a {ndim}-D floating tensor, got {desc}")


def grouped_gemm(
    x_MK: torch.Tensor,
    w_EKN: torch.Tensor,
    offsets_E1: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Forward grouped GEMM: y[rows of e] = x[rows of e] @ w[e].

    Args:
        x_MK: [M, K] float tensor, rows sorted by expert.
        w_EKN: [E, K, N] float tensor on x's device.
        offsets_E1: [E + 1] int32/int64 segment offsets (see module docstring).
        out_dtype: output dtype; default x's dtype.

    Returns:
        y_MN [M, N] ``out_dtype``; padding rows (>= offsets[E]) are zero.
    """
    op = "grouped_gemm"
    _check_matrix(op, "x_MK", x_MK, 2)
    _check_matrix(op, "w_EKN", w_EKN, 3)
    if w_EKN.shape[1] != x_MK.shape[1]:
        raise ValueError(f"{op}: w_EKN {tuple(w_EKN.shape)} must have K={x_MK.shape[1]} in dim 1")
    segments = expert_segments(offsets_E1, x_MK.shape[0], w_EKN.shape[0], op)
    out_dtype = out_dtype or x_MK.dtype
    y = x_MK.new_zeros(x_MK.shape[0], w_EKN.shape[2], dtype=out_dtype)
    for expert, (start, end) in enumerate(segments):
        if end > start:
            y[start:end] = (x_MK[start:end].float() @ w_EKN[expert].float()).to(out_dtype)
    return y


def grouped_gemm_dgrad(
    dy_MN: torch.Tensor,
    w_EKN: torch.Tensor,
    offsets_E1: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Input gradient of `grouped_gemm`: dx[rows of e] = dy[rows of e] @ w[e]^T.

    Args:
        dy_MN: [M, N] float tensor, rows sorted by expert.
        w_EKN: [E, K, N] float tensor.
        offsets_E1: [E + 1] int32/int64 segment offsets.
        out_dtype: output dtype; default dy's dtype.

    Returns:
        dx_MK [M, K] ``out_dtype``; padding rows are zero.
    """
    op = "grouped_gemm_dgrad"
    _check_matrix(op, "dy_MN", dy_MN, 2)
    _check_matrix(op, "w_EKN", w_EKN, 3)
    if w_EKN.shape[2] != dy_MN.shape[1]:
        raise ValueError(f"{op}: w_EKN {tuple(w_EKN.shape)} must have N={dy_MN.shape[1]} in dim 2")
    segments = expert_segments(offsets_E1, dy_MN.shape[0], w_EKN.shape[0], op)
    out_dtype = out_dtype or dy_MN.dtype
    dx = dy_MN.new_zeros(dy_MN.shape[0], w_EKN.shape[1], dtype=out_dtype)
    for expert, (start, end) in enumerate(segments):
        if end > start:
            dx[start:end] = (dy_MN[start:end].float() @ w_EKN[expert].float().t()).to(out_dtype)
    return dx


def grouped_gemm_wgrad(
    x_MK: torch.Tensor,
    dy_MN: torch.Tensor,
    offsets_E1: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weight gradient of `grouped_gemm`: dw[e] = x[rows of e]^T @ dy[rows of e].

    Args:
        x_MK: [M, K] float tensor.
        dy_MN: [M, N] float tensor.
        offsets_E1: [E + 1] int32/int64 segment offsets; E is taken from its length.
        out_dtype: output dtype; default x's dtype.

    Returns:
        dw_EKN [E, K, N] ``out_dtype``; experts with no rows get zeros.
    """
    op = "grouped_gemm_wgrad"
    _check_matrix(op, "x_MK", x_MK, 2)
    _check_matrix(op, "dy_MN", dy_MN, 2)
    if dy_MN.shape[0] != x_MK.shape[0]:
        raise ValueError(f"{op}: dy_MN has {dy_MN.shape[0]} rows but x_MK has {x_MK.shape[0]}")
    if not isinstance(offsets_E1, torch.Tensor) or offsets_E1.dim() != 1:
        raise ValueError(f"{op}: offsets_E1 must be a 1-D int tensor [E + 1]")
    num_experts = offsets_E1.shape[0] - 1
    segments = expert_segments(offsets_E1, x_MK.shape[0], num_experts, op)
    out_dtype = out_dtype or x_MK.dtype
    dw = x_MK.new_zeros(num_experts, x_MK.shape[1], dy_MN.shape[1], dtype=out_dtype)
    for expert, (start, end) in enumerate(segments):
        if end > start:
            dw[expert] = (x_MK[start:end].float().t() @ dy_MN[start:end].float()).to(out_dtype)
    return dw


def grouped_gemm_fp8_blockscaled(
    x_fp8_MK: torch.Tensor,
    x_scales_MKb: torch.Tensor,
    w_fp8_EKN: torch.Tensor,
    w_scales_EKbNb: torch.Tensor,
    offsets_E1: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """FP8 blockscaled grouped GEMM, computed on the dequantized (float32) operands.

    Args:
        x_fp8_MK: [M, K] float8_e4m3fn activations, K % 128 == 0 (from quantize_fp8_1x128).
        x_scales_MKb: [M, K/128] float32 1x128 scales (row-major or MN-major strides).
        w_fp8_EKN: [E, K, N] float8_e4m3fn weights, K and N multiples of 128.
        w_scales_EKbNb: [E, K/128, N/128] float32 128x128 scales (quantize_fp8_128x128 on w_EKN).
        offsets_E1: [E + 1] int32/int64 segment offsets.
        out_dtype: output dtype (default bfloat16).

    Returns:
        y_MN [M, N] ``out_dtype``; padding rows are zero.
    """
    x = dequantize_fp8_1x128(x_fp8_MK, x_scales_MKb, torch.float32)
    w = dequantize_fp8_128x128(w_fp8_EKN, w_scales_EKbNb, torch.float32)
    return grouped_gemm(x, w, offsets_E1, out_dtype=out_dtype)
