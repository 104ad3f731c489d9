"""Properties, not examples: the data generators' distributions and the config validation's bounds, checked with
hypothesis over seeds, options and values.

The statistical checks are chi-square tests at a false-alarm rate of 1e-6 per check (hypothesis runs derandomised,
so a run is reproducible); the bugs they are meant to catch move the statistic by hundreds of standard deviations.
The expected distributions are written here from the modules' documentation, not read from their code.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from timm_capsules import config_checks, loading
from timm_capsules.data import affine_mnist as am
from timm_capsules.data import diverse_multimnist as dmm

from mnist_digits import digit_hashes

# few examples: each one generates thousands of images; derandomised: CI sees the same seeds every run
GENERATORS = settings(
    max_examples=4, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
VALIDATORS = settings(max_examples=60, deadline=None, derandomize=True, database=None)
SEEDS = st.integers(0, 2**32 - 1)


def chi_square_limit(dof: int, z: float = 4.75) -> float:
    """The chi-square statistic exceeded with probability ~1e-6 (z = 4.75), by Wilson and Hilferty's cube root."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_uniform(counts: np.ndarray, what: str):
    counts = np.asarray(counts, np.float64).ravel()
    expected = counts.sum() / len(counts)
    statistic = ((counts - expected) ** 2 / expected).sum()
    assert statistic < chi_square_limit(len(counts) - 1), f'{what} is not uniform: chi2 {statistic:.1f}, {counts}'


def assert_independent(a: np.ndarray, b: np.ndarray, bins: int, what: str):
    """Two values in [0, 1) are independent: Pearson's chi-square on their bins x bins contingency table."""
    table = np.zeros((bins, bins))
    np.add.at(table, (np.minimum((a * bins).astype(int), bins - 1), np.minimum((b * bins).astype(int), bins - 1)), 1)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    statistic = ((table - expected) ** 2 / expected).sum()
    assert statistic < chi_square_limit((bins - 1) ** 2), f'{what} are not independent: chi2 {statistic:.1f}'


def test_the_chi_square_checks_can_fail():
    rng = np.random.default_rng(0)
    assert_uniform(np.bincount(rng.integers(0, 9, 20_000), minlength=9), 'a fair die')
    with pytest.raises(AssertionError, match='not uniform'):
        assert_uniform(np.bincount(np.minimum(rng.integers(0, 10, 20_000), 8), minlength=9), 'a loaded die')
    u = rng.random(5000)
    assert_independent(u, rng.random(5000), 4, 'two draws')
    with pytest.raises(AssertionError, match='not independent'):
        assert_independent(u, u, 4, 'one draw twice')
    assert chi_square_limit(89) == pytest.approx(167.6, abs=1.0)  # tables: 1e-6 quantile of chi2(89) is ~167


# ------------------------------------------------------------------------------------------ DiverseMultiMNIST
@GENERATORS
@given(seed=SEEDS)
def test_class_pair_is_uniform_over_the_90_ordered_pairs(train_digits, seed):
    """The sample bank holds 400 digits of each class, so the first class is uniform; the second is uniform over
    the nine others: every ordered pair of different classes is equally likely, and so is each offset
    (second - first) mod 10 for each first class."""
    assert (np.bincount(train_digits.labels) == 400).all()
    batch = dmm.generate(train_digits, np.arange(20_000), seed=seed, split='train')
    first, second = batch.classes[batch.num_digits == 2].T
    assert (first != second).all()
    pairs = np.zeros((10, 10), np.int64)
    np.add.at(pairs, (first, second), 1)
    assert_uniform(pairs[~np.eye(10, dtype=bool)], 'the ordered class pair')
    offsets = (second - first) % 10
    for c in range(10):
        assert_uniform(np.bincount(offsets[first == c], minlength=10)[1:], f'the second class after {c}')


@GENERATORS
@given(seed=SEEDS, p_single=st.one_of(st.sampled_from([1 / 6, 0.0, 1.0]), st.floats(0, 1)))
def test_single_digit_rate_is_p_single(train_digits, seed, p_single):
    """p_single = 1 once crashed: a request without a two-digit image pasted an empty batch of second digits."""
    n = 12_000
    batch = dmm.generate(train_digits, np.arange(n), seed=seed, split='train', p_single=p_single)
    single = (batch.num_digits == 1).sum()
    sigma = math.sqrt(n * p_single * (1 - p_single))
    assert abs(single - n * p_single) <= 5 * sigma + 1e-9
    assert ((batch.classes[:, 1] == -1) == (batch.num_digits == 1)).all()


