"""Differences over seeds with their 95% Welch confidence intervals, written out (no scipy): the report calls a
difference one only when its interval excludes zero."""

import math
import statistics
from typing import NamedTuple, Optional, Sequence


def mean_std(values: Sequence[float]) -> str:
    """'83.1 ± 0.4 (2)' in % over seeds (sample std), '—' for none."""
    if not values:
        return '—'
    values = [100 * v for v in values]
    spread = f' ± {statistics.stdev(values):.1f}' if len(values) > 1 else ''
    return f'{statistics.mean(values):.1f}{spread} ({len(values)})'


# a clause of the verdicts claims a difference (one of these words) only when its interval excludes zero
CLAIM_WORDS = ('beats', 'trails', 'better', 'worse', 'costs', 'adds', 'rises', 'falls', 'wider', 'narrower')


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) (continued fraction, Numerical Recipes' betacf)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a
    c, d, f = 1.0, 1.0 - (a + b) * x / (a + 1), 0.0
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    f = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + numerator / c
            c = c if abs(c) > 1e-300 else 1e-300
            f *= c * d
        if abs(c * d - 1.0) < 1e-12:
            break
    return front * f


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (p > 0.5) of Student's t distribution with ``df`` (real, > 0) degrees of freedom."""

    def upper_tail(t):  # P(T > t) for t >= 0
        return 0.5 * _incomplete_beta(df / 2, 0.5, df / (df + t * t))

    low, high = 0.0, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if upper_tail(middle) > 1 - p else (low, middle)
    return (low + high) / 2


class Difference(NamedTuple):
    """mean(a) - mean(b) in points, with its 95% confidence interval over seeds."""

    value: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f'{self.value:+.1f} [{self.low:+.1f}, {self.high:+.1f}]{"*" if self.excludes_zero else ""}'


def welch(a: Sequence[float], b: Sequence[float]) -> Optional[Difference]:
    """mean(a) - mean(b) (fractions in, points out) with Welch's 95% interval (unequal variances,
    Welch-Satterthwaite degrees of freedom); None unless both have 2 values or more. With b empty: the mean of a
    with its one-sample t interval (for paired differences, e.g. a gap per seed)."""
    if len(a) < 2 or (b and len(b) < 2):
        return None
    a = [100 * v for v in a]
    b = [100 * v for v in b]
    parts = [statistics.variance(x) / len(x) for x in (a, b) if x]
    se2 = sum(parts)
    value = statistics.mean(a) - (statistics.mean(b) if b else 0.0)
    if se2 == 0:
        return Difference(value, value, value)
    df = se2**2 / sum(part**2 / (len(x) - 1) for part, x in zip(parts, [x for x in (a, b) if x]))
    half = t_quantile(0.975, df) * se2**0.5
    return Difference(value, value - half, value + half)


def claim(d: Optional[Difference], subject: str, positive: str, negative: str, other: str = '') -> str:
    """'<d>: <subject> <positive|negative> <other>' when the interval excludes zero, else says that it does not."""
    if d is None:
        return 'n/a (fewer than 2 seeds)'
    if not d.excludes_zero:
        return f'{d}: not distinguishable from 0'
    return f'{d}: {subject} {positive if d.value > 0 else negative}{" " + other if other else ""}'


INTERVALS = 'points, 95% Welch interval over seeds in brackets, * where it excludes 0'
