"""Rotary position embedding: half-split rotation, with YaRN frequency blending for long context.

For a head vector split into halves ``x1, x2`` of size ``d/2``:
``out = [x1*cos - x2*sin, x2*cos + x1*sin]`` with ``inv_freq[i] = theta^(-2i/d)`` (inventory 2.5).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(
    dim: int,
    theta: float,
    scaling_factor: float = 1.0,
    original_max_position: int = 8192,
    ntk_alpha: float = 1.0,
    ntk_beta: float = 32.0,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[dim/2]`` (float64) and the attention-logit concentration factor.

    With ``scaling_factor > 1`` this is YaRN: dimensions rotating faster than ``ntk_beta`` turns
    over the original context keep their frequency (extrapolation), those slower than
    ``ntk_alpha`` turns are divided by the factor (interpolation), with a linear ramp between;
    the concentration ``0.1*ln(s) + 1`` scales cos/sin.
    """
    base = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if scaling_factor <= 1.0:
        return base, 1.0

    def correction_dim(turns: float) -> float:
        return dim * math.log(original_max_position / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(ntk_beta)), 0)
    high = min(math.ceil(correction_dim(ntk_alpha)), dim // 2 - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)
    extrapolate_weight = 1.0 - ramp.clamp(0.0, 1.0)
    inv_freq = base / scaling_factor * (1 - extrapolate_weight) + base * extrapolate_weight
    return inv_freq, 0.1 * math.log(scaling_factor) + 1.0


class RotaryEmbedding(nn.Module):
    """Precomputed float32 cos/sin tables ``[max_positions, dim/2]`` (non-persistent buffers)."""

    def __init__(
        self,
        dim: int,
        max_positions: int,
        theta: float,
        scaling_factor: float = 1.0,
        ntk_alpha: float = 1.0,
        ntk_beta: float = 32.0,
    ):
        super().__init__()
        self.dim = dim
        inv_freq, concentration = rope_inv_freq(
            dim, theta, scaling_factor, max_positions, ntk_alpha, ntk_beta
        )
        total = int(max_positions * max(scaling_factor, 1.0))
        angles = torch.outer(torch.arange(total, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", (angles.cos() * concentration).float(), persistent=False)
        self.register_buffer("sin", (angles.sin() * concentration).float(), persistent=False)

    def forward(
        self, x: torch.Tensor, start_pos: int = 0, positions_BS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rotate ``x [B, S, H, dim]`` at positions ``start_pos .. start_pos + S - 1``, or, when
        ``positions_BS`` (int64 ``[B, S]``, values in ``[0, max_positions)``) is given, at those
        per-row positions (left-padded batched decoding: position = slot - left padding, so
        ``start_pos + S`` still bounds them and is checked against the table)."""
        seq = x.shape[1]
        if start_pos + seq > self.cos.shape[0]:  # slots bound the (left-padded) positions too
            raise ValueError(
                f"position {start_pos + seq} exceeds the RoPE table ({self.cos.shape[0]}); raise "
                f"attention.max_position_embeddings"
            )
        if positions_BS is not None:
            cos = self.cos[positions_BS].unsqueeze(2)  # [B, S, 1, dim/2]
            sin = self.sin[positions_BS].unsqueeze(2)
        else:
            cos = self.cos[start_pos : start_pos + seq].view(1, seq, 1, -1)
            sin = self.sin[start_pos : start_pos + seq].view(1, seq, 1, -1)
        compute = torch.promote_types(x.dtype, torch.float32)
        cos, sin = cos.to(compute), sin.to(compute)
        x1, x2 = x.to(compute).chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)
