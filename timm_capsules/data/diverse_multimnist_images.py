"""DiverseMultiMNIST's images (Tsai et al., ICLR 2020, appendix B.2): counter-based random draws, the
vectorised generator, ``make_split``, the on-the-fly training stream and a preview grid. ``diverse_multimnist``
builds the ``datasets`` builder, the export and the command line on top of these.

Each 36x36 image holds one MNIST digit (probability 1/6) or two digits of different classes,
each shifted independently by up to 4 px in each direction; two digits are overlaid by a
pixelwise sum clipped at 255. Train images use only MNIST train digits, test images only MNIST
test digits. The target is a 10-dim multi-hot vector.

**Determinism.** Image ``i`` of a split is a pure function of ``(seed, split, i)`` and the
options: every random number it needs is a counter-based hash (SplitMix64) of those keys, so
any set of indices can be generated in one vectorised call, in any order, by any worker or
process, and the bytes never depend on chunking, worker count or resumption point.
"""

import dataclasses
import math
import os
from pathlib import Path
from typing import Dict, Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .mnist import MnistDigits, load_mnist

NUM_CLASSES = 10
DIGIT_SIZE = 28
OVERLAYS = ('sum_clip', 'max', 'mean')
IMAGE_FEATURES = ('image', 'array')
_SPLIT_CODES = {'train': 0, 'test': 1}
# Images generated per vectorised call. Does not change any image, only speed and memory.
CHUNK_SIZE = 2048


