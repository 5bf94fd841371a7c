"""Dense SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``. Used for dense layers, shared experts and MTP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """SwiGLU MLP ``dim -> inter_dim -> dim`` without biases."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)

    def output_projections(self) -> list[nn.Linear]:
        return [self.w2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
