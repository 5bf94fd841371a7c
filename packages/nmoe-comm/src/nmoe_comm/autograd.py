"""Differentiable dispatch and combine over any `Dispatcher`, for the MoE layer.

``dispatch`` makes the received rows differentiable w.r.t. the token rows (backward:
`Dispatcher.dispatch_backward`); ``combine`` makes the output differentiable w.r.t. the expert
results and the gates (backward: `Dispatcher.combine_backward`). Gates enter `combine` as a graph
tensor, so the router receives its gradient there; ``Dispatched.gates_R`` is detached. Letters as
in `nmoe_comm.dispatcher`.

Example (one MoE layer; ``expert_fn`` runs each local expert on its contiguous segment)::

    from nmoe_comm import autograd as comm_autograd
    received = comm_autograd.dispatch(dispatcher, x_TD, expert_ids_TK, gates_TK)
    y_RD = expert_fn(received.x_RD, received.counts_E)
    out_TD = comm_autograd.combine(dispatcher, y_RD, received.handle, gates_TK)
    out_TD.sum().backward()  # gradients reach x_TD, the expert weights and gates_TK

Collectiveness (rule 5) extends to the backward: in a group of several ranks, every rank must
run the backward of every dispatch and combine, so every rank's loss must depend on its
combined output (multiply by zero rather than skip it). Double backward is not supported.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from nmoe_comm.dispatcher import Dispatched, Dispatcher, DispatchHandle


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, dispatcher, expert_ids_TK, gates_TK, result, sync):
        received = dispatcher.dispatch(x_TD, expert_ids_TK, gates_TK.detach(), sync=sync)
        result.append(received)
        ctx.dispatcher = dispatcher
        ctx.handle = received.handle
        ctx.x_dtype = x_TD.dtype
        return received.x_RD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x_RD):
        grad_x_TD = ctx.dispatcher.dispatch_backward(grad_x_RD.contiguous(), ctx.handle)
        return grad_x_TD.to(ctx.x_dtype), None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD, gates_TK, dispatcher, handle):
        ctx.save_for_backward(y_RD, gates_TK)
        ctx.dispatcher = dispatcher
        ctx.handle = handle
        return dispatcher.combine(y_RD, handle, gates_TK)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out_TD):
        y_RD, gates_TK = ctx.saved_tensors
        grad_y_RD, grad_gates_TK = ctx.dispatcher.combine_backward(
            grad_out_TD.contiguous(), y_RD, ctx.handle, gates_TK
        )
        grad_y_RD = grad_y_RD if ctx.needs_input_grad[0] else None
        grad_gates_TK = grad_gates_TK.to(gates_TK.dtype) if ctx.needs_input_grad[1] else None
        return grad_y_RD, grad_gates_TK, None, None


def dispatch(
    dispatcher: Dispatcher,
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    *,
    sync: bool = True,
) -> Dispatched:
    """`Dispatcher.dispatch` whose ``x_RD`` is differentiable w.r.t. ``x_TD``.

    Args:
        dispatcher: the backend.
        x_TD: ``[T, D]`` token rows (float32 / bfloat16 / float16; float64 on ``local``),
            contiguous, may require grad.
        expert_ids_TK: int32/int64 ``[T, K]`` global expert ids in ``[0, E)``.
        gates_TK: float ``[T, K]`` gates; only their values are used here (pass the same graph
            tensor to `combine` for the router's gradient).
        sync: False for the sync-free dispatch (contract rule 7): ``x_RD`` is padded past R
            (``num_received``), its gradient rows past R are ignored, and `combine` takes
            ``y_RD`` with ``x_RD``'s row count.

    Returns:
        `Dispatched` whose ``x_RD`` carries the graph; ``counts_E`` and ``gates_R`` are not
        differentiable. Its backward is `Dispatcher.dispatch_backward` (a fixed-order float32
        sum over each token's K slots).
    """
    if getattr(dispatcher, "zero_copy", False):
        raise ValueError(
            f"dispatcher: a zero_copy {dispatcher.name} dispatcher returns x_RD as a view of its "
            f"buffer, overwritten by the next dispatch, while autograd keeps activations for the "
            f"backward; construct it with zero_copy=False for training")
    result: list[Dispatched] = []
    x_RD = _Dispatch.apply(x_TD, dispatcher, expert_ids_TK, gates_TK, result, sync)
    received = result[0]
    return Dispatched(
        x_RD=x_RD, counts_E=received.counts_E, gates_R=received.gates_R, handle=received.handle,
        num_received=received.num_received,
    )


def combine(
    dispatcher: Dispatcher,
    y_RD: torch.Tensor,
    handle: DispatchHandle,
    gates_TK: torch.Tensor,
) -> torch.Tensor:
    """`Dispatcher.combine` differentiable w.r.t. ``y_RD`` and ``gates_TK``.

    Args:
        dispatcher: the backend that made ``handle``.
        y_RD: ``[R, D']`` expert results in the dispatch layout, may require grad.
        handle: the ``handle`` of the matching `dispatch`.
        gates_TK: float ``[T, K]`` gates, usually the router's output tensor; the gradient w.r.t.
            them (``<dOut[t], y(t, k)>``, float32) is returned in their dtype.

    Returns:
        ``[T, D']`` in ``y_RD``'s dtype: ``out[t] = sum_k gates[t, k] * y(t, k)`` (rule 2).
    """
    return _Combine.apply(y_RD, gates_TK, dispatcher, handle)
