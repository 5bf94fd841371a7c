"""`swiglu_backward_gated` argument errors that can be checked without a GPU (the rest of its
errors, and its values, are in test_swiglu_backward_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import nmoe_kernels
import nmoe_kernels._C as C


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_wrapper_without_gpu_points_to_reference_and_names_the_argument():
    h = torch.zeros(2, 256, dtype=torch.bfloat16)
    da = torch.zeros(2, 128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError) as err:
        nmoe_kernels.swiglu_backward_gated(h, da, torch.zeros(2))
    message = str(err.value)
    assert "h_R2F is on cpu and no CUDA GPU is visible" in message
    assert "nmoe_kernels.reference.swiglu_backward_gated on CPU" in message
    with pytest.raises(TypeError, match="h_R2F must be a torch.Tensor, got list"):
        nmoe_kernels.swiglu_backward_gated([0.0, 1.0], da, torch.zeros(2))


def test_binding_checks_h_first_naming_it():
    if not C.WITH_CUDA:
        pytest.skip("_C was built without CUDA ops")
    h = torch.zeros(2, 256, dtype=torch.bfloat16)
    rest = [to_dlpack(t) for t in (torch.zeros(2, 128, dtype=torch.bfloat16), torch.zeros(2),
                                    torch.empty_like(h), torch.empty(2, 128, dtype=torch.bfloat16),
                                    torch.empty(2))]
    with pytest.raises(ValueError, match=r"^h: expected dtype bfloat16, got float32"):
        C.swiglu_backward_gated(to_dlpack(h.float()), *rest, None, None, False, True, 0)
    with pytest.raises(ValueError, match=r"^h: expected a CUDA tensor, got bfloat16\[2, 256\]"):
        C.swiglu_backward_gated(to_dlpack(h), *rest, None, None, False, True, 0)


def _as_cuda_capsule(tensor: torch.Tensor) -> object:
    """A DLPack capsule of a CPU tensor relabelled as cuda:0 (DLTensor.device.device_type is the
    int32 after the data pointer). Only for zero-row calls, whose launchers return before any
    CUDA call: it runs the binding's host-side checks on a machine without a GPU."""
    import ctypes

    capsule = to_dlpack(tensor)
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    ctypes.c_int32.from_address(get(capsule, b"dltensor") + 8).value = 2  # kDLCUDA
    return capsule


@pytest.mark.parametrize("mn_major", [True, False])
def test_zero_rows_pass_the_checks_with_empty_scale_storage(mn_major):
    # Regression: the MN-major scale storage of 0 rows is float32[blocks, 0]; torch gives it
    # strides (1, 1), which the contiguity check rejected although an empty tensor has no layout.
    if not C.WITH_CUDA:
        pytest.skip("_C was built without CUDA ops")
    features = 128
    h = torch.empty(0, 2 * features, dtype=torch.bfloat16)
    storage = torch.empty(2, 0) if mn_major else torch.empty(0, 2)
    args = [h, torch.empty(0, features, dtype=torch.bfloat16), torch.empty(0), torch.empty_like(h),
            torch.empty(0, features, dtype=torch.bfloat16), torch.empty(0),
            torch.empty(0, 2 * features, dtype=torch.uint8), storage]
    C.swiglu_backward_gated(*[_as_cuda_capsule(t) for t in args], False, mn_major, 0)
