"""Routing data movement on the GPU (CUDA kernels in nmoe_kernels._C): permute token rows into
expert-contiguous order, unpermute expert outputs back to tokens, gather rows.

Shape letters: T tokens, K top-k slots per token, D hidden dim, E experts, R routed rows
(R = T * K for `permute`). A routed row is identified by its slot index ``t * K + k``.

Each op is bitwise equal to its reference in `nmoe_kernels.reference.permutation` and
deterministic: no atomics decide any order or sum. Arguments are checked here (values stay on the
GPU: checking ids or indices would need a host sync, so out-of-range values have the defined but
reference-free behaviour stated per op), outputs are allocated with torch, and the kernels run on
the current CUDA stream of the inputs' device.
"""

from __future__ import annotations

import torch

from nmoe_kernels import _extension

__all__ = ["gather_rows", "permute", "unpermute"]

_INTS = (torch.int32, torch.int64)
_FLOATS = (torch.bfloat16, torch.float32)


def _byte_rows(op: str, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` [rows, D] as a [rows, D * element_size] uint8 view (the kernels move raw bytes)."""
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; call .contiguous() first")
    if t.data_ptr() % 16 != 0:
        raise ValueError(f"{op}: {name} must start at a 16-byte aligned address; .clone() it")
    return t.view(torch.uint8)  # [rows, D * element_size]: the last dim scales with the size


def _check_index(op: str, name: str, t: torch.Tensor, length: int | None = None) -> None:
    if t.dtype not in _INTS or t.dim() != 1:
        raise ValueError(
            f"{op}: {name} must be a 1-D int32 or int64 tensor, got {t.dtype}{tuple(t.shape)}"
        )
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{op}: {name} must have {length} entries, got {t.shape[0]}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; call .contiguous() first")


def permute(
    x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather token rows into expert-contiguous order, stable: by expert, then token, then slot.

    A counting sort (per-chunk counts, one scan, ranks from warp-level matching) followed by a row
    gather with 16-byte vectors when D * element_size % 16 == 0; bitwise equal to
    `nmoe_kernels.reference.permute`.

    Args:
        x_TD: [T, D] CUDA tensor of any dtype, contiguous, 16-byte aligned.
        expert_ids_TK: [T, K] int32 or int64 on the same device, contiguous; T * K < 2^31. Ids
            should lie in [0, num_experts) (not checked: that needs a host sync). A slot whose id
            lies outside is placed after the last expert's rows (in slot order) and is not
            counted in counts_E, so ``counts_E.sum() < T * K`` reveals it.
        num_experts: E, 1 <= E <= 1024.

    Returns:
        x_RD: [R, D] = x_TD[src_index_R // K], R = T * K, x's dtype.
        counts_E: [E] int64 rows per expert (offsets = concat([0], cumsum(counts))).
        src_index_R: [R] int64 slot index t * K + k of each routed row.
    """
    op = "permute"
    device = _extension.check_cuda_tensors(op, x_TD=x_TD, expert_ids_TK=expert_ids_TK)
    x_bytes = _byte_rows(op, "x_TD", x_TD)
    if expert_ids_TK.dtype not in _INTS or expert_ids_TK.dim() != 2:
        raise ValueError(
            f"{op}: expert_ids_TK must be a 2-D int32 or int64 tensor [T, K], got "
            f"{expert_ids_TK.dtype}{tuple(expert_ids_TK.shape)}"
        )
    if expert_ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(
            f"{op}: expert_ids_TK must be [T, K] with T = {x_TD.shape[0]} (x_TD's rows), got "
            f"{tuple(expert_ids_TK.shape)}"
        )
    if not expert_ids_TK.is_contiguous():
        raise ValueError(f"{op}: expert_ids_TK must be contiguous; call .contiguous() first")
    compiled = _extension.compiled_module(op)
    if not 1 <= num_experts <= compiled.PERMUTE_MAX_EXPERTS:
        raise ValueError(
            f"{op}: num_experts must lie in [1, {compiled.PERMUTE_MAX_EXPERTS}], got {num_experts}"
        )
    num_slots = expert_ids_TK.numel()
    if num_slots >= 2**31:
        raise ValueError(f"{op}: T * K = {num_slots} must be below 2^31; split the batch")
    x_RD = torch.empty(num_slots, x_TD.shape[1], dtype=x_TD.dtype, device=device)
    counts_E = torch.empty(num_experts, dtype=torch.int64, device=device)
    src_index_R = torch.empty(num_slots, dtype=torch.int64, device=device)
    workspace = torch.empty(
        compiled.permute_workspace_numel(num_slots, num_experts), dtype=torch.int32, device=device
    )
    compiled.permute(
        _extension.capsule(x_bytes),
        _extension.capsule(expert_ids_TK),
        int(num_experts),
        _extension.capsule(_byte_rows(op, "x_RD", x_RD)),
        _extension.capsule(counts_E),
        _extension.capsule(src_index_R),
        _extension.capsule(workspace),
        _extension.stream_handle(device),
    )
    return x_RD, counts_E, src_index_R


def gather_rows(x_TD: torch.Tensor, index_R: torch.Tensor) -> torch.Tensor:
    """Copy rows: ``out_RD[r] = x_TD[index_R[r]]``, bitwise equal to
    `nmoe_kernels.reference.gather_rows`.

    Args:
        x_TD: [T, D] CUDA tensor of any dtype, contiguous, 16-byte aligned.
        index_R: [R] int32 or int64 on the same device, contiguous; values in [0, T), repeats
            allowed. Not checked (that needs a host sync): a row whose index lies outside [0, T)
            is written as zeros.

    Returns:
        out_RD [R, D], x's dtype.
    """
    op = "gather_rows"
    device = _extension.check_cuda_tensors(op, x_TD=x_TD, index_R=index_R)
    x_bytes = _byte_rows(op, "x_TD", x_TD)
    _check_index(op, "index_R", index_R)
    compiled = _extension.compiled_module(op)
    out = torch.empty(index_R.shape[0], x_TD.shape[1], dtype=x_TD.dtype, device=device)
    compiled.gather_rows(
        _extension.capsule(x_bytes),
        _extension.capsule(index_R),
        _extension.capsule(_byte_rows(op, "out", out)),
        _extension.stream_handle(device),
    )
    return out


def unpermute(
    y_RD: torch.Tensor,
    src_index_R: torch.Tensor,
    gates_TK: torch.Tensor,
    num_tokens: int,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Scatter expert outputs back to tokens, weighted by the gates, in a fixed slot order.

    For each token t, over the slots k = 0..K-1 present in src_index_R, in order and in float32:
    ``acc = g_first * y_first; acc = acc + g_k * y_k; ...`` with every product and sum rounded on
    its own (``__fmul_rn`` / ``__fadd_rn``, no FMA), then one cast to ``out_dtype``; tokens
    without rows get zeros. Bitwise equal to `nmoe_kernels.reference.unpermute`.

    Args:
        y_RD: [R, D] bfloat16 or float32 CUDA tensor, contiguous, 16-byte aligned; row r belongs
            to slot src_index_R[r].
        src_index_R: [R] int32 or int64, contiguous, distinct slots t * K + k in [0, T * K) (as
            `permute` returns). Not checked (that needs a host sync): values outside are
            ignored; for a repeated slot one of its rows is used, which one is unspecified.
        gates_TK: [T, K] float32 or bfloat16 gate weights (bfloat16 is widened to float32
            exactly), contiguous; T * K < 2^31.
        num_tokens: T (= gates_TK.shape[0]).
        out_dtype: torch.bfloat16 or torch.float32; default y's dtype.

    Returns:
        out_TD [T, D] ``out_dtype``.
    """
    op = "unpermute"
    device = _extension.check_cuda_tensors(
        op, y_RD=y_RD, src_index_R=src_index_R, gates_TK=gates_TK
    )
    out_dtype = out_dtype or y_RD.dtype
    if y_RD.dtype not in _FLOATS:
        raise ValueError(f"{op}: y_RD must be bfloat16 or float32, got {y_RD.dtype}")
    if out_dtype not in _FLOATS:
        raise ValueError(
            f"{op}: out_dtype must be torch.bfloat16 or torch.float32, got {out_dtype}"
        )
    if y_RD.dim() != 2 or not y_RD.is_contiguous() or y_RD.data_ptr() % 16 != 0:
        raise ValueError(
            f"{op}: y_RD must be a contiguous 2-D [R, D] tensor at a 16-byte aligned address, "
            f"got shape {tuple(y_RD.shape)}; call .contiguous() / .clone() first"
        )
    _check_index(op, "src_index_R", src_index_R, y_RD.shape[0])
    if gates_TK.dtype not in _FLOATS or gates_TK.dim() != 2:
        raise ValueError(
            f"{op}: gates_TK must be a 2-D float32 or bfloat16 tensor [T, K], got "
            f"{gates_TK.dtype}{tuple(gates_TK.shape)}"
        )
    if gates_TK.shape[0] != num_tokens:
        raise ValueError(
            f"{op}: gates_TK has {gates_TK.shape[0]} rows but num_tokens is {num_tokens}"
        )
    if gates_TK.numel() >= 2**31:
        raise ValueError(f"{op}: T * K = {gates_TK.numel()} must be below 2^31; split the batch")
    gates = gates_TK.float().contiguous()
    compiled = _extension.compiled_module(op)
    out = torch.empty(num_tokens, y_RD.shape[1], dtype=out_dtype, device=device)
    workspace = torch.empty(gates.numel(), dtype=torch.int32, device=device)
    compiled.unpermute(
        _extension.capsule(y_RD),
        _extension.capsule(src_index_R),
        _extension.capsule(gates),
        _extension.capsule(out),
        _extension.capsule(workspace),
        _extension.stream_handle(device),
    )
    return out
