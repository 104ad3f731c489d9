"""``timm_capsules/data/affine_mnist_images.py`` checked by value: the uniforms against SplitMix64 over Python
integers with the documented stream keys, each image's digit and six transform numbers against a per-image
reference written from the module docstring (the shift range from the ink box's four corners, by a loop), the
matrices against a product written out, and the checks' exact messages. Written for a mutmut run
(tests/README.md); small sizes, built-in sample digits."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from timm_capsules.data import affine_mnist_images as ami

from test_affine_mnist import reference_matrix, reference_warp
from test_diverse_multimnist_images_values import MASK, mix_reference

pytestmark = pytest.mark.usefixtures('offline_mnist')

TAG = 0xAFF1  # the affine streams' tag; the digit is stream 0, translated 1, affine 2


def uniforms_reference(key, index, slots):
    key_image, key_slot = (int(k) for k in np.random.SeedSequence(list(key)).generate_state(2, np.uint64))
    state = mix_reference((index * 0x9E3779B97F4A7C15 + key_image) & MASK)
    return [
        (mix_reference(state ^ ((key_slot + j * 0xD1B54A32D192ED03) & MASK)) >> 11) / 2**53 for j in range(1, slots + 1)
    ]


def ink_box_reference(digit):
    """[[x_min, x_max], [y_min, y_max]] pixel edges of the ink about the frame's centre (13.5), by a loop."""
    rows = [r for r in range(28) if any(digit[r, c] for c in range(28))]
    cols = [c for c in range(28) if any(digit[r, c] for r in range(28))]
    if not rows:
        rows = cols = [0, 27]
    return [[cols[0] - 0.5 - 13.5, cols[-1] + 0.5 - 13.5], [rows[0] - 0.5 - 13.5, rows[-1] + 0.5 - 13.5]]


def params_reference(digits, seed, split, transform, index):
    """The digit and the six numbers of image ``index``, from the docstring."""
    code = ('train', 'test').index(split)
    n = len(digits.images)
    source = min(int(uniforms_reference([seed, TAG, code, 0], index, 1)[0] * n), n - 1)
    if transform == 'translated':
        u = uniforms_reference([seed, TAG, code, 1], index, 2)
        shift = [min(int(v * 13), 12) - 6 for v in u]
        return source, [0.0, 0.0, 1.0, 1.0, float(shift[0]), float(shift[1])]
    u = uniforms_reference([seed, TAG, code, 2], index, 6)
    rotation, shear = (2 * u[0] - 1) * 20.0, (2 * u[1] - 1) * 0.2
    scale_x, scale_y = 0.8 + u[2] * (1.2 - 0.8), 0.8 + u[3] * (1.2 - 0.8)
    matrix = reference_matrix(rotation, shear, scale_x, scale_y)
    box = ink_box_reference(digits.images[source])
    moved = [matrix @ [x, y] for x in box[0] for y in box[1]]
    shift = []
    for axis in range(2):
        low = -20 - min(p[axis] for p in moved)
        high = 20 - max(p[axis] for p in moved)
        if low > high:
            low = high = (low + high) / 2
        shift.append(low + u[4 + axis] * (high - low))
    return source, [rotation, shear, scale_x, scale_y, *shift]


