"""`cross_entropy_rows` argument errors that can be checked without a GPU (its values are in
test_cross_entropy_gpu.py)."""

from __future__ import annotations

import ctypes

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import nmoe_kernels
import nmoe_kernels._C as C


def _as_cuda_capsule(tensor: torch.Tensor) -> object:
    """A DLPack capsule of a CPU tensor relabelled as cuda:0 (DLTensor.device.device_type is the
    int32 after the data pointer). Only for zero-row calls, whose launcher returns before any CUDA
    call: it runs the binding's host-side checks on a machine without a GPU."""
    capsule = to_dlpack(tensor)
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    ctypes.c_int32.from_address(get(capsule, b"dltensor") + 8).value = 2  # kDLCUDA
    return capsule


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_wrapper_without_gpu_points_to_reference_and_names_the_argument():
    logits = torch.zeros(2, 7, dtype=torch.bfloat16)
    targets = torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError) as err:
        nmoe_kernels.cross_entropy_rows(logits, targets)
    message = str(err.value)
    assert "logits_NV is on cpu and no CUDA GPU is visible" in message
    assert "nmoe_kernels.reference.cross_entropy_rows on CPU" in message
    with pytest.raises(TypeError, match="logits_NV must be a torch.Tensor, got list"):
        nmoe_kernels.cross_entropy_rows([0.0, 1.0], targets)


def _zero_row_args(vocab: int = 7, dtype=torch.bfloat16):
    return dict(logits=torch.empty(0, vocab, dtype=dtype), targets=torch.empty(0, dtype=torch.long),
                loss=torch.empty(0), lse=torch.empty(0))


def _call(args: dict, row_scale=None, ignore_index: int = -100):
    capsules = [_as_cuda_capsule(args[k]) for k in ("logits", "targets", "loss", "lse")]
    C.cross_entropy_rows(*capsules, ignore_index,
                         None if row_scale is None else _as_cuda_capsule(row_scale), 1.0, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_zero_rows_pass_the_checks(dtype):
    if not C.WITH_CUDA:
        pytest.skip("_C was built without CUDA ops")
    _call(_zero_row_args(dtype=dtype))
    _call(_zero_row_args(dtype=dtype), row_scale=torch.empty(0))


def test_binding_names_the_bad_argument():
    if not C.WITH_CUDA:
        pytest.skip("_C was built without CUDA ops")
    args = _zero_row_args()
    with pytest.raises(ValueError, match=r"^logits: expected a CUDA tensor, got bfloat16\[0, 7\]"):
        C.cross_entropy_rows(*[to_dlpack(args[k]) for k in ("logits", "targets", "loss", "lse")],
                             -100, None, 1.0, 0)
    cases = [
        ("logits", torch.empty(0, 7, dtype=torch.float16), r"^logits: expected dtype"),
        ("logits", torch.empty(0, 0, dtype=torch.bfloat16), r"^logits: V must be >= 1"),
        ("logits", torch.empty(0, 7, 1, dtype=torch.bfloat16), r"^logits: expected a 2-D tensor"),
        ("targets", torch.empty(0, dtype=torch.int32), r"^targets: expected dtype int64"),
        ("targets", torch.empty(1, dtype=torch.long), r"^targets: expected shape \[0\]"),
        ("loss", torch.empty(0, dtype=torch.int32), r"^loss: expected dtype float32"),
        ("lse", torch.empty(2), r"^lse: expected shape \[0\]"),
    ]
    for name, bad, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            _call({**args, name: bad})
    with pytest.raises(ValueError, match=r"^row_scale: expected shape \[0\]"):
        _call(args, row_scale=torch.empty(1))
