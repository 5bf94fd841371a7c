"""`adamw_step_` argument errors that can be checked without a GPU (its values are in
test_adamw_gpu.py)."""

from __future__ import annotations

import pytest
import torch

import nmoe_kernels
import nmoe_kernels._C as C

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)


def test_list_lengths_and_step_are_checked_first():
    t = [torch.zeros(3)]
    with pytest.raises(ValueError, match="equal lengths, got 1, 0, 1, 1"):
        nmoe_kernels.adamw_step_(t, [], t, t, step=1, **HYPER)
    with pytest.raises(ValueError, match="step must be >= 1"):
        nmoe_kernels.adamw_step_(t, t, t, t, step=0, **HYPER)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cpu_tensors_point_to_the_reference():
    if not C.WITH_CUDA:
        pytest.skip("_C was built without CUDA ops (the error names the rebuild instead)")
    t = [torch.zeros(3)]
    with pytest.raises(RuntimeError) as err:
        nmoe_kernels.adamw_step_(t, t, t, t, step=1, **HYPER)
    assert "params[0] is on cpu and no CUDA GPU is visible" in str(err.value)
    assert "nmoe_kernels.reference.adamw_step_ on CPU" in str(err.value)


def test_binding_exports_its_chunk():
    if not C.WITH_CUDA:
        pytest.skip("_C was built without CUDA ops")
    assert C.ADAMW_BLOCK_ELEMS % 1024 == 0  # whole rounds of 256 threads x 4 elements
