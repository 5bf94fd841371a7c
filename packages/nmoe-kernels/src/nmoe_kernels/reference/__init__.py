"""Pure-PyTorch reference ops (CPU or GPU), one function per op of nmoe-kernels.

The compiled ops are tested against these (bitwise for data movement and quantization), and the
layers above use them on machines without a GPU. Modules:

- `quantization`: FP8 1x128 / 128x128, MXFP8 1x32 and NVFP4 quantize / dequantize, SwiGLU + FP8
  1x128 quantization.
- `grouped_gemm`: per-expert GEMMs over the contiguous expert-sorted layout (fwd, dgrad, wgrad,
  FP8 blockscaled).
- `activation`: SwiGLU, its gated backward and the interleaved W13 column convention.
- `cross_entropy`: per-row cross-entropy, log-sum-exp and the logits gradient written in place.
- `permutation`: permute tokens to expert-contiguous rows, unpermute with gate weighting, gather
  rows.
- `optim`: AdamW's step over a list of tensors, moments in float32 or bfloat16.
- `router`: the router's top-k experts by biased score (descending, ties to the lower expert).
"""

from nmoe_kernels.reference.activation import (
    interleave_w13,
    split_w13,
    swiglu,
    swiglu_backward_gated,
    swiglu_interleaved,
)
from nmoe_kernels.reference.cross_entropy import cross_entropy_rows
from nmoe_kernels.reference.grouped_gemm import (
    grouped_gemm,
    grouped_gemm_dgrad,
    grouped_gemm_fp8_blockscaled,
    grouped_gemm_wgrad,
)
from nmoe_kernels.reference.optim import adamw_step_
from nmoe_kernels.reference.permutation import gather_rows, permute, unpermute
from nmoe_kernels.reference.quantization import (
    dequantize_fp8_1x128,
    dequantize_fp8_128x128,
    dequantize_mxfp8_1x32,
    dequantize_nvfp4,
    quantize_fp8_1x128,
    quantize_fp8_128x128,
    quantize_mxfp8_1x32,
    quantize_nvfp4,
    swiglu_quantize_fp8_1x128,
    to_mn_major_tma_aligned,
)
from nmoe_kernels.reference.router import router_topk

__all__ = [
    "adamw_step_",
    "cross_entropy_rows",
    "dequantize_fp8_128x128",
    "dequantize_fp8_1x128",
    "dequantize_mxfp8_1x32",
    "dequantize_nvfp4",
    "gather_rows",
    "grouped_gemm",
    "grouped_gemm_dgrad",
    "grouped_gemm_fp8_blockscaled",
    "grouped_gemm_wgrad",
    "interleave_w13",
    "permute",
    "quantize_fp8_128x128",
    "quantize_fp8_1x128",
    "quantize_mxfp8_1x32",
    "quantize_nvfp4",
    "router_topk",
    "split_w13",
    "swiglu",
    "swiglu_backward_gated",
    "swiglu_interleaved",
    "swiglu_quantize_fp8_1x128",
    "to_mn_major_tma_aligned",
    "unpermute",
]
