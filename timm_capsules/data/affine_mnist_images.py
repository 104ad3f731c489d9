"""Affine MNIST's images: train on translated digits, test on affinely transformed ones (``affine_mnist``
builds the export, the preview and the command line on these).

The data of Sabour et al. 2017 (`Dynamic Routing Between Capsules`, §5.2), rebuilt as a deterministic
generator: a model trained on MNIST digits that are only *translated* on a 40x40 canvas is tested on
digits under random *affine* transforms in the style of Tieleman's affNIST, on the same 40x40 canvas
so one model reads both.

Two transforms (``transform=``), each on either split of the digits (``split=``, MNIST train digits
for ``'train'``, MNIST test digits for ``'test'``, never mixed):

- ``'translated'`` (the training distribution): the 28x28 digit pasted on a black 40x40 canvas with an
  integer shift drawn uniformly from -6..6 px on each axis (28 + 2 * 6 = 40, so nothing is cut off).
  Pixels are copied unchanged.
- ``'affine'`` (the test distribution; affNIST's ranges): about the centre of the 28x28 frame, scale by
  ``scale_x``, ``scale_y`` drawn independently from U(0.8, 1.2), then shear horizontally by
  ``shear`` ~ U(-0.2, 0.2) (x' = x + shear * y), then rotate by ``rotation`` ~ U(-20°, 20°) (positive is
  anticlockwise as displayed), then translate by ``(shift_x, shift_y)`` drawn uniformly from the
  continuous range that keeps the digit's ink bounding box inside the canvas; resampled bilinearly
  (``torch.nn.functional.grid_sample``, float64) and rounded half up to uint8. (A box too large for the
  canvas, possible with Fashion-MNIST, not with MNIST's 20x20 digit boxes, is centred.)

Every image records its transform as six numbers, ``PARAM_NAMES``: rotation (degrees), shear, scale_x,
scale_y, shift_x, shift_y (px, the offset of the 28x28 frame's centre from the canvas centre; x is the
column, y the row). A translated image records rotation 0, shear 0, scales 1 and its integer shift, so
its digit's top-left corner is at row ``6 + shift_y``, column ``6 + shift_x``.

**Determinism.** Image ``i`` is a pure function of ``(seed, split, transform, i)`` and its digit of
``(seed, split, i)`` alone, so ``translated`` and ``affine`` image ``i`` of a split show the same digit
(paired test sets). The random numbers are counter-based hashes (DiverseMultiMNIST's SplitMix64
scheme), so any set of indices can be generated in one vectorised call, in any order or chunking.
"""

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .diverse_multimnist_images import _GOLDEN, _SLOT_STEP, _mix64
from .mnist import SPLITS, MnistDigits, load_mnist

__all__ = [
    'AffineBatch',
    'generate',
    'make_split',
    'CANVAS_SIZE',
    'MAX_SHIFT',
    'MAX_ROTATION',
    'MAX_SHEAR',
    'SCALE_RANGE',
    'TRANSFORMS',
    'PARAM_NAMES',
]

DIGIT_SIZE = 28
CANVAS_SIZE = 40
MAX_SHIFT = (CANVAS_SIZE - DIGIT_SIZE) // 2  # 6: the translated digit's whole frame stays on the canvas
MAX_ROTATION = 20.0  # degrees
MAX_SHEAR = 0.2
SCALE_RANGE = (0.8, 1.2)
TRANSFORMS = ('translated', 'affine')
PARAM_NAMES = ('rotation', 'shear', 'scale_x', 'scale_y', 'shift_x', 'shift_y')
# Images generated per vectorised call. Changes no image, only speed and memory.
CHUNK_SIZE = 2048

# Keys of the random streams; the tag keeps them apart from DiverseMultiMNIST's for the same seed.
_STREAM_TAG = 0xAFF1
_DIGIT_STREAM = 0
_TRANSFORM_STREAMS = {'translated': 1, 'affine': 2}


class AffineBatch(NamedTuple):
    """Generated images and how they were made."""

    images: np.ndarray  # (n, 40, 40) uint8
    labels: np.ndarray  # (n,) int64 class of the digit
    params: np.ndarray  # (n, 6) float64 transform, columns PARAM_NAMES
    sources: np.ndarray  # (n,) int64 index of the digit in its source split