@GENERATORS
@given(seed=SEEDS, max_shift=st.integers(0, 6), extra=st.integers(0, 8))
def test_shifts_are_uniform_in_range_and_independent(train_digits, seed, max_shift, extra):
    """Each of the four shifts (row and column of each digit) is uniform over -max_shift..max_shift about the
    canvas's centre, and the row and column shifts of a digit are independent."""
    canvas = 28 + 2 * max_shift + extra
    batch = dmm.generate(
        train_digits, np.arange(6000), seed=seed, split='train', max_shift=max_shift, canvas_size=canvas, p_single=0.0
    )
    shifts = batch.offsets - (canvas - 28) // 2  # (n, digit, row/col)
    span = 2 * max_shift + 1
    assert shifts.min() >= -max_shift and shifts.max() <= max_shift
    if max_shift == 0:
        return
    for digit in range(2):
        for axis, name in enumerate(('row', 'column')):
            assert_uniform(np.bincount(shifts[:, digit, axis] + max_shift, minlength=span), f'digit {digit} {name}')
        u = (shifts[:, digit] + max_shift + 0.5) / span
        assert_independent(u[:, 0], u[:, 1], min(span, 4), f"digit {digit}'s row and column shifts")


@GENERATORS
@given(seed=SEEDS, split=st.sampled_from(['train', 'test']), size=st.integers(1, 600))
def test_a_split_uses_only_its_own_bank(train_digits, test_digits, seed, split, size):
    """make_split loads the split's own digits: every digit on an image is one of that bank's, at the recorded
    place, and none of the other bank's."""
    batch = dmm.make_split(split, size, source='sample', seed=seed)
    own, other = (train_digits, test_digits) if split == 'train' else (test_digits, train_digits)
    present = batch.sources >= 0
    used = own.images[batch.sources[present]]
    assert digit_hashes(used) <= digit_hashes(own.images)
    assert not digit_hashes(used) & digit_hashes(other.images)
    for k in range(min(size, 20)):  # the image is those digits, overlaid at their offsets
        layers = np.zeros((2, 36, 36), np.uint16)
        for d in range(batch.num_digits[k]):
            (row, col), source = batch.offsets[k, d], batch.sources[k, d]
            layers[d, row : row + 28, col : col + 28] = own.images[source]
            assert own.labels[source] == batch.classes[k, d]
        np.testing.assert_array_equal(batch.images[k], np.minimum(layers.sum(0), 255))


@GENERATORS
@given(
    seed=SEEDS,
    indices=st.lists(st.integers(0, 10**9), min_size=1, max_size=40),
    split=st.sampled_from(['train', 'test']),
)
def test_image_i_depends_only_on_seed_split_and_i(train_digits, seed, indices, split):
    """Any request (order, repeats, neighbours) gives image i the bytes it has alone; another seed or split, others."""
    together = dmm.generate(train_digits, indices, seed=seed, split=split)
    for k, i in enumerate(indices):
        alone = dmm.generate(train_digits, [i], seed=seed, split=split)
        for field, value in zip(together._fields, together):
            np.testing.assert_array_equal(value[k], getattr(alone, field)[0], err_msg=field)
    reversed_ = dmm.generate(train_digits, indices[::-1], seed=seed, split=split)
    np.testing.assert_array_equal(reversed_.images[::-1], together.images)
    many = np.arange(200) + min(indices)
    base = dmm.generate(train_digits, many, seed=seed, split=split).images
    for other in (
        dmm.generate(train_digits, many, seed=seed + 1, split=split).images,
        dmm.generate(train_digits, many, seed=seed, split={'train': 'test', 'test': 'train'}[split]).images,
    ):
        assert (other != base).any((1, 2)).mean() > 0.9


