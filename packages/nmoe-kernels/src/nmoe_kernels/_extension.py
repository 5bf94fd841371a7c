"""Access to the compiled module `nmoe_kernels._C` for the Python op wrappers.

The wrappers check arguments here first (so errors name the Python argument and the fix), then
pass tensors to `_C` as DLPack capsules together with the current CUDA stream as an integer.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch.utils.dlpack import to_dlpack

REBUILD_HINT = (
    "install the CUDA toolkit >= 12.8 so that `nvcc` is on PATH, then rebuild with "
    "`pip install --no-build-isolation -e packages/nmoe-kernels`"
)


def compiled_module(op: str) -> ModuleType:
    """`nmoe_kernels._C`, or a RuntimeError naming ``op`` when it is missing or has no CUDA ops."""
    try:
        module = importlib.import_module("nmoe_kernels._C")
    except ImportError as err:
        raise RuntimeError(
            f"{op}: the compiled module nmoe_kernels._C is not built ({err}); {REBUILD_HINT}"
        ) from err
    if not module.WITH_CUDA:
        raise RuntimeError(
            f"{op}: nmoe_kernels._C was built without nvcc, so it has no CUDA ops; "
            f"{REBUILD_HINT}. On CPU, use nmoe_kernels.reference.{op}."
        )
    return module


def check_cuda_tensors(op: str, **tensors: torch.Tensor) -> torch.device:
    """The common CUDA device of ``tensors``; a clear error when one is not on it."""
    device = None
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"{op}: {name} is on {tensor.device} and no CUDA GPU is visible; "
                    f"use nmoe_kernels.reference.{op} on CPU"
                )
            raise ValueError(
                f"{op}: {name} must be a CUDA tensor, got one on {tensor.device}; move it with "
                f".cuda() or use nmoe_kernels.reference.{op} on CPU"
            )
        if device is None:
            device = tensor.device
        elif tensor.device != device:
            raise ValueError(
                f"{op}: {name} is on {tensor.device} but the other inputs are on {device}; "
                "put all tensors on one GPU"
            )
    assert device is not None, "check_cuda_tensors needs at least one tensor"
    return device


def capsule(tensor: torch.Tensor) -> object:
    """A DLPack capsule of ``tensor`` (detached; float8 tensors go through a uint8 view)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.float8_e4m3fn:
        tensor = tensor.view(torch.uint8)
    return to_dlpack(tensor)


def stream_handle(device: torch.device) -> int:
    """The current torch CUDA stream of ``device`` as an integer handle for `_C`."""
    return int(torch.cuda.current_stream(device).cuda_stream)
