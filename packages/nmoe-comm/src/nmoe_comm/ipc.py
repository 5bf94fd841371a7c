"""``ipc``: expert-parallel dispatch inside one node over CUDA IPC (NVLink), no collectives.

At construction every rank allocates one buffer with ``cudaMalloc`` (`rdep.BufferLayout`, sized
from ``capacity``; `IpcDispatcher.buffer_size_hint` gives its bytes), exports a CUDA IPC handle,
and the handles are exchanged once over torch.distributed (``all_gather_object``); each rank then
maps every peer's buffer. On the hot path the kernels of `nmoe_comm.rdep` store rows straight
into the owners' buffers and back, and synchronise with GPU-side barriers (epoch flags written
with release stores, read with acquire loads); there is no NCCL call and one host
synchronisation per dispatch (the shape of ``x_RD``). Needs every rank on one host, every GPU of
the group visible to every process (do not narrow ``CUDA_VISIBLE_DEVICES`` per rank) and
peer-to-peer access between them.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from nmoe_comm import _extension
from nmoe_comm.rdep import RdepDispatcher
from nmoe_comm.registry import BackendUnavailableError, register_backend


def check_group(group: dist.ProcessGroup | None, world_size: int, rank: int) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise BackendUnavailableError(
            "torch.distributed is not initialised; call torch.distributed.init_process_group "
            "(torchrun) before creating a multi-rank dispatcher")
    size, me = dist.get_world_size(group), dist.get_rank(group)
    if (size, me) != (world_size, rank):
        raise ValueError(
            f"world_size={world_size}, rank={rank} do not match the process group (size {size}, "
            f"this process is rank {me}); pass the group's values")


def cuda_device(device: torch.device | int | str | None) -> torch.device:
    """``device`` as ``torch.device("cuda", index)``; None means the current CUDA device."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device}")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None
                        else device.index)


def _local_index_of(uuid: str) -> int | None:
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return index
    return None