@pytest.mark.parametrize(
    'seed, split, transform',
    [(0, 'train', 'translated'), (3, 'test', 'affine'), (2**32 - 1, 'train', 'affine'), (9, 'test', 'translated')],
)
def test_each_image_is_its_reference_digit_transform_and_pixels(train_digits, test_digits, seed, split, transform):
    digits = train_digits if split == 'train' else test_digits
    indices = [0, 1, 2, 5, 40, 1000, 10**9]
    batch = ami.generate(indices, split, transform, seed=seed, digits=digits)
    assert batch.images.shape == (7, 40, 40) and batch.images.dtype == np.uint8 and batch.params.dtype == np.float64
    for k, index in enumerate(indices):
        source, params = params_reference(digits, seed, split, transform, index)
        assert batch.sources[k] == source and batch.labels[k] == digits.labels[source]
        np.testing.assert_allclose(batch.params[k], params, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(batch.images[k], reference_warp(digits.images[source], params))


def test_uniforms_of_several_slots():
    got = ami._uniforms([4, TAG, 1, 2], np.array([0, 3, 2**33]), 5)
    assert got.shape == (3, 5) and got.tolist() == [uniforms_reference([4, TAG, 1, 2], i, 5) for i in (0, 3, 2**33)]


@settings(max_examples=10, deadline=None)
@given(
    rotation=st.floats(-20, 20), shear=st.floats(-0.2, 0.2), scale_x=st.floats(0.8, 1.2), scale_y=st.floats(0.8, 1.2)
)
def test_linear_part_is_rotate_shear_scale(rotation, shear, scale_x, scale_y):
    got = ami._linear_part(np.array([rotation]), np.array([shear]), np.array([scale_x]), np.array([scale_y]))
    np.testing.assert_allclose(got[0], reference_matrix(rotation, shear, scale_x, scale_y), rtol=0, atol=1e-14)


def test_ink_box_of_a_digit_a_blank_and_a_full_frame(test_digits):
    glyphs = np.zeros((3, 28, 28), np.uint8)
    glyphs[0, 3:9, 20:22] = 1  # rows 3-8, columns 20-21
    glyphs[2] = 7
    got = ami._ink_box(np.concatenate([glyphs, test_digits.images[:20]]))
    assert got[0].tolist() == [[6.0, 8.0], [-11.0, -5.0]]
    assert got[1].tolist() == got[2].tolist() == [[-14.0, 14.0], [-14.0, 14.0]]
    for k in range(20):
        assert got[3 + k].tolist() == ink_box_reference(test_digits.images[k])


def test_paste_puts_the_top_left_corner_at_six_plus_the_shift():
    glyphs = np.arange(2 * 28 * 28).reshape(2, 28, 28).astype(np.uint8)
    got = ami._paste(glyphs, np.array([[-6, 6], [3, -2]]))
    want = np.zeros((2, 40, 40), np.uint8)
    want[0, 12:40, 0:28] = glyphs[0]
    want[1, 4:32, 9:37] = glyphs[1]
    np.testing.assert_array_equal(got, want)


def test_warp_of_nothing_is_an_empty_batch():
    got = ami._warp(np.zeros((0, 28, 28), np.uint8), np.zeros((0, 2, 2)), np.zeros((0, 2)))
    assert got.shape == (0, 40, 40) and got.dtype == np.uint8


def test_warp_identity_is_a_paste_and_bright_pixels_stay_255():
    glyphs = np.full((1, 28, 28), 255, np.uint8)
    got = ami._warp(glyphs, np.eye(2)[None], np.array([[2.0, -3.0]]))
    want = np.zeros((40, 40), np.uint8)
    want[6 - 3 : 34 - 3, 6 + 2 : 34 + 2] = 255
    np.testing.assert_array_equal(got[0], want)


@pytest.mark.parametrize(
    'change, message',
    [
        (lambda d: d._replace(images=d.images[0]), 'digits must be uint8 (N, 28, 28), got uint8 (28, 28)'),
        (
            lambda d: d._replace(images=d.images[:, :, :27]),
            'digits must be uint8 (N, 28, 28), got uint8 (1000, 28, 27)',
        ),
        (lambda d: d._replace(images=d.images[:, :27]), 'digits must be uint8 (N, 28, 28), got uint8 (1000, 27, 28)'),
        (
            lambda d: d._replace(images=d.images.astype(np.int32)),
            'digits must be uint8 (N, 28, 28), got int32 (1000, 28, 28)',
        ),
        (
            lambda d: d._replace(images=d.images[:0], labels=d.labels[:0]),
            'digits from sample hold 0 images and 0 labels; need as many labels as images, at least one',
        ),
        (
            lambda d: d._replace(labels=d.labels[:-1]),
            'digits from sample hold 1000 images and 999 labels; need as many labels as images, at least one',
        ),
    ],
)
def test_bad_digits_are_refused_with_the_reason(test_digits, change, message):
    with pytest.raises(ValueError) as error:
        ami.generate([0], 'test', digits=change(test_digits))
    assert str(error.value) == message


@pytest.mark.parametrize(
    'call, message',
    [
        (lambda d: ami.generate([0], 'val', digits=d), "split must be one of ('train', 'test'), got 'val'"),
        (
            lambda d: ami.generate([0], 'test', 'rot', digits=d),
            "transform must be one of ('translated', 'affine'), got 'rot'",
        ),
        (lambda d: ami.generate([0], seed=-1, digits=d), 'seed must be a non-negative integer, got -1'),
        (lambda d: ami.generate([0], seed=1.0, digits=d), 'seed must be a non-negative integer, got 1.0'),
        (
            lambda d: ami.generate([[0, 1]], digits=d),
            'indices must be a 1-d sequence of non-negative integers, got shape (1, 2)',
        ),
        (
            lambda d: ami.generate([2, -1], digits=d),
            'indices must be a 1-d sequence of non-negative integers, got shape (2,)',
        ),
        (lambda d: ami.make_split(-1, digits=d), 'count must be a non-negative integer, got -1'),
        (lambda d: ami.make_split(2.0, digits=d), 'count must be a non-negative integer, got 2.0'),
    ],
)
def test_bad_options_are_refused_with_the_reason(test_digits, call, message):
    with pytest.raises(ValueError) as error:
        call(test_digits)
    assert str(error.value) == message


def test_numpy_integers_are_accepted_and_defaults(train_digits, test_digits):
    batch = ami.generate(np.array([0, 0]), seed=np.int64(0), digits=train_digits)
    assert batch.params[:, :4].tolist() == [[0.0, 0.0, 1.0, 1.0]] * 2  # translated by default
    default = ami.generate([0, 1, 2])  # the train split of the built-in sample
    np.testing.assert_array_equal(default.images, ami.generate([0, 1, 2], 'train', digits=train_digits).images)
    test = ami.generate([0, 1, 2], 'test', source='sample')
    np.testing.assert_array_equal(test.images, ami.generate([0, 1, 2], 'test', digits=test_digits).images)
    assert ami.make_split(np.int64(2), digits=train_digits).images.shape == (2, 40, 40)
    np.testing.assert_array_equal(
        ami.make_split(3, 'test', 'affine', source='sample').images,
        ami.generate([0, 1, 2], 'test', 'affine', digits=test_digits).images,
    )


def test_make_split_chunks_and_its_empty_split(train_digits, monkeypatch):
    calls = []
    real = ami.generate
    monkeypatch.setattr(ami, 'generate', lambda idx, *a, **k: calls.append(list(idx)) or real(idx, *a, **k))
    monkeypatch.setattr(ami, 'CHUNK_SIZE', 4)
    split = ami.make_split(9, 'train', 'affine', seed=2, digits=train_digits)
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    whole = real(np.arange(9), 'train', 'affine', seed=2, digits=train_digits)
    for got, want in zip(split, whole):
        np.testing.assert_array_equal(got, want)
    calls.clear()
    empty = ami.make_split(0, digits=train_digits)
    assert calls == [[]] and [c.shape for c in empty] == [(0, 40, 40), (0,), (0, 6), (0,)]
    assert empty.images.dtype == np.uint8


def test_a_box_too_big_for_the_canvas_is_centred_on_that_axis():
    glyphs = np.full((1, 28, 28), 9, np.uint8)
    wide = ami._linear_part(np.array([0.0]), np.array([0.0]), np.array([1.6]), np.array([1.0]))
    low, high = ami._shift_range(glyphs, wide)
    # x: the box is 44.8 px wide, 4.8 more than the canvas: centred; y: 28 px, free by 6 either side
    assert low.tolist() == [[0.0, -6.0]] and high.tolist() == [[0.0, 6.0]]
    assert math.isclose(ami._shift_range(glyphs, np.eye(2)[None])[1][0, 0], 6.0)


def test_a_box_too_big_off_the_frame_s_centre_is_centred_on_the_canvas():
    glyphs = np.zeros((1, 28, 28), np.uint8)
    glyphs[0, 10:12, 0:26] = 5  # ink in columns 0-25: x from -14 to 12 about the frame's centre
    wide = ami._linear_part(np.array([0.0]), np.array([0.0]), np.array([1.6]), np.array([1.0]))
    low, high = ami._shift_range(glyphs, wide)
    # x: the box runs from -22.4 to 19.2, 41.6 px: its centre, -1.6, is moved onto the canvas's
    np.testing.assert_allclose(low[0, 0], 1.6, rtol=0, atol=1e-12)
    np.testing.assert_allclose(high[0, 0], 1.6, rtol=0, atol=1e-12)
    # y: rows 10-11, [-4, -2] about the centre: free from -16 to 22
    np.testing.assert_allclose([low[0, 1], high[0, 1]], [-16.0, 22.0], rtol=0, atol=1e-12)


@pytest.mark.parametrize('transform', ami.TRANSFORMS)
def test_a_source_folder_given_is_the_one_read(tmp_path, test_digits, transform):
    """An IDX folder of inverted sample digits: what generate and make_split draw from when it is named."""
    from timm_capsules.data import mnist

    inverted = 255 - test_digits.images[:7]
    mnist.write_idx(tmp_path / 't10k-images-idx3-ubyte', inverted)
    mnist.write_idx(tmp_path / 't10k-labels-idx1-ubyte', test_digits.labels[:7].astype(np.uint8))
    digits = mnist.MnistDigits(inverted, test_digits.labels[:7], 'inverted')
    want = ami.generate(np.arange(5), 'test', transform, seed=4, digits=digits)
    for got in (
        ami.generate(np.arange(5), 'test', transform, seed=4, source=str(tmp_path)),
        ami.make_split(5, 'test', transform, seed=4, source=str(tmp_path)),
    ):
        for column_got, column_want in zip(got, want):
            np.testing.assert_array_equal(column_got, column_want)
    assert set(want.sources.tolist()) <= set(range(7))


def test_labels_come_out_int64_whatever_the_digits_hold(test_digits):
    digits = test_digits._replace(labels=test_digits.labels.astype(np.uint8))
    batch = ami.generate([0, 3, 9], 'test', digits=digits)
    assert batch.labels.dtype == np.int64 and batch.labels.tolist() == test_digits.labels[batch.sources].tolist()
    assert batch.sources.dtype == np.int64
