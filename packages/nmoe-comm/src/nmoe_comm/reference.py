"""The exact expected result of dispatch/combine over ``W`` ranks, simulated in one process.

This module is the executable form of the contract in `nmoe_comm.dispatcher`: pure torch, written
for clarity rather than speed. Every backend's output on rank ``r`` must be bitwise equal to the
entry ``r`` of these functions' results (``dGates`` only to float32 rounding, see rule 3).

Every function takes per-rank lists: ``xs[r]`` is what rank ``r`` passes to its dispatcher. Ranks
may hold different numbers of tokens (``T_r``, possibly 0) but share ``K``, ``D`` and the dtypes.
Rank ``o`` owns experts ``[o * E_local, (o + 1) * E_local)``; the rows it receives are ordered by
``(local expert, src_rank, token, slot)``. Letters as in `nmoe_comm.dispatcher`.

Example::

    from nmoe_comm import reference
    received = reference.dispatch(xs, expert_ids, gates, num_experts=8)
    ys = [expert_fn(d.x_RD, d.counts_E) for d in received]
    outs = reference.combine(ys, [d.handle for d in received])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nmoe_comm.dispatcher import (
    CapacityError,
    Dispatched,
    DispatchHandle,
    accumulation_dtype,
)
from nmoe_comm.quantization import check_fp8_rows
from nmoe_comm.validation import (
    check_dispatch_inputs,
    check_expert_id_range,
    check_gates,
    check_rows,
)
from nmoe_kernels import reference as kernels_reference


@dataclass(frozen=True)
class ReferenceState:
    """`DispatchHandle.state` of a reference dispatch, for rank ``rank``.

    A rank is both a source (of its ``T`` tokens) and an owner (of the ``R`` rows it received);
    the state maps both ways.

    Attributes:
        rank: the rank this handle belongs to.
        world_size: ``W``.
        num_local_experts: ``E_local``.
        dest_rank_TK: int64 ``[T, K]``: the rank that received slot ``(t, k)`` of this rank.
        dest_row_TK: int64 ``[T, K]``: that row's index in the receiving rank's ``x_RD``.
        src_rank_R: int64 ``[R]``: for each row received here, the rank it came from.
        src_token_R: int64 ``[R]``: its token index on that rank.
        src_slot_R: int64 ``[R]``: its slot ``k``.
    """

    rank: int
    world_size: int
    num_local_experts: int
    dest_rank_TK: torch.Tensor
    dest_row_TK: torch.Tensor
    src_rank_R: torch.Tensor
    src_token_R: torch.Tensor
    src_slot_R: torch.Tensor


def _check_lists(world_size: int, **lists: Sequence) -> None:
    for name, value in lists.items():
        if len(value) != world_size:
            raise ValueError(
                f"{name} has {len(value)} entries, expected one per rank ({world_size})"
            )


def dispatch(
    xs: Sequence[torch.Tensor],
    expert_ids: Sequence[torch.Tensor],
    gates: Sequence[torch.Tensor],
    num_experts: int,
    capacity: int | None = None,
    *,
    fp8: bool = False,
) -> list[Dispatched]:
    """Dispatch every rank's rows to the experts' owners.

    Args:
        xs: ``W`` tensors, ``xs[r]`` is rank ``r``'s ``[T_r, D]`` rows (float32 / bfloat16 /
            float16 / float64, one dtype and one ``D`` for all ranks); ``T_r`` may be 0.
        expert_ids: ``W`` int32/int64 ``[T_r, K]`` global expert ids in ``[0, num_experts)``.
        gates: ``W`` float ``[T_r, K]`` gate weights (kept as float32).
        num_experts: ``E``, divisible by ``W = len(xs)``.
        capacity: the most rows one rank may receive; None for no limit.
        fp8: quantize each rank's rows with `nmoe_kernels.reference.quantize_fp8_1x128` and move
            the FP8 rows and their scales (contract rule 6).

    Returns:
        ``W`` `Dispatched`, entry ``o`` holding what rank ``o`` receives; each handle's ``state``
        is a `ReferenceState`. With ``fp8`` each ``x_RD`` is float8_e4m3fn and ``x_scales_RG``
        holds the scales.

    Raises:
        CapacityError: for the lowest rank that would receive more than ``capacity`` rows.
        ValueError: inconsistent shapes, dtypes or expert ids (the message names the argument).
    """
    world_size = len(xs)
    if world_size == 0:
        raise ValueError("xs is empty; pass one [T_r, D] tensor per rank")
    _check_lists(world_size, expert_ids=expert_ids, gates=gates)
    if num_experts <= 0 or num_experts % world_size != 0:
        raise ValueError(
            f"num_experts={num_experts} must be positive and divisible by the number of ranks "
            f"({world_size})"
        )
    shapes = [check_dispatch_inputs(xs[r], expert_ids[r], gates[r]) for r in range(world_size)]
    for r in range(world_size):
        check_expert_id_range(expert_ids[r], num_experts)
        if shapes[r][1:] != shapes[0][1:] or xs[r].dtype != xs[0].dtype:
            raise ValueError(
                f"rank {r} has K={shapes[r][1]}, D={shapes[r][2]}, dtype {xs[r].dtype} but rank 0 "
                f"has K={shapes[0][1]}, D={shapes[0][2]}, dtype {xs[0].dtype}; all ranks must agree"
            )
    num_local = num_experts // world_size
    ids = [e.to(torch.int64) for e in expert_ids]
    device = xs[0].device

    # Which (src_rank, token, slot) each owner receives, in the contract's order.
    # torch.nonzero lists matches in row-major order: token ascending, then slot ascending.
    src_rank, src_token, src_slot, counts = [], [], [], []
    for owner in range(world_size):
        ranks, tokens, slots, owner_counts = [], [], [], []
        for local_expert in range(num_local):
            expert = owner * num_local + local_expert
            count = 0
            for src in range(world_size):
                token, slot = torch.nonzero(ids[src] == expert, as_tuple=True)
                ranks.append(torch.full_like(token, src))
                tokens.append(token)
                slots.append(slot)
                count += token.numel()
            owner_counts.append(count)
        src_rank.append(torch.cat(ranks))
        src_token.append(torch.cat(tokens))
        src_slot.append(torch.cat(slots))
        counts.append(owner_counts)

    if capacity is not None:
        for owner in range(world_size):
            if sum(counts[owner]) > capacity:
                raise CapacityError(owner, sum(counts[owner]), capacity)

    # All ranks' tokens stacked: rank s's token t is global token token_offset[s] + t.
    token_offset = _offsets([x.shape[0] for x in xs], device)
    x_all, scales_all = _rows_to_move(xs, fp8)
    gates_all = torch.cat([g.detach().float() for g in gates])

    # The inverse map, per source: where each of its slots landed.
    dest_row_all = torch.empty_like(torch.cat(ids))
    for owner in range(world_size):
        token_all = token_offset[src_rank[owner]] + src_token[owner]
        dest_row_all[token_all, src_slot[owner]] = torch.arange(token_all.numel(), device=device)
    dest_row = torch.split(dest_row_all, [x.shape[0] for x in xs])

    received = []
    for owner in range(world_size):
        token_all = token_offset[src_rank[owner]] + src_token[owner]
        state = ReferenceState(
            rank=owner,
            world_size=world_size,
            num_local_experts=num_local,
            dest_rank_TK=ids[owner] // num_local,
            dest_row_TK=dest_row[owner],
            src_rank_R=src_rank[owner],
            src_token_R=src_token[owner],
            src_slot_R=src_slot[owner],
        )
        handle = DispatchHandle(
            num_tokens=xs[owner].shape[0],
            top_k=ids[owner].shape[1],
            hidden=xs[owner].shape[1],
            dtype=xs[owner].dtype,
            gates_TK=gates[owner].detach().float(),
            expert_ids_TK=ids[owner],
            state=state,
        )
        x_RD = x_all[token_all]
        received.append(
            Dispatched(
                x_RD=x_RD.view(torch.float8_e4m3fn) if fp8 else x_RD,
                counts_E=torch.tensor(counts[owner], dtype=torch.int64, device=device),
                gates_R=gates_all[token_all, src_slot[owner]],
                handle=handle,
                x_scales_RG=None if scales_all is None else scales_all[token_all],
            )
        )
    return received


def _rows_to_move(
    xs: Sequence[torch.Tensor], fp8: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All ranks' rows stacked, as they travel: the rows themselves, or (rule 6) their FP8
    quantization as uint8 (indexable on every device) plus the float32 ``[T, G]`` scales."""
    if not fp8:
        return torch.cat(list(xs)), None
    quantized = []
    for x in xs:
        check_fp8_rows(x)
        quantized.append(kernels_reference.quantize_fp8_1x128(x))
    rows = torch.cat([q.view(torch.uint8) for q, _ in quantized])
    return rows, torch.cat([s for _, s in quantized])


