"""The `Dispatcher` interface: move routed token rows to the ranks that own their experts and back.

Letters used in tensor names and docstrings throughout nmoe-comm:

- ``T``: tokens on this rank (the caller's batch, flattened).
- ``K``: routed slots per token (top-k).
- ``D``: hidden size of a row.
- ``E``: experts in the whole expert-parallel group (global expert ids are ``0 .. E-1``).
- ``W``: ranks in the expert-parallel group; rank ``r`` owns the contiguous block of experts
  ``[r * E_local, (r + 1) * E_local)`` with ``E_local = E // W``.
- ``R``: rows received by this rank for its own experts (``sum(counts_E)``); ``R <= capacity``.
- ``G``: FP8 scale groups per row, ``D / 128`` (one float32 scale per 1x128 block, rule 6).

The contract every backend keeps (and `nmoe_comm.reference` spells out in plain torch):

1. **Layout.** ``dispatch`` returns the received rows expert-contiguous: all rows of local expert 0,
   then local expert 1, ... Inside one expert, rows are ordered by ``(src_rank, token, slot)``
   ascending. This order is part of the contract, so every backend's output is bitwise equal to
   the reference, not merely equal up to a permutation.
2. **Combine.** ``combine`` returns, for every source token ``t``,
   ``out[t] = sum_k gates[t, k] * y(t, k)`` accumulated in float32 in the fixed order
   ``k = 0, 1, ..., K-1``: ``acc = g0*y0; acc = acc + g1*y1; ...`` where every product and every
   sum is rounded to float32 separately (no fused multiply-add), then cast to ``y``'s dtype.
   Results are therefore bitwise reproducible run to run and across backends.
3. **Backward.** The gradient of ``dispatch`` is a combine without gates (a sum over the K slot
   rows of each token, same fixed order: ``acc = g0; acc = acc + g1; ...``); the gradient of
   ``combine`` sends ``gate * dOut[t]`` to each row (one float32 product, cast to ``y``'s dtype)
   and returns ``dGates[t, k] = <dOut[t], y(t, k)>`` computed in float32. The summation order of
   that dot product over ``D`` is the backend's own (a reduction inside one row, like any GEMV),
   so ``dGates`` agrees across backends to float32 rounding, not bitwise; everything else in
   rules 1-3 is bitwise.
4. **Capacity.** A dispatch that would hand a rank more than ``capacity`` rows raises
   `CapacityError` naming the rows needed; rows are never dropped silently.
5. **Collectiveness.** In a group of several ranks, every rank calls every method the same number
   of times in the same order, including ranks that send or receive no rows.
6. **FP8 dispatch.** ``dispatch(..., fp8=True)`` quantizes every row at its source to FP8 E4M3
   with one float32 scale per 1x128 block along ``D`` (`nmoe_kernels.quantize_fp8_1x128` on a
   GPU, `nmoe_kernels.reference.quantize_fp8_1x128` on the CPU; the two are bitwise equal) and
   moves the FP8 row and its scales instead of the row: ``x_RD`` is float8_e4m3fn ``[R, D]`` and
   ``x_scales_RG`` float32 ``[R, G]``, bitwise equal to quantizing the reference's rows (the
   quantization is per row, so it commutes with moving rows). Needs bfloat16 or float32 rows and
   ``D % 128 == 0``. Everything else is unchanged: ``gates_R``, ``counts_E``, the handle, and
   every backward (which take and return gradients in the dtype of ``x_TD``).
7. **Sync-free dispatch.** ``dispatch(..., sync=False)`` never waits for the host: ``x_RD`` (and
   ``gates_R``, ``x_scales_RG``) have a row count fixed by the dispatcher, not by the routing
   (``capacity`` rows for ``ipc`` / ``nvshmem``, ``T * K`` for ``local``); their first ``R``
   rows are bitwise those of rule 1 and the rest are unspecified. ``R`` stays on the device in
   ``Dispatched.num_received`` (int64 ``[1]``) and ``counts_E`` is a device tensor as always, so
   grouped GEMMs that take device offsets can consume the rows without a host round trip.
   ``combine`` and the backwards take rows of ``x_RD``'s row count and ignore the unspecified
   ones (their outputs there are unspecified too). Errors (capacity, a bad expert id, too many
   slots) cannot be raised without a host sync: such a dispatch moves nothing, ``R`` and
   ``counts_E`` read 0, results are unspecified, and `Dispatcher.check_dispatch` raises the
   error (on every rank alike). Backends that need the host to size a transfer (``nccl``; the
   ``nvshmem`` multi-node path) raise ``NotImplementedError`` naming ``sync=True``.

"float32" above is the accumulation dtype for float32, bfloat16 and float16 rows. float64 rows
(accepted by ``local`` and `nmoe_comm.reference` so that gradients can be checked with
`torch.autograd.gradcheck`) accumulate in float64 by the same rules; GPU backends may reject them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

#: Row dtypes every backend accepts; ``local`` and the reference also accept float64.
ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def accumulation_dtype(row_dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and products are rounded to for rows of ``row_dtype``: float64 for float64
    rows, float32 for everything else (see the note under the contract)."""
    return torch.float64 if row_dtype == torch.float64 else torch.float32


