"""Access to the compiled transport `nmoe_comm._C` (CUDA IPC helpers and the RDEP kernels).

`missing_transport` says why the ``ipc`` / ``nvshmem`` backends cannot run here (module not
built, built without nvcc, no GPU), or returns None.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

REBUILD_HINT = (
    "install the CUDA toolkit >= 12.8 so that `nvcc` is on PATH, then rebuild with "
    "`pip install --no-build-isolation -e packages/nmoe-comm`"
)


def compiled_module() -> ModuleType:
    """`nmoe_comm._C` with its CUDA transport, or RuntimeError saying what is missing."""
    reason = missing_transport(need_gpu=False)
    if reason is not None:
        raise RuntimeError(reason)
    return importlib.import_module("nmoe_comm._C")


def missing_transport(*, need_gpu: bool = True) -> str | None:
    """Why the compiled GPU transport cannot run in this process, or None when it can."""
    try:
        module = importlib.import_module("nmoe_comm._C")
    except ImportError as err:
        return f"the compiled module nmoe_comm._C is not built ({err}); {REBUILD_HINT}"
    if not module.WITH_CUDA:
        return f"nmoe_comm._C was built without nvcc, so it has no CUDA transport; {REBUILD_HINT}"
    if need_gpu and not torch.cuda.is_available():
        return "no CUDA GPU is visible to this process"
    return None


def current_stream(device: torch.device) -> int:
    """The current torch CUDA stream of ``device`` as an integer handle for `_C`."""
    return int(torch.cuda.current_stream(device).cuda_stream)