# ------------------------------------------------------------------------------------------------ affine MNIST
@GENERATORS
@given(seed=SEEDS)
def test_affine_parameters_are_uniform_and_independent(test_digits, seed):
    """rotation ~ U(-20, 20), shear ~ U(-0.2, 0.2), scale_x and scale_y ~ U(0.8, 1.2), each uniform over its
    range (ten bins) and independent of every other (4 x 4 contingency tables)."""
    batch = am.generate(np.arange(4000), 'test', 'affine', seed=seed, digits=test_digits)
    ranges = {'rotation': (-20, 20), 'shear': (-0.2, 0.2), 'scale_x': (0.8, 1.2), 'scale_y': (0.8, 1.2)}
    unit = {}
    for name, (low, high) in ranges.items():
        values = batch.params[:, am.PARAM_NAMES.index(name)]
        assert low <= values.min() and values.max() <= high, name
        unit[name] = (values - low) / (high - low)
        assert_uniform(np.bincount(np.minimum((unit[name] * 10).astype(int), 9), minlength=10), name)
    names = list(unit)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert_independent(unit[a], unit[b], 4, f'{a} and {b}')


@GENERATORS
@given(seed=SEEDS, split=st.sampled_from(['train', 'test']))
def test_translated_shifts_are_uniform_integers_and_independent(train_digits, test_digits, seed, split):
    bank = train_digits if split == 'train' else test_digits
    batch = am.generate(np.arange(4000), split, 'translated', seed=seed, digits=bank)
    shift = batch.params[:, 4:]
    np.testing.assert_array_equal(shift, np.round(shift))
    assert shift.min() >= -6 and shift.max() <= 6
    for axis in range(2):
        assert_uniform(np.bincount(shift[:, axis].astype(int) + 6, minlength=13), f'shift {axis}')
    assert_independent((shift[:, 0] + 6.5) / 13, (shift[:, 1] + 6.5) / 13, 4, 'shift_x and shift_y')


@GENERATORS
@given(seed=SEEDS, indices=st.lists(st.integers(0, 10**9), min_size=1, max_size=200))
def test_affine_ink_box_stays_on_the_canvas(test_digits, seed, indices):
    """The digit's ink box, moved by the recorded transform (rotate @ shear @ scale about the frame's centre, then
    the shift), lies on the 40 x 40 canvas; and the image's ink lies inside that moved box (one pixel of
    bilinear spill)."""
    batch = am.generate(indices, 'test', 'affine', seed=seed, digits=test_digits)
    for k in range(len(indices)):
        digit = test_digits.images[batch.sources[k]]
        rows, cols = np.flatnonzero(digit.any(1)), np.flatnonzero(digit.any(0))
        corners = np.array([[x, y] for x in (cols[0] - 0.5, cols[-1] + 0.5) for y in (rows[0] - 0.5, rows[-1] + 0.5)])
        rotation, shear, scale_x, scale_y = batch.params[k, :4]
        angle = math.radians(rotation)
        matrix = (
            np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
            @ np.array([[1, shear], [0, 1]])
            @ np.diag([scale_x, scale_y])
        )
        moved = (corners - 13.5) @ matrix.T + batch.params[k, 4:] + 19.5  # pixel centres; the canvas's edges
        assert moved.min() >= -0.5 - 1e-9 and moved.max() <= 39.5 + 1e-9, k  # are at -0.5 and 39.5
        ink_rows, ink_cols = np.flatnonzero(batch.images[k].any(1)), np.flatnonzero(batch.images[k].any(0))
        if len(ink_rows):
            assert moved[:, 0].min() - 1 <= ink_cols[0] and ink_cols[-1] <= moved[:, 0].max() + 1, k
            assert moved[:, 1].min() - 1 <= ink_rows[0] and ink_rows[-1] <= moved[:, 1].max() + 1, k


# ------------------------------------------------------------------------------------------- config validation
# Each numeric model argument's documented bounds (loading.py: sizes and counts positive and at most 2**16, a
# chunk size (max_votes) at most 2**40; a class count, padding or index may be 0; other numbers non-negative; rates
# and momenta at most 1; eps positive; t in 1..64).
SIZE = 2**16
INT_BOUNDS = {
    'in_chans': (1, SIZE),
    'primary_caps': (1, SIZE),
    'pose_dim': (1, SIZE),
    'primary_kernel_size': (1, SIZE),
    'primary_stride': (1, SIZE),
    'max_votes': (1, 2**40),
    'num_classes': (0, SIZE),
    'primary_padding': (0, SIZE),
    'backbone_out_index': (0, SIZE),
    'iterations': (1, 64),
    'img_size': (1, SIZE),
}
CNN_INT_BOUNDS = {'in_chans': (1, SIZE), 'num_classes': (0, SIZE), 'head_hidden_size': (1, SIZE), 'img_size': (1, SIZE)}
FLOAT_BOUNDS = {  # (low, low included, high)
    'drop_rate': (0.0, True, 1.0),
    'drop_path_rate': (0.0, True, 1.0),
    'drop_block_rate': (0.0, True, 1.0),
    'bn_momentum': (0.0, True, 1.0),
    'bn_eps': (0.0, False, None),
}
CAPSNET, CNN = 'capsnet_simple_cifar10', 'cnn_baseline_cifar10'


