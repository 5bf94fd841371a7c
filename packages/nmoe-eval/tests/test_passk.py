"""The unbiased pass@k estimator against the binomial formula."""

from __future__ import annotations

import math
import random

import pytest

from nmoe_eval.passk import mean_pass_at_k, pass_at_k


def test_pass_at_k_equals_binomial_formula(seed):
    rng = random.Random(seed)
    for _ in range(200):
        n = rng.randrange(1, 60)
        c, k = rng.randrange(0, n + 1), rng.randrange(1, n + 1)
        want = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k, seed)


def test_pass_at_k_known_values():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 1, 2) == pytest.approx(0.4)  # 1 - C(4,2)/C(5,2) = 1 - 6/10
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every pair holds a pass
    assert mean_pass_at_k([(2, 1), (2, 0)], 1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)
