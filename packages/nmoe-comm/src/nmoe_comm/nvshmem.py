"""``nvshmem``: expert-parallel dispatch over NVSHMEM (nvshmem4py), inside and across nodes.

The same RDEP algorithm and kernels as ``ipc`` (`nmoe_comm.rdep`), with NVSHMEM as the transport:

- **Bootstrap**: rank 0 of the group creates an NVSHMEM unique id, torch.distributed broadcasts
  it, every rank calls ``nvshmem.core.init(uid=..., rank=..., nranks=...)``. NVSHMEM is
  initialised once per process; its world is this dispatcher's group, so every nvshmem
  dispatcher of a process must use the same group. The symmetric heap is sized from the first
  dispatcher (``NVSHMEM_SYMMETRIC_SIZE``, unless already set: set it yourself when a process
  creates several nvshmem dispatchers).
- **Buffers**: one symmetric allocation per rank with the `rdep.BufferLayout` of ``ipc``.
- **Peers on NVLink** (``nvshmem_ptr`` gives a mapping): the kernels store rows straight into the
  peer's symmetric buffer, exactly as ``ipc`` does.
- **Other peers** (other nodes): the kernels write those rows to a symmetric staging area, in an
  order that makes each peer's rows one contiguous chunk, and the host moves each chunk with one
  ``putmem_nbi_on_stream`` (the sizes come from the count matrix read at the dispatch's host
  synchronisation and kept in the handle).
- **Count exchange and barriers**: when every peer is mapped (one node), the GPU-side count
  exchange and epoch barriers of ``ipc`` (nothing on the host stream between kernels); otherwise
  ``int32_fcollect_on_stream`` of the count rows and ``barrier_all_on_stream`` (which also
  completes the puts). ``peer_access="puts"`` forces the second path on one node (every other
  rank is treated as unmapped: rows staged, moved by NVSHMEM puts), so the multi-node data path
  can be tested on a single machine.

Why puts from the host and not from the kernels: device-initiated NVSHMEM (``nvshmem_putmem_nbi``
inside a kernel) needs the NVSHMEM device library linked into the kernel's module and that
module registered with NVSHMEM (``nvshmemx_cumodule_init``); nvshmem4py offers this only for
kernels written in Numba-CUDA or CuTe DSL, not for a precompiled CUDA C++ extension like
``nmoe_comm._C``. Inside one node nothing is put (every peer is mapped), so the tested path has
the same data movement as ``ipc``; the staged-put path for other nodes is written but has not
run on several nodes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from nmoe_comm import _extension
from nmoe_comm.ipc import check_group, cuda_device
from nmoe_comm.rdep import RdepDispatcher
from nmoe_comm.registry import BackendUnavailableError, register_backend

_INSTALL_HINT = (
    "install nvshmem4py-cu13>=0.4.1 with its dependencies (cuda-python>=13 for cuda.bindings, "
    "cuda.core>=0.5, cuda.pathfinder, nvidia-nvshmem-cu13): pip install 'nmoe-comm[nvshmem]'"
)
#: Process-wide NVSHMEM state: initialised once, for one group (rank, world size).
_RUNTIME: dict[str, object] = {}


def _import_nvshmem():
    """``(nvshmem.core, nvshmem.bindings, cuda.core.Device)`` or an error naming what failed."""
    try:
        import nvshmem.bindings as bindings
        import nvshmem.core as core
        from cuda.core import Device
    except Exception as err:  # noqa: BLE001 (ImportError, missing shared libraries, ...)
        raise BackendUnavailableError(
            f"dispatcher backend 'nvshmem' cannot run here: nvshmem4py does not import "
            f"({type(err).__name__}: {err}); {_INSTALL_HINT}") from err
    return core, bindings, Device


def _missing() -> str | None:
    missing = _extension.missing_transport()
    if missing:
        return missing
    try:
        _import_nvshmem()
    except BackendUnavailableError as err:
        return str(err).split(": ", 1)[1]
    if not dist.is_available() or not dist.is_initialized():
        return "torch.distributed is not initialised; call init_process_group (torchrun) first"
    return None


def _initialise(group, world_size: int, rank: int, device: torch.device, heap_bytes: int):
    """NVSHMEM for this process (once): unique id from group rank 0, broadcast, init."""
    core, bindings, device_cls = _import_nvshmem()
    if _RUNTIME:
        if (_RUNTIME["world"], _RUNTIME["rank"]) != (world_size, rank):
            raise ValueError(
                f"NVSHMEM was initialised in this process for rank {_RUNTIME['rank']} of "
                f"{_RUNTIME['world']}; every nvshmem dispatcher of a process must use that group")
        return core, bindings
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(heap_bytes))
    cuda_dev = device_cls(device.index)
    cuda_dev.set_current()
    uid = core.get_unique_id(empty=rank != 0)
    raw = [uid._data.tobytes() if rank == 0 else None]
    source = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast_object_list(raw, src=source, group=group)
    if rank != 0:
        import numpy as np

        uid._data.view(np.int8)[:] = np.frombuffer(raw[0], dtype=np.int8)
    core.init(device=cuda_dev, uid=uid, rank=rank, nranks=world_size, initializer_method="uid")
    _RUNTIME.update(world=world_size, rank=rank)
    return core, bindings


def finalize() -> None:
    """Finalize NVSHMEM in this process once every nvshmem dispatcher was destroyed. Collective:
    every rank of the group calls it. A no-op when NVSHMEM was not initialised here."""
    if not _RUNTIME:
        return
    core, _, _ = _import_nvshmem()
    core.finalize()
    _RUNTIME.clear()


class NvshmemDispatcher(RdepDispatcher):
    """Dispatch/combine over NVSHMEM symmetric memory; see the module docstring.

    Args: as `nmoe_comm.ipc.IpcDispatcher` (``num_experts``, ``capacity``, ``world_size``,
    ``rank``, ``hidden``, ``dtype``, ``max_send_rows``, ``group``, ``device``, ``timeout_s`` for
    the GPU-side barriers, ``dedup_rows``, ``reduce_on_owner``, ``pipelined`` and ``zero_copy``,
    used when every peer is mapped; ``zero_copy`` gives views on any group), plus
    ``peer_access``: "auto" (stores to every peer NVSHMEM maps, puts to the others) or "puts"
    (puts to every other rank, the multi-node path; for tests).

    Raises:
        BackendUnavailableError: nvshmem4py (or a dependency) missing, no compiled transport,
            no GPU, torch.distributed not initialised.
    """

    name = "nvshmem"
    _device_barriers = False

    def __init__(
        self,
        num_experts: int,
        capacity: int,
        world_size: int = 1,
        rank: int = 0,
        *,
        hidden: int,
        dtype: torch.dtype = torch.bfloat16,
        max_send_rows: int | None = None,
        group: dist.ProcessGroup | None = None,
        device: torch.device | int | None = None,
        timeout_s: float = 100.0,
        dedup_rows: bool = False,
        reduce_on_owner: bool = False,
        pipelined: bool | None = None,
        peer_access: str = "auto",
        zero_copy: bool = False,
    ):
        super().__init__(num_experts, capacity, world_size, rank)
        if peer_access not in ("auto", "puts"):
            raise ValueError(f"peer_access must be 'auto' or 'puts', got {peer_access!r}")
        missing = _extension.missing_transport()
        if missing:
            raise BackendUnavailableError(f"dispatcher backend 'nvshmem' cannot run here: "
                                          f"{missing}")
        check_group(group, world_size, rank)
        self._init_engine(hidden=hidden, dtype=dtype, max_send_rows=max_send_rows,
                          timeout_s=timeout_s, dedup_rows=dedup_rows,
                          reduce_on_owner=reduce_on_owner, pipelined=pipelined,
                          zero_copy=zero_copy)
        self.group = group
        device = cuda_device(device)
        layout = self.layout
        heap = int(1.25 * (layout.total_bytes + layout.stage_bytes)) + (256 << 20)
        core, bindings = _initialise(group, world_size, rank, device, heap)
        self._core, self._bindings = core, bindings
        self._team = int(bindings.Team_id.TEAM_WORLD)

        everyone = [None] * world_size
        mine = (layout, dedup_rows, reduce_on_owner, self.pipelined, zero_copy)
        dist.all_gather_object(everyone, mine, group=group)
        if any(other != mine for other in everyone):
            raise ValueError("ranks sized their buffers differently (capacity, hidden, dtype, "
                             "max_send_rows or num_experts differ) or passed different "
                             "dedup_rows / reduce_on_owner / pipelined / zero_copy; pass the same "
                             "values")
        with torch.cuda.device(device):
            self._buffer = core.buffer(layout.total_bytes)  # collective
            base = int(self._buffer.handle)
            self._bytes = torch.from_dlpack(self._buffer)  # uint8 view, for zeroing and counts
            self._bytes.zero_()
            bases = [int(bindings.ptr(base, pe)) for pe in range(world_size)]
            if peer_access == "puts":
                bases = [b if pe == rank else 0 for pe, b in enumerate(bases)]
            unmapped = [None] * world_size
            dist.all_gather_object(unmapped, any(b == 0 for b in bases), group=group)
            # Every peer mapped everywhere: GPU-side exchange and barriers, as ipc.
            self._device_barriers = not any(unmapped)
            self._stage_buffer = core.buffer(layout.stage_bytes) if any(unmapped) else None
            stage = 0 if self._stage_buffer is None else int(self._stage_buffer.handle)
            torch.cuda.synchronize(device)
            self._stream_barrier(_extension.current_stream(device))
            torch.cuda.synchronize(device)
        self._attach(device, base, bases, stage)
        offset = layout.counts_off
        self._counts = self._bytes[offset:offset + 4 * world_size * (num_experts + 1)].view(
            torch.int32).view(world_size, num_experts + 1)

    def _count_exchange(self, stream: int) -> None:
        layout = self.layout
        self._bindings.int32_fcollect_on_stream(
            self._team, self._local_base + layout.counts_off,
            self._local_base + layout.counts_src_off, self.num_experts + 1, stream)

    def _stream_barrier(self, stream: int) -> None:
        self._bindings.barrier_all_on_stream(stream)

    def _put(self, stream: int, pe: int, dst_off: int, src_stage_off: int, nbytes: int) -> None:
        # The destination is this rank's address of the symmetric region; NVSHMEM maps it to pe.
        self._bindings.putmem_nbi_on_stream(self._local_base + dst_off,
                                            self._stage + src_stage_off, nbytes, pe, stream)

    def _counts_view(self) -> torch.Tensor:
        return self._counts

    def destroy(self) -> None:
        """Barrier and free the symmetric buffers (collective: every rank calls it). NVSHMEM
        itself stays initialised for the life of the process."""
        if self._destroyed:
            return
        stream = _extension.current_stream(self.device)
        self._barrier(stream)
        self._stream_barrier(stream)
        torch.cuda.synchronize(self.device)
        del self._counts, self._bytes
        self._view = None  # zero-copy views still held by the caller dangle from here on
        with torch.cuda.device(self.device):
            if self._stage_buffer is not None:
                self._core.free(self._stage_buffer)
            self._core.free(self._buffer)
        self._destroyed = True


register_backend(
    "nvshmem",
    NvshmemDispatcher,
    summary="NVSHMEM (nvshmem4py): NVLink stores inside a node, staged puts across nodes",
    missing=_missing,
)