# ------------------------------------------------------------------------ counter-based random
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SLOT_STEP = np.uint64(0xD1B54A32D192ED03)
# Random draws per image, by slot: single?, first digit, second class, second digit, 4 shifts.
_SLOT_SINGLE, _SLOT_FIRST, _SLOT_CLASS2, _SLOT_SECOND, _SLOT_SHIFT = 0, 1, 2, 3, 4
_NUM_SLOTS = 8


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective avalanche hash of uint64 (wrap-around is intended)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, split: str, indices: np.ndarray) -> np.ndarray:
    """Uniform doubles in [0, 1), shape (n, _NUM_SLOTS): row k depends only on (seed, split, indices[k])."""
    # SeedSequence spreads small, similar seeds over the whole 64-bit key space.
    key_image, key_slot = np.random.SeedSequence([seed, _SPLIT_CODES[split]]).generate_state(2, np.uint64)
    state = _mix64(indices.astype(np.uint64) * _GOLDEN + key_image)
    slot_keys = key_slot + np.arange(1, _NUM_SLOTS + 1, dtype=np.uint64) * _SLOT_STEP
    bits = _mix64(state[:, None] ^ slot_keys[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # 53 random bits, exact in float64


# ---------------------------------------------------------------------------------- generation
class MultiDigitBatch(NamedTuple):
    """Generated images and how they were made. Absent second digits are marked -1."""

    images: np.ndarray  # (n, C, C) uint8
    targets: np.ndarray  # (n, 10) float32 multi-hot
    num_digits: np.ndarray  # (n,) uint8, 1 or 2
    classes: np.ndarray  # (n, 2) int64 class of each digit, in drawing order
    sources: np.ndarray  # (n, 2) int64 index of each digit in the source split
    offsets: np.ndarray  # (n, 2, 2) int64 (row, col) of each 28x28 digit's top-left corner


@dataclasses.dataclass(frozen=True)
class _DigitBank:
    """Source digits plus a per-class index, so 'a digit of class c' is one fancy-index away."""

    images: np.ndarray
    by_class: np.ndarray  # indices into images, sorted by class
    class_start: np.ndarray  # (10,) first position of each class in by_class
    class_count: np.ndarray  # (10,)

    @classmethod
    def of(cls, digits: MnistDigits) -> '_DigitBank':
        labels = np.asarray(digits.labels)
        if digits.images.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE) or digits.images.dtype != np.uint8:
            raise ValueError(f'digits must be uint8 (N, 28, 28), got {digits.images.dtype} {digits.images.shape}')
        count = np.bincount(labels, minlength=NUM_CLASSES)
        if len(count) != NUM_CLASSES or (count == 0).any():
            raise ValueError(f'every class 0-9 needs at least one digit; counts {count.tolist()}')
        start = np.concatenate([[0], np.cumsum(count)[:-1]])
        return cls(digits.images, np.argsort(labels, kind='stable'), start, count)


_BANKS: Dict[int, _DigitBank] = {}


def _bank(digits: MnistDigits) -> _DigitBank:
    # Keyed by the images array's identity: load_mnist caches its arrays, so this is built once.
    key = id(digits.images)
    if key not in _BANKS or _BANKS[key].images is not digits.images:
        _BANKS[key] = _DigitBank.of(digits)
    return _BANKS[key]


def _paste(canvas: np.ndarray, rows_of: np.ndarray, digits: np.ndarray, row: np.ndarray, col: np.ndarray) -> None:
    """canvas[rows_of[k], row[k]:row[k]+28, col[k]:col[k]+28] = digits[k] for all k, in one scatter."""
    size = canvas.shape[-1]
    window = (np.arange(DIGIT_SIZE)[:, None] * size + np.arange(DIGIT_SIZE)[None, :]).ravel()
    start = rows_of * (size * size) + row * size + col
    canvas.reshape(-1)[start[:, None] + window[None, :]] = digits.reshape(len(digits), DIGIT_SIZE * DIGIT_SIZE)


def generate(
    digits: MnistDigits,
    indices: Sequence[int] | np.ndarray,
    *,
    seed: int = 0,
    split: str = 'train',
    p_single: float = 1 / 6,
    max_shift: int = 4,
    canvas_size: int = 36,
    overlay: str = 'sum_clip',
) -> MultiDigitBatch:
    """Generate the DiverseMultiMNIST images with the given indices from one split's digits.

    Vectorised over all indices (no per-image Python). ``digits`` must be the split named by
    ``split`` (train digits for "train", test digits for "test"); ``split`` also keys the randomness.
    Overlay: ``sum_clip`` = min(a + b, 255) (Sabour et al.), ``max`` = max(a, b),
    ``mean`` = round-half-up (a + b) / 2 for two-digit images (a single digit is left as is).
    """
    _check_options(split, p_single, max_shift, canvas_size, overlay)
    bank = _bank(digits)
    indices = np.asarray(indices, dtype=np.int64)
    n, size = len(indices), canvas_size
    u = _uniforms(seed, split, indices)

    two = u[:, _SLOT_SINGLE] >= p_single
    first = np.minimum((u[:, _SLOT_FIRST] * len(bank.images)).astype(np.int64), len(bank.images) - 1)
    first_class = np.asarray(digits.labels, dtype=np.int64)[first]
    # The second class is one of the 9 others, uniformly; then a uniform digit of that class.
    second_class = (first_class + 1 + np.minimum((u[:, _SLOT_CLASS2] * 9).astype(np.int64), 8)) % NUM_CLASSES
    count = bank.class_count[second_class]
    within = np.minimum((u[:, _SLOT_SECOND] * count).astype(np.int64), count - 1)
    second = bank.by_class[bank.class_start[second_class] + within]

    span = 2 * max_shift + 1
    shifts = np.minimum((u[:, _SLOT_SHIFT : _SLOT_SHIFT + 4] * span).astype(np.int64), span - 1) - max_shift
    offsets = shifts.reshape(n, 2, 2) + (size - DIGIT_SIZE) // 2

    layer_a = np.zeros((n, size, size), np.uint8)
    _paste(layer_a, np.arange(n), bank.images[first], offsets[:, 0, 0], offsets[:, 0, 1])
    layer_b = np.zeros_like(layer_a)
    pair = np.flatnonzero(two)
    _paste(layer_b, pair, bank.images[second[pair]], offsets[pair, 1, 0], offsets[pair, 1, 1])
    if overlay == 'sum_clip':
        images = np.minimum(np.add(layer_a, layer_b, dtype=np.uint16), 255).astype(np.uint8)
    elif overlay == 'max':
        images = np.maximum(layer_a, layer_b)
    else:  # mean
        mean = ((np.add(layer_a, layer_b, dtype=np.uint16) + 1) // 2).astype(np.uint8)
        images = np.where(two[:, None, None], mean, layer_a)

    classes = np.stack([first_class, np.where(two, second_class, -1)], axis=1)
    sources = np.stack([first, np.where(two, second, -1)], axis=1)
    offsets[~two, 1] = -1
    targets = np.zeros((n, NUM_CLASSES), np.float32)
    targets[np.arange(n), first_class] = 1.0
    targets[pair, second_class[pair]] = 1.0
    return MultiDigitBatch(images, targets, (1 + two).astype(np.uint8), classes, sources, offsets)


def _check_options(split: str, p_single: float, max_shift: int, canvas_size: int, overlay: str) -> None:
    if split not in _SPLIT_CODES:
        raise ValueError(f'split must be one of {tuple(_SPLIT_CODES)}, got {split!r}')
    if overlay not in OVERLAYS:
        raise ValueError(f'overlay must be one of {OVERLAYS}, got {overlay!r}')
    if not 0.0 <= p_single <= 1.0:
        raise ValueError(f'p_single must be in [0, 1], got {p_single}')
    if max_shift < 0 or canvas_size < DIGIT_SIZE + 2 * max_shift:
        raise ValueError(f'canvas_size {canvas_size} cannot hold a 28 px digit shifted by up to {max_shift} px')


def make_split(
    split: str,
    size: Optional[int] = None,
    *,
    source: Optional[str] = None,
    digits: Optional[MnistDigits] = None,
    seed: int = 0,
    progress: bool = False,
    **options,
) -> MultiDigitBatch:
    """A fixed split as arrays: images ``0 .. size-1`` (default size: 10,000 test / 60,000 train).

    This is what the builder writes; use it directly for the fixed test set in training scripts.
    ``options`` are those of :func:`generate` (``p_single``, ``max_shift``, ``canvas_size``, ``overlay``).
    """
    size = (10_000 if split == 'test' else 60_000) if size is None else size
    digits = load_mnist(split, source) if digits is None else digits
    starts = range(0, size, CHUNK_SIZE)
    parts = [
        generate(digits, np.arange(s, min(s + CHUNK_SIZE, size)), seed=seed, split=split, **options)
        for s in tqdm(starts, desc=f'DiverseMultiMNIST {split}', disable=not progress)
    ]
    if not parts:
        parts = [generate(digits, np.arange(0), seed=seed, split=split, **options)]
    return MultiDigitBatch(*(np.concatenate(column) for column in zip(*parts)))


# ------------------------------------------------------------------------ on-the-fly training stream
class DiverseMultiMNISTStream(torch.utils.data.IterableDataset):
    """Endless (or ``num_samples``-long) stream of freshly generated images for training.

    Yields ``(image, target)``: float32 ``(1, C, C)`` in [0, 1] (normalise yourself) and a float32
    10-dim multi-hot target; with ``batch_size`` set it yields whole batches ``(B, 1, C, C)``,
    ``(B, 10)`` (use ``DataLoader(stream, batch_size=None)``), which is faster and resumes exactly.

    Sharding: rank ``r`` of ``world_size`` sees global images ``r, r + W, r + 2W, ...`` (rank and
    world size default to ``torch.distributed`` when it is initialised). DataLoader worker ``w`` of
    ``K`` produces items ``w, w + K, ...`` of its rank's stream, which is exactly the round-robin
    order in which the DataLoader collects them, so the output does not depend on ``num_workers``.

    Resuming: ``start`` = number of items (batches with ``batch_size``, else samples) already
    consumed; nothing before it is generated. In sample mode with ``num_workers > 1`` and
    DataLoader batching, the multiset of a finite pass is exact but the order is the DataLoader's.
    """

    def __init__(
        self,
        split: str = 'train',
        *,
        source: Optional[str] = None,
        digits: Optional[MnistDigits] = None,
        seed: int = 0,
        batch_size: Optional[int] = None,
        num_samples: Optional[int] = None,
        start: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        chunk_size: int = CHUNK_SIZE,
        p_single: float = 1 / 6,
        max_shift: int = 4,
        canvas_size: int = 36,
        overlay: str = 'sum_clip',
    ):
        super().__init__()
        _check_options(split, p_single, max_shift, canvas_size, overlay)
        self.split, self.seed, self.batch_size, self.num_samples, self.start = (
            split,
            seed,
            batch_size,
            num_samples,
            start,
        )
        self.rank, self.world_size, self.chunk_size = rank, world_size, chunk_size
        self.options = dict(p_single=p_single, max_shift=max_shift, canvas_size=canvas_size, overlay=overlay)
        # Loaded once here; DataLoader workers inherit the arrays.
        self.digits = load_mnist(split, source) if digits is None else digits

    def _rank_and_world(self) -> Tuple[int, int]:
        if self.rank is not None or self.world_size is not None:
            return self.rank or 0, self.world_size or 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _num_items(self) -> Optional[int]:
        if self.num_samples is None:
            return None
        return self.num_samples if self.batch_size is None else math.ceil(self.num_samples / self.batch_size)

    def __len__(self) -> int:
        items = self._num_items()
        if items is None:
            raise TypeError('an endless stream has no length; pass num_samples')
        return max(0, items - self.start)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        rank, world = self._rank_and_world()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        item_size = self.batch_size or 1
        num_items = self._num_items()
        items_per_call = max(1, self.chunk_size // item_size)
        item = self.start + worker  # this worker's next item; items advance by `workers`
        while num_items is None or item < num_items:
            mine = np.arange(item, item + items_per_call * workers, workers)
            if num_items is not None:
                mine = mine[mine < num_items]
            # Rank-local sample positions of those items, then global image indices.
            positions = (mine[:, None] * item_size + np.arange(item_size)[None, :]).ravel()
            if self.num_samples is not None:
                positions = positions[positions < self.num_samples]
            batch = generate(self.digits, positions * world + rank, seed=self.seed, split=self.split, **self.options)
            images = torch.from_numpy(batch.images).unsqueeze(1).float().div_(255.0)
            targets = torch.from_numpy(batch.targets)
            if self.batch_size is None:
                yield from zip(images, targets)
            else:
                yield from zip(images.split(item_size), targets.split(item_size))
            item = int(mine[-1]) + workers


# ------------------------------------------------------------------------------------------- preview
def preview(
    out_png: Union[str, os.PathLike],
    *,
    count: int = 24,
    split: str = 'test',
    source: Optional[str] = None,
    seed: int = 0,
    columns: int = 8,
    **options,
) -> Path:
    """Save a PNG grid of the first ``count`` images of a split, titled with their labels."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    batch = make_split(split, count, source=source, seed=seed, **options)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.5 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis('off')
        if k < count:
            ax.imshow(batch.images[k], cmap='gray', vmin=0, vmax=255)
            ax.set_title(','.join(str(c) for c in sorted(batch.classes[k][batch.classes[k] >= 0])), fontsize=9)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
