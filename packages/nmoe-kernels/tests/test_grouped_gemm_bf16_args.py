"""Argument checks of the BF16 grouped GEMM wrappers that fire before any GPU work (CPU).

Each bad input must raise an error that names the argument and says what to do.
"""

from __future__ import annotations

import pytest
import torch

import nmoe_kernels


def test_wrong_dtype_rank_and_device_are_named():
    x = torch.randn(32, 64).bfloat16()
    w = torch.randn(2, 64, 128).bfloat16()
    offsets = torch.tensor([0, 16, 32], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"x_MK must be bfloat16, got torch.float32.*bfloat16\(\)"):
        nmoe_kernels.grouped_gemm_bf16(x.float(), w, offsets)
    with pytest.raises(ValueError, match=r"x_MK must be 2-D \[M, K\], got shape \(64,\)"):
        nmoe_kernels.grouped_gemm_bf16_swiglu(x[0], w, offsets)
    with pytest.raises(ValueError, match="dy_MN must be a CUDA tensor"):
        nmoe_kernels.grouped_gemm_bf16_dgrad(x, w, offsets)
    with pytest.raises(TypeError, match="x_MK must be a torch.Tensor"):
        nmoe_kernels.grouped_gemm_bf16_wgrad(x.tolist(), x, offsets)


def test_exported_from_top_level():
    import nmoe_kernels.grouped_gemm as module

    for name in module.__all__:
        assert getattr(nmoe_kernels, name) is getattr(module, name)
        assert name in dir(nmoe_kernels)
