"""``timm_capsules/experiments/intervals.py`` called directly, checked by value: the incomplete beta function
against closed forms and binomial sums, Student's t quantiles against closed forms and a numerical integral of the
density, Welch's intervals recomputed here step by step, and the exact strings of the summaries and claims.
Written for a mutmut run (tests/README.md); fast, no records are read."""

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from timm_capsules.experiments import intervals
from timm_capsules.experiments.intervals import Difference, claim, mean_std, t_quantile, welch

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


# ---- mean_std ---------------------------------------------------------------------------------------------


def test_mean_std_by_hand():
    assert mean_std([]) == '—' and mean_std(()) == '—'
    assert mean_std([0.831]) == '83.1 (1)'
    # 80 and 84 points: mean 82, sample std sqrt(8) = 2.83 (the population std would be 2.0)
    assert mean_std([0.80, 0.84]) == '82.0 ± 2.8 (2)'
    # 10, 20, 30 points: mean 20, sample std 10 (population std 8.2)
    assert mean_std([0.1, 0.2, 0.3]) == '20.0 ± 10.0 (3)'
    assert mean_std([0.5, 0.5, 0.5, 0.5]) == '50.0 ± 0.0 (4)'


# ---- the regularised incomplete beta function -------------------------------------------------------------


def binomial_tail(a: int, b: int, x: float) -> float:
    """I_x(a, b) for whole a, b: P(at least a successes in a + b - 1 trials of probability x)."""
    n = a + b - 1
    return sum(math.comb(n, j) * x**j * (1 - x) ** (n - j) for j in range(a, n + 1))


@pytest.mark.parametrize('x', [0.0, -0.5])
def test_incomplete_beta_is_zero_at_and_below_zero(x):
    assert intervals._incomplete_beta(2.0, 3.0, x) == 0.0


@pytest.mark.parametrize('x', [1.0, 1.5])
def test_incomplete_beta_is_one_at_and_above_one(x):
    assert intervals._incomplete_beta(2.0, 3.0, x) == 1.0


@pytest.mark.parametrize('a, b', [(1, 1), (1, 4), (3, 1), (2, 3), (5, 2), (4, 7), (10, 10)])
@pytest.mark.parametrize('x', [0.01, 0.2, 0.35, 0.5, 0.65, 0.9, 0.999])
def test_incomplete_beta_of_whole_parameters_is_a_binomial_tail(a, b, x):
    assert intervals._incomplete_beta(a, b, x) == pytest.approx(binomial_tail(a, b, x), abs=1e-11)


@pytest.mark.parametrize('x', [0.001, 0.1, 0.3, 0.5, 0.7, 0.95])
def test_incomplete_beta_closed_forms_of_half_parameters(x):
    # I_x(1/2, 1/2) = 2 asin(sqrt x) / pi; I_x(1, 1/2) = 1 - sqrt(1 - x); I_x(1/2, 1) = sqrt(x)
    assert intervals._incomplete_beta(0.5, 0.5, x) == pytest.approx(2 * math.asin(math.sqrt(x)) / math.pi, abs=1e-11)
    assert intervals._incomplete_beta(1.0, 0.5, x) == pytest.approx(1 - math.sqrt(1 - x), abs=1e-11)
    assert intervals._incomplete_beta(0.5, 1.0, x) == pytest.approx(math.sqrt(x), abs=1e-11)


@SETTINGS
@given(
    st.floats(0.3, 40.0),
    st.floats(0.3, 40.0),
    st.floats(0.001, 0.999),
)
def test_incomplete_beta_is_in_0_1_and_reflects(a, b, x):
    value = intervals._incomplete_beta(a, b, x)
    assert 0.0 <= value <= 1.0
    assert value + intervals._incomplete_beta(b, a, 1 - x) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize('a, b, x', [(2.5, 1.5, 0.3), (2.5, 1.5, 0.8), (7.5, 0.5, 0.9), (3.2, 4.7, 0.45)])
def test_incomplete_beta_is_the_integral_of_the_beta_density(a, b, x):
    # Simpson's rule over [0, x] of t^(a-1) (1-t)^(b-1) / B(a, b) (a, b > 1 or x away from 1: a smooth integrand)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    steps = 4000
    h = x / steps

    def density(t):
        return math.exp((a - 1) * math.log(t) + (b - 1) * math.log(1 - t) - log_beta) if t > 0 else 0.0

    total = density(0) + density(x) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    assert intervals._incomplete_beta(a, b, x) == pytest.approx(total * h / 3, abs=1e-7)


