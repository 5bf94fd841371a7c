"""The router's top-k expert choice on the GPU (CUDA kernel in `_C`), as a torch custom op.

Shape letters: T tokens (rows), E experts, K chosen experts per token.

`router_topk` replaces ``torch.topk(scores_TE + bias_E, K).indices`` of a sigmoid router: one
warp per row (a group of fewer lanes when E <= 16), the row's biased scores in registers, K
rounds of a warp arg-max; the scores are read once and the int64 ids written directly. The op is
registered as ``torch.ops.nmoe_kernels.router_topk`` (`torch.library.custom_op`): its CUDA
implementation is the kernel, every other device runs `nmoe_kernels.reference.router_topk`, and
its fake implementation (an empty int64 [T, K]) lets torch.compile keep it in the graph as one
opaque call. Reference: `nmoe_kernels.reference.router_topk` (the same order, bit for bit).
"""

from __future__ import annotations

import torch

from nmoe_kernels import _extension
from nmoe_kernels.reference.router import router_topk as _reference_router_topk

__all__ = ["MAX_EXPERTS", "MAX_TOP_K", "router_topk"]

# The kernel's limits (csrc/router/router_topk.h): a row in one warp, at most 32 values per lane,
# the K winners one per lane.
MAX_EXPERTS = 1024
MAX_TOP_K = 32

_OP = "router_topk"


def _check_args(scores_TE: torch.Tensor, bias_E: torch.Tensor, k: int) -> None:
    """Raise a clear error unless the arguments are what the CUDA kernel takes (the device is
    checked last, so the other errors also show on a machine without a GPU)."""
    for name, tensor in (("scores_TE", scores_TE), ("bias_E", bias_E)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if scores_TE.dtype != torch.float32:
        raise ValueError(f"{_OP}: scores_TE must be float32, got {scores_TE.dtype}; cast it with "
                         f".float(), or use nmoe_kernels.reference.{_OP} for other dtypes")
    if scores_TE.dim() != 2 or scores_TE.shape[1] < 1:
        raise ValueError(f"{_OP}: scores_TE must be [T, E] with E >= 1, got shape "
                         f"{tuple(scores_TE.shape)}")
    num_experts = scores_TE.shape[1]
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"{_OP}: scores_TE has E = {num_experts} experts, the kernel takes at "
                         f"most {MAX_EXPERTS}; use torch.topk for E > {MAX_EXPERTS}")
    if not scores_TE.is_contiguous():
        raise ValueError(f"{_OP}: scores_TE must be contiguous, got strides {scores_TE.stride()}; "
                         "call .contiguous() first")
    if bias_E.dtype != torch.float32:
        raise ValueError(f"{_OP}: bias_E must be float32, got {bias_E.dtype}; cast it with "
                         ".float()")
    if tuple(bias_E.shape) != (num_experts,):
        raise ValueError(f"{_OP}: bias_E must be [E] = [{num_experts}], got "
                         f"{tuple(bias_E.shape)}")
    if not bias_E.is_contiguous():
        raise ValueError(f"{_OP}: bias_E must be contiguous; call .contiguous() first")
    limit = min(num_experts, MAX_TOP_K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
        raise ValueError(f"{_OP}: k must be an int with 1 <= k <= min(E, {MAX_TOP_K}) = {limit}, "
                         f"got {k!r}; use torch.topk for k > {MAX_TOP_K}")
    _extension.check_cuda_tensors(_OP, scores_TE=scores_TE, bias_E=bias_E)


def router_topk(scores_TE: torch.Tensor, bias_E: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the ``k`` experts with the largest ``scores_TE + bias_E``, best first (CUDA).

    The biased value is one float32 add rounded to nearest even, exactly torch's
    ``scores_TE + bias_E``; experts are ordered by it descending, equal values to the lower
    expert index (NaN above +inf, -0.0 equal to +0.0): bitwise
    `nmoe_kernels.reference.router_topk`, and ``torch.topk(scores_TE + bias_E, k).indices``
    wherever the row has no ties. Reads each score once; no host synchronisation. Calls the
    custom op ``torch.ops.nmoe_kernels.router_topk`` (torch.compile keeps it in the graph).

    Args:
        scores_TE: [T, E] float32 CUDA tensor, contiguous, T >= 0 (T = 0 launches nothing),
            1 <= E <= 1024 (use torch.topk beyond).
        bias_E: [E] float32, contiguous, same device.
        k: experts per row, 1 <= k <= min(E, 32).

    Returns:
        expert_ids_TK: int64 [T, k] on the scores' device, contiguous.
    """
    _check_args(scores_TE, bias_E, k)
    return torch.ops.nmoe_kernels.router_topk(scores_TE, bias_E, k)


@torch.library.custom_op("nmoe_kernels::router_topk", mutates_args=())
def _router_topk_op(scores_TE: torch.Tensor, bias_E: torch.Tensor, k: int) -> torch.Tensor:
    # Every device without a kernel (CPU): the reference.
    return _reference_router_topk(scores_TE, bias_E, k)


@_router_topk_op.register_kernel("cuda")
def _router_topk_cuda(scores_TE: torch.Tensor, bias_E: torch.Tensor, k: int) -> torch.Tensor:
    # A compiled graph may hand over another layout than eager's; copying is then the only cost.
    scores_TE, bias_E = scores_TE.contiguous(), bias_E.contiguous()
    _check_args(scores_TE, bias_E, k)
    compiled = _extension.compiled_module(_OP)
    expert_ids_TK = torch.empty((scores_TE.shape[0], k), dtype=torch.int64,
                                device=scores_TE.device)
    compiled.router_topk(
        _extension.capsule(scores_TE),
        _extension.capsule(bias_E),
        _extension.capsule(expert_ids_TK),
        k,
        _extension.stream_handle(scores_TE.device),
    )
    return expert_ids_TK


@_router_topk_op.register_fake
def _router_topk_fake(scores_TE: torch.Tensor, bias_E: torch.Tensor, k: int) -> torch.Tensor:
    return scores_TE.new_empty((scores_TE.shape[0], k), dtype=torch.int64)
