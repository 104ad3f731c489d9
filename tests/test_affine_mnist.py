"""Tests of timm_capsules.data.affine_mnist: determinism per index, the translated split's exact pixels,
the affine split's ranges and warp (against a per-pixel reference written here), the disjoint digit
banks, the exported Hub-layout folder and the preview."""

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from timm_capsules.data import affine_mnist as am
from timm_capsules.data import affine_mnist_images
from timm_capsules.data import mnist

from mnist_digits import digit_hashes

pytestmark = pytest.mark.usefixtures('offline_mnist')


def reference_matrix(rotation: float, shear: float, scale_x: float, scale_y: float) -> np.ndarray:
    """The documented transform on (x, y) = (column, row), y down: rotate @ shear @ scale, with a positive
    rotation turning anticlockwise as displayed."""
    angle = math.radians(rotation)
    rotate = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    return rotate @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([scale_x, scale_y])


def reference_warp(digit: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Per-pixel inverse mapping with bilinear interpolation, zero outside the digit, rounded half up."""
    rotation, shear, scale_x, scale_y, shift_x, shift_y = params
    inverse = np.linalg.inv(reference_matrix(rotation, shear, scale_x, scale_y))
    size, centre, digit_centre = am.CANVAS_SIZE, (am.CANVAS_SIZE - 1) / 2, 13.5
    out = np.zeros((size, size), np.uint8)

    def pixel(row: int, col: int) -> float:
        return float(digit[row, col]) if 0 <= row < 28 and 0 <= col < 28 else 0.0

    for row in range(size):
        for col in range(size):
            x, y = inverse @ [col - centre - shift_x, row - centre - shift_y] + digit_centre
            x0, y0 = math.floor(x), math.floor(y)
            fx, fy = x - x0, y - y0
            value = (1 - fy) * ((1 - fx) * pixel(y0, x0) + fx * pixel(y0, x0 + 1)) + fy * (
                (1 - fx) * pixel(y0 + 1, x0) + fx * pixel(y0 + 1, x0 + 1)
            )
            out[row, col] = min(255, math.floor(value + 0.5))
    return out


# ---------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize('transform', am.TRANSFORMS)
def test_image_depends_only_on_seed_split_transform_and_index(train_digits, monkeypatch, transform):
    forward = am.generate([5, 2], 'train', transform, seed=3, digits=train_digits)
    backward = am.generate([2, 5], 'train', transform, seed=3, digits=train_digits)
    for got, want in zip(backward, forward):
        np.testing.assert_array_equal(got, want[::-1])
    whole = am.generate(np.arange(300), 'train', transform, seed=3, digits=train_digits)
    monkeypatch.setattr(affine_mnist_images, 'CHUNK_SIZE', 64)  # make_split in 5 chunks, the last one short
    chunked = am.make_split(300, 'train', transform, seed=3, digits=train_digits)
    for got, want in zip(chunked, whole):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(whole.images[[5, 2]], forward.images)
    other_seed = am.generate(np.arange(300), 'train', transform, seed=4, digits=train_digits)
    assert (other_seed.images != whole.images).any(axis=(1, 2)).mean() > 0.95
    other_split = am.generate(np.arange(300), 'test', transform, seed=3, digits=train_digits)
    assert (other_split.sources != whole.sources).mean() > 0.95  # the split keys the randomness too


def test_translated_and_affine_image_i_show_the_same_digit(test_digits):
    translated = am.make_split(400, 'test', 'translated', seed=1, digits=test_digits)
    affine = am.make_split(400, 'test', 'affine', seed=1, digits=test_digits)
    np.testing.assert_array_equal(translated.sources, affine.sources)
    np.testing.assert_array_equal(translated.labels, affine.labels)
    assert len(np.unique(affine.sources)) > 300  # and the digits themselves vary over the indices


# -------------------------------------------------------------------------------------- translated
def test_translated_is_an_integer_shift_of_the_unchanged_digit(train_digits):
    batch = am.make_split(1500, 'train', 'translated', seed=0, digits=train_digits)
    rotation, shear, scale_x, scale_y, shift_x, shift_y = batch.params.T
    assert (rotation == 0).all() and (shear == 0).all() and (scale_x == 1).all() and (scale_y == 1).all()
    for shift in (shift_x, shift_y):
        assert (shift == np.round(shift)).all()
        assert set(shift.astype(int).tolist()) == set(range(-6, 7))  # every shift of -6..6 occurs, none else
    np.testing.assert_array_equal(batch.labels, train_digits.labels[batch.sources])
    for k in range(len(batch.images)):
        row, col = 6 + int(shift_y[k]), 6 + int(shift_x[k])
        image = batch.images[k].copy()
        np.testing.assert_array_equal(image[row : row + 28, col : col + 28], train_digits.images[batch.sources[k]])
        image[row : row + 28, col : col + 28] = 0
        assert not image.any()  # nothing outside the pasted digit


# ------------------------------------------------------------------------------------------- affine
def test_affine_parameters_cover_the_documented_ranges(test_digits):
    batch = am.make_split(3000, 'test', 'affine', seed=0, digits=test_digits)
    rotation, shear, scale_x, scale_y, shift_x, shift_y = batch.params.T
    for values, low, high in ((rotation, -20, 20), (shear, -0.2, 0.2), (scale_x, 0.8, 1.2), (scale_y, 0.8, 1.2)):
        assert low <= values.min() and values.max() <= high
        # uniform over the whole range: the extreme tenths are both reached
        assert values.min() < low + 0.1 * (high - low) and values.max() > high - 0.1 * (high - low)
    assert np.abs(rotation).mean() == pytest.approx(10, abs=0.5)  # U(-20, 20): mean |rotation| = 10
    # translation beyond the training distribution's +-6 px (a 20 px wide digit box has 10 px either side)
    assert (np.abs(shift_x) > 6).mean() > 0.25 and (np.abs(shift_y) > 6).mean() > 0.25
    assert np.abs(shift_x).max() > 12 and np.abs(shift_y).max() > 12
    # The ink box stays on the canvas, and its place is uniform over all places that keep it there:
    # the free margin before it, as a fraction of the total free margin, is U(0, 1) on each axis.
    before_fraction = []
    for k in range(len(batch.images)):
        digit = test_digits.images[batch.sources[k]]
        rows, cols = np.flatnonzero(digit.any(1)), np.flatnonzero(digit.any(0))
        corners = np.array([[x, y] for x in (cols[0] - 0.5, cols[-1] + 0.5) for y in (rows[0] - 0.5, rows[-1] + 0.5)])
        moved = (corners - 13.5) @ reference_matrix(*batch.params[k, :4]).T + batch.params[k, 4:] + 19.5
        before, after = moved.min(0) + 0.5, 39.5 - moved.max(0)
        assert (before >= -1e-9).all() and (after >= -1e-9).all(), k
        before_fraction.append(before / (before + after))
    before_fraction = np.array(before_fraction)
    assert before_fraction.min() < 0.01 and before_fraction.max() > 0.99
    np.testing.assert_allclose(before_fraction.mean(0), 0.5, atol=0.02)


def test_affine_image_equals_a_per_pixel_reference_warp(test_digits):
    batch = am.generate([0, 1, 2, 3, 17, 999], 'test', 'affine', seed=5, digits=test_digits)
    for k in range(len(batch.images)):
        want = reference_warp(test_digits.images[batch.sources[k]], batch.params[k])
        np.testing.assert_array_equal(batch.images[k], want)
        assert want.astype(int).sum() > 5000  # a real digit, not a blank canvas


def test_digit_filling_its_frame_is_cut_at_its_edges_and_centred_when_too_big():
    """Ink up to the frame's edges (Fashion-MNIST-like): outside the frame is black, not a smeared edge,
    and a transformed box wider than the canvas on an axis is centred on that axis."""
    noise = np.random.default_rng(0).integers(1, 256, (3, 28, 28), dtype=np.uint8)
    digits = mnist.MnistDigits(noise, np.arange(3), 'noise')
    batch = am.make_split(400, 'test', 'affine', seed=0, digits=digits)
    for k in range(4):
        np.testing.assert_array_equal(batch.images[k], reference_warp(noise[batch.sources[k]], batch.params[k]))
    corners = np.array([[x, y] for x in (-14, 14) for y in (-14, 14)])
    too_wide = 0
    for k in range(len(batch.images)):
        moved = corners @ reference_matrix(*batch.params[k, :4]).T
        wider = moved.max(0) - moved.min(0) > am.CANVAS_SIZE
        assert (batch.params[k, 4:][wider] == 0).all(), k
        too_wide += wider.sum()
    assert too_wide >= 10  # the case occurs (40 times here)


def test_positive_rotation_turns_anticlockwise_as_displayed():
    bar = np.zeros((1, 28, 28), np.uint8)
    bar[0, 13:15, 14:26] = 255  # a bar from the centre to the right
    digits = mnist.MnistDigits(bar, np.zeros(1, np.int64), 'bar')
    batch = am.make_split(400, 'test', 'affine', seed=0, digits=digits)
    rotation = batch.params[:, 0]
    rows = np.arange(am.CANVAS_SIZE)[:, None]
    ink = batch.images.astype(float)
    centroid_row = (ink * rows).sum((1, 2)) / ink.sum((1, 2)) - (19.5 + batch.params[:, 5])
    assert (centroid_row[rotation > 5] < 0).all()  # the bar's end lifts: up the screen
    assert (centroid_row[rotation < -5] > 0).all()


def test_train_and_test_use_disjoint_source_digits(train_digits, test_digits):
    train = am.make_split(3000, 'train', 'translated', seed=0, source='sample')
    test = am.make_split(1000, 'test', 'affine', seed=0, source='sample')
    # every train image is a train-bank digit, every checked test image a test-bank digit's warp
    for k in range(0, 3000, 11):
        row, col = 6 + int(train.params[k, 5]), 6 + int(train.params[k, 4])
        np.testing.assert_array_equal(
            train.images[k, row : row + 28, col : col + 28], train_digits.images[train.sources[k]]
        )
    for k in (0, 500):
        np.testing.assert_array_equal(
            test.images[k], reference_warp(test_digits.images[test.sources[k]], test.params[k])
        )
    used_train = digit_hashes(train_digits.images[train.sources])
    used_test = digit_hashes(test_digits.images[test.sources])
    assert len(used_train) > 2000 and len(used_test) > 500 and not used_train & used_test


@pytest.mark.parametrize(
    'call, message',
    [
        (lambda d: am.generate([0], 'val', digits=d), "split must be one of ('train', 'test'), got 'val'"),
        (lambda d: am.generate([0], 'train', 'rotated', digits=d), "transform must be one of ('translated', 'affine')"),
        (lambda d: am.generate([0], seed=-1, digits=d), 'seed must be a non-negative integer, got -1'),
        (lambda d: am.generate([3, -1], digits=d), 'indices must be a 1-d sequence of non-negative integers'),
        (lambda d: am.make_split(-2, digits=d), 'count must be a non-negative integer, got -2'),
        (lambda d: am.generate([0], digits=d._replace(images=d.images[:, :27])), 'digits must be uint8 (N, 28, 28)'),
        (
            lambda d: am.export('never_written', train_size=-1),
            'train_size and test_size must be >= 0, got -1 and 10000',
        ),
    ],
)
def test_bad_input_is_one_clear_error(train_digits, call, message):
    with pytest.raises(ValueError) as error:
        call(train_digits)
    assert message in str(error.value)


# ------------------------------------------------------------------------------------ export, preview
def test_export_loads_with_plain_load_dataset(tmp_path):
    import datasets
    from huggingface_hub import DatasetCard

    out = tmp_path / 'affine_mnist'
    am.main(['export', str(out), '--source', 'sample', '--train-size', '60', '--test-size', '40', '--seed', '2'])
    assert sorted(p.name for p in (out / 'data').iterdir()) == [
        'test_affine-00000-of-00001.parquet',
        'test_translated-00000-of-00001.parquet',
        'train_translated-00000-of-00001.parquet',
    ]
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / 'hf_cache'))
    assert {name: len(ds) for name, ds in loaded.items()} == {
        'train_translated': 60,
        'test_translated': 40,
        'test_affine': 40,
    }
    for name, (split, transform) in am.EXPORT_SPLITS.items():
        want = am.make_split(len(loaded[name]), split, transform, seed=2, source='sample')
        assert loaded[name].features['image'] == datasets.Array2D((40, 40), 'uint8')
        # plain Python values: the numpy format would hand floats back as float32
        got = loaded[name].to_dict()
        np.testing.assert_array_equal(np.array(got['image']), want.images)
        np.testing.assert_array_equal(got['label'], want.labels)
        np.testing.assert_array_equal(np.array([got[p] for p in am.PARAM_NAMES]).T, want.params)
        np.testing.assert_array_equal(got['source_index'], want.sources)
    assert loaded['test_affine'].features['label'].names == list('0123456789')
    card = DatasetCard.load(out / 'README.md')
    assert card.data.license == 'cc-by-sa-3.0'
    assert {entry['split'] for entry in card.data.configs[0]['data_files']} == set(am.EXPORT_SPLITS)
    for needle in (
        '-6..6 px',
        'U(0.8, 1.2)',
        'U(-0.2, 0.2)',
        'U(-20, 20) degrees',
        'Seed `2`, digit source `sample`',
        '| test_affine | test | affine | 40 |',
        'Sabour',
    ):
        assert needle in card.text, needle


def test_preview_shows_translated_above_affine(tmp_path):
    from PIL import Image

    out = am.preview(tmp_path / 'grid.png', count=6, columns=3, source='sample', seed=1)
    with Image.open(out) as image:
        assert image.format == 'PNG' and image.size == (420, 680)  # figsize (1.4 x 3, 3.4 x 2 blocks) at 100 dpi
        pixels = np.asarray(image.convert('L'))
    assert pixels.min() < 30 and pixels.max() > 225  # black tiles with bright digits on a white page
    with pytest.raises(ValueError, match='count >= 1'):
        am.preview(tmp_path / 'none.png', count=0, source='sample')


def test_command_line_outputs_default_to_the_ignored_outputs_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv, message in (
        (['preview', '--count', '0'], '--count must be >= 1, got 0'),
        (['export', '--test-size', '-3'], '--test-size must be >= 0, got -3'),
    ):
        with pytest.raises(SystemExit):
            am.main(argv)
        assert message in capsys.readouterr().err
    assert not (tmp_path / 'outputs').exists() and not (tmp_path / 'never_written').exists()
    am.main(['preview', '--source', 'sample', '--count', '2'])
    am.main(['export', '--source', 'sample', '--train-size', '4', '--test-size', '2'])
    assert (tmp_path / 'outputs' / 'affine_mnist_preview.png').is_file()
    assert sorted(p.name for p in (tmp_path / 'outputs' / 'affine_mnist').iterdir()) == ['README.md', 'data']
    ignored = subprocess.run(
        ['git', 'check-ignore', '-q', 'outputs/affine_mnist/README.md'], cwd=Path(__file__).resolve().parents[1]
    )
    assert ignored.returncode == 0


def test_package_exposes_the_generator_lazily():
    import timm_capsules.data as data

    assert data.make_affine_mnist_split is am.make_split and data.generate_affine_mnist is am.generate
    assert data.export_affine_mnist is am.export and data.preview_affine_mnist is am.preview
    assert data.AffineBatch is am.AffineBatch and 'make_affine_mnist_split' in data.__all__
