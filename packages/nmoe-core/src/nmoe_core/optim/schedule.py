"""The warmup-stable-decay (WSD) learning-rate schedule (inventory §4.5).

The schedule is a scale in [0, 1] applied between an absolute floor and each group's peak lr:

    scale = (step + 1) / warmup_steps                 while step < warmup_steps   (by steps)
          = 1                                         while tokens_seen < hold_tokens
          = 0.5 * (1 + cos(pi * t / decay_tokens))    t = tokens_seen - hold_tokens < decay_tokens
          = 0                                         afterwards
    lr    = floor + (peak - floor) * scale

Warmup counts optimizer steps; hold and decay count tokens from 0 (the warmup's tokens are part of
the hold). The caller advances ``tokens_seen`` by ``global_batch_size * seq_len`` per step.
"""

from __future__ import annotations

import math

__all__ = ["wsd_lr", "wsd_scale"]


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def wsd_scale(
    step: int,
    tokens_seen: float,
    warmup_steps: int,
    hold_tokens: float,
    decay_tokens: float,
) -> float:
    """The WSD scale in [0, 1] at an optimizer step.

    Args:
        step: 0-based index of the optimizer step about to run (>= 0).
        tokens_seen: tokens consumed before this step (>= 0), counted from the start of training.
        warmup_steps: linear warmup length in steps (>= 0; 0 disables warmup).
        hold_tokens: the scale stays 1 until this many tokens have been seen (>= 0).
        decay_tokens: length of the cosine decay in tokens after the hold (>= 0; 0 drops the
            scale straight to 0 at the end of the hold).
    """
    _check_non_negative(
        step=step,
        tokens_seen=tokens_seen,
        warmup_steps=warmup_steps,
        hold_tokens=hold_tokens,
        decay_tokens=decay_tokens,
    )
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if tokens_seen < hold_tokens:
        return 1.0
    t = tokens_seen - hold_tokens
    if t < decay_tokens:
        return 0.5 * (1.0 + math.cos(math.pi * t / decay_tokens))
    return 0.0


def wsd_lr(
    peak: float,
    floor: float,
    step: int,
    tokens_seen: float,
    warmup_steps: int,
    hold_tokens: float,
    decay_tokens: float,
) -> float:
    """The learning rate ``floor + (peak - floor) * wsd_scale(...)``.

    Args:
        peak: the group's peak lr (> 0).
        floor: the absolute lr floor the decay ends at (0 <= floor <= peak). Callers pass
            ``min(decay_floor, peak)`` for groups whose peak may sit below the global floor.
        step, tokens_seen, warmup_steps, hold_tokens, decay_tokens: as in `wsd_scale`.
    """
    if peak <= 0:
        raise ValueError(f"peak lr must be > 0, got {peak}")
    if not 0 <= floor <= peak:
        raise ValueError(f"lr floor must satisfy 0 <= floor <= peak ({peak}), got {floor}")
    scale = wsd_scale(step, tokens_seen, warmup_steps, hold_tokens, decay_tokens)
    return floor + (peak - floor) * scale