class CapacityError(RuntimeError):
    """A dispatch would deliver more rows to a rank than its buffers hold."""

    def __init__(self, rank: int, rows_needed: int, capacity: int):
        self.rank = rank
        self.rows_needed = rows_needed
        self.capacity = capacity
        super().__init__(
            f"dispatch routes {rows_needed} rows to rank {rank}, above its capacity of {capacity} "
            f"rows; construct the dispatcher with capacity >= {rows_needed} (the worst case is "
            f"tokens_per_rank * top_k * world_size)"
        )


@dataclass(frozen=True)
class DispatchHandle:
    """What `Dispatcher.combine` and the backward passes need to route results back.

    Attributes:
        num_tokens: ``T``, tokens on this (source) rank.
        top_k: ``K``.
        hidden: ``D``.
        dtype: dtype of the dispatched rows.
        gates_TK: float32 ``[T, K]`` gate weights used by `combine` unless others are passed.
        expert_ids_TK: int32 or int64 ``[T, K]`` global expert ids, as given to `dispatch`
            (``local`` and ``nccl`` keep them as int64; ``ipc`` / ``nvshmem`` keep the given
            tensor, saving a conversion per dispatch).
        state: backend-private routing state (index maps, buffer offsets). Treat as opaque.
    """

    num_tokens: int
    top_k: int
    hidden: int
    dtype: torch.dtype
    gates_TK: torch.Tensor
    expert_ids_TK: torch.Tensor
    state: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class Dispatched:
    """The result of `Dispatcher.dispatch` on one rank.

    Attributes:
        x_RD: ``[R, D]`` received rows in the layout of the module docstring, dtype of ``x_TD``.
        counts_E: int64 ``[E_local]`` rows per local expert, on the rows' device.
        gates_R: float32 ``[R]`` the gate of each received row (its ``gates_TK[t, k]``).
        handle: routing state for `Dispatcher.combine` and the backward passes.
        x_scales_RG: float32 ``[R, G]`` row-major scales of an FP8 dispatch (rule 6): row ``r``
            dequantizes as ``x_RD[r].float() * x_scales_RG[r].repeat_interleave(128)``. None
            unless the dispatch was called with ``fp8=True``.
        num_received: int64 ``[1]`` on the rows' device holding ``R`` for a ``sync=False``
            dispatch (rule 7), whose row tensors are padded past ``R``; None for a synchronous
            dispatch (``R = x_RD.shape[0]``).
    """

    x_RD: torch.Tensor
    counts_E: torch.Tensor
    gates_R: torch.Tensor
    handle: DispatchHandle
    x_scales_RG: torch.Tensor | None = None
    num_received: torch.Tensor | None = None

    @property
    def offsets_E1(self) -> torch.Tensor:
        """int64 ``[E_local + 1]``: row offsets of each local expert's segment, starting at 0."""
        zero = torch.zeros(1, dtype=torch.int64, device=self.counts_E.device)
        return torch.cat([zero, torch.cumsum(self.counts_E, 0)])