def _uniforms(key: Sequence[int], indices: np.ndarray, num_slots: int) -> np.ndarray:
    """Uniform doubles in [0, 1), shape (n, num_slots): row k depends only on (key, indices[k])."""
    # SeedSequence spreads small, similar keys over the whole 64-bit space.
    key_image, key_slot = np.random.SeedSequence(list(key)).generate_state(2, np.uint64)
    state = _mix64(indices.astype(np.uint64) * _GOLDEN + key_image)
    slot_keys = key_slot + np.arange(1, num_slots + 1, dtype=np.uint64) * _SLOT_STEP
    bits = _mix64(state[:, None] ^ slot_keys[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # 53 random bits, exact in float64


def _linear_part(rotation: np.ndarray, shear: np.ndarray, scale_x: np.ndarray, scale_y: np.ndarray) -> np.ndarray:
    """The (n, 2, 2) matrices rotate @ shear @ scale acting on (x, y) = (column, row) offsets, y down."""
    angle = np.deg2rad(rotation)
    cos, sin, zero, one = np.cos(angle), np.sin(angle), np.zeros_like(angle), np.ones_like(angle)
    # y points down the screen, so [[cos, sin], [-sin, cos]] turns anticlockwise as displayed
    rotate = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], -2)
    shear_matrix = np.stack([np.stack([one, shear], -1), np.stack([zero, one], -1)], -2)
    scale = np.stack([np.stack([scale_x, zero], -1), np.stack([zero, scale_y], -1)], -2)
    return rotate @ shear_matrix @ scale


def _ink_box(glyphs: np.ndarray) -> np.ndarray:
    """(n, 2, 2) pixel-edge bounds [[x_min, x_max], [y_min, y_max]] of each digit's ink, as offsets from
    the frame's centre; an empty digit counts as its whole frame."""
    bounds = []
    for axis in (1, 2):  # columns: any ink down a column (axis 1); rows: along a row (axis 2)
        has_ink = glyphs.any(axis=axis)
        first = np.where(has_ink.any(1), has_ink.argmax(1), 0)
        last = np.where(has_ink.any(1), DIGIT_SIZE - 1 - has_ink[:, ::-1].argmax(1), DIGIT_SIZE - 1)
        bounds.append(np.stack([first - 0.5, last + 0.5], -1) - (DIGIT_SIZE - 1) / 2)
    return np.stack(bounds, 1)


