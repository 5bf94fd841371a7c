"""nmoe-core: the MoE transformer, its MoE layer, optimizers, configs, presets and tokenizers.

Pure Python on PyTorch. Runs on CPU (reference path) and on GPUs.
"""

import nmoe_kernels

# Inclusive range of nmoe_kernels._C ABI versions this package was written against.
KERNELS_ABI_MIN = 1
KERNELS_ABI_MAX = 2
nmoe_kernels.require_abi("nmoe-core", KERNELS_ABI_MIN, KERNELS_ABI_MAX)

__version__ = "0.1.0"

__all__ = ["__version__"]
