"""``nccl``: the portable expert-parallel `Dispatcher`, over torch.distributed ``all_to_all``.

The baseline the GPU backends are measured against, and the path that runs anywhere
torch.distributed does: NCCL on GPUs, gloo on CPUs (the CPU test suite runs it over gloo with 2
and 3 processes). Results are bitwise equal to `nmoe_comm.reference`. Letters as in
`nmoe_comm.dispatcher`; ``N = T * K`` slots on this rank.

Dispatch, on every rank:

1. Sort the ``N`` slots by expert id, stably, so the **send order** is owner-major, then local
   expert, token, slot (the order of each owner's segment in the contract).
2. ``all_gather`` of the per-expert slot counts (plus a count of out-of-range ids) into the count
   matrix ``C [W, E + 1]``, then one device-to-host copy of ``C``: **the one host
   synchronisation per dispatch**, needed because the ``all_to_all`` split sizes and the shape of
   ``x_RD`` must be known on the host. Every rank sees every owner's total, so a capacity
   overflow (or a bad expert id) raises on every rank before any row moves.
3. ``all_to_all_single`` of the rows (as bytes, so any dtype travels) and of the gates, in send
   order; rows arrive source-major (**landing order**: source, local expert, token, slot).
4. The owner gathers landing order into the contract order (local expert, source, token, slot)
   with positions from prefix sums of ``C``: no sort.

Combine and ``dispatch_backward`` run the way back: the owner scatters its rows to landing order,
one ``all_to_all`` with the splits swapped returns them in send order, and the source reduces
each token's ``K`` slots in fixed order (rule 2). ``combine_backward`` sends each slot's
``dOut[t]`` and gate to the owner (forward splits, no host sync), which forms ``grad_y`` and the
per-row dots ``<dOut[t], y>``; the dots return by one more ``all_to_all``.

Only ``dispatch`` synchronises with the host; the other methods reuse the split sizes kept in
the handle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nmoe_comm.dispatcher import (
    CapacityError,
    Dispatched,
    Dispatcher,
    DispatchHandle,
    accumulation_dtype,
)
from nmoe_comm.quantization import check_fp8_rows, quantize_rows_fp8
from nmoe_comm.registry import register_backend
from nmoe_comm.validation import (
    ROW_DTYPES_WITH_FLOAT64,
    check_dispatch_inputs,
    check_gates,
    check_rows,
    check_tensor,
)


@dataclass(frozen=True)
class NcclRouting:
    """`DispatchHandle.state` of an `NcclDispatcher` dispatch.

    Attributes:
        send_pos_TK: int64 ``[T, K]``: position of slot ``(t, k)`` in this rank's send order.
        slot_of_send_N: int64 ``[N]``: the flat slot ``t * K + k`` of each send-order row.
        token_of_send_N: int64 ``[N]``: the token of each send-order row.
        send_splits: rows this rank sent to each owner (``W`` ints, host).
        recv_splits: rows this rank received from each source (``W`` ints, host).
        land_row_R: int64 ``[R]``: landing-order index of each received row (contract order).
        dispatcher_id: ``id()`` of the dispatcher that made the handle (checked on use).
    """

    send_pos_TK: torch.Tensor
    slot_of_send_N: torch.Tensor
    token_of_send_N: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    land_row_R: torch.Tensor
    dispatcher_id: int


# torch >= 2.13 renames all_gather_into_tensor (deprecated there) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _as_bytes(rows: torch.Tensor) -> torch.Tensor:
    """``[M, B]`` uint8 view of ``[M, D]`` rows (any dtype travels as bytes)."""
    if rows.numel() == 0:  # an empty tensor may carry any strides (e.g. an expanded gradient)
        return torch.empty(rows.shape[0], rows.shape[1] * rows.element_size(),
                           dtype=torch.uint8, device=rows.device)
    return rows.contiguous().view(torch.uint8)


class NcclDispatcher(Dispatcher):
    """Dispatch/combine over ``torch.distributed.all_to_all_single`` (NCCL, gloo, ...).

    Args:
        num_experts: ``E``, divisible by ``world_size``.
        capacity: the most rows one rank may receive per dispatch; more raises `CapacityError`
            on every rank before any row moves.
        world_size: ``W``; must equal the group's size.
        rank: this rank; must equal the rank in the group.
        group: the process group (default: the world group). Rows must live where the group's
            backend works (CUDA tensors for NCCL, CPU tensors for gloo).
    """

    name = "nccl"

    def __init__(
        self,
        num_experts: int,
        capacity: int,
        world_size: int = 1,
        rank: int = 0,
        *,
        group: dist.ProcessGroup | None = None,
    ):
        super().__init__(num_experts, capacity, world_size, rank)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "the nccl dispatcher needs torch.distributed: call "
                "torch.distributed.init_process_group(...) before creating it"
            )
        group_size, group_rank = dist.get_world_size(group), dist.get_rank(group)
        if (group_size, group_rank) != (world_size, rank):
            raise ValueError(
                f"world_size={world_size}, rank={rank} do not match the process group (size "
                f"{group_size}, this process is rank {group_rank}); pass the group's values"
            )
        self.group = group
        self._destroyed = False

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
        """Transient bytes of one dispatch + combine (an upper bound; nothing is kept).

        A dispatch holds the send-order rows, the landing rows and ``x_RD`` (``N + 2R`` rows of
        ``hidden`` elements), float32 gates and int64 index vectors (about 6 per slot and 5 per
        received row). A combine holds the landing rows, the returned rows and, per slot, a
        gathered row block plus its float32 product and running sum. ``N <= max_send_rows``
        (default ``capacity``), ``R <= capacity``; ``world_size`` is ignored.
        """
        send = capacity if max_send_rows is None else max_send_rows
        item = torch.empty(0, dtype=dtype).element_size()
        acc = torch.empty(0, dtype=accumulation_dtype(dtype)).element_size()
        row = hidden * item
        dispatch_bytes = send * (row + 4 + 6 * 8) + capacity * (2 * row + 4 * 2 + 5 * 8)
        combine_bytes = capacity * row + send * row + send * hidden * (item + 3 * acc)
        return dispatch_bytes + combine_bytes

    def _all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]):
        """Rows of ``send`` (split by ``send_splits`` over the owners) -> received rows."""
        recv = send.new_empty((sum(recv_splits), *send.shape[1:]))
        dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=self.group)
        return recv

    # ------------------------------------------------------------------------------- dispatch

    def _exchange_counts(self, ids_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' per-expert counts: ``(C [W, E+1] on the rows' device, C on the host)``.

        Column ``E`` counts this rank's ids outside ``[0, E)`` (they are not counted elsewhere).
        """
        num_experts = self.num_experts
        bad = (ids_N < 0) | (ids_N >= num_experts)
        column = torch.where(bad, num_experts, ids_N)
        # index_add_, not bincount: bincount sizes its output from the ids' max, a host sync.
        counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids_N.device)
        counts.index_add_(0, column, torch.ones_like(column))
        gathered = counts.new_empty(self.world_size * (num_experts + 1))
        _all_gather_single(gathered, counts, group=self.group)
        gathered = gathered.view(self.world_size, num_experts + 1)
        return gathered, gathered.cpu()  # the one host synchronisation

    def _check_counts(self, counts_host: torch.Tensor) -> None:
        """Raise on every rank alike: a bad expert id anywhere, or an owner over capacity."""
        num_experts = self.num_experts
        bad_ranks = torch.nonzero(counts_host[:, num_experts]).flatten().tolist()
        if bad_ranks:
            where = "this rank's" if bad_ranks[0] == self.rank else f"rank {bad_ranks[0]}'s"
            raise ValueError(
                f"expert_ids_TK: {where} expert ids include values outside [0, {num_experts}); "
                f"ids are global expert indices below num_experts={num_experts}"
            )
        per_owner = counts_host[:, :num_experts].reshape(self.world_size, self.world_size, -1)
        totals = per_owner.sum(dim=(0, 2)).tolist()
        for owner, rows in enumerate(totals):
            if rows > self.capacity:
                raise CapacityError(owner, rows, self.capacity)

    def _landing_rows(self, counts: torch.Tensor, num_rows: int) -> torch.Tensor:
        """int64 ``[R]``: the landing-order index of each row in contract order.

        Landing order is ``(source, local expert, token, slot)``, contract order
        ``(local expert, source, token, slot)``; both block layouts come from prefix sums of
        ``M[s, e] = C[s, rank * E_local + e]``.
        """
        local = self.num_local_experts
        first = self.rank * local
        block_SE = counts[:, first:first + local]
        land_start_SE = (torch.cumsum(block_SE.flatten(), 0) - block_SE.flatten()).view_as(
            block_SE)
        block_ES = block_SE.t().flatten()
        contract_start = torch.cumsum(block_ES, 0) - block_ES
        block_of_row = torch.repeat_interleave(
            torch.arange(block_ES.numel(), device=counts.device), block_ES, output_size=num_rows)
        within = torch.arange(num_rows, device=counts.device) - contract_start[block_of_row]
        expert, source = block_of_row // self.world_size, block_of_row % self.world_size
        return land_start_SE[source, expert] + within

    def dispatch(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        gates_TK: torch.Tensor,
        *,
        fp8: bool = False,
        sync: bool = True,
    ) -> Dispatched:
        """See `Dispatcher.dispatch`; one host synchronisation (module docstring, step 2).
        ``sync=False`` is not supported (the all_to_all split sizes live on the host)."""
        self._check_live()
        if not sync:
            raise NotImplementedError(
                "dispatch(sync=False) is not supported by the nccl backend: all_to_all_single "
                "needs the split sizes on the host; call dispatch with sync=True (the default), "
                "or use the ipc / nvshmem backend for a sync-free dispatch")
        num_tokens, top_k, hidden = check_dispatch_inputs(x_TD, expert_ids_TK, gates_TK)
        if fp8:
            check_fp8_rows(x_TD)
        device = x_TD.device
        ids_N = expert_ids_TK.reshape(-1).to(torch.int64)
        slot_of_send_N = torch.sort(ids_N, stable=True).indices
        num_slots = ids_N.numel()
        send_pos_N = torch.empty_like(slot_of_send_N).scatter_(
            0, slot_of_send_N, torch.arange(num_slots, device=device))

        counts, counts_host = self._exchange_counts(ids_N)
        self._check_counts(counts_host)
        local = self.num_local_experts
        per_owner = counts_host[:, :self.num_experts].reshape(self.world_size, self.world_size,
                                                              local).sum(dim=2)
        send_splits = per_owner[self.rank].tolist()
        recv_splits = per_owner[:, self.rank].tolist()
        num_rows = sum(recv_splits)
        land_row_R = self._landing_rows(counts, num_rows)

        token_of_send_N = slot_of_send_N // top_k
        gates_f32_TK = gates_TK.detach().to(torch.float32)
        payloads = quantize_rows_fp8(x_TD) if fp8 else (x_TD,)
        moved = []
        for rows_TB in payloads:
            send = _as_bytes(rows_TB).index_select(0, token_of_send_N)
            moved.append(self._all_to_all(send, send_splits, recv_splits).index_select(
                0, land_row_R))
        gates_send = gates_f32_TK.reshape(-1).index_select(0, slot_of_send_N)
        gates_R = self._all_to_all(gates_send, send_splits, recv_splits).index_select(
            0, land_row_R)

        handle = DispatchHandle(
            num_tokens=num_tokens,
            top_k=top_k,
            hidden=hidden,
            dtype=x_TD.dtype,
            gates_TK=gates_f32_TK,
            expert_ids_TK=ids_N.view(num_tokens, top_k),
            state=NcclRouting(
                send_pos_TK=send_pos_N.view(num_tokens, top_k),
                slot_of_send_N=slot_of_send_N,
                token_of_send_N=token_of_send_N,
                send_splits=send_splits,
                recv_splits=recv_splits,
                land_row_R=land_row_R,
                dispatcher_id=id(self),
            ),
        )
        first = self.rank * local
        counts_E = counts[:, first:first + local].sum(dim=0)
        if fp8:
            return Dispatched(
                x_RD=moved[0].view(torch.float8_e4m3fn), counts_E=counts_E, gates_R=gates_R,
                handle=handle, x_scales_RG=moved[1].view(torch.float32))
        x_RD = moved[0].view(x_TD.dtype).view(num_rows, hidden)
        return Dispatched(x_RD=x_RD, counts_E=counts_E, gates_R=gates_R, handle=handle)

    # ------------------------------------------------------------------- combine and backward

    def _return_rows(self, y_RD: torch.Tensor, routing: NcclRouting) -> torch.Tensor:
        """Each received row back at its source: ``[N, D']`` in send order, ``y_RD``'s dtype."""
        y_land = torch.empty_like(y_RD).index_copy_(0, routing.land_row_R, y_RD)
        back = self._all_to_all(_as_bytes(y_land), routing.recv_splits, routing.send_splits)
        return back.view(y_RD.dtype).view(back.shape[0], y_RD.shape[1])

    def _sum_slots(
        self, rows_ND: torch.Tensor, routing: NcclRouting, gates_TK: torch.Tensor | None
    ) -> torch.Tensor:
        """Rule 2 (rule 3 without gates): per slot gather ``y(t, k)``, multiply, accumulate;
        each product and sum its own op, so each is rounded on its own."""
        acc_dtype = accumulation_dtype(rows_ND.dtype)
        if gates_TK is not None:
            gates_TK = gates_TK.to(acc_dtype)
        acc = None
        for k in range(routing.send_pos_TK.shape[1]):
            term = rows_ND.index_select(0, routing.send_pos_TK[:, k]).to(acc_dtype)
            if gates_TK is not None:
                term = gates_TK[:, k, None] * term
            acc = term if acc is None else acc + term
        return acc.to(rows_ND.dtype)

    def _checked_rows(self, name: str, rows: object, routing: NcclRouting, hidden=None):
        rows = check_rows(name, rows, routing.land_row_R.numel(), hidden=hidden,
                          device=routing.land_row_R.device)
        return rows.contiguous()

    def combine(
        self,
        y_RD: torch.Tensor,
        handle: DispatchHandle,
        gates_TK: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See `Dispatcher.combine`; no host synchronisation."""
        self._check_live()
        routing = self._routing(handle, NcclRouting)
        y_RD = self._checked_rows("y_RD", y_RD, routing)
        gates_TK = check_gates(gates_TK, handle, y_RD.device)
        return self._sum_slots(self._return_rows(y_RD, routing), routing, gates_TK)

    def dispatch_backward(self, grad_x_RD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """See `Dispatcher.dispatch_backward`; no host synchronisation."""
        self._check_live()
        routing = self._routing(handle, NcclRouting)
        grad_x_RD = self._checked_rows("grad_x_RD", grad_x_RD, routing, hidden=handle.hidden)
        return self._sum_slots(self._return_rows(grad_x_RD, routing), routing, None)

    def combine_backward(
        self,
        grad_out_TD: torch.Tensor,
        y_RD: torch.Tensor,
        handle: DispatchHandle,
        gates_TK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See `Dispatcher.combine_backward`; no host synchronisation."""
        self._check_live()
        routing = self._routing(handle, NcclRouting)
        y_RD = self._checked_rows("y_RD", y_RD, routing)
        device = y_RD.device
        grad_out_TD = check_tensor("grad_out_TD", grad_out_TD, ndim=2,
                                   dtypes=ROW_DTYPES_WITH_FLOAT64, device=device)
        if tuple(grad_out_TD.shape) != (handle.num_tokens, y_RD.shape[1]):
            raise ValueError(
                f"grad_out_TD has shape {tuple(grad_out_TD.shape)}, expected "
                f"{(handle.num_tokens, y_RD.shape[1])} ([T, D'] with D' = y_RD.shape[1])"
            )
        acc_dtype = accumulation_dtype(y_RD.dtype)
        gates_TK = check_gates(gates_TK, handle, device).to(acc_dtype)

        # dOut[t] per slot travels in its own dtype and is widened at the owner, like the
        # reference widens it before any product.
        send = _as_bytes(grad_out_TD).index_select(0, routing.token_of_send_N)
        landed = self._all_to_all(send, routing.send_splits, routing.recv_splits)
        grad_out_RD = landed.index_select(0, routing.land_row_R).view(grad_out_TD.dtype).to(
            acc_dtype)
        gates_send = gates_TK.reshape(-1).index_select(0, routing.slot_of_send_N)
        gate_R = self._all_to_all(gates_send, routing.send_splits,
                                  routing.recv_splits).index_select(0, routing.land_row_R)

        grad_y_RD = (gate_R[:, None] * grad_out_RD).to(y_RD.dtype)
        dots_R = (grad_out_RD * y_RD.to(acc_dtype)).sum(dim=-1)
        dots_land = torch.empty_like(dots_R).index_copy_(0, routing.land_row_R, dots_R)
        dots_N = self._all_to_all(dots_land, routing.recv_splits, routing.send_splits)
        grad_gates_TK = dots_N.index_select(0, routing.send_pos_TK.reshape(-1)).view(
            handle.num_tokens, handle.top_k)
        return grad_y_RD, grad_gates_TK


def _missing() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_initialized():
        return (
            "torch.distributed is not initialised; call torch.distributed.init_process_group "
            "(NCCL for CUDA rows, gloo for CPU rows) before create_dispatcher"
        )
    return None


register_backend(
    "nccl",
    NcclDispatcher,
    summary="torch.distributed all_to_all (NCCL on GPUs, gloo on CPUs); the portable baseline",
    missing=_missing,
)
