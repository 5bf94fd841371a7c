"""Access to the compiled module `nmoe_comm._C` (CUDA IPC helpers, the RDEP kernels, the slot
sum of the ``local`` backend).

`missing_transport` says why the ``ipc`` / ``nvshmem`` backends cannot run here (module not
built, built without nvcc, no GPU), or returns None. `slot_sum_kernel` gives the ``local``
backend its CUDA slot reduction, or None with the reason (`missing_slot_sum`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType

import torch

#: The `nmoe_comm._C` ABI version that added ``sum_slots``; an older build lacks it.
SLOT_SUM_ABI = 3
#: The ABI whose kernels count barrier epochs on the device (the engine passes a flag where
#: older builds took the host's epoch, so it must not run on them).
DEVICE_EPOCH_ABI = 4
#: The ABI this Python code drives: the combine's token phases became a per-dispatch argument of
#: dispatch_stream and combine_stream (10); zero-copy outputs changed the Rdep constructor
#: (view_off) and dispatch_stream (direct) (9); the module exports STREAM_CHUNK_ROWS_MAX (8);
#: dispatch_stream takes its chunk rows (7); the pipelined transport changed route_plan's
#: signature and the Rdep constructor's (6).
RDEP_ABI = 10

#: Row dtype codes of `nmoe_comm._C` (its ``RowDtype``).
ROW_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

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
    if module.ABI_VERSION < RDEP_ABI:
        return (f"nmoe_comm._C has ABI {module.ABI_VERSION}, older than the {RDEP_ABI} this "
                f"Python code drives (the pipelined transport since 6, partial sums on the "
                f"owners since 5); rebuild with "
                f"`pip install --no-build-isolation -e packages/nmoe-comm`")
    if need_gpu and not torch.cuda.is_available():
        return "no CUDA GPU is visible to this process"
    return None


def current_stream(device: torch.device) -> int:
    """The current torch CUDA stream of ``device`` as an integer handle for `_C`."""
    return int(torch.cuda.current_stream(device).cuda_stream)


def _raw_stream_getter() -> Callable[[int], int]:
    """``f(device_index) -> int``: the current torch CUDA stream as an integer, without building
    a `torch.cuda.Stream` object (microseconds per call on the hot path)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw
    return lambda index: int(torch.cuda.current_stream(index).cuda_stream)


#: ``current_raw_stream(device_index)``: the current torch CUDA stream of that device as an int.
current_raw_stream = _raw_stream_getter()


@functools.cache
def _slot_sum() -> tuple[Callable | None, str | None]:
    try:
        module = importlib.import_module("nmoe_comm._C")
    except ImportError as err:
        return None, f"nmoe_comm._C is not built ({err}); {REBUILD_HINT}"
    if not module.WITH_CUDA:
        return None, f"nmoe_comm._C was built without nvcc; {REBUILD_HINT}"
    if module.ABI_VERSION < SLOT_SUM_ABI:
        return None, (f"nmoe_comm._C has ABI {module.ABI_VERSION}, older than the "
                      f"{SLOT_SUM_ABI} that added sum_slots; rebuild with `pip install "
                      f"--no-build-isolation -e packages/nmoe-comm`")
    return module.sum_slots, None


def slot_sum_kernel() -> Callable | None:
    """`nmoe_comm._C.sum_slots` (the ``local`` backend's CUDA slot reduction), or None when this
    build lacks it (see `missing_slot_sum`). Decided once per process."""
    return _slot_sum()[0]


def missing_slot_sum() -> str | None:
    """Why `slot_sum_kernel` is None here (module not built, built without nvcc, built before
    ABI 3), or None when the kernel is present. Does not look for a GPU."""
    return _slot_sum()[1]
