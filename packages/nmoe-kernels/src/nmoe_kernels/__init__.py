"""nmoe-kernels: compiled CUDA and CuTeDSL kernels for MoE training, with pure-torch references.

`nmoe_kernels.reference` holds one pure-PyTorch function per op; the compiled ops in this package
are tested against them. Imports without a GPU (the CUDA ops raise a clear error when called
without one). The ops are loaded lazily, so ``import nmoe_kernels`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from nmoe_kernels._abi import ABIMismatchError, compiled_abi_version, require_abi

__version__ = "0.1.0"

# Public op name -> module that defines it (imported on first access).
_LAZY = {
    "quantize_fp8_1x128": "nmoe_kernels.quant",
    "dequantize_fp8_1x128": "nmoe_kernels.quant",
    "quantize_fp8_128x128": "nmoe_kernels.quant",
    "swiglu_quantize_fp8_1x128": "nmoe_kernels.quant",
    "swiglu_backward_gated": "nmoe_kernels.activation",
    "cross_entropy_rows": "nmoe_kernels.cross_entropy",
    "adamw_step_": "nmoe_kernels.optim",
    "router_topk": "nmoe_kernels.router",
    "permute": "nmoe_kernels.permutation",
    "unpermute": "nmoe_kernels.permutation",
    "gather_rows": "nmoe_kernels.permutation",
    "grouped_gemm_bf16": "nmoe_kernels.grouped_gemm",
    "grouped_gemm_bf16_swiglu": "nmoe_kernels.grouped_gemm",
    "grouped_gemm_bf16_dgrad": "nmoe_kernels.grouped_gemm",
    "grouped_gemm_bf16_wgrad": "nmoe_kernels.grouped_gemm",
    "grouped_gemm_fp8_blockscaled": "nmoe_kernels.grouped_gemm_fp8",
    "grouped_gemm_fp8_swiglu_quant": "nmoe_kernels.grouped_gemm_fp8",
    "fp8_weights_to_nk": "nmoe_kernels.grouped_gemm_fp8",
}

__all__ = ["ABIMismatchError", "__version__", "compiled_abi_version", "require_abi", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nmoe_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
