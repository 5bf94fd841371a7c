"""pass@k: the unbiased estimator of Chen et al. 2021 (HumanEval, eq. 1).

With ``n`` samples of which ``c`` pass, the probability that at least one of ``k`` samples drawn
without replacement passes is ``1 - C(n - c, k) / C(n, k)``. It is computed as the product
``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``, which never forms the (huge) binomials.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["mean_pass_at_k", "pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem.

    Args:
        n: samples drawn (>= 1).
        c: samples that passed (``0 <= c <= n``).
        k: the k of pass@k (``1 <= k <= n``).
    """
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, "
                         f"c={c}, k={k}")
    if n - c < k:  # every k-subset holds a passing sample
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given ``(n, c)`` per problem."""
    if not counts:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
