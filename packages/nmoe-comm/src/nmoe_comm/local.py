"""``local``: the one-device `Dispatcher` (world size 1), torch on CPU or GPU.

With one rank every routed row stays on the device, so dispatch is a stable sort of the
``T * K`` slots by expert id followed by a row gather, and combine gathers each slot's result
back and reduces over the K slots. Results are bitwise equal to `nmoe_comm.reference` with one
rank. Letters as in `nmoe_comm.dispatcher`.

Slot sums (``combine`` and ``dispatch_backward``): on CUDA, for float32, bfloat16 and float16
rows, one kernel of `nmoe_comm._C` (``sum_slots``, csrc/slot_sum.cu) gathers each token's K rows
and reduces them in one pass, bitwise equal to the torch loop `_sum_slots_torch` (per slot a
gather, a cast to float32, a gate product and an add, ``4 K`` launches over ``[T, D]``). CPU
tensors, float64 rows, and a `_C` built without nvcc (or before ABI 3) use the torch loop;
`LocalDispatcher.describe` says which the CUDA path uses.

Host synchronisation: none on the data path. ``R = T * K`` is known from shapes, so the capacity
check is free, and per-expert counts come from a ``searchsorted`` on the device. The one sync is
the expert-id range check (`nmoe_comm.validation.check_expert_id_range`), which reads the ids;
construct with ``validate=False`` to skip it once the router is trusted (an out-of-range id then
yields undefined ``counts_E`` instead of an error). ``dispatch(..., sync=False)`` (contract rule
7) defers that check to `LocalDispatcher.check_dispatch`; ``R = T * K`` rows come back as always.
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
    accumulation_dtype,
)
from nmoe_comm.quantization import check_fp8_rows, quantize_rows_fp8
from nmoe_comm.registry import register_backend
from nmoe_comm.validation import (
    check_dispatch_inputs,
    check_expert_id_range,
    check_gates,
    check_rows,
    check_tensor,
)


def _sum_slots_torch(
    y_RD: torch.Tensor, row_of_slot_TK: torch.Tensor, gates_TK: torch.Tensor | None
) -> torch.Tensor:
    """Rule 2 (rule 3 without gates) in torch, the reference of the CUDA kernel: per slot,
    gather ``y(t, k)`` and accumulate, each product and sum its own op so that each is rounded
    on its own.

    Args:
        y_RD: ``[R, D]`` rows, any float dtype and layout, on any device.
        row_of_slot_TK: int64 ``[T, K]`` (``K >= 1``) on ``y_RD``'s device, entries in ``[0, R)``.
        gates_TK: ``[T, K]`` on ``y_RD``'s device (any float dtype, converted to the accumulation
            dtype), or None for the plain sum.

    Returns:
        ``[T, D]`` in ``y_RD``'s dtype.
    """
    acc_dtype = accumulation_dtype(y_RD.dtype)
    if gates_TK is not None:
        gates_TK = gates_TK.to(acc_dtype)
    acc = None
    for k in range(row_of_slot_TK.shape[1]):
        term = y_RD.index_select(0, row_of_slot_TK[:, k]).to(acc_dtype)
        if gates_TK is not None:
            term = gates_TK[:, k, None] * term
        acc = term if acc is None else acc + term
    return acc.to(y_RD.dtype)


def _sum_slots_cuda(
    kernel, y_RD: torch.Tensor, row_of_slot_TK: torch.Tensor, gates_TK: torch.Tensor | None
) -> torch.Tensor:
    """`_sum_slots_torch` in one launch of `nmoe_comm._C.sum_slots` on the current stream.

    Args:
        kernel: `nmoe_comm._extension.slot_sum_kernel()`.
        y_RD: ``[R, D]`` float32, bfloat16 or float16 on a CUDA device (copied when not
            contiguous).
        row_of_slot_TK: int64 ``[T, K]`` (``K >= 1``) on that device, entries in ``[0, R)``
            (not checked: the dispatch made them).
        gates_TK: ``[T, K]`` on that device (any float dtype, rounded to float32 as the torch
            loop does), or None for the plain sum.

    Returns:
        ``[T, D]`` in ``y_RD``'s dtype, bitwise equal to `_sum_slots_torch`.
    """
    y_RD = y_RD.contiguous()
    row_of_slot_TK = row_of_slot_TK.contiguous()
    num_tokens, top_k = row_of_slot_TK.shape
    hidden = y_RD.shape[1]
    out_TD = torch.empty(num_tokens, hidden, dtype=y_RD.dtype, device=y_RD.device)
    if gates_TK is not None:
        gates_TK = gates_TK.to(torch.float32).contiguous()
    device = y_RD.device.index
    kernel(device, _extension.ROW_DTYPE_CODES[y_RD.dtype], num_tokens, top_k, hidden,
           y_RD.data_ptr(), row_of_slot_TK.data_ptr(),
           0 if gates_TK is None else gates_TK.data_ptr(), out_TD.data_ptr(),
           _extension.current_raw_stream(device))
    return out_TD


@dataclass(frozen=True)
class LocalRouting:
    """`DispatchHandle.state` of a `LocalDispatcher` dispatch.

    Attributes:
        row_of_slot_TK: int64 ``[T, K]``: the row of ``x_RD`` that slot ``(t, k)`` went to.
        slot_of_row_R: int64 ``[R]``: for each row, the flat slot ``t * K + k`` it came from.
        dispatcher_id: ``id()`` of the dispatcher that made the handle (checked on use).
    """

    row_of_slot_TK: torch.Tensor
    slot_of_row_R: torch.Tensor
    dispatcher_id: int


class LocalDispatcher(Dispatcher):
    """Dispatch/combine on one device, no communication.

    Args:
        num_experts: ``E``.
        capacity: the most rows one dispatch may produce (``T * K``); more raises `CapacityError`.
        world_size: must be 1 (use an expert-parallel backend for more ranks).
        rank: must be 0.
        validate: check that expert ids lie in ``[0, E)``, which costs one device-to-host
            synchronisation per dispatch on a GPU. Shapes, dtypes and devices are always checked
            (from metadata, no sync).
    """

    name = "local"

    def __init__(
        self,
        num_experts: int,
        capacity: int,
        world_size: int = 1,
        rank: int = 0,
        *,
        validate: bool = True,
    ):
        if world_size != 1:
            raise ValueError(
                f"the local backend runs one rank, got world_size={world_size}; use an "
                f"expert-parallel backend (ipc, nvshmem, nccl) for more"
            )
        super().__init__(num_experts, capacity, world_size, rank)
        self.validate = validate
        self._destroyed = False

    def describe(self) -> str:
        """One line for the start-up report, saying how CUDA slot sums run."""
        reason = _extension.missing_slot_sum()
        how = "nmoe_comm._C kernel" if reason is None else f"torch loop ({reason})"
        return f"{super().describe()}, CUDA slot sums: {how}"

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
        """Transient bytes one dispatch + combine allocates for ``capacity`` rows (an upper bound).

        The local backend keeps no buffers between calls. A dispatch allocates ``x_RD``
        (``capacity * hidden`` elements of ``dtype``), float32 ``gates_R`` and four int64 index
        vectors of ``capacity`` entries (ids, sorted ids, both index maps). A combine by the torch
        loop holds, per slot, a gathered ``[T, hidden]`` row block in ``dtype`` and in the
        accumulation dtype, the product, the running sum and the output; ``T <= capacity``. The
        CUDA kernel (module docstring) holds only the output, well inside the bound.
        ``world_size`` and ``max_send_rows`` are ignored.
        """
        item = torch.empty(0, dtype=dtype).element_size()
        acc = torch.empty(0, dtype=accumulation_dtype(dtype)).element_size()
        dispatch_bytes = capacity * (hidden * item + 4 + 4 * 8)
        combine_bytes = capacity * hidden * (2 * item + 3 * acc)
        return dispatch_bytes + combine_bytes

    def dispatch(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        gates_TK: torch.Tensor,
        *,
        fp8: bool = False,
        sync: bool = True,
    ) -> Dispatched:
        """See `Dispatcher.dispatch`; float64 rows are also accepted (without ``fp8``). With
        ``sync=False`` the id range check (``validate``) moves to `check_dispatch`; ``x_RD``
        has ``T * K`` rows, all valid (the count depends on shapes only)."""
        self._check_live()
        num_tokens, top_k, hidden = check_dispatch_inputs(x_TD, expert_ids_TK, gates_TK)
        if fp8:
            check_fp8_rows(x_TD)
        num_rows = num_tokens * top_k
        if num_rows > self.capacity:
            raise CapacityError(self.rank, num_rows, self.capacity)
        if self.validate and sync:
            check_expert_id_range(expert_ids_TK, self.num_experts)
        device = x_TD.device

        ids_N = expert_ids_TK.reshape(-1).to(torch.int64)
        # Stable: inside one expert, slots keep their (token, slot) order, as rule 1 requires.
        sorted_ids_R, slot_of_row_R = torch.sort(ids_N, stable=True)
        row_of_slot_N = torch.empty_like(slot_of_row_R).scatter_(
            0, slot_of_row_R, torch.arange(num_rows, device=device)
        )
        expert_bounds = torch.arange(self.num_experts + 1, device=device)
        offsets_E1 = torch.searchsorted(sorted_ids_R, expert_bounds)
        gates_f32_TK = gates_TK.detach().to(torch.float32)

        handle = DispatchHandle(
            num_tokens=num_tokens,
            top_k=top_k,
            hidden=hidden,
            dtype=x_TD.dtype,
            gates_TK=gates_f32_TK,
            expert_ids_TK=expert_ids_TK.to(torch.int64),
            state=LocalRouting(
                row_of_slot_TK=row_of_slot_N.view(num_tokens, top_k),
                slot_of_row_R=slot_of_row_R,
                dispatcher_id=id(self),
            ),
        )
        token_of_row_R = slot_of_row_R // top_k
        scales_RG = None
        if fp8:
            x_fp8_TD, scales_TG = quantize_rows_fp8(x_TD)
            x_RD = x_fp8_TD.view(torch.uint8).index_select(0, token_of_row_R)
            x_RD = x_RD.view(torch.float8_e4m3fn)
            scales_RG = scales_TG.index_select(0, token_of_row_R)
        else:
            x_RD = x_TD.index_select(0, token_of_row_R)
        num_received = None if sync else torch.full((1,), num_rows, dtype=torch.int64,
                                                    device=device)
        return Dispatched(
            x_RD=x_RD,
            counts_E=torch.diff(offsets_E1),
            gates_R=gates_f32_TK.reshape(-1).index_select(0, slot_of_row_R),
            handle=handle,
            x_scales_RG=scales_RG,
            num_received=num_received,
        )

    def check_dispatch(self, handle: DispatchHandle) -> None:
        """See `Dispatcher.check_dispatch`: the expert-id range check (``validate``) that a
        ``sync=False`` dispatch skipped; one host sync on a GPU."""
        self._routing(handle, LocalRouting)
        if self.validate:
            check_expert_id_range(handle.expert_ids_TK, self.num_experts)

    def _sum_slots(
        self, y_RD: torch.Tensor, routing: LocalRouting, gates_TK: torch.Tensor | None
    ) -> torch.Tensor:
        """Rule 2 (rule 3 without gates): per slot, gather ``y(t, k)`` and accumulate, each
        product and sum rounded on its own; the CUDA kernel where it applies (module docstring),
        else the torch loop."""
        if y_RD.is_cuda and y_RD.dtype in ROW_DTYPES:
            kernel = _extension.slot_sum_kernel()
            if kernel is not None:
                return _sum_slots_cuda(kernel, y_RD, routing.row_of_slot_TK, gates_TK)
        return _sum_slots_torch(y_RD, routing.row_of_slot_TK, gates_TK)

    def combine(
        self,
        y_RD: torch.Tensor,
        handle: DispatchHandle,
        gates_TK: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See `Dispatcher.combine`; float64 rows accumulate in float64."""
        self._check_live()
        routing = self._routing(handle, LocalRouting)
        y_RD = check_rows("y_RD", y_RD, routing.slot_of_row_R.numel(),
                          device=routing.slot_of_row_R.device)
        gates_TK = check_gates(gates_TK, handle, y_RD.device)
        return self._sum_slots(y_RD, routing, gates_TK)

    def dispatch_backward(self, grad_x_RD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """See `Dispatcher.dispatch_backward`."""
        self._check_live()
        routing = self._routing(handle, LocalRouting)
        grad_x_RD = check_rows("grad_x_RD", grad_x_RD, routing.slot_of_row_R.numel(),
                               hidden=handle.hidden, device=routing.slot_of_row_R.device)
        return self._sum_slots(grad_x_RD, routing, None)

    def combine_backward(
        self,
        grad_out_TD: torch.Tensor,
        y_RD: torch.Tensor,
        handle: DispatchHandle,
        gates_TK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See `Dispatcher.combine_backward`; ``grad_gates`` is float64 for float64 rows."""
        self._check_live()
        routing = self._routing(handle, LocalRouting)
        device = routing.slot_of_row_R.device
        y_RD = check_rows("y_RD", y_RD, routing.slot_of_row_R.numel(), device=device)
        grad_out_TD = check_tensor("grad_out_TD", grad_out_TD, ndim=2, device=device)
        if tuple(grad_out_TD.shape) != (handle.num_tokens, y_RD.shape[1]):
            raise ValueError(
                f"grad_out_TD has shape {tuple(grad_out_TD.shape)}, expected "
                f"{(handle.num_tokens, y_RD.shape[1])} ([T, D'] with D' = y_RD.shape[1])"
            )
        gates_TK = check_gates(gates_TK, handle, device)
        acc_dtype = accumulation_dtype(y_RD.dtype)
        grad_out_TD = grad_out_TD.to(acc_dtype)
        gates_TK = gates_TK.to(acc_dtype)
        top_k = handle.top_k

        slot_of_row_R = routing.slot_of_row_R
        gate_R = gates_TK.reshape(-1).index_select(0, slot_of_row_R)
        grad_out_RD = grad_out_TD.index_select(0, slot_of_row_R // top_k)
        grad_y_RD = (gate_R[:, None] * grad_out_RD).to(y_RD.dtype)

        dots = []
        for k in range(top_k):
            y_TD = y_RD.index_select(0, routing.row_of_slot_TK[:, k]).to(acc_dtype)
            dots.append((grad_out_TD * y_TD).sum(dim=-1))
        grad_gates_TK = torch.stack(dots, dim=1)
        return grad_y_RD, grad_gates_TK


register_backend(
    "local",
    LocalDispatcher,
    summary="one device (CPU or GPU), torch plus a CUDA slot-sum kernel; world size 1",
)
