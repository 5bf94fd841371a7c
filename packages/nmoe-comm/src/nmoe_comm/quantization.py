"""FP8 rows for ``dispatch(..., fp8=True)`` (contract rule 6), on any device.

Rows are quantized at their source with one float32 scale per 1x128 block along ``D``:
`nmoe_kernels.quantize_fp8_1x128` (CUDA kernel) for CUDA tensors,
`nmoe_kernels.reference.quantize_fp8_1x128` (pure torch) otherwise. The two are bitwise equal
(nmoe-kernels tests them against each other), so every backend's FP8 rows match the reference's.
Letters as in `nmoe_comm.dispatcher` (``G = D / 128``).
"""

from __future__ import annotations

import torch

#: Row dtypes an FP8 dispatch accepts (those both quantizers take).
FP8_INPUT_DTYPES = (torch.bfloat16, torch.float32)
#: Elements per scale block along ``D``.
FP8_BLOCK = 128


def check_fp8_rows(x_TD: torch.Tensor) -> int:
    """Raise unless ``x_TD`` can be FP8-dispatched; return ``G = D / 128``."""
    if x_TD.dtype not in FP8_INPUT_DTYPES:
        raise ValueError(
            f"x_TD has dtype {x_TD.dtype}; an fp8 dispatch quantizes bfloat16 or float32 rows "
            f"(convert with .to(torch.bfloat16), or dispatch with fp8=False)"
        )
    if x_TD.shape[1] % FP8_BLOCK != 0:
        raise ValueError(
            f"x_TD has D={x_TD.shape[1]} columns; an fp8 dispatch needs D % {FP8_BLOCK} == 0 "
            f"(one scale per 1x{FP8_BLOCK} block); pad D or dispatch with fp8=False"
        )
    return x_TD.shape[1] // FP8_BLOCK


def quantize_rows_fp8(x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[T, D]`` rows to FP8 E4M3 with 1x128 float32 scales.

    Args:
        x_TD: ``[T, D]`` bfloat16/float32, contiguous, ``D % 128 == 0``, finite values; any
            device (CUDA uses the nmoe-kernels CUDA kernel, anything else the reference).

    Returns:
        ``(x_fp8_TD, scales_TG)``: float8_e4m3fn ``[T, D]`` and row-major float32 ``[T, G]``.
    """
    check_fp8_rows(x_TD)
    if x_TD.is_cuda:
        import nmoe_kernels

        return nmoe_kernels.quantize_fp8_1x128(x_TD.contiguous())
    from nmoe_kernels import reference

    return reference.quantize_fp8_1x128(x_TD)
