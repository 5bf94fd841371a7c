"""Argument checks shared by the dispatcher backends and the reference.

Every check raises `ValueError` (or `TypeError` for a non-tensor) whose message names the argument
and says how to fix it. Letters as in `nmoe_comm.dispatcher`. Only `check_expert_id_range` reads
tensor values; it synchronises with the device when the ids live on a GPU.
"""

from __future__ import annotations

import torch

from nmoe_comm.dispatcher import ROW_DTYPES, DispatchHandle

#: Row dtypes ``local`` and the reference accept: `ROW_DTYPES` plus float64 for gradient checks.
ROW_DTYPES_WITH_FLOAT64 = (*ROW_DTYPES, torch.float64)
EXPERT_ID_DTYPES = (torch.int32, torch.int64)


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int,
    dtypes: tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Check that ``value`` is a tensor with ``ndim`` dimensions, one of ``dtypes`` (any floating
    dtype when None), on ``device`` (unchecked when None) and, if asked, contiguous."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}"
        )
    if dtypes is None:
        if not value.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {value.dtype}")
    elif value.dtype not in dtypes:
        raise ValueError(
            f"{name} has dtype {value.dtype}; expected one of {_names(dtypes)} "
            f"(convert with .to(...))"
        )
    if device is not None and value.device != device:
        raise ValueError(
            f"{name} is on {value.device} but the rows are on {device}; move it there with "
            f".to({str(device)!r})"
        )
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous; pass {name}.contiguous()")
    return value


def check_shape(name: str, value: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    """Raise unless ``value.shape == expected``; ``meaning`` spells out the expected shape."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"{name} has shape {tuple(value.shape)}, expected {tuple(expected)} ({meaning})"
        )


def check_dispatch_inputs(
    x_TD: object,
    expert_ids_TK: object,
    gates_TK: object,
    *,
    row_dtypes: tuple[torch.dtype, ...] = ROW_DTYPES_WITH_FLOAT64,
) -> tuple[int, int, int]:
    """Check the arguments of `Dispatcher.dispatch` except the id range; return ``(T, K, D)``."""
    x_TD = check_tensor("x_TD", x_TD, ndim=2, dtypes=row_dtypes, contiguous=True)
    device = x_TD.device
    expert_ids_TK = check_tensor(
        "expert_ids_TK", expert_ids_TK, ndim=2, dtypes=EXPERT_ID_DTYPES, device=device
    )
    gates_TK = check_tensor("gates_TK", gates_TK, ndim=2, device=device)
    num_tokens, hidden = x_TD.shape
    if expert_ids_TK.shape[0] != num_tokens:
        raise ValueError(
            f"expert_ids_TK has {expert_ids_TK.shape[0]} rows but x_TD has {num_tokens} tokens; "
            f"expert_ids_TK must be [T, K] with T = x_TD.shape[0]"
        )
    top_k = expert_ids_TK.shape[1]
    if top_k < 1:
        raise ValueError("expert_ids_TK must have at least one slot per token (K >= 1), got K=0")
    check_shape("gates_TK", gates_TK, (num_tokens, top_k), "[T, K], the shape of expert_ids_TK")
    return num_tokens, top_k, hidden


def check_expert_id_range(expert_ids_TK: torch.Tensor, num_experts: int) -> None:
    """Raise unless every id is in ``[0, num_experts)``.

    Reads the ids, so on a GPU this is one device-to-host synchronisation (skipped for T = 0).
    """
    if expert_ids_TK.numel() == 0:
        return
    low, high = torch.aminmax(expert_ids_TK)
    low, high = int(low), int(high)  # the one host sync
    if low < 0 or high >= num_experts:
        bad = low if low < 0 else high
        raise ValueError(
            f"expert_ids_TK holds expert id {bad}, outside [0, {num_experts}); ids are global "
            f"expert indices below num_experts={num_experts}"
        )


def check_gates(
    gates_TK: object, handle: DispatchHandle, device: torch.device
) -> torch.Tensor:
    """The gates a combine applies: ``handle.gates_TK`` when None, else a checked ``[T, K]``."""
    if gates_TK is None:
        return handle.gates_TK
    gates_TK = check_tensor("gates_TK", gates_TK, ndim=2, device=device)
    check_shape(
        "gates_TK", gates_TK, (handle.num_tokens, handle.top_k), "[T, K] of the matching dispatch"
    )
    return gates_TK


def check_rows(
    name: str,
    value: object,
    num_rows: int,
    *,
    hidden: int | None = None,
    device: torch.device | None = None,
    meaning: str = "one per row the matching dispatch delivered, in its layout",
) -> torch.Tensor:
    """Check a ``[N, D']`` row tensor: ``num_rows`` rows (``meaning`` says which), ``hidden``
    columns when given."""
    value = check_tensor(name, value, ndim=2, dtypes=ROW_DTYPES_WITH_FLOAT64, device=device)
    if value.shape[0] != num_rows:
        raise ValueError(f"{name} has {value.shape[0]} rows, expected {num_rows} ({meaning})")
    if hidden is not None and value.shape[1] != hidden:
        raise ValueError(
            f"{name} has {value.shape[1]} columns, expected {hidden} (the dispatched hidden size)"
        )
    return value
