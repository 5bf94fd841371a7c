"""RDEP over peer memory: the engine shared by the ``ipc`` and ``nvshmem`` backends.

Every rank allocates one buffer, once, sized from ``capacity`` (`BufferLayout`); every rank can
store into every peer's buffer (CUDA IPC mappings, or NVSHMEM's ``nvshmem_ptr``). There is no
all-to-all: sources write their rows straight into the owners' buffers, owners write results
straight back. The kernels are in ``csrc/rdep_kernels.cu``; this module checks arguments, sizes
the outputs and sequences the launches. Letters as in `nmoe_comm.dispatcher`; ``N = T * K``
slots of this rank, ``L = E / W`` local experts.

Three orders of rows (all follow from the count matrix ``C [W, E]``, ``C[s, e]`` = slots of rank
``s`` routed to expert ``e``, by prefix sums; nothing is sorted on the owner):

- **send order**: a source's slots sorted by (expert, token, slot), stable; owner-major.
- **landing order**: an owner's rows by (source, local expert, token, slot); each source's rows
  for one owner are one contiguous chunk of its send order (so one put can move them).
- **contract order**: (local expert, source, token, slot), the layout of rule 1.

Dispatch (``route_plan`` -> ``scatter_slots`` -> one host sync -> ``unpack``):

1. ``route_plan`` (one block per 2048 slots, at most one per SM, meeting at grid barriers):
   per-expert counts of this rank's slots and each slot's send position (warp-private
   histograms, per-block counts summed over the blocks before, no sort); the count row goes to
   every peer's count matrix (CUDA IPC: direct stores, then a GPU barrier; NVSHMEM: an
   ``fcollect`` on the stream); then,
   from the full matrix, each slot's landing row on its owner, this rank's ``counts_E``, and a
   status that every rank computes identically: a bad expert id anywhere, a rank sending more
   than ``max_send_rows`` slots, rows too wide for the buffer, or an owner over ``capacity``.
2. ``scatter_slots``: one warp per slot stores the row (or its FP8 quantization and scales) and
   the gate into the owner's landing row; nothing is written when the status is not OK, so
   overflow is decided before any write. The last block runs the completion barrier.
3. The one host synchronisation per dispatch: the status and ``R`` (the shape of ``x_RD``) are
   read; errors raise on every rank alike (`CapacityError`, ValueError).
4. ``unpack``: landing order -> contract order into fresh ``x_RD`` / ``gates_R`` tensors (the
   buffer is reused by the next call, so the rows are copied out once), plus per-row routing.

Sync-free dispatch (``sync=False``, contract rule 7) skips step 3: the output tensors get
``capacity`` rows, ``unpack`` reads ``R`` from the plan's info on the device and walks only the
first R rows, and so do ``return_rows`` and ``owner_grad`` of that handle's combine and
backwards. A failed plan writes ``R = 0`` and zero ``counts_E``; the scatters of the dispatch and
of ``combine_backward`` test the handle's status and move nothing, ``reduce_slots`` /
``gather_dots`` skip a rank that sent more than ``max_send_rows`` slots (its send positions would
point past the return buffer), so every later call of the handle is safe and keeps the barriers;
`RdepDispatcher.check_dispatch` raises the error. It needs every peer mapped (the NVSHMEM puts
path sizes its puts on the host).

CUDA graphs: the in-kernel barriers count their epochs on the device (a counter in each rank's
buffer), so sync-free dispatches, combines and backwards captured in a CUDA graph replay with
fresh epochs, and nothing in those calls reads back to the host: a decode step's dispatch and
combine can be captured once and replayed (`check_cuda_graph` in `nmoe_comm.testing` does it
against the reference). Every rank must capture the same calls and replay its graph as often
as the others, in the same order relative to its eager calls, like any sequence of dispatcher
calls. Capture whole dispatch -> combine cycles: the entry barriers (below) are decided at
capture time from the call before, and a cycle ends in the state its first call expects.
``dispatch(sync=True)`` and `check_dispatch` read the host and raise during a capture.

Per-call state (the plan's info, ``counts_E``, send positions, landing rows, the ``_R`` routing
vectors) is allocated per dispatch in two torch allocations and owned by the handle, never a view
of reused scratch: several handles of one dispatcher may be alive at once (the MoE layers of
nmoe-core keep one dispatcher per layer, but the fused path re-dispatches ``dOut`` in the
backward while the forward's handle is still needed). ``stage_hook`` reports each stage for the
benchmark's ``--breakdown``.

``dedup_rows=True`` (an option of ``ipc`` / ``nvshmem``; used when every peer is mapped): step 2
moves each token's row once per owner instead of once per slot, into the landing row of the
token's first slot routed to that owner, and every slot's 16-byte trailer names that row next to
its gate; ``unpack`` copies from the named row. With top-8 of 256 experts over 4 ranks a token
reaches about 2.7 other ranks instead of sending 6 rows to them, so the dispatch moves about 2.2x
fewer bytes over NVLink (about 4x on 2 ranks, 1.5x on 8); results are bitwise the same (every
copy of a token's row is the row). The combine keeps one row per slot: pre-summing a token's
slots on their owner changes the summation order that rule 2 fixes, unless asked for:

``reduce_on_owner=True`` (needs ``dedup_rows``): the combine direction sends one row per token
and owner too. Each slot's trailer also names the landing row of the token's next slot on the
same owner (a chain in slot order, recorded by ``unpack``), and ``head_N`` marks each token's
first slot per owner. ``combine(y_RD, handle)`` without gates (the dispatch's gates, which the
owner received as ``gates_R``) and ``dispatch_backward`` then run ``owner_reduce``: per token
and owner the float32 sum over the token's slots there, slot order, of ``gate * y`` (of the
rows, for the backward), every product and sum rounded on its own, rounded to the rows' dtype
and stored at the first slot's send position; ``reduce_slots`` sums those partial rows over the
owners in float32, in the order of each owner's first slot, and rounds to the dtype. So the
result is rule 2's up to the rounding of each owner's partial sum (exact for float32 rows, and
for tokens whose slots share one owner); it is deterministic and `nmoe_comm.reference` computes
it bitwise (``reduce_on_owner=True``). A combine given explicit gates keeps the per-slot rows.

Combine and ``dispatch_backward``: ``return_rows`` stores each row into its source's return
buffer at the slot's send position (barrier), ``reduce_slots`` sums each token's K slots in
fixed order with float32 products and sums rounded separately (rule 2). ``combine_backward``:
``scatter_slots`` sends ``dOut[t]`` and the gate to each slot's landing row (the forward's), the
owner forms ``grad_y`` and ``<dOut, y>`` per row and stores the dot at the source
(``owner_grad``), the source gathers ``dGates``. None of these synchronise with the host.

Pipelined kernels (``pipelined``, the default for dispatchers of at least 4096 slots per rank,
and for deduplicated rows only from 4 KiB; every peer mapped; csrc/rdep_stream.cu): steps 2 and
4 run as ONE kernel, ``dispatch_stream``: sender blocks walk the send order (``slot_of_send``,
written by ``route_plan``) in chunks of 32 rows of one owner (consecutive landing rows), store
them and publish each chunk with a flag on the owner; receiver blocks copy each published chunk
to contract order while later chunks cross, and also record each row's token phase
(``phase_R``, ``stream_phases`` phases by token index at the source); rows a rank owns itself go
straight to contract order. A synchronous dispatch's host sync then comes right after
``route_plan`` (the kernel needs its outputs sized). The combine of such a handle (not the
owners' partial sums) is ``combine_stream``: senders return rows phase by phase, the last sender
block of a phase publishes it on every source, and reducer blocks sum a phase's tokens (as
``reduce_slots``) once all owners published it. Flags carry a per-rank stream epoch counted on
the device; no barrier closes either kernel (a combine's completion implies every owner finished
its dispatch kernel and its returns, which keeps the reuse rules below valid).

Zero-copy outputs (``zero_copy=True``, an option of ``ipc`` / ``nvshmem``): the buffer gains
``capacity`` rows of outputs and a dispatch returns ``x_RD`` (and FP8 ``x_scales_RG``) as views
of them instead of fresh tensors. On the pipelined path without ``dedup_rows`` the senders store
each slot's payload straight at its contract row on the owner (``direct``: the owner's rank, its
local expert and the count matrix give the row), so the receivers only record the routing from
the trailers and no row is copied twice; elsewhere the unpack writes into the views. The views
hold until this rank's next ``dispatch`` (whose senders may overwrite them once every rank has
entered it) and until ``destroy``: use them before, or copy them; autograd refuses such a
dispatcher (activations kept for the backward would be overwritten).

Reuse of the buffer: each call's writes are followed by a barrier before they are read, and a
region read *after* a call's last barrier (``RECV``/``COUNTS`` by ``unpack``, ``RET`` by
``reduce_slots``, ``DOTS`` by the gather) gets an extra entry barrier before the next call that
writes it (two dispatches in a row, two combines in a row); the usual dispatch, combine,
dispatch, ... alternation needs none. Ranks with no rows join every barrier (rule 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nmoe_comm import _extension
from nmoe_comm.dispatcher import (
    ROW_DTYPES,
    CapacityError,
    Dispatched,
    Dispatcher,
    DispatchHandle,
)
from nmoe_comm.quantization import check_fp8_rows, quantize_rows_fp8
from nmoe_comm.validation import check_dispatch_inputs, check_gates, check_rows, check_tensor

RECV, COUNTS, RET, DOTS = "recv", "counts", "ret", "dots"
_DISPATCH_READS = frozenset({COUNTS, RECV})  # read by unpack after the dispatch's last barrier
_RECV, _RET, _DOTS, _NOTHING = frozenset({RECV}), frozenset({RET}), frozenset({DOTS}), frozenset()
_COUNTS = frozenset({COUNTS})

_ALIGN = 128
_TRAILER_BYTES = 16  # per landing row: float32 gate, 12 bytes reserved
_DTYPE_CODE = _extension.ROW_DTYPE_CODES
# Plan status codes (csrc/rdep.h PlanStatus) and count-row flags (CountFlags).
_OK, _OVER_CAPACITY, _BAD_ID, _TOO_MANY_SLOTS, _ROW_TOO_WIDE = 0, 1, 2, 3, 4
_FLAG_TOO_MANY_SLOTS, _FLAG_ROW_TOO_WIDE = 2, 4
_ROUTE, _EXCHANGE, _PLAN = 1, 2, 4
# The pipelined transport (csrc/rdep.h): rows of capacity per dispatch flag (a chunk is a
# multiple of them), the most token phases of a combine, and the words of the counter region
# (checked against the compiled module when attaching).
_STREAM_FLAG_ROWS, _STREAM_PHASES_MAX, _COUNTER_WORDS = 8, 64, 80
_STREAM_CHUNK_ROWS_MAX = 256


#: ``pipelined=None`` turns the pipelined kernels on for dispatchers sized for at least this many
#: slots per rank (``max_send_rows``). On 4 x H200 they were faster at 32768-131072 slots and
#: slower at a decode step's 1024 (each combine phase costs a fence and a flag hop).
PIPELINE_MIN_SEND_ROWS = 4096
#: ... and, with ``dedup_rows``, rows of at least this many bytes: deduplicated dispatches of
#: narrow rows ran slower pipelined on 4 x H200 (768 bfloat16: 810 against 732 us; 2048: equal;
#: 7168: 747 against 834), and so did `super`'s expert-parallel training step (hidden 768).
PIPELINE_MIN_DEDUP_ROW_BYTES = 4096
#: The pipelined dispatch's grid on a ``zero_copy`` dispatcher with one row per slot: its
#: receivers only record the routing (the sources store the rows at their final place), so more
#: blocks send. On 4 x H200 (CUDA-graph loop, two runs; bench/results/dispatch_4xH200_zero_copy.txt)
#: 85% senders took 1063 us against 1089-1091 at 75% for (4096, 7168, 8), 540 against 572 at
#: (16384, 768, 8) and 500 against 509-510 at (8192, 2048, 6); 80% and 90% fell in between.
ZERO_COPY_DISPATCH_GRID = (2, 85, 32)


def check_stream_grids(dispatch_grid, combine_grid) -> None:
    """Raise ValueError unless ``dispatch_grid`` is (blocks per SM >= 1, percent of senders in
    [0, 100], rows per chunk: a multiple of 8 from 8 to 256) and ``combine_grid`` is (blocks per
    SM >= 1, percent of senders in [0, 100]), all ints (`RdepDispatcher.dispatch_grid`)."""
    for name, grid, size in (("dispatch_grid", dispatch_grid, 3), ("combine_grid", combine_grid,
                                                                   2)):
        if (not isinstance(grid, tuple | list) or len(grid) != size
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in grid)):
            raise ValueError(f"RdepDispatcher.{name} must be a tuple of {size} ints, got "
                             f"{grid!r}")
        if grid[0] < 1 or not 0 <= grid[1] <= 100:
            raise ValueError(f"RdepDispatcher.{name} = {tuple(grid)}: blocks per SM must be >= 1 "
                             f"and the percent of sender blocks in [0, 100]")
    chunk = dispatch_grid[2]
    if chunk % _STREAM_FLAG_ROWS or not _STREAM_FLAG_ROWS <= chunk <= _STREAM_CHUNK_ROWS_MAX:
        raise ValueError(f"RdepDispatcher.dispatch_grid[2] (rows per dispatch chunk) must be a "
                         f"multiple of {_STREAM_FLAG_ROWS} from {_STREAM_FLAG_ROWS} to "
                         f"{_STREAM_CHUNK_ROWS_MAX}, got {chunk}")


def check_stream_phases(phases) -> int:
    """``phases`` (`RdepDispatcher.stream_phases`) as an int, or ValueError unless it is an int
    from 1 to 64."""
    if not isinstance(phases, int) or isinstance(phases, bool) or not (
            1 <= phases <= _STREAM_PHASES_MAX):
        raise ValueError(f"RdepDispatcher.stream_phases must be an int from 1 to "
                         f"{_STREAM_PHASES_MAX}, got {phases!r}")
    return phases


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _align(value: int, to: int = _ALIGN) -> int:
    return (value + to - 1) // to * to


@dataclass(frozen=True)
class BufferLayout:
    """Byte offsets of one rank's buffer (the same on every rank; csrc/rdep.h ``Layout``).

    Attributes:
        row_bytes: the widest row payload, ``hidden * dtype.itemsize`` rounded up to 16.
        recv_stride: bytes per landing row: payload plus a 16-byte trailer (the gate).
        ret_stride: bytes per returned row.
        signal_off, counter_off, counts_off, counts_src_off, recv_off, ret_off, dots_off,
            dflags_off, cflags_off: region offsets (barrier epochs ``[W]`` u64; counters and
            epochs; count matrix ``[W, E+1]`` i32; this rank's count row ``[E+1]`` i32; landing
            rows ``[capacity]``; returned rows ``[max_send_rows]``; dots ``[max_send_rows]``
            f32; the pipelined dispatch's chunk flags ``[W, dflag_chunks]`` u64 and the
            pipelined combine's phase flags ``[W, 16]`` u64).
        dflag_chunks: chunks of 32 rows in ``capacity`` rows (a source's rows for one owner).
        view_off, view_bytes: the zero-copy outputs (``zero_copy``; else -1 and 0), last:
            ``capacity`` rows of the first payload, then from `view_p1_off` the second's.
        total_bytes: the whole buffer.
        stage_bytes: the staging area for peers without load/store access (NVSHMEM across
            nodes): the larger of a dispatch's staged rows and a combine's.
    """

    row_bytes: int
    recv_stride: int
    ret_stride: int
    signal_off: int
    counter_off: int
    counts_off: int
    counts_src_off: int
    recv_off: int
    ret_off: int
    dots_off: int
    dflags_off: int
    cflags_off: int
    dflag_chunks: int
    total_bytes: int
    stage_bytes: int
    view_off: int = -1
    view_bytes: int = 0

    @classmethod
    def plan(
        cls,
        *,
        capacity: int,
        hidden: int,
        dtype: torch.dtype,
        world_size: int,
        num_experts: int,
        max_send_rows: int,
        zero_copy: bool = False,
    ) -> BufferLayout:
        """The layout for ``capacity`` landing rows and ``max_send_rows`` returned rows of up
        to ``hidden`` elements of ``dtype``, and with ``zero_copy`` ``capacity`` output rows."""
        row_bytes = _align(hidden * torch.empty(0, dtype=dtype).element_size(), 16)
        recv_stride = row_bytes + _TRAILER_BYTES
        offsets, cursor = {}, 0
        dflag_chunks = -(-capacity // _STREAM_FLAG_ROWS)
        for name, size in (
            ("signal_off", 8 * world_size),
            ("counter_off", 4 * _COUNTER_WORDS),
            ("counts_off", 4 * world_size * (num_experts + 1)),
            ("counts_src_off", 4 * (num_experts + 1)),
            ("recv_off", capacity * recv_stride),
            ("ret_off", max_send_rows * row_bytes),
            ("dots_off", 4 * max_send_rows),
            ("dflags_off", 8 * world_size * dflag_chunks),
            ("cflags_off", 8 * world_size * _STREAM_PHASES_MAX),
        ):
            offsets[name] = cursor
            cursor = _align(cursor + size)
        if zero_copy:  # both payloads' rows: at most capacity * row_bytes plus the rounding
            offsets["view_off"], offsets["view_bytes"] = cursor, capacity * row_bytes + 16
            cursor = _align(cursor + offsets["view_bytes"])
        stage = max(max_send_rows * recv_stride, capacity * row_bytes)
        return cls(row_bytes=row_bytes, recv_stride=recv_stride, ret_stride=row_bytes,
                   dflag_chunks=dflag_chunks, total_bytes=cursor, stage_bytes=_align(stage),
                   **offsets)

    def view_p1_off(self, capacity: int, p0_bytes: int) -> int:
        """Offset in the zero-copy outputs of the second payload's rows (csrc ``view_p1_off``):
        ``capacity`` rows of ``p0_bytes``, rounded up to 16."""
        return _align(capacity * p0_bytes, 16)


@dataclass(frozen=True)
class RdepRouting:
    """`DispatchHandle.state` of an `RdepDispatcher` dispatch. Every tensor is owned by the
    handle (allocated per dispatch, never a view of reused scratch), so any number of handles may
    be alive at once (several layers, a forward and its backward's re-dispatch).

    Attributes:
        info_8: int64 ``[8]`` the plan's status (csrc/rdep.h ``PlanStatus``; ``info_8[3]`` is R).
        send_pos_N: int32 ``[N]``: each slot's position in this rank's send order.
        land_index_N: int32 ``[N]``: each slot's landing row on its owner.
        src_rank_R: int32 ``[R]``: the source of each received row.
        ret_index_R: int32 ``[R]``: each row's position in its source's send order.
        land_row_R: int32 ``[R]``: each row's landing row here.
        num_received: None (synchronous dispatch: ``R = src_rank_R.numel()``) or, for a
            sync-free dispatch, int64 ``[1]`` on the device holding R; the ``_R`` vectors then
            have ``capacity`` entries of which the first R are valid.
        row_bytes: bytes of a dispatched row (payloads), for a deferred error's message.
        send_chunks: ``(owner, rows, send_start, landing_start)`` for owners this rank cannot
            store to (NVSHMEM puts); empty when every peer is mapped.
        recv_chunks: ``(source, rows, landing_start, send_start)`` for sources this rank cannot
            store to.
        dispatcher_id: ``id()`` of the dispatcher that made the handle (checked on use).
        head_N, gates_R, chain_R, head_R, row_of_land_R: ``reduce_on_owner`` only (else None),
            int32 (``gates_R`` float32): each slot's first-slot-on-its-owner flag ``[N]``; this
            rank's received gates, the next landing row in each row's chain (-1 at the end), the
            row's head flag and the contract row of each landing row (``[R]`` each).
        phase_R: pipelined dispatches only (else None), int32 ``[R]``: each row's token phase
            at its source (the pipelined combine returns rows phase by phase).
        phases: the token phases of a pipelined dispatch (``stream_phases`` when it ran; its
            combine uses the same).
    """

    info_8: torch.Tensor
    send_pos_N: torch.Tensor
    land_index_N: torch.Tensor
    src_rank_R: torch.Tensor
    ret_index_R: torch.Tensor
    land_row_R: torch.Tensor
    num_received: torch.Tensor | None
    row_bytes: int
    send_chunks: tuple[tuple[int, int, int, int], ...]
    recv_chunks: tuple[tuple[int, int, int, int], ...]
    dispatcher_id: int
    head_N: torch.Tensor | None = None
    gates_R: torch.Tensor | None = None
    chain_R: torch.Tensor | None = None
    head_R: torch.Tensor | None = None
    row_of_land_R: torch.Tensor | None = None
    phase_R: torch.Tensor | None = None
    phases: int = 0


def _device_bytes(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 CUDA tensor over ``nbytes`` of device memory at ``ptr`` (shares it; the memory
    stays owned by the dispatcher)."""

    class _Region:  # __cuda_array_interface__ v3: torch.as_tensor keeps this object alive
        __cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                    "version": 3, "strides": None}

    return torch.as_tensor(_Region(), device=device)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


_current_stream = _extension.current_raw_stream


class _DispatchOutputs:
    """A dispatch's per-row outputs for ``num_rows`` rows: ``x_RD`` (and FP8 ``scales_RG``;
    fresh tensors, or with ``view`` views of a zero-copy dispatcher's output rows, the scales'
    from byte ``p1_off``), and in one int32 allocation gates_R (float32 bits), src_rank_R,
    ret_index_R, land_row_R, then (reduce_on_owner) chain_R, head_R, row_of_land_R and
    (pipelined) phase_R."""

    def __init__(self, num_rows: int, hidden: int, payloads, fp8: bool, owner_sums: bool,
                 pipelined: bool, device: torch.device, view: torch.Tensor | None = None,
                 p1_off: int = 0):
        if view is None:
            self.x_RD = torch.empty(num_rows, hidden, dtype=payloads[0].dtype, device=device)
            self.scales_RG = torch.empty(num_rows, payloads[1].shape[1], dtype=torch.float32,
                                         device=device) if fp8 else None
        else:  # zero-copy: views of the buffer's output rows (p1_off: the scales' rows)
            p0_bytes = hidden * payloads[0].element_size()
            self.x_RD = view[:num_rows * p0_bytes].view(payloads[0].dtype).view(num_rows, hidden)
            self.scales_RG = None
            if fp8:
                groups = payloads[1].shape[1]
                self.scales_RG = view[p1_off:p1_off + num_rows * 4 * groups].view(
                    torch.float32).view(num_rows, groups)
        rows = torch.empty(4 + 3 * owner_sums + pipelined, num_rows, dtype=torch.int32,
                           device=device)
        self.gates_R = rows[0].view(torch.float32)
        self.src_rank_R, self.ret_index_R, self.land_row_R = rows[1], rows[2], rows[3]
        self.chain_R, self.head_R, self.row_of_land_R = (
            (rows[4], rows[5], rows[6]) if owner_sums else (None, None, None))
        self.phase_R = rows[-1] if pipelined else None

    def routing_ptrs(self) -> tuple[int, ...]:
        """gates_R, src_rank_R, ret_index_R, land_row_R, chain_R, head_R, row_of_land_R."""
        return tuple(_ptr(t) for t in (self.gates_R, self.src_rank_R, self.ret_index_R,
                                       self.land_row_R, self.chain_R, self.head_R,
                                       self.row_of_land_R))


class RdepDispatcher(Dispatcher):
    """The RDEP algorithm over a peer-memory transport; `IpcDispatcher` and `NvshmemDispatcher`
    provide the buffer, the peer table and the barriers. Not constructed directly.

    Subclass contract: call `_attach` once the buffer exists on every rank, and implement
    `_count_exchange` / `_stream_barrier` / `_put` when ``_device_barriers`` is False.
    """

    #: True: barriers run inside the kernels (CUDA IPC). False: the kernels skip them and the
    #: subclass barriers on the stream (NVSHMEM).
    _device_barriers = True

    #: Profiling hook (bench ``--breakdown``): None, or a callable ``hook(stage)`` run on the host
    #: right after each stage of a call is enqueued (``checks``, ``route_plan``,
    #: ``scatter_slots``, ``host_sync``, ``alloc``, ``unpack``, ``handle`` for a dispatch;
    #: ``checks``, ``return_rows`` (``owner_reduce``), ``reduce_slots`` for a combine /
    #: dispatch_backward). Costs one
    #: attribute test per stage when None.
    stage_hook = None

    #: Grids of the pipelined kernels: (blocks per SM, percent of them that send), and for the
    #: dispatch the rows per published chunk (a multiple of 8, at most 256). The launcher caps
    #: the blocks to what is resident at once. On 4 x H200 other shares of senders (60-90%) and
    #: one or two blocks per SM for either kernel moved the largest payload by under 1.3% or made
    #: it slower (bench ``--grids``; bench/results/dispatch_4xH200_blocks_per_sm.txt).
    dispatch_grid = (2, 75, 32)
    combine_grid = (4, 75)
    #: Token phases of the pipelined combine (1 to 64): owners return a dispatch's rows in this
    #: many groups by token index at the source, each published by one flag, and the sources
    #: reduce a group as soon as every owner has published it. Each phase costs every sender
    #: block a fence and a barrier (~3.5 us of combine per phase on 4 x H200), and the reduce
    #: of the last one is the combine's tail. On 4 x H200 (CUDA-graph loop,
    #: bench/results/dispatch_4xH200_phases.txt) 6-12 phases beat 16 on the three large
    #: payloads (combine 498-508 against 524-536 us at (16384, 768, 8) and (8192, 2048, 6),
    #: 1125-1135 against 1133-1146 at (4096, 7168, 8)); 32 and 64 were slower, and phases
    #: shrinking toward the end (tried, not kept) slower still. Read at each dispatch and kept in
    #: its handle (the combine uses the dispatch's); every rank must use the same value.
    stream_phases = 8

    def _init_engine(self, *, hidden: int, dtype: torch.dtype, max_send_rows: int | None,
                     timeout_s: float, dedup_rows: bool = False,
                     reduce_on_owner: bool = False, pipelined: bool | None = None,
                     zero_copy: bool = False) -> None:
        if not isinstance(hidden, int) or hidden <= 0:
            raise ValueError(f"hidden must be a positive int (the widest row, in elements), got "
                             f"{hidden!r}")
        if dtype not in ROW_DTYPES:
            raise ValueError(f"dtype must be one of {ROW_DTYPES} (sizes the rows), got {dtype}")
        if max_send_rows is None:
            max_send_rows = self.capacity
        if max_send_rows <= 0:
            raise ValueError(f"max_send_rows must be positive, got {max_send_rows}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.hidden, self.row_dtype, self.max_send_rows = hidden, dtype, max_send_rows
        self.timeout_s = timeout_s
        if not isinstance(dedup_rows, bool):
            raise ValueError(f"dedup_rows must be True or False, got {dedup_rows!r}")
        self.dedup_rows = dedup_rows
        if not isinstance(reduce_on_owner, bool):
            raise ValueError(f"reduce_on_owner must be True or False, got {reduce_on_owner!r}")
        if reduce_on_owner and not dedup_rows:
            raise ValueError("reduce_on_owner=True needs dedup_rows=True (the owner's partial "
                             "sums follow the chains a deduplicated dispatch records); pass both")
        self.reduce_on_owner = reduce_on_owner
        if not isinstance(zero_copy, bool):
            raise ValueError(f"zero_copy must be True or False, got {zero_copy!r}")
        self.zero_copy = zero_copy
        self._view: torch.Tensor | None = None  # the zero-copy outputs, once attached
        self.layout = BufferLayout.plan(capacity=self.capacity, hidden=hidden, dtype=dtype,
                                        world_size=self.world_size, num_experts=self.num_experts,
                                        max_send_rows=max_send_rows, zero_copy=zero_copy)
        if pipelined is None:  # decided from the construction arguments: alike on every rank
            pipelined = max_send_rows >= PIPELINE_MIN_SEND_ROWS and (
                not dedup_rows or self.layout.row_bytes >= PIPELINE_MIN_DEDUP_ROW_BYTES)
        if not isinstance(pipelined, bool):
            raise ValueError(f"pipelined must be True, False or None (auto), got {pipelined!r}")
        self.pipelined = pipelined
        if zero_copy and pipelined and not dedup_rows:  # direct stores (module docstring)
            self.dispatch_grid = ZERO_COPY_DISPATCH_GRID
        self._consumed: frozenset[str] = frozenset()
        self._destroyed = False

    @property
    def owner_sums_active(self) -> bool:
        """Whether combines without gates and dispatch backwards sum on the owners:
        ``reduce_on_owner`` on a group whose peers are all mapped (else one row per slot)."""
        return self.reduce_on_owner and self._device_barriers  # it implies dedup_rows

    @property
    def pipelined_active(self) -> bool:
        """Whether dispatches (and the combines of their handles) run the pipelined kernels:
        ``pipelined`` on a group whose peers are all mapped (module docstring)."""
        return self.pipelined and self._device_barriers

    @property
    def persistent_bytes(self) -> int:
        """This rank's buffer (`BufferLayout.total_bytes`), plus the NVSHMEM staging area where
        one is allocated."""
        stage = getattr(self, "_stage_buffer", None)
        return self.layout.total_bytes + (self.layout.stage_bytes if stage is not None else 0)

    def _attach(self, device: torch.device, local_base: int, peer_bases: list[int],
                stage: int) -> None:
        """Build the kernels' view of the group once every rank's buffer is mapped here."""
        c_module = _extension.compiled_module()
        compiled = (c_module.STREAM_FLAG_ROWS, c_module.STREAM_PHASES_MAX,
                    c_module.COUNTER_WORDS, c_module.STREAM_CHUNK_ROWS_MAX)
        expected = (_STREAM_FLAG_ROWS, _STREAM_PHASES_MAX, _COUNTER_WORDS, _STREAM_CHUNK_ROWS_MAX)
        if compiled != expected:
            raise RuntimeError(f"nmoe_comm._C was built with (flag rows, most phases, counter "
                               f"words, largest chunk rows) {compiled}, this Python code expects "
                               f"{expected}; rebuild with "
                               f"`pip install --no-build-isolation -e packages/nmoe-comm`")
        self.device = device
        self._unmapped = tuple(p for p, base in enumerate(peer_bases) if base == 0)
        self._peer_bases = torch.tensor(peer_bases, dtype=torch.int64, device=device)
        layout = self.layout
        self._rdep = c_module.Rdep(
            device.index, self.rank, self.world_size, self.num_experts, self.capacity,
            self.max_send_rows, self._peer_bases.data_ptr(), local_base, stage,
            layout.signal_off, layout.counter_off, layout.counts_off, layout.counts_src_off,
            layout.recv_off, layout.recv_stride, layout.ret_off, layout.ret_stride,
            layout.dots_off, layout.dflags_off, layout.cflags_off, layout.dflag_chunks,
            layout.view_off, int(self.timeout_s * 1e9))
        if self.zero_copy:
            self._view = _device_bytes(local_base + layout.view_off, layout.view_bytes, device)
        self._local_base = local_base
        self._stage = stage
        self._device_index = device.index

    def describe(self) -> str:
        """One line for the start-up report, with the buffer this rank holds."""
        return (f"{super().describe()}, hidden {self.hidden} {str(self.row_dtype)[6:]}, "
                f"buffer {self.layout.total_bytes / 2**20:.0f} MiB"
                + (", one row per token and owner" if self.dedup_rows else "")
                + (" both ways" if self.reduce_on_owner else "")
                + (", zero-copy outputs" if self.zero_copy else "")
                + (", pipelined" if self.pipelined_active else "")
                + (f", {len(self._unmapped)} peers via puts" if self._unmapped else ""))

    # ------------------------------------------------------------------------ transport hooks

    def _count_exchange(self, stream: int) -> None:
        """NVSHMEM: gather every rank's count row into the count matrix (on the stream)."""
        raise NotImplementedError

    def _stream_barrier(self, stream: int) -> None:
        """NVSHMEM: a barrier over the group, ordered on the stream."""
        raise NotImplementedError

    def _put(self, stream: int, pe: int, dst_off: int, src_stage_off: int, nbytes: int) -> None:
        """NVSHMEM: copy ``nbytes`` from this rank's staging area to rank ``pe``'s buffer."""
        raise NotImplementedError

    def _sync_peers(self) -> int:
        """The kernels' ``sync_peers`` flag: 1 runs the in-kernel barrier (its epoch is counted
        on the device), 0 skips it (the NVSHMEM puts path barriers on the stream)."""
        return 1 if self._device_barriers else 0

    def _barrier(self, stream: int) -> None:
        if self._device_barriers:
            self._rdep.barrier(self._sync_peers(), stream)
        else:
            self._stream_barrier(stream)

    def _completed(self, stream: int, puts) -> None:
        """After a write kernel: NVSHMEM moves the staged chunks and barriers; CUDA IPC already
        barriered inside the kernel."""
        if self._device_barriers:
            return
        for pe, dst_off, src_off, nbytes in puts:
            if nbytes:
                self._put(stream, pe, dst_off, src_off, nbytes)
        self._stream_barrier(stream)

    def _before_writing(self, regions: frozenset[str], stream: int) -> None:
        """Entry barrier when the previous call read one of ``regions`` after its last barrier."""
        if self._consumed & regions:
            self._barrier(stream)
        self._consumed = _NOTHING

    # -------------------------------------------------------------------------------- checks

    def _rows(self, name: str, rows: object, routing: RdepRouting, hidden: int | None = None,
              count: int | None = None):
        """``rows`` checked: ``[R, D']`` (``count`` rows when given; a sync-free handle's
        ``capacity`` rows), a moved dtype, no wider than the buffer; made contiguous."""
        if count is None:
            count = routing.land_row_R.numel()
            meaning = ("x_RD.shape[0] of the matching sync=False dispatch (its capacity rows)"
                       if routing.num_received is not None else
                       "one per row the matching dispatch delivered, in its layout")
        else:
            meaning = "one per token of the matching dispatch"
        rows = check_rows(name, rows, count, hidden=hidden, device=self.device, meaning=meaning)
        if rows.dtype not in ROW_DTYPES:
            raise ValueError(f"{name} has dtype {rows.dtype}; the {self.name} backend moves "
                             f"float32, bfloat16 or float16 rows")
        if rows.shape[1] * rows.element_size() > self.layout.ret_stride:
            raise ValueError(
                f"{name} rows have {rows.shape[1] * rows.element_size()} bytes, above the "
                f"{self.layout.ret_stride} the buffer was sized for (hidden={self.hidden}, "
                f"dtype={self.row_dtype}); construct the dispatcher with a larger hidden/dtype"
            )
        return rows.contiguous()

    # ------------------------------------------------------------------------------ dispatch

    def dispatch(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        gates_TK: torch.Tensor,
        *,
        fp8: bool = False,
        sync: bool = True,
    ) -> Dispatched:
        """See `Dispatcher.dispatch` and the module docstring: one host synchronisation, none
        with ``sync=False`` (every peer mapped: ``ipc``, ``nvshmem`` inside a node)."""
        self._check_live()
        hook = self.stage_hook
        num_tokens, top_k, hidden = check_dispatch_inputs(x_TD, expert_ids_TK, gates_TK,
                                                          row_dtypes=ROW_DTYPES)
        if x_TD.device != self.device:
            check_tensor("x_TD", x_TD, ndim=2, device=self.device)  # raises, naming the device
        if sync and _capturing():
            raise RuntimeError(
                "dispatch(sync=True) reads the plan's status on the host, which a CUDA graph "
                "capture cannot do; capture dispatch(..., sync=False) (and call check_dispatch "
                "on its handle after a replay)")
        if not sync and not self._device_barriers:
            raise NotImplementedError(
                f"dispatch(sync=False) on the {self.name} backend needs every peer mapped (one "
                f"node); with peers reached by puts the host needs the count matrix to move the "
                f"rows: call dispatch with sync=True")
        if fp8:
            check_fp8_rows(x_TD)
        num_slots = num_tokens * top_k
        payloads = quantize_rows_fp8(x_TD) if fp8 else (x_TD,)
        widths = [p.shape[1] * p.element_size() for p in payloads]
        local_flags = 0
        if num_slots > self.max_send_rows:
            local_flags |= _FLAG_TOO_MANY_SLOTS
        if _align(widths[0], 16) + (widths[1] if fp8 else 0) > self.layout.row_bytes:
            local_flags |= _FLAG_ROW_TOO_WIDE
        ids = expert_ids_TK.contiguous()
        gates_TK = gates_TK.detach()
        if gates_TK.dtype != torch.float32 or not gates_TK.is_contiguous():
            gates_TK = gates_TK.to(torch.float32).contiguous()
        device = self.device
        num_local = self.num_local_experts
        # One row per (token, owner) needs every owner mapped (staged puts move whole chunks).
        dedup = self.dedup_rows and self._device_barriers
        owner_sums = self.owner_sums_active
        pipelined = self.pipelined_active
        phases = 0
        if pipelined:  # before anything moves, so every rank raises alike
            check_stream_grids(self.dispatch_grid, self.combine_grid)
            phases = check_stream_phases(self.stream_phases)
        # Payloads straight to the owners' contract rows: one row per slot, zero-copy outputs.
        direct = self.zero_copy and pipelined and not dedup
        # One allocation for the per-call routing: int64 info [8] and counts_E [L], then int32
        # send_pos [N], land_index [N], (reduce_on_owner) head_N [N] and (pipelined)
        # slot_of_send [N]. Owned by the handle.
        slot_vectors = 2 + owner_sums + pipelined
        meta = torch.empty(8 + num_local + (slot_vectors * num_slots + 1) // 2, dtype=torch.int64,
                           device=device)
        info, counts_E = meta[:8], meta[8:8 + num_local]
        slots = meta[8 + num_local:].view(torch.int32)
        vectors = iter(slots[v * num_slots:(v + 1) * num_slots] for v in range(slot_vectors))
        send_pos, land_index = next(vectors), next(vectors)
        head_N = next(vectors) if owner_sums else None
        slot_of_send = next(vectors) if pipelined else None
        stream = _current_stream(self._device_index)
        is64 = ids.dtype == torch.int64
        if hook is not None:
            hook("checks")

        self._before_writing(_DISPATCH_READS, stream)
        self._route_and_plan((ids.data_ptr(), is64, num_slots, local_flags, send_pos.data_ptr(),
                              land_index.data_ptr(), _ptr(slot_of_send), counts_E.data_ptr(),
                              info.data_ptr()), stream)
        if hook is not None:
            hook("route_plan")
        p1 = payloads[1] if fp8 else None
        rows_args = (payloads[0].data_ptr(), widths[0], widths[0], _ptr(p1),
                     widths[1] if fp8 else 0, widths[1] if fp8 else 0, gates_TK.data_ptr(),
                     info.data_ptr(), dedup, _ptr(head_N))
        if not pipelined:
            self._rdep.scatter_slots(ids.data_ptr(), is64, num_slots, top_k, send_pos.data_ptr(),
                                     land_index.data_ptr(), *rows_args, self._sync_peers(),
                                     stream)
            if hook is not None:
                hook("scatter_slots")
        # The pipelined kernel needs its outputs sized first, so its host sync comes here.
        num_rows, num_received, send_chunks, recv_chunks = self._settle_plan(
            info, sync, stream, num_slots, sum(widths))
        out = _DispatchOutputs(num_rows, hidden, payloads, fp8, owner_sums, pipelined, device,
                               view=self._view,
                               p1_off=self.layout.view_p1_off(self.capacity, widths[0]))
        if hook is not None:
            hook("alloc")
        if pipelined:
            self._rdep.dispatch_stream(
                ids.data_ptr(), is64, num_slots, num_tokens, top_k, send_pos.data_ptr(),
                land_index.data_ptr(), slot_of_send.data_ptr(), *rows_args, num_rows,
                out.x_RD.data_ptr(), _ptr(out.scales_RG), *out.routing_ptrs(),
                _ptr(out.phase_R), phases, direct, *self.dispatch_grid, stream)
        else:
            self._rdep.unpack(num_rows, _ptr(num_received), dedup, out.x_RD.data_ptr(),
                              widths[0], _ptr(out.scales_RG), widths[1] if fp8 else 0,
                              *out.routing_ptrs(), stream)
        self._consumed = _DISPATCH_READS
        if hook is not None:
            hook("dispatch_stream" if pipelined else "unpack")
        gates_R = out.gates_R
        handle = DispatchHandle(
            num_tokens=num_tokens, top_k=top_k, hidden=hidden, dtype=x_TD.dtype,
            gates_TK=gates_TK, expert_ids_TK=ids,
            state=RdepRouting(info_8=info, send_pos_N=send_pos, land_index_N=land_index,
                              src_rank_R=out.src_rank_R, ret_index_R=out.ret_index_R,
                              land_row_R=out.land_row_R, num_received=num_received,
                              row_bytes=sum(widths), send_chunks=send_chunks,
                              recv_chunks=recv_chunks, dispatcher_id=id(self), head_N=head_N,
                              gates_R=gates_R if owner_sums else None, chain_R=out.chain_R,
                              head_R=out.head_R, row_of_land_R=out.row_of_land_R,
                              phase_R=out.phase_R, phases=phases))
        dispatched = Dispatched(x_RD=out.x_RD, counts_E=counts_E, gates_R=gates_R,
                                handle=handle, x_scales_RG=out.scales_RG,
                                num_received=num_received)
        if hook is not None:
            hook("handle")
        return dispatched

    def _settle_plan(self, info: torch.Tensor, sync: bool, stream: int, num_slots: int,
                     row_bytes: int):
        """Step 3 of the module docstring: ``(R or capacity, R on the device or None, send
        chunks, receive chunks)``. A synchronous dispatch reads the plan (the one host sync),
        raises a failed one on every rank alike and moves the staged rows; a sync-free one
        leaves R on the device."""
        if not sync:  # every peer mapped: no puts, no chunks
            return self.capacity, info[3:4], (), ()
        status, counts_host = self._read_plan(info)
        send_chunks, recv_chunks = self._chunks(counts_host)
        if status[0] != _OK:
            self._completed(stream, ())
            # Every rank's plan read the count matrix after the exchange's barrier, and on the
            # pipelined path no barrier follows (the two-kernel scatter_slots ends in one): a
            # rank that raises first could otherwise start its next dispatch and overwrite its
            # count row on a peer that is still reading it -- which could then miss the error
            # (a bad id, an overflow) that this rank raised. The next call barriers first.
            self._consumed = _COUNTS
            raise self._plan_error(status, num_slots, row_bytes)
        self._completed(stream, self._send_puts(send_chunks, self.layout.recv_stride))
        if self.stage_hook is not None:
            self.stage_hook("host_sync")
        return int(status[3]), None, send_chunks, recv_chunks

    def check_dispatch(self, handle: DispatchHandle) -> None:
        """See `Dispatcher.check_dispatch`: reads the plan status of ``handle`` (one host sync)
        and raises the error a ``sync=False`` dispatch deferred, on every rank alike."""
        routing = self._routing(handle, RdepRouting)
        if routing.num_received is None:
            return  # a synchronous dispatch raised already
        if _capturing():
            raise RuntimeError("check_dispatch reads the plan's status on the host, which a CUDA "
                               "graph capture cannot do; call it after a replay, outside capture")
        status = routing.info_8.tolist()
        if status[0] != _OK:
            raise self._plan_error(status, handle.num_tokens * handle.top_k, routing.row_bytes)

    def _route_and_plan(self, args: tuple, stream: int) -> None:
        """Step 1 of the module docstring: one launch with the count exchange and its barrier
        inside (CUDA IPC), or route, fcollect, plan (NVSHMEM)."""
        if self._device_barriers:
            self._rdep.route_plan(*args, _ROUTE | _EXCHANGE | _PLAN, self._sync_peers(), stream)
            return
        self._rdep.route_plan(*args, _ROUTE, 0, stream)
        self._count_exchange(stream)
        self._rdep.route_plan(*args, _PLAN, 0, stream)

    def _read_plan(self, info: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """The plan's status (and, with unmapped peers, the count matrix) on the host."""
        if not self._unmapped:
            return info.tolist(), None
        counts = self._counts_view().to(torch.int64).flatten()
        both = torch.cat([info, counts]).cpu()
        width = self.num_experts + 1
        return both[:8].tolist(), both[8:].view(self.world_size, width)[:, :self.num_experts]

    def _counts_view(self) -> torch.Tensor:
        """The count matrix as a tensor (NVSHMEM backend only, which keeps one)."""
        raise NotImplementedError

    def _plan_error(self, status: list[int], num_slots: int, row_bytes: int) -> Exception:
        """The exception for a failed plan (every rank computes the same status)."""
        code, arg1, arg2 = status[0], int(status[1]), int(status[2])
        who = "this rank" if arg1 == self.rank else f"rank {arg1}"
        if code == _OVER_CAPACITY:
            return CapacityError(arg1, arg2, self.capacity)
        if code == _BAD_ID:
            return ValueError(
                f"expert_ids_TK: {who} passed expert ids outside [0, {self.num_experts}); ids are "
                f"global expert indices below num_experts={self.num_experts}")
        if code == _TOO_MANY_SLOTS:
            mine = f" (this rank: {num_slots})" if arg1 != self.rank else f" ({num_slots})"
            return ValueError(
                f"x_TD: {who} sends more slots T*K than max_send_rows={self.max_send_rows}"
                f"{mine}; construct the dispatcher with max_send_rows >= tokens * top_k")
        return ValueError(
            f"x_TD: {who} dispatches rows of {row_bytes} bytes, wider than the buffer's "
            f"{self.layout.row_bytes} (hidden={self.hidden}, dtype={self.row_dtype}); construct "
            f"the dispatcher with a larger hidden/dtype")

    def _chunks(self, counts: torch.Tensor | None):
        """Host-side chunk lists for the peers this rank cannot store to (see RdepRouting)."""
        if counts is None:
            return (), ()
        me, local = self.rank, self.num_local_experts
        per_owner = counts.view(self.world_size, self.world_size, local)  # [s, o, l]
        to_owner = per_owner.sum(dim=2)  # [s, o]
        send_start = torch.cumsum(to_owner[me], 0) - to_owner[me]
        land_start = torch.cumsum(to_owner[:, me], 0) - to_owner[:, me]
        send = tuple((o, int(to_owner[me, o]), int(send_start[o]),
                      int(to_owner[:me, o].sum())) for o in self._unmapped)
        recv = tuple((s, int(to_owner[s, me]), int(land_start[s]),
                      int(to_owner[s, :me].sum())) for s in self._unmapped)
        return send, recv

    def _send_puts(self, chunks, stride: int):
        """Puts moving staged send-order rows to the owners' landing rows."""
        recv_off = self.layout.recv_off
        return [(o, recv_off + land * stride, start * stride, rows * stride)
                for o, rows, start, land in chunks]

    def _return_puts(self, chunks, region_off: int, stride: int):
        """Puts moving staged landing-order rows back to the sources' send-order rows."""
        return [(s, region_off + send * stride, land * stride, rows * stride)
                for s, rows, land, send in chunks]

    # ------------------------------------------------------------------ combine and backward

    def _reduced_slots(self, handle: DispatchHandle) -> int:
        """Slots ``reduce_slots`` / ``gather_dots`` may read: all of them, or none when this rank
        sent more than ``max_send_rows`` (only a failed sync-free dispatch leaves such a handle:
        its send positions would point past the return buffer; the result is unspecified)."""
        num_slots = handle.num_tokens * handle.top_k
        return num_slots if num_slots <= self.max_send_rows else 0

    def _return_and_reduce(self, y_RD, handle, routing, gates_f32_TK,
                           owner_gates_R: torch.Tensor | None = None,
                           on_owner: bool = False) -> torch.Tensor:
        """Return the rows and reduce them at the source: one row per slot (``gates_f32_TK``
        applied by the source, or none), or with ``on_owner`` the owners' partial sums (gated by
        ``owner_gates_R``, or plain; ``gates_f32_TK`` is then None); see the module docstring."""
        hook = self.stage_hook
        stream = _current_stream(self._device_index)
        if hook is not None:
            hook("checks")
        self._before_writing(_RET, stream)
        num_rows = routing.land_row_R.numel()
        tokens = handle.num_tokens if self._reduced_slots(handle) else 0
        out = torch.empty(handle.num_tokens, y_RD.shape[1], dtype=y_RD.dtype, device=self.device)
        if routing.phase_R is not None and not on_owner:  # a pipelined dispatch's handle
            self._rdep.combine_stream(
                _DTYPE_CODE[y_RD.dtype], num_rows, _ptr(routing.num_received), y_RD.shape[1],
                y_RD.data_ptr(), routing.src_rank_R.data_ptr(), routing.ret_index_R.data_ptr(),
                routing.phase_R.data_ptr(), routing.phases, tokens, handle.num_tokens,
                handle.top_k, routing.send_pos_N.data_ptr(), _ptr(gates_f32_TK), out.data_ptr(),
                *self.combine_grid, stream)
            self._consumed = _RET
            if hook is not None:
                hook("combine_stream")
            return out
        if on_owner:
            self._rdep.owner_reduce(_DTYPE_CODE[y_RD.dtype], num_rows, _ptr(routing.num_received),
                                    y_RD.shape[1], y_RD.data_ptr(), _ptr(owner_gates_R),
                                    routing.src_rank_R.data_ptr(), routing.ret_index_R.data_ptr(),
                                    routing.chain_R.data_ptr(), routing.head_R.data_ptr(),
                                    routing.row_of_land_R.data_ptr(), handle.top_k,
                                    self._sync_peers(), stream)
            self._completed(stream, ())  # every peer mapped: nothing staged
        else:
            self._rdep.return_rows(num_rows, _ptr(routing.num_received),
                                   y_RD.data_ptr(), y_RD.shape[1] * y_RD.element_size(),
                                   routing.src_rank_R.data_ptr(), routing.ret_index_R.data_ptr(),
                                   routing.land_row_R.data_ptr(), self._sync_peers(), stream)
            self._completed(stream, self._return_puts(routing.recv_chunks, self.layout.ret_off,
                                                      self.layout.ret_stride))
        if hook is not None:
            hook("owner_reduce" if on_owner else "return_rows")
        self._rdep.reduce_slots(_DTYPE_CODE[y_RD.dtype], tokens, handle.top_k,
                                y_RD.shape[1], routing.send_pos_N.data_ptr(), _ptr(gates_f32_TK),
                                _ptr(routing.head_N) if on_owner else 0, out.data_ptr(), stream)
        self._consumed = _RET
        if hook is not None:
            hook("reduce_slots")
        return out

    def combine(
        self,
        y_RD: torch.Tensor,
        handle: DispatchHandle,
        gates_TK: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See `Dispatcher.combine`; no host synchronisation. On a ``reduce_on_owner``
        dispatcher, a combine without ``gates_TK`` (the dispatch's gates) sums on the owners
        (module docstring); one given gates returns one row per slot."""
        self._check_live()
        routing = self._routing(handle, RdepRouting)
        y_RD = self._rows("y_RD", y_RD, routing)
        if gates_TK is None and routing.chain_R is not None:
            return self._return_and_reduce(y_RD, handle, routing, None,
                                           owner_gates_R=routing.gates_R, on_owner=True)
        gates_f32_TK = handle.gates_TK if gates_TK is None else check_gates(
            gates_TK, handle, self.device).to(torch.float32).contiguous()
        return self._return_and_reduce(y_RD, handle, routing, gates_f32_TK)

    def dispatch_backward(self, grad_x_RD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """See `Dispatcher.dispatch_backward`; no host synchronisation."""
        self._check_live()
        routing = self._routing(handle, RdepRouting)
        grad_x_RD = self._rows("grad_x_RD", grad_x_RD, routing, hidden=handle.hidden)
        return self._return_and_reduce(grad_x_RD, handle, routing, None,
                                       on_owner=routing.chain_R is not None)

    def combine_backward(
        self,
        grad_out_TD: torch.Tensor,
        y_RD: torch.Tensor,
        handle: DispatchHandle,
        gates_TK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See `Dispatcher.combine_backward`; no host synchronisation."""
        self._check_live()
        routing = self._routing(handle, RdepRouting)
        num_rows = routing.land_row_R.numel()
        y_RD = self._rows("y_RD", y_RD, routing)
        grad_out_TD = self._rows("grad_out_TD", grad_out_TD, routing, hidden=y_RD.shape[1],
                                 count=handle.num_tokens)
        gates_f32_TK = handle.gates_TK if gates_TK is None else check_gates(
            gates_TK, handle, self.device).to(torch.float32).contiguous()
        ids = handle.expert_ids_TK
        stream = _current_stream(self._device_index)
        width = grad_out_TD.shape[1] * grad_out_TD.element_size()

        self._before_writing(_RECV, stream)
        # The forward's info: a failed (sync-free) plan moves nothing here either.
        self._rdep.scatter_slots(
            ids.data_ptr(), ids.dtype == torch.int64, ids.numel(), handle.top_k,
            routing.send_pos_N.data_ptr(), routing.land_index_N.data_ptr(),
            grad_out_TD.data_ptr(), width, width, 0, 0, 0, gates_f32_TK.data_ptr(),
            routing.info_8.data_ptr(), False, 0, self._sync_peers(), stream)
        self._completed(stream, self._send_puts(routing.send_chunks, self.layout.recv_stride))
        grad_y_RD = torch.empty_like(y_RD)
        self._rdep.owner_grad(_DTYPE_CODE[y_RD.dtype], _DTYPE_CODE[grad_out_TD.dtype], num_rows,
                              _ptr(routing.num_received), y_RD.shape[1], y_RD.data_ptr(),
                              routing.src_rank_R.data_ptr(), routing.ret_index_R.data_ptr(),
                              routing.land_row_R.data_ptr(), grad_y_RD.data_ptr(),
                              self._sync_peers(), stream)
        self._completed(stream, self._return_puts(routing.recv_chunks, self.layout.dots_off, 4))
        grad_gates_TK = torch.empty(handle.num_tokens, handle.top_k, dtype=torch.float32,
                                    device=self.device)
        self._rdep.gather_dots(self._reduced_slots(handle), routing.send_pos_N.data_ptr(),
                               grad_gates_TK.data_ptr(), stream)
        self._consumed = _DOTS
        return grad_y_RD, grad_gates_TK

    @classmethod
    def buffer_size_hint(
        cls,
        *,
        capacity: int,
        hidden: int,
        dtype: torch.dtype,
        world_size: int = 1,
        max_send_rows: int | None = None,
        num_experts: int = 256,
        zero_copy: bool = False,
    ) -> int:
        """Persistent bytes per rank: `BufferLayout.total_bytes` (the count matrix assumes
        ``num_experts``, 256 by default; it is a few KiB either way), with ``zero_copy`` the
        output rows too (``capacity`` rows of ``hidden`` elements). Per-call outputs (``x_RD``
        unless ``zero_copy``, ``gates_R``, index vectors) are allocated by torch on top."""
        layout = BufferLayout.plan(
            capacity=capacity, hidden=hidden, dtype=dtype, world_size=world_size,
            num_experts=num_experts,
            max_send_rows=capacity if max_send_rows is None else max_send_rows,
            zero_copy=zero_copy)
        return layout.total_bytes
