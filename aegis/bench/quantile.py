"""A distribution-free confidence interval of a percentile: order statistics and the exact binomial.

Of n values drawn independently from one distribution, the number B below its q-quantile is
Binomial(n, q). So the interval [x_(l), x_(u)] between the l-th and u-th smallest values holds
the q-quantile with probability P(l <= B <= u - 1). interval() takes the largest l with
P(B <= l - 1) <= (1 - confidence) / 2 and the smallest u with P(B <= u - 1) >= (1 + confidence) / 2,
so the interval holds the quantile with at least `confidence`; with too few values a side has no
order statistic (l = 0: no lower bound; u = n + 1: no upper bound, e.g. a p99 from fewer than
368 values at 95 %) and is None.
"""
from __future__ import annotations

import math

from aegis.bench.repeat import betainc


def binom_cdf(k: int, n: int, q: float) -> float:
    """P(B <= k) for B ~ Binomial(n, q): I_{1-q}(n - k, k + 1), the regularized incomplete beta."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return betainc(n - k, k + 1, 1.0 - q)


def _first(n: int, pred) -> int:
    """The smallest k in [-1, n] with pred(k) true (pred monotone, true at n)."""
    lo, hi = -1, n
    if pred(lo):
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid
    return hi


def ranks(n: int, q: float, confidence: float) -> tuple[int, int]:
    """(l, u): the 1-based ranks of the interval's order statistics (0 and n + 1: unbounded)."""
    alpha = 1.0 - confidence
    low = _first(n, lambda k: binom_cdf(k, n, q) > alpha / 2)  # (the largest k with cdf(k) <= a/2) + 1
    high = _first(n, lambda k: binom_cdf(k, n, q) >= 1.0 - alpha / 2) + 1
    return low, high


def interval(values: list[float], q: float, confidence: float) -> tuple[float | None, float | None]:
    """The `confidence` interval of the q-quantile (0 < q < 1) of the distribution `values` came from."""
    n = len(values)
    if n == 0:
        return None, None
    xs = sorted(values)
    low, high = ranks(n, q, confidence)
    lo = xs[low - 1] if low >= 1 else None
    hi = xs[high - 1] if high <= n else None
    return lo, hi


def stat_quantile(stat: str) -> float:
    """'p99' -> 0.99, 'median' -> 0.5 (a summary key's statistic as a quantile)."""
    q = 0.5 if stat == "median" else float(stat[1:]) / 100.0
    assert 0.0 < q < 1.0 and math.isfinite(q), stat
    return q