class Dispatcher(ABC):
    """Moves routed token rows to expert owners and results back. See the module docstring.

    Args:
        num_experts: ``E``, experts in the whole group; must be divisible by ``world_size``.
        capacity: the most rows one rank may receive in one dispatch (``R`` bound). Buffers are
            sized from it, never from the routing of the moment.
        world_size: ``W``, ranks in the expert-parallel group.
        rank: this rank's index in the group, ``0 <= rank < W``.
    """

    #: Short backend name reported at start-up (``local``, ``ipc``, ``nvshmem``, ``nccl``).
    name: str = "abstract"

    def __init__(self, num_experts: int, capacity: int, world_size: int = 1, rank: int = 0):
        if num_experts <= 0:
            raise ValueError(f"num_experts must be positive, got {num_experts}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if num_experts % world_size != 0:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by world_size={world_size}; every "
                f"rank must own the same number of experts"
            )
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.num_experts = num_experts
        self.capacity = capacity
        self.world_size = world_size
        self.rank = rank

    @property
    def num_local_experts(self) -> int:
        """``E_local = E // W``."""
        return self.num_experts // self.world_size

    @abstractmethod
    def dispatch(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        gates_TK: torch.Tensor,
        *,
        fp8: bool = False,
        sync: bool = True,
    ) -> Dispatched:
        """Send each token's row to the owner of each of its K experts.

        Args:
            x_TD: ``[T, D]`` rows, float32 / bfloat16 / float16, contiguous. ``T`` may be 0.
            expert_ids_TK: ``[T, K]`` int32/int64 global expert ids in ``[0, E)``. A token may
                name the same expert in two slots; each slot is a separate row.
            gates_TK: ``[T, K]`` gate weights (any float dtype; kept as float32).
            fp8: quantize the rows at the source and move FP8 rows plus scales (rule 6; needs
                bfloat16/float32 rows and ``D % 128 == 0``).
            sync: True (default): one host synchronisation where the backend needs it, exact
                ``R`` rows, errors raised here. False: no host synchronisation (rule 7): padded
                row tensors, ``R`` in ``Dispatched.num_received`` on the device, routing errors
                deferred to `check_dispatch`.

        Returns:
            `Dispatched` for this rank's experts.

        Raises:
            CapacityError: a rank would receive more than ``capacity`` rows (with
                ``sync=False``: raised by `check_dispatch` instead).
            ValueError: shapes, dtypes, devices or expert ids are invalid (the message names
                the argument).
            NotImplementedError: ``sync=False`` on a backend that must size transfers on the
                host (``nccl``, ``nvshmem`` with peers in other nodes).
        """

    @abstractmethod
    def combine(
        self,
        y_RD: torch.Tensor,
        handle: DispatchHandle,
        gates_TK: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return each row to its source and reduce: ``out[t] = sum_k gates[t, k] * y(t, k)``.

        Args:
            y_RD: ``[R, D']`` results for the rows this rank received, in the dispatch layout.
                ``D'`` may differ from the dispatched ``D``.
            handle: the handle of the matching `dispatch`.
            gates_TK: ``[T, K]`` gates to apply (any float dtype, rounded to float32); defaults
                to ``handle.gates_TK``.

        Returns:
            ``[T, D']`` in ``y_RD``'s dtype, reduced in float32 in the fixed order of rule 2.
        """

    @abstractmethod
    def dispatch_backward(self, grad_x_RD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Gradient of `dispatch` w.r.t. ``x_TD``: ``dx[t] = sum_k grad(t, k)`` (rule 3).

        Args:
            grad_x_RD: ``[R, D]`` gradient for the received rows.
            handle: the handle of the matching `dispatch`.

        Returns:
            ``[T, D]`` in ``grad_x_RD``'s dtype, reduced in float32 in slot order.
        """

    @abstractmethod
    def combine_backward(
        self,
        grad_out_TD: torch.Tensor,
        y_RD: torch.Tensor,
        handle: DispatchHandle,
        gates_TK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of `combine` w.r.t. ``y_RD`` and the gates.

        Args:
            grad_out_TD: ``[T, D']`` gradient of the combined output.
            y_RD: ``[R, D']`` the rows that were combined (saved from the forward).
            handle: the handle of the matching `dispatch`.
            gates_TK: the gates the forward used; defaults to ``handle.gates_TK``.

        Returns:
            ``(grad_y_RD, grad_gates_TK)``: ``grad_y_RD[row] = gate(row) * grad_out[t(row)]``
            (computed in float32, cast to ``y_RD``'s dtype) and float32 ``[T, K]``
            ``grad_gates[t, k] = <grad_out[t], y(t, k)>`` summed in float32.
        """

    def check_dispatch(self, handle: DispatchHandle) -> None:
        """Raise the error a ``sync=False`` dispatch deferred (rule 7), if it had one.

        One host synchronisation for a sync-free handle; a no-op for a synchronous one (its
        dispatch raised already). Collective only in the sense that every rank computes the
        same verdict: each rank may call it whenever it likes, without waiting for the others.

        Args:
            handle: the handle of a dispatch of this dispatcher.

        Raises:
            CapacityError, ValueError: as `dispatch` with ``sync=True`` would have.
        """
        self._routing(handle, object)

    @property
    def persistent_bytes(self) -> int:
        """Bytes of device memory this dispatcher holds between calls (0 for backends that
        allocate per call). ``ipc`` / ``nvshmem`` buffers come from ``cudaMalloc`` / the NVSHMEM
        heap, outside torch's allocator, so ``torch.cuda.max_memory_allocated`` does not see
        them."""
        return 0

    @classmethod
    def buffer_size_hint(
        cls,
        *,
        capacity: int,
        hidden: int,
        dtype: torch.dtype,
        world_size: int = 1,
        max_send_rows: int | None = None,
    ) -> int:
        """Bytes this backend allocates on one rank for ``capacity`` rows of ``hidden`` elements.

        Args:
            capacity: the dispatcher's ``capacity`` (rows one rank may receive).
            hidden: ``D``, elements per row (the larger of the dispatched and combined widths).
            dtype: dtype of the rows.
            world_size: ``W``; backends whose buffers scale with the group size use it.
            max_send_rows: the most slots (``T * K``) one rank sends per dispatch, for backends
                that keep a per-slot return buffer (``ipc``, ``nvshmem``); None means
                ``capacity``.

        Returns:
            An upper bound in bytes: persistent buffers for backends that keep them, the
            transient workspace of one dispatch + combine for backends that allocate per call.
        """
        raise NotImplementedError(f"{cls.__name__} does not define buffer_size_hint")

    def destroy(self) -> None:
        """Release buffers and communication resources. The dispatcher is unusable afterwards
        (backends with resources extend this and call it)."""
        self._destroyed = True

    def _check_live(self) -> None:
        """Raise if `destroy` was called."""
        if getattr(self, "_destroyed", False):
            raise RuntimeError(f"this {type(self).__name__} was destroyed; create a new one")

    def _routing(self, handle: object, state_type: type) -> Any:
        """The backend state of ``handle``, checked to come from this dispatcher's dispatch."""
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle must be a DispatchHandle, got {type(handle).__name__}")
        state = handle.state
        if not isinstance(state, state_type) or getattr(state, "dispatcher_id", None) != id(self):
            raise ValueError(
                f"handle was not produced by this {type(self).__name__}'s dispatch; pass the "
                f"handle of the matching dispatch (Dispatched.handle)"
            )
        return state

    def describe(self) -> str:
        """One line for the start-up report."""
        return (
            f"{self.name} (rank {self.rank}/{self.world_size}, experts {self.num_experts}, "
            f"local {self.num_local_experts}, capacity {self.capacity} rows)"
        )
