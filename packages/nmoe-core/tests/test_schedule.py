"""The WSD schedule at chosen points: warmup start/end, hold, exact cosine values, end, floor."""

from __future__ import annotations

import math
import random

import pytest

from nmoe_core.optim.schedule import wsd_lr, wsd_scale


def _draw():
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    warmup = rng.randrange(1, 1000)
    hold = rng.uniform(1e6, 1e10)
    decay = rng.uniform(1e6, 1e10)
    return seed, rng, warmup, hold, decay


def test_warmup_is_linear_in_steps():
    seed, rng, warmup, hold, decay = _draw()
    assert wsd_scale(0, 0, warmup, hold, decay) == 1 / warmup, seed
    assert wsd_scale(warmup - 1, 0, warmup, hold, decay) == 1.0, seed
    step = rng.randrange(warmup)
    assert wsd_scale(step, 0, warmup, hold, decay) == (step + 1) / warmup, seed
    # Warmup is step-based: it wins even when the token count is past the whole decay.
    assert wsd_scale(step, hold + 2 * decay, warmup, hold, decay) == (step + 1) / warmup, seed
    peak, floor = 3e-4, 3e-5
    want = floor + (peak - floor) / warmup
    assert wsd_lr(peak, floor, 0, 0, warmup, hold, decay) == pytest.approx(want, rel=1e-15)


def test_hold_then_exact_cosine_then_zero():
    seed, rng, warmup, hold, decay = _draw()
    after = warmup + rng.randrange(10**6)
    assert wsd_scale(warmup, 0, warmup, hold, decay) == 1.0, seed
    assert wsd_scale(after, rng.uniform(0, hold), warmup, hold, decay) == 1.0, seed
    assert wsd_scale(after, hold, warmup, hold, decay) == 1.0, seed  # cos(0)
    for frac, want in [(1 / 3, 0.75), (0.5, 0.5), (2 / 3, 0.25)]:
        got = wsd_scale(after, hold + frac * decay, warmup, hold, decay)
        assert got == pytest.approx(want, abs=1e-12), (seed, frac)
    frac = rng.random()
    got = wsd_scale(after, hold + frac * decay, warmup, hold, decay)
    assert got == pytest.approx(0.5 * (1 + math.cos(math.pi * frac)), abs=1e-12), seed
    assert wsd_scale(after, hold + decay, warmup, hold, decay) == 0.0, seed
    assert wsd_scale(after, hold + 5 * decay, warmup, hold, decay) == 0.0, seed


def test_lr_between_floor_and_peak():
    seed, rng, warmup, hold, decay = _draw()
    peak = rng.uniform(1e-4, 1e-2)
    floor = peak * rng.uniform(0.01, 0.5)
    after = warmup + 1
    assert wsd_lr(peak, floor, after, 0, warmup, hold, decay) == pytest.approx(peak, rel=1e-15)
    assert wsd_lr(peak, floor, after, hold + decay, warmup, hold, decay) == floor, seed
    mid = wsd_lr(peak, floor, after, hold + decay / 2, warmup, hold, decay)
    assert mid == pytest.approx((peak + floor) / 2, rel=1e-12), seed


def test_degenerate_lengths():
    # No warmup: full scale at step 0. No decay: straight to 0 at the end of the hold.
    assert wsd_scale(0, 0, 0, 100, 50) == 1.0
    assert wsd_scale(5, 99, 0, 100, 0) == 1.0
    assert wsd_scale(5, 100, 0, 100, 0) == 0.0
    assert wsd_scale(5, 0, 0, 0, 0) == 0.0


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="tokens_seen"):
        wsd_scale(0, -1, 10, 100, 100)
    with pytest.raises(ValueError, match="warmup_steps"):
        wsd_scale(0, 0, -10, 100, 100)
    with pytest.raises(ValueError, match="floor"):
        wsd_lr(1e-4, 2e-4, 0, 0, 10, 100, 100)
    with pytest.raises(ValueError, match="peak"):
        wsd_lr(0.0, 0.0, 0, 0, 10, 100, 100)
