"""Pure-torch reference for routing data movement: permute tokens into expert-contiguous rows and
unpermute expert outputs back to tokens.

Shape letters: T tokens, K top-k slots per token, D hidden dim, E experts, R routed rows
(R = T * K). A routed row is identified by its slot index ``t * K + k`` (token t, slot k).
"""

from __future__ import annotations

import torch

_INTS = (torch.int32, torch.int64)


def permute(
    x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather token rows into expert-contiguous order (stable: by expert, then token, then slot).

    Args:
        x_TD: [T, D] tensor (any dtype).
        expert_ids_TK: [T, K] int32/int64 expert ids in [0, num_experts).
        num_experts: E >= 1.

    Returns:
        x_RD: [R, D] = x_TD[src_index_R // K], R = T * K, same dtype as x.
        counts_E: [E] int64 rows per expert (offsets = concat([0], cumsum(counts))).
        src_index_R: [R] int64 slot index t * K + k of each routed row.
    """
    op = "permute"
    if not isinstance(x_TD, torch.Tensor) or x_TD.dim() != 2:
        raise ValueError(f"{op}: x_TD must be a 2-D tensor [T, D]")
    if not isinstance(expert_ids_TK, torch.Tensor) or expert_ids_TK.dtype not in _INTS:
        raise ValueError(f"{op}: expert_ids_TK must be an int32 or int64 tensor")
    if expert_ids_TK.dim() != 2 or expert_ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(
            f"{op}: expert_ids_TK must be [T, K] with T={x_TD.shape[0]}, got "
            f"{tuple(expert_ids_TK.shape)}"
        )
    if num_experts < 1:
        raise ValueError(f"{op}: num_experts must be >= 1, got {num_experts}")
    flat_ids = expert_ids_TK.reshape(-1).long()
    if flat_ids.numel() and (flat_ids.min() < 0 or flat_ids.max() >= num_experts):
        raise ValueError(
            f"{op}: expert_ids_TK must lie in [0, {num_experts}), got range "
            f"[{int(flat_ids.min())}, {int(flat_ids.max())}]"
        )
    top_k = expert_ids_TK.shape[1]
    src_index_R = torch.sort(flat_ids, stable=True).indices
    counts_E = torch.bincount(flat_ids, minlength=num_experts)
    x_RD = x_TD[torch.div(src_index_R, top_k, rounding_mode="floor")]
    return x_RD, counts_E, src_index_R


def gather_rows(x_TD: torch.Tensor, index_R: torch.Tensor) -> torch.Tensor:
    """Copy rows: ``out_RD[r] = x_TD[index_R[r]]``.

    Args:
        x_TD: [T, D] tensor (any dtype).
        index_R: [R] int32/int64 row indices in [0, T); repeats allowed.

    Returns:
        out_RD [R, D], x's dtype.
    """
    op = "gather_rows"
    if not isinstance(x_TD, torch.Tensor) or x_TD.dim() != 2:
        raise ValueError(f"{op}: x_TD must be a 2-D tensor [T, D]")
    if not isinstance(index_R, torch.Tensor) or index_R.dtype not in _INTS or index_R.dim() != 1:
        raise ValueError(f"{op}: index_R must be a 1-D int32 or int64 tensor [R]")
    index = index_R.long()
    if index.numel() and (index.min() < 0 or index.max() >= x_TD.shape[0]):
        raise ValueError(
            f"{op}: index_R must lie in [0, T={x_TD.shape[0]}), got range "
            f"[{int(index.min())}, {int(index.max())}]"
        )
    return x_TD[index]


def unpermute(
    y_RD: torch.Tensor,
    src_index_R: torch.Tensor,
    gates_TK: torch.Tensor,
    num_tokens: int,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Scatter expert outputs back to tokens, weighted by the gates, in a fixed slot order.

    For each token t, over the slots k = 0..K-1 that appear in src_index_R, in float32:
    ``acc = g_first * y_first; acc = acc + g_k * y_k; ...`` (each product and each sum rounded to
    float32 separately; no FMA), then one cast to the output dtype. Tokens with no routed rows
    get zeros. Deterministic and atomic-free, the contract the fused kernels follow.

    Args:
        y_RD: [R, D] float tensor, row r belongs to slot src_index_R[r].
        src_index_R: [R] int32/int64 distinct slot indices t * K + k in [0, T * K).
        gates_TK: [T, K] float tensor (gate weights; cast to float32).
        num_tokens: T.
        out_dtype: output dtype; default y's dtype.

    Returns:
        out_TD [T, D] ``out_dtype``.
    """
    op = "unpermute"
    if not isinstance(y_RD, torch.Tensor) or y_RD.dim() != 2 or not y_RD.is_floating_point():
        raise ValueError(f"{op}: y_RD must be a 2-D floating tensor [R, D]")
    if not isinstance(src_index_R, torch.Tensor) or src_index_R.dtype not in _INTS:
        raise ValueError(f"{op}: src_index_R must be an int32 or int64 tensor")
    if src_index_R.shape != (y_RD.shape[0],):
        raise ValueError(
            f"{op}: src_index_R must be [R] = [{y_RD.shape[0]}], got {tuple(src_index_R.shape)}"
        )
    if not isinstance(gates_TK, torch.Tensor) or gates_TK.dim() != 2:
        raise ValueError(f"{op}: gates_TK must be a 2-D tensor [T, K]")
    if gates_TK.shape[0] != num_tokens:
        raise ValueError(
            f"{op}: gates_TK has {gates_TK.shape[0]} rows but num_tokens is {num_tokens}"
        )
    top_k = gates_TK.shape[1]
    num_slots = num_tokens * top_k
    index = src_index_R.long()
    if index.numel():
        if index.min() < 0 or index.max() >= num_slots:
            raise ValueError(f"{op}: src_index_R must lie in [0, T*K={num_slots})")
        if torch.bincount(index, minlength=num_slots).max() > 1:
            raise ValueError(f"{op}: src_index_R must not repeat a slot")

    hidden = y_RD.shape[1]
    slots = y_RD.new_zeros(num_slots, hidden, dtype=torch.float32)
    slots[index] = y_RD.float()
    present = torch.zeros(num_slots, dtype=torch.bool, device=y_RD.device)
    present[index] = True
    slots = slots.view(num_tokens, top_k, hidden)
    present = present.view(num_tokens, top_k, 1)
    gates = gates_TK.float().unsqueeze(-1)

    acc = y_RD.new_zeros(num_tokens, hidden, dtype=torch.float32)
    started = torch.zeros(num_tokens, 1, dtype=torch.bool, device=y_RD.device)
    for k in range(top_k):
        product = gates[:, k] * slots[:, k]
        acc = torch.where(present[:, k], torch.where(started, acc + product, product), acc)
        started = started | present[:, k]
    return acc.to(out_dtype or y_RD.dtype)