class IpcDispatcher(RdepDispatcher):
    """Dispatch/combine inside one node through CUDA IPC mappings of every rank's buffer.

    Args:
        num_experts: ``E``, divisible by ``world_size``.
        capacity: the most rows one rank may receive per dispatch (sizes the landing rows).
        world_size: ``W``, ranks in ``group`` (2-8 GPUs of one node in practice).
        rank: this rank in ``group``.
        hidden: the widest row in elements (dispatched ``D`` and combined ``D'``).
        dtype: the widest row dtype (float32 rows need ``dtype=torch.float32``).
        max_send_rows: the most slots ``T * K`` one rank sends per dispatch (sizes the return
            rows); None means ``capacity``.
        group: the process group (default: world); used only at construction and destroy.
        device: this rank's GPU (default: the current CUDA device).
        timeout_s: a GPU barrier waiting longer than this traps with a message naming the rank
            it waits for (a rank that skipped a call, or crashed).
        dedup_rows: move each token's row once per owner instead of once per slot (fewer bytes
            over NVLink, bitwise the same results; see `nmoe_comm.rdep`). The same on every rank.
        reduce_on_owner: with ``dedup_rows``, the combine (without explicit gates) and the
            dispatch backward also send one row per token and owner: the owner sums the token's
            slots first, and the source sums those partial rows (each rounded to the rows'
            dtype; deterministic, `nmoe_comm.rdep` says the order). The same on every rank.
        pipelined: run each dispatch and combine as one kernel whose local copies (landing
            order to contract order; the slot sums) overlap the NVLink transfers, chunk by
            chunk (`nmoe_comm.rdep`); False runs the two-kernel path with a barrier between;
            None (default) picks the pipelined kernels when ``max_send_rows`` is at least
            `nmoe_comm.rdep.PIPELINE_MIN_SEND_ROWS` (4096) and, with ``dedup_rows``, rows have at
            least 4096 bytes: decode-sized dispatchers and deduplicated narrow rows stay on the
            two-kernel path, which measured faster there. Bitwise the same results. The same on
            every rank.
        zero_copy: return each dispatch's ``x_RD`` (and FP8 ``x_scales_RG``) as views of
            ``capacity`` output rows in the buffer (``capacity * row bytes`` more memory per
            rank) instead of fresh tensors; on the pipelined path without ``dedup_rows`` the
            sources then store each row straight at its final row on the owner, and no row is
            copied on the owner. The views hold until this rank's next ``dispatch`` and until
            `destroy`: for inference (a decode or prefill step that consumes ``x_RD`` before the
            next layer's dispatch), not for training (autograd refuses it). Bitwise the same
            rows. The same on every rank.

    Raises:
        BackendUnavailableError: no compiled transport, no GPU, torch.distributed not
            initialised, ranks on different hosts, a peer GPU not visible or without P2P access.
    """

    name = "ipc"

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
        zero_copy: bool = False,
    ):
        super().__init__(num_experts, capacity, world_size, rank)
        missing = _extension.missing_transport()
        if missing:
            raise BackendUnavailableError(f"dispatcher backend 'ipc' cannot run here: {missing}")
        check_group(group, world_size, rank)
        self._init_engine(hidden=hidden, dtype=dtype, max_send_rows=max_send_rows,
                          timeout_s=timeout_s, dedup_rows=dedup_rows,
                          reduce_on_owner=reduce_on_owner, pipelined=pipelined,
                          zero_copy=zero_copy)
        self.group = group
        device = cuda_device(device)
        c_module = _extension.compiled_module()
        me = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid),
              self.layout, (dedup_rows, reduce_on_owner, self.pipelined, zero_copy))
        everyone = [None] * world_size
        dist.all_gather_object(everyone, me, group=group)
        self._check_group(everyone, device, c_module)

        self._base = c_module.alloc(device.index, self.layout.total_bytes)
        handles = [None] * world_size
        dist.all_gather_object(handles, c_module.ipc_handle(device.index, self._base),
                               group=group)
        self._opened = []
        bases = []
        for peer, handle in enumerate(handles):
            if peer == rank:
                bases.append(self._base)
            else:
                bases.append(c_module.ipc_open(device.index, handle))
                self._opened.append(bases[-1])
        self._attach(device, self._base, bases, stage=0)

    def _check_group(self, everyone, device: torch.device, c_module) -> None:
        hosts = {host for host, _, _, _ in everyone}
        if len(hosts) != 1:
            raise BackendUnavailableError(
                f"the ipc backend needs every rank on one host, got {sorted(hosts)}; use nvshmem "
                f"or nccl across nodes")
        for peer, (_, uuid, layout, options) in enumerate(everyone):
            mine = (self.dedup_rows, self.reduce_on_owner, self.pipelined, self.zero_copy)
            if options != mine:
                raise ValueError(
                    f"rank {peer} passed (dedup_rows, reduce_on_owner, pipelined, zero_copy)="
                    f"{options}, this rank {mine}; every rank must pass the same values")
            if layout != self.layout:
                raise ValueError(
                    f"rank {peer} sized its buffer differently (capacity, hidden, dtype, "
                    f"max_send_rows or num_experts differ); every rank must pass the same values")
            index = _local_index_of(uuid)
            if index is None:
                raise BackendUnavailableError(
                    f"rank {peer}'s GPU ({uuid}) is not visible in this process; the ipc backend "
                    f"needs every GPU of the group visible to every rank (do not narrow "
                    f"CUDA_VISIBLE_DEVICES per rank)")
            if not c_module.can_access_peer(device.index, index):
                raise BackendUnavailableError(
                    f"cuda:{device.index} cannot access rank {peer}'s GPU cuda:{index} peer to "
                    f"peer (no NVLink/PCIe P2P); use the nccl backend")

    def destroy(self) -> None:
        """Barrier, unmap the peers' buffers, wait for every rank, free this rank's buffer.
        Collective: every rank calls it."""
        if self._destroyed:
            return
        c_module = _extension.compiled_module()
        stream = _extension.current_stream(self.device)
        self._rdep.barrier(self._sync_peers(), stream)
        torch.cuda.synchronize(self.device)
        for base in self._opened:
            c_module.ipc_close(self.device.index, base)
        dist.barrier(group=self.group)
        self._view = None  # zero-copy views still held by the caller dangle from here on
        c_module.free(self.device.index, self._base)
        self._destroyed = True


def _missing() -> str | None:
    missing = _extension.missing_transport()
    if missing:
        return missing
    if torch.cuda.device_count() < 2:
        return f"it needs 2 or more GPUs on one node; {torch.cuda.device_count()} visible"
    if not dist.is_available() or not dist.is_initialized():
        return "torch.distributed is not initialised; call init_process_group (torchrun) first"
    return None


register_backend(
    "ipc",
    IpcDispatcher,
    summary="CUDA IPC over NVLink inside one node; GPU-side barriers, no collectives",
    missing=_missing,
)
