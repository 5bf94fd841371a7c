"""nmoe-comm: expert-parallel dispatch/combine behind one `Dispatcher` interface.

`create_dispatcher` picks a backend by name: ``local`` (one device, torch), ``nccl``
(torch.distributed all_to_all; NCCL on GPUs, gloo on CPUs), ``ipc`` (CUDA IPC inside one node)
and ``nvshmem`` (NVSHMEM through nvshmem4py, inside and across nodes). `nmoe_comm.reference`
gives the exact expected result of a dispatch over any number of ranks, simulated in one
process; `nmoe_comm.autograd` makes dispatch and combine differentiable for the MoE layer. The
contract every backend keeps is in `nmoe_comm.dispatcher`.
"""

import nmoe_kernels

# Inclusive range of nmoe_kernels._C ABI versions this package was written against.
KERNELS_ABI_MIN = 1
KERNELS_ABI_MAX = 2
nmoe_kernels.require_abi("nmoe-comm", KERNELS_ABI_MIN, KERNELS_ABI_MAX)

from nmoe_comm.dispatcher import (  # noqa: E402
    CapacityError,
    Dispatched,
    Dispatcher,
    DispatchHandle,
)
from nmoe_comm.ipc import IpcDispatcher  # noqa: E402
from nmoe_comm.local import LocalDispatcher  # noqa: E402
from nmoe_comm.nccl import NcclDispatcher  # noqa: E402
from nmoe_comm.nvshmem import NvshmemDispatcher  # noqa: E402
from nmoe_comm.registry import (  # noqa: E402
    BackendUnavailableError,
    available_backends,
    buffer_size_hint,
    create_dispatcher,
    register_backend,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CapacityError",
    "Dispatched",
    "DispatchHandle",
    "Dispatcher",
    "IpcDispatcher",
    "LocalDispatcher",
    "NcclDispatcher",
    "NvshmemDispatcher",
    "available_backends",
    "buffer_size_hint",
    "create_dispatcher",
    "register_backend",
    "__version__",
]