# ---- Student's t quantiles --------------------------------------------------------------------------------


@SETTINGS
@given(st.floats(0.51, 0.999))
def test_t_quantiles_of_one_two_and_four_degrees_of_freedom_are_the_closed_forms(p):
    # df 1 is Cauchy's; df 2: (2p - 1) / sqrt(2 p (1 - p)); df 4: 2 sqrt(q - 1), q = cos(acos(sqrt(alpha)) / 3) /
    # sqrt(alpha), alpha = 4 p (1 - p) (Shaw, "Sampling Student's t distribution", 2006)
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9, abs=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9, abs=1e-9)
    alpha = 4 * p * (1 - p)
    q = math.cos(math.acos(math.sqrt(alpha)) / 3) / math.sqrt(alpha)
    assert t_quantile(p, 4) == pytest.approx(2 * math.sqrt(q - 1), rel=1e-9, abs=1e-9)


def t_density(t: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))


@pytest.mark.parametrize('df', [1.5, 3.0, 5.7, 12.0, 45.3])
@pytest.mark.parametrize('p', [0.55, 0.8, 0.975])
def test_t_quantile_is_where_the_integral_of_the_density_reaches_p(df, p):
    q = t_quantile(p, df)
    steps = 4000
    h = q / steps
    total = t_density(0, df) + t_density(q, df)
    total += sum((4 if i % 2 else 2) * t_density(i * h, df) for i in range(1, steps))
    assert 0.5 + total * h / 3 == pytest.approx(p, abs=1e-9)


@pytest.mark.parametrize('df', [1e3, 1e5])
@pytest.mark.parametrize('p', [0.6, 0.9, 0.975])
def test_t_quantile_of_many_degrees_of_freedom_is_the_cornish_fisher_expansion(df, p):
    # t = z + (z^3 + z) / 4df + (5z^5 + 16z^3 + 3z) / 96df^2 + ..., z the normal quantile (Abramowitz & Stegun
    # 26.7.5); at these df the terms left out are below 1e-12
    z = statistics.NormalDist().inv_cdf(p)
    expansion = z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    expansion += (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    assert t_quantile(p, df) == pytest.approx(expansion, abs=1e-9)
    assert t_quantile(0.5000001, 3) == pytest.approx(0.0, abs=1e-5)


# ---- Difference and Welch's interval ---------------------------------------------------------------------


@pytest.mark.parametrize(
    'low, high, excludes',
    [(0.5, 2.0, True), (-3.0, -0.1, True), (-1.0, 1.0, False), (0.0, 2.0, False), (-2.0, 0.0, False), (0, 0, False)],
)
def test_a_difference_excludes_zero_only_when_zero_is_outside_its_interval(low, high, excludes):
    assert Difference((low + high) / 2, low, high).excludes_zero is excludes


def test_a_difference_prints_signed_points_and_a_star_when_it_excludes_zero():
    assert str(Difference(1.23, 0.51, 1.96)) == '+1.2 [+0.5, +2.0]*'
    assert str(Difference(-0.51, -1.44, 0.42)) == '-0.5 [-1.4, +0.4]'
    assert str(Difference(-4.6, -5.4, -3.8)) == '-4.6 [-5.4, -3.8]*'
    assert str(Difference(0.0, 0.0, 0.0)) == '+0.0 [+0.0, +0.0]'


def welch_by_hand(a, b):
    """The same interval, written out from the textbook formulas (Welch 1947) on points."""
    a, b = [100 * v for v in a], [100 * v for v in b]
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    var_a = sum((v - mean_a) ** 2 for v in a) / (len(a) - 1)
    var_b = sum((v - mean_b) ** 2 for v in b) / (len(b) - 1)
    sa, sb = var_a / len(a), var_b / len(b)
    if sa + sb < 1e-9:
        return mean_a - mean_b, 0.0, 0.0
    df = (sa + sb) ** 2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1))
    half = t_quantile(0.975, df) * math.sqrt(sa + sb)
    return mean_a - mean_b, df, half