def _offsets(sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 ``[len(sizes)]``: where each block starts when the blocks are concatenated."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return torch.tensor(starts, dtype=torch.int64, device=device)


def _check_gates(
    gates: Sequence[torch.Tensor] | None, handles: Sequence[DispatchHandle], acc_dtype: torch.dtype
) -> list[torch.Tensor]:
    """The gates to apply per source rank, in ``acc_dtype``: ``gates`` or the handles' gates."""
    if gates is None:
        return [h.gates_TK.to(acc_dtype) for h in handles]
    _check_lists(len(handles), gates=gates)
    return [
        check_gates(gates[r], h, h.gates_TK.device).to(acc_dtype) for r, h in enumerate(handles)
    ]


def _states(handles: Sequence[DispatchHandle]) -> list[ReferenceState]:
    states = [h.state for h in handles]
    for r, state in enumerate(states):
        if not isinstance(state, ReferenceState) or state.rank != r:
            raise ValueError(
                f"handles[{r}] is not rank {r}'s handle from reference.dispatch; pass "
                f"[d.handle for d in reference.dispatch(...)] in rank order"
            )
    return states


def _rows_of_slots(ys: Sequence[torch.Tensor], state: ReferenceState) -> torch.Tensor:
    """``[T, K, D']``: the row ``y(t, k)`` that slot ``(t, k)`` of ``state``'s rank got back."""
    row_offset = _offsets([y.shape[0] for y in ys], ys[0].device)
    return torch.cat(list(ys))[row_offset[state.dest_rank_TK] + state.dest_row_TK]


def _sum_slots(y_TKD: torch.Tensor, gates_TK: torch.Tensor | None) -> torch.Tensor:
    """Rule 2: ``acc = g0*y0; acc = acc + g1*y1; ...``, each product and sum its own op (and so
    rounded on its own); ``y_TKD`` and ``gates_TK`` already in the accumulation dtype.
    With ``gates_TK`` None the terms are the rows themselves (rule 3, dispatch backward)."""
    acc = None
    for k in range(y_TKD.shape[1]):
        term = y_TKD[:, k] if gates_TK is None else gates_TK[:, k, None] * y_TKD[:, k]
        acc = term if acc is None else acc + term
    return acc


def _sum_on_owners(y_TKD: torch.Tensor, gates_TK: torch.Tensor | None, owner_TK: torch.Tensor,
                   row_dtype: torch.dtype) -> torch.Tensor:
    """``reduce_on_owner`` (`nmoe_comm.rdep`): per token and owner the sum over the token's slots
    on that owner, slot order, of ``gate * y`` (``y`` without gates), each product and sum its
    own op, rounded to ``row_dtype``; then the sum of those partial sums over the owners in the
    order of each owner's first slot. ``y_TKD`` and ``gates_TK`` in the accumulation dtype."""
    top_k = y_TKD.shape[1]
    # head_TK[t, k]: the token's first slot on slot k's owner.
    head_TK = torch.empty_like(owner_TK)
    for k in range(top_k):
        head_TK[:, k] = k
        for j in reversed(range(k)):
            head_TK[:, k] = torch.where(owner_TK[:, j] == owner_TK[:, k], j, head_TK[:, k])
    partial_TKD = torch.zeros_like(y_TKD)
    rows = torch.arange(y_TKD.shape[0], device=y_TKD.device)
    for k in range(top_k):
        term = y_TKD[:, k] if gates_TK is None else gates_TK[:, k, None] * y_TKD[:, k]
        first = head_TK[:, k] == k
        head_rows = partial_TKD[rows, head_TK[:, k]]
        partial_TKD[rows, head_TK[:, k]] = torch.where(first[:, None], term, head_rows + term)
    partial_TKD = partial_TKD.to(row_dtype).to(y_TKD.dtype)
    acc = partial_TKD[:, 0]
    for k in range(1, top_k):
        acc = torch.where((head_TK[:, k] == k)[:, None], acc + partial_TKD[:, k], acc)
    return acc


def _check_ys(
    name: str, ys: Sequence[torch.Tensor], handles: Sequence[DispatchHandle], *, dispatched: bool
) -> None:
    """Check per-owner ``[R_o, D']`` rows (``D' = D`` when ``dispatched``)."""
    _check_lists(len(handles), **{name: ys})
    for o, handle in enumerate(handles):
        check_rows(f"{name}[{o}]", ys[o], handle.state.src_rank_R.numel(),
                   hidden=handle.hidden if dispatched else None)
        if ys[o].dtype != ys[0].dtype or ys[o].shape[1] != ys[0].shape[1]:
            raise ValueError(f"{name}[{o}] and {name}[0] differ in dtype or width; they must agree")


def combine(
    ys: Sequence[torch.Tensor],
    handles: Sequence[DispatchHandle],
    gates: Sequence[torch.Tensor] | None = None,
    *,
    reduce_on_owner: bool = False,
) -> list[torch.Tensor]:
    """Return every row to its source and reduce with the gates (rule 2).

    Args:
        ys: ``W`` tensors, ``ys[o]`` is ``[R_o, D']`` (one dtype, one ``D'`` for all ranks): the
            results for the rows rank ``o`` received, in the dispatch layout.
        handles: the ``W`` handles of the matching `dispatch`, in rank order.
        gates: ``W`` float ``[T_r, K]`` gates, or None for the handles' gates.
        reduce_on_owner: the sum of an ``ipc`` / ``nvshmem`` dispatcher built with
            ``reduce_on_owner=True`` for a combine without gates: each owner's partial sum of a
            token's slots (slot order) rounded to the rows' dtype, then the partial sums in the
            order of each owner's first slot (`nmoe_comm.rdep`).

    Returns:
        ``W`` tensors, entry ``r`` is ``[T_r, D']`` in ``ys``' dtype:
        ``out[t] = sum_k gates[t, k] * y(t, k)`` in float32 (float64 for float64 rows), slot order.
    """
    states = _states(handles)
    _check_ys("ys", ys, handles, dispatched=False)
    acc_dtype = accumulation_dtype(ys[0].dtype)
    gates_acc = _check_gates(gates, handles, acc_dtype)
    outs = []
    for src, state in enumerate(states):
        y_TKD = _rows_of_slots(ys, state).to(acc_dtype)
        if reduce_on_owner:
            out = _sum_on_owners(y_TKD, gates_acc[src], state.dest_rank_TK, ys[0].dtype)
        else:
            out = _sum_slots(y_TKD, gates_acc[src])
        outs.append(out.to(ys[0].dtype))
    return outs


def dispatch_backward(
    grads: Sequence[torch.Tensor], handles: Sequence[DispatchHandle], *,
    reduce_on_owner: bool = False,
) -> list[torch.Tensor]:
    """Gradient of `dispatch` w.r.t. each rank's ``xs[r]`` (rule 3).

    Args:
        grads: ``W`` tensors, ``grads[o]`` is ``[R_o, D]``, the gradient of rank ``o``'s ``x_RD``.
        handles: the ``W`` handles of the matching `dispatch`, in rank order.
        reduce_on_owner: sum on the owners first, as `combine` with ``reduce_on_owner``.

    Returns:
        ``W`` tensors, entry ``r`` is ``[T_r, D]`` in ``grads``' dtype:
        ``dx[t] = sum_k grad(t, k)`` in float32 (float64 for float64 rows), slot order.
    """
    states = _states(handles)
    _check_ys("grads", grads, handles, dispatched=True)
    acc_dtype = accumulation_dtype(grads[0].dtype)
    outs = []
    for state in states:
        g_TKD = _rows_of_slots(grads, state).to(acc_dtype)
        out = (_sum_on_owners(g_TKD, None, state.dest_rank_TK, grads[0].dtype)
               if reduce_on_owner else _sum_slots(g_TKD, None))
        outs.append(out.to(grads[0].dtype))
    return outs


def combine_backward(
    grad_outs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    handles: Sequence[DispatchHandle],
    gates: Sequence[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of `combine` w.r.t. each rank's ``ys[o]`` and gates (rule 3).

    Args:
        grad_outs: ``W`` tensors, ``grad_outs[r]`` is ``[T_r, D']``, the gradient of rank ``r``'s
            combined output.
        ys: the ``W`` ``[R_o, D']`` tensors the forward combined.
        handles: the ``W`` handles of the matching `dispatch`, in rank order.
        gates: the gates the forward used, or None for the handles' gates.

    Returns:
        ``(grad_ys, grad_gates)``: ``grad_ys[o][row] = gate(row) * grad_out[t(row)]`` ``[R_o, D']``
        in ``ys``' dtype (one product in the accumulation dtype, then cast), and
        ``grad_gates[r][t, k] = <grad_outs[r][t], y(t, k)>`` ``[T_r, K]`` in the accumulation
        dtype (float32, float64 for float64 rows).
    """
    states = _states(handles)
    _check_ys("ys", ys, handles, dispatched=False)
    _check_lists(len(states), grad_outs=grad_outs)
    acc_dtype = accumulation_dtype(ys[0].dtype)
    for r, handle in enumerate(handles):
        check_rows(f"grad_outs[{r}]", grad_outs[r], handle.num_tokens, hidden=ys[0].shape[1],
                   meaning=f"one per token of rank {r}")
    gates_acc = _check_gates(gates, handles, acc_dtype)
    grad_outs_acc = [g.to(acc_dtype) for g in grad_outs]

    # Each received row's gate and output gradient, looked up at its source.
    token_offset = _offsets([g.shape[0] for g in grad_outs], ys[0].device)
    grad_out_all = torch.cat(grad_outs_acc)
    gates_all = torch.cat(gates_acc)
    grad_ys = []
    for state in states:
        token_all = token_offset[state.src_rank_R] + state.src_token_R
        gate_R = gates_all[token_all, state.src_slot_R]
        grad_ys.append((gate_R[:, None] * grad_out_all[token_all]).to(ys[0].dtype))

    grad_gates = []
    for src, state in enumerate(states):
        y_TKD = _rows_of_slots(ys, state).to(acc_dtype)
        dots = [(grad_outs_acc[src] * y_TKD[:, k]).sum(dim=-1) for k in range(y_TKD.shape[1])]
        grad_gates.append(torch.stack(dots, dim=1))
    return grad_ys, grad_gates