def _shift_range(glyphs: np.ndarray, linear: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per image, the (x, y) shifts that keep the transformed ink box on the canvas: low, high (n, 2)."""
    box = _ink_box(glyphs)
    corners = np.stack(np.meshgrid([0, 1], [0, 1], indexing='ij'), -1).reshape(4, 2)
    points = np.stack([box[:, 0, corners[:, 0]], box[:, 1, corners[:, 1]]], -1)  # (n, 4, 2)
    moved = points @ linear.transpose(0, 2, 1)
    low = -CANVAS_SIZE / 2 - moved.min(1)
    high = CANVAS_SIZE / 2 - moved.max(1)
    too_big = low > high
    middle = (low + high) / 2
    return np.where(too_big, middle, low), np.where(too_big, middle, high)


def _warp(glyphs: np.ndarray, linear: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Bilinear inverse-mapping warp of 28x28 digits onto the canvas: output pixel p reads the digit at
    frame_centre + linear^-1 (p - canvas_centre - shift), zero outside the digit."""
    n = len(glyphs)
    if n == 0:
        return np.zeros((0, CANVAS_SIZE, CANVAS_SIZE), np.uint8)
    inverse = np.linalg.inv(linear)
    # The same map in grid_sample's normalised coordinates (align_corners=False: pixel k of a side of
    # length L sits at (2k + 1) / L - 1); the two centres cancel.
    theta = np.concatenate([inverse * (CANVAS_SIZE / DIGIT_SIZE), inverse @ shift[:, :, None] * (-2 / DIGIT_SIZE)], 2)
    grid = F.affine_grid(torch.from_numpy(theta), [n, 1, CANVAS_SIZE, CANVAS_SIZE], align_corners=False)
    source = torch.from_numpy(glyphs).to(torch.float64).unsqueeze(1)
    warped = F.grid_sample(source, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    return np.floor(warped[:, 0].numpy() + 0.5).clip(0, 255).astype(np.uint8)


def _paste(glyphs: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Digits copied onto black canvases with their top-left corners at MAX_SHIFT + shift."""
    n = len(glyphs)
    canvas = np.zeros((n, CANVAS_SIZE, CANVAS_SIZE), np.uint8)
    rows = (MAX_SHIFT + shift[:, 1])[:, None] + np.arange(DIGIT_SIZE)
    cols = (MAX_SHIFT + shift[:, 0])[:, None] + np.arange(DIGIT_SIZE)
    canvas[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = glyphs
    return canvas


def _check_digits(digits: MnistDigits) -> None:
    if (
        digits.images.ndim != 3
        or digits.images.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE)
        or digits.images.dtype != np.uint8
    ):
        raise ValueError(f'digits must be uint8 (N, 28, 28), got {digits.images.dtype} {digits.images.shape}')
    if len(digits.images) == 0 or len(digits.labels) != len(digits.images):
        raise ValueError(
            f'digits from {digits.source} hold {len(digits.images)} images and '
            f'{len(digits.labels)} labels; need as many labels as images, at least one'
        )


def _check_options(split: str, transform: str, seed: int) -> None:
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    if transform not in TRANSFORMS:
        raise ValueError(f'transform must be one of {TRANSFORMS}, got {transform!r}')
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f'seed must be a non-negative integer, got {seed!r}')


def generate(
    indices: Union[Sequence[int], np.ndarray],
    split: str = 'train',
    transform: str = 'translated',
    *,
    seed: int = 0,
    source: Optional[str] = None,
    digits: Optional[MnistDigits] = None,
) -> AffineBatch:
    """Generate the images with the given indices, vectorised over all of them.

    ``split`` ('train' / 'test') names the digits used (``digits`` if given, else ``load_mnist(split,
    source)``) and keys the randomness; ``transform`` is 'translated' or 'affine' (see the module doc).
    """
    _check_options(split, transform, seed)
    digits = load_mnist(split, source) if digits is None else digits
    _check_digits(digits)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or (indices < 0).any():
        raise ValueError(f'indices must be a 1-d sequence of non-negative integers, got shape {indices.shape}')
    split_code = SPLITS.index(split)

    count = len(digits.images)
    pick = _uniforms([seed, _STREAM_TAG, split_code, _DIGIT_STREAM], indices, 1)[:, 0]
    sources = np.minimum((pick * count).astype(np.int64), count - 1)
    glyphs = digits.images[sources]
    labels = np.asarray(digits.labels, dtype=np.int64)[sources]

    n = len(indices)
    key = [seed, _STREAM_TAG, split_code, _TRANSFORM_STREAMS[transform]]
    if transform == 'translated':
        span = 2 * MAX_SHIFT + 1
        shift = np.minimum((_uniforms(key, indices, 2) * span).astype(np.int64), span - 1) - MAX_SHIFT
        params = np.column_stack([np.zeros((n, 2)), np.ones((n, 2)), shift]).astype(np.float64)
        return AffineBatch(_paste(glyphs, shift), labels, params, sources)

    u = _uniforms(key, indices, 6)
    rotation = (2 * u[:, 0] - 1) * MAX_ROTATION
    shear = (2 * u[:, 1] - 1) * MAX_SHEAR
    low_scale, high_scale = SCALE_RANGE
    scale_x, scale_y = (low_scale + u[:, 2:4] * (high_scale - low_scale)).T
    linear = _linear_part(rotation, shear, scale_x, scale_y)
    low, high = _shift_range(glyphs, linear)
    shift = low + u[:, 4:6] * (high - low)
    params = np.column_stack([rotation, shear, scale_x, scale_y, shift])
    return AffineBatch(_warp(glyphs, linear, shift), labels, params, sources)


def make_split(
    count: int,
    split: str = 'train',
    transform: str = 'translated',
    *,
    seed: int = 0,
    source: Optional[str] = None,
    digits: Optional[MnistDigits] = None,
) -> AffineBatch:
    """Images ``0 .. count - 1`` of (split, transform) as arrays, generated in chunks of CHUNK_SIZE."""
    if not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f'count must be a non-negative integer, got {count!r}')
    digits = load_mnist(split, source) if digits is None else digits
    parts = [
        generate(np.arange(start, min(start + CHUNK_SIZE, count)), split, transform, seed=seed, digits=digits)
        for start in range(0, max(count, 1), CHUNK_SIZE)
    ]
    return AffineBatch(*(np.concatenate(column) for column in zip(*parts)))
