"""Small-sample statistics for sweep reports: Student-t intervals and Welch differences.

Replicate counts in a sweep are small (2-5 seeds), so intervals use Student's t with
the exact quantile (no normal approximation); the quantile comes from the regularised
incomplete beta function, computed here so that reports need no scipy. Pure math, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["MeanCI", "Difference", "t_quantile", "mean_ci", "welch_difference"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` (> 0, real) degrees of freedom."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile(p={p}, df={df}): needs 0 < p < 1 and df > 0")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    # Beyond 1e7 degrees of freedom t is the normal to 1e-7 (and the beta function loses digits).
    cdf = (lambda t: 0.5 * math.erfc(-t / math.sqrt(2.0))) if df > 1e7 else (lambda t: _t_cdf(t, df))
    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2.0
    for _ in range(200):  # bisection: the CDF is monotone, 200 halvings reach float precision
        mid = 0.5 * (low + high)
        if cdf(mid) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True, slots=True)
class MeanCI:
    """Mean of n replicates and the half-width of its two-sided t-interval (NaN for n < 2)."""

    mean: float
    half_width: float
    n: int
    sd: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


@dataclass(frozen=True, slots=True)
class Difference:
    """mean(a) - mean(b) with Welch's interval; ``outside_noise`` when that interval excludes 0."""

    diff: float
    half_width: float
    df: float
    n_a: int
    n_b: int

    @property
    def outside_noise(self) -> bool:
        return math.isfinite(self.half_width) and abs(self.diff) > self.half_width


def _mean_var(values: Sequence[float]) -> tuple[int, float, float]:
    n = len(values)
    mean = sum(values) / n if n else math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else math.nan
    return n, mean, var


def mean_ci(values: Sequence[float], level: float = 0.95) -> MeanCI:
    """Mean and t-interval of ``values`` (NaNs dropped)."""
    n, mean, var = _mean_var([v for v in values if not math.isnan(v)])
    if n < 2:
        return MeanCI(mean, math.nan, n, math.nan)
    sd = math.sqrt(var)
    return MeanCI(mean, t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n), n, sd)


def welch_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Difference:
    """mean(a) - mean(b) with Welch's t-interval (unequal variances, Welch-Satterthwaite df)."""
    n_a, mean_a, var_a = _mean_var([v for v in a if not math.isnan(v)])
    n_b, mean_b, var_b = _mean_var([v for v in b if not math.isnan(v)])
    diff = mean_a - mean_b
    if n_a < 2 or n_b < 2:
        return Difference(diff, math.nan, math.nan, n_a, n_b)
    se_a, se_b = var_a / n_a, var_b / n_b
    se2 = se_a + se_b
    if se2 == 0.0:  # identical replicates on both sides: no noise at all
        return Difference(diff, 0.0, math.inf, n_a, n_b)
    df = se2**2 / (se_a**2 / (n_a - 1) + se_b**2 / (n_b - 1))
    return Difference(diff, t_quantile(0.5 + level / 2, df) * math.sqrt(se2), df, n_a, n_b)
