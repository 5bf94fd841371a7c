"""nmoe-kernels: compiled CUDA and CuTeDSL kernels for MoE training, with pure-torch references.

`nmoe_kernels.reference` holds one pure-PyTorch function per op; the compiled ops in this package
are tested against them. Imports without a GPU (the CUDA ops raise a clear error when called
without one).
"""

from nmoe_kernels._abi import ABIMismatchError, compiled_abi_version, require_abi
from nmoe_kernels.quant import dequantize_fp8_1x128, quantize_fp8_1x128

__version__ = "0.1.0"

__all__ = [
    "ABIMismatchError",
    "__version__",
    "compiled_abi_version",
    "dequantize_fp8_1x128",
    "quantize_fp8_1x128",
    "require_abi",
]