def accepts(model_args, architecture):
    try:
        loading.validate_model_args(model_args, architecture, 'x.json')
    except loading.ConfigError as error:
        assert 'x.json: model_args.' in str(error)  # the message names the argument
        return False
    return True


def ints_near(bounds):
    low, high = bounds
    near = [low - 1, low, low + 1] + ([high - 1, high, high + 1] if high is not None else [10**6])
    return st.one_of(st.sampled_from(near), st.integers(-(10**9), 10**9))


def test_the_bound_tables_cover_every_numeric_argument():
    for architecture, ints in ((CAPSNET, INT_BOUNDS), (CNN, CNN_INT_BOUNDS)):
        parameters = config_checks._constructor_parameters(config_checks.model_class(architecture))
        numeric = {
            name
            for name, (hint, _) in parameters.items()
            if config_checks._type_name(hint)
            in ('int', 'float', 'Optional[int]', 'Optional[float]', 'Union[int, Tuple[int, int]]')
        }
        assert numeric == set(ints) | set(FLOAT_BOUNDS), architecture


@pytest.mark.parametrize('architecture, name', [(CAPSNET, n) for n in INT_BOUNDS] + [(CNN, n) for n in CNN_INT_BOUNDS])
@VALIDATORS
@given(data=st.data())
def test_integer_arguments_are_bounded_on_both_sides(architecture, name, data):
    low, high = (INT_BOUNDS if architecture == CAPSNET else CNN_INT_BOUNDS)[name]
    value = data.draw(ints_near((low, high)))
    inside = value >= low and (high is None or value <= high)
    assert accepts({name: value}, architecture) == inside, value
    if name == 'img_size':  # a (height, width) pair: both sides bounded too
        assert accepts({name: [value, 32]}, architecture) == inside
        assert accepts({name: [32, value]}, architecture) == inside


@pytest.mark.parametrize('architecture', [CAPSNET, CNN])
@pytest.mark.parametrize('name', list(FLOAT_BOUNDS))
@VALIDATORS
@given(data=st.data())
def test_float_arguments_are_bounded_on_both_sides(architecture, name, data):
    low, low_included, high = FLOAT_BOUNDS[name]
    near = [low, math.nextafter(low, -1), math.nextafter(low, 1), -1.0, 1.0, 1e9]
    if high is not None:
        near += [high, math.nextafter(high, 2), math.nextafter(high, 0)]
    value = data.draw(st.one_of(st.sampled_from(near), st.floats(allow_nan=True, allow_infinity=True)))
    above = value >= low if low_included else value > low
    inside = math.isfinite(value) and above and (high is None or value <= high)
    assert accepts({name: value}, architecture) == inside, value


def checkpoint_config(mean, std, channels=3):
    return dict(num_classes=10, input_size=[channels, 32, 32], mean=mean, std=std)


@VALIDATORS
@given(channels=st.integers(1, 4), data=st.data())
def test_mean_is_any_finite_number_and_std_a_positive_one_per_channel(channels, data):
    numbers = st.one_of(
        st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 1.0, -1.0]), st.floats(allow_nan=True, allow_infinity=True)
    )
    mean = data.draw(st.lists(numbers, min_size=channels, max_size=channels))
    std = data.draw(st.lists(numbers, min_size=channels, max_size=channels))
    good = all(map(math.isfinite, mean)) and all(math.isfinite(s) and s > 0 for s in std)
    try:
        loading.validate_checkpoint_config(checkpoint_config(mean, std, channels), where='x.json')
        accepted = True
    except loading.ConfigError:
        accepted = False
    assert accepted == good, (mean, std)
    # one entry too many or too few is refused however good the numbers
    for wrong in ([0.5] * (channels + 1), [0.5] * (channels - 1)):
        with pytest.raises(loading.ConfigError):
            loading.validate_checkpoint_config(checkpoint_config(wrong, [0.5] * channels, channels))
        with pytest.raises(loading.ConfigError):
            loading.validate_checkpoint_config(checkpoint_config([0.5] * channels, wrong, channels))
