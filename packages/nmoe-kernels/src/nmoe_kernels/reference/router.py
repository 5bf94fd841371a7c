"""Pure-torch reference for the router's top-k expert choice (`nmoe_kernels.router_topk`).

Shape letters: T tokens (rows), E experts, K chosen experts per token.

Per row t, the experts are ordered by the biased score ``scores_TE[t, e] + bias_E[e]`` (torch's
elementwise add: one add in the promoted dtype, rounded to nearest even), descending; equal
values keep the lower expert first (a stable sort). NaN orders above +inf (torch.sort's rule),
and -0.0 equals +0.0. The first K of that order are the row's experts. On inputs without ties
this is exactly ``torch.topk(scores_TE + bias_E, K).indices``; with ties torch.topk leaves their
order unspecified, while this rule fixes it.
"""

from __future__ import annotations

import torch

__all__ = ["router_topk"]

_SCORE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def router_topk(scores_TE: torch.Tensor, bias_E: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` experts with the largest ``scores_TE + bias_E`` per row, best first.

    Args:
        scores_TE: [T, E] floating tensor (router scores), any device, T >= 0, E >= 1.
        bias_E: [E] floating tensor on the same device (the load-balancing bias); added with
            torch's type promotion (float32 + float32 stays float32).
        k: number of experts per row, 1 <= k <= E.

    Returns:
        expert_ids_TK: int64 [T, k], contiguous: per row the expert indices in descending order
        of the biased score, equal scores in ascending expert order (module docstring).
    """
    op = "router_topk"
    if not isinstance(scores_TE, torch.Tensor) or scores_TE.dtype not in _SCORE_DTYPES:
        raise ValueError(f"{op}: scores_TE must be a floating tensor {_SCORE_DTYPES}, got "
                         f"{getattr(scores_TE, 'dtype', type(scores_TE).__name__)}")
    if scores_TE.dim() != 2 or scores_TE.shape[1] < 1:
        raise ValueError(f"{op}: scores_TE must be [T, E] with E >= 1, got shape "
                         f"{tuple(scores_TE.shape)}")
    num_experts = scores_TE.shape[1]
    if not isinstance(bias_E, torch.Tensor) or bias_E.dtype not in _SCORE_DTYPES:
        raise ValueError(f"{op}: bias_E must be a floating tensor {_SCORE_DTYPES}")
    if tuple(bias_E.shape) != (num_experts,):
        raise ValueError(f"{op}: bias_E must be [E] = [{num_experts}], got "
                         f"{tuple(bias_E.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"{op}: k must be an int with 1 <= k <= E = {num_experts}, got {k!r}")
    biased_TE = scores_TE + bias_E
    order_TE = torch.sort(biased_TE, dim=-1, descending=True, stable=True).indices
    return order_TE[:, :k].contiguous()