@SETTINGS
@given(
    st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6),
    st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6),
)
def test_welch_is_the_textbook_interval(a, b):
    value, df, half = welch_by_hand(a, b)
    d = welch(a, b)
    if half == 0:  # (next to) no spread in either: the interval is the point
        assert (d.low, d.value, d.high) == pytest.approx((value, value, value), abs=1e-3)
        return
    assert (d.value, d.low, d.high) == pytest.approx((value, value - half, value + half), rel=1e-6, abs=1e-6)
    assert min(len(a), len(b)) - 1 <= df + 1e-9 and df <= len(a) + len(b) - 2 + 1e-9  # Welch's bounds


def test_welch_of_unequal_sizes_and_spreads_by_hand():
    # a: 10, 20, 30 points (variance 100, /3); b: 50, 54 (variance 8, /2): se2 = 33.33 + 4 = 37.33
    d = welch([0.1, 0.2, 0.3], [0.50, 0.54])
    se2 = 100 / 3 + 4
    df = se2**2 / ((100 / 3) ** 2 / 2 + 4**2 / 1)
    half = t_quantile(0.975, df) * math.sqrt(se2)
    assert (d.value, d.low, d.high) == pytest.approx((-32.0, -32.0 - half, -32.0 + half))
    assert 2.4 < df < 2.6 and d.excludes_zero


def test_welch_needs_two_values_in_each_sample():
    assert welch([], []) is None and welch([0.5], []) is None
    assert welch([0.5], [0.4, 0.6]) is None and welch([0.4, 0.6], [0.5]) is None
    assert welch([0.4, 0.6], [0.5, 0.7]) is not None


def test_welch_of_samples_without_spread_is_the_point():
    assert welch([0.5, 0.5], [0.25, 0.25, 0.25]) == Difference(25.0, 25.0, 25.0)
    assert welch([0.3, 0.3, 0.3], []) == pytest.approx(Difference(30.0, 30.0, 30.0))


def test_welch_one_sample_is_the_t_interval_of_its_mean():
    # 0 and 2 points: mean 1, variance 2, standard error 1 (se2 exactly 1), 1 degree of freedom
    d = welch([0.0, 0.02], [])
    assert (d.value, d.low, d.high) == pytest.approx((1.0, 1.0 - 12.7062047, 1.0 + 12.7062047), abs=1e-5)
    # 30, 40, 50 points: mean 40, standard error 10 / sqrt(3), 2 degrees of freedom (t = 4.30265)
    d = welch([0.3, 0.4, 0.5], [])
    half = 4.302652730 * 10 / math.sqrt(3)
    assert (d.value, d.low, d.high) == pytest.approx((40.0, 40.0 - half, 40.0 + half), abs=1e-6)


# ---- claims -------------------------------------------------------------------------------------------------


def test_claim_words_a_difference_only_when_its_interval_excludes_zero():
    up, down, unsure = Difference(2.0, 1.0, 3.0), Difference(-2.0, -3.0, -1.0), Difference(0.5, -0.5, 1.5)
    assert claim(up, 'IDA', 'beats', 'trails', 'EM') == '+2.0 [+1.0, +3.0]*: IDA beats EM'
    assert claim(down, 'IDA', 'beats', 'trails', 'EM') == '-2.0 [-3.0, -1.0]*: IDA trails EM'
    assert claim(up, 'the ablation', 'adds', 'costs') == '+2.0 [+1.0, +3.0]*: the ablation adds'
    assert claim(unsure, 'IDA', 'beats', 'trails', 'EM') == '+0.5 [-0.5, +1.5]: not distinguishable from 0'
    assert claim(None, 'IDA', 'beats', 'trails') == 'n/a (fewer than 2 seeds)'


def test_claim_of_an_excluding_interval_around_a_zero_value_is_the_negative_word():
    # value exactly 0 cannot exclude 0 from a proper interval; the word follows value > 0 only
    assert claim(Difference(0.0, 1.0, 2.0), 'A', 'rises', 'falls') == '+0.0 [+1.0, +2.0]*: A falls'


def test_claim_of_a_difference_below_one_point_takes_its_sign():
    assert claim(Difference(0.5, 0.2, 0.8), 'A', 'rises', 'falls') == '+0.5 [+0.2, +0.8]*: A rises'
    assert claim(Difference(-0.5, -0.8, -0.2), 'A', 'rises', 'falls') == '-0.5 [-0.8, -0.2]*: A falls'
