"""MNIST-like digit sources: IDX files, the Hub's ``ylecun/mnist``, and a built-in real sample.

Every source gives the same thing for a split ("train" or "test"): uint8 images ``(N, 28, 28)``
and int64 labels ``(N,)``, wrapped in :class:`MnistDigits`.

Source names accepted by :func:`load_mnist` / :func:`resolve_source`:

- ``"sample"``: 5,000 real MNIST digits shipped with this package (see ``MNIST_SAMPLE.md``),
  split into fixed, disjoint banks of 400 (train) / 100 (test) digits per class.
- ``"hub"``: ``ylecun/mnist`` through :func:`datasets.load_dataset` (needs network or a warm cache).
- ``"fashion_mnist"``: Fashion-MNIST IDX files, by default where Debian's package
  ``dataset-fashion-mnist`` installs them (override with ``FASHION_MNIST_DIR``).
- any other string: a folder holding IDX files (``train-images-idx3-ubyte[.gz]``, ...).
- ``None`` / ``"auto"``: the first of env ``MNIST_DIR``, the Hub when reachable, the sample.
"""

import functools
import gzip
import logging
import os
import socket
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple, Union

import numpy as np

logger = logging.getLogger(__name__)

SPLITS = ('train', 'test')
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_IDX_UINT8 = 0x08
_IDX_PREFIX = {'train': 'train', 'test': 't10k'}  # file-name prefixes used by MNIST and Fashion-MNIST

HUB_REPO_ID = 'ylecun/mnist'
FASHION_MNIST_DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
SAMPLE_FILE = 'mnist_sample.npz'
MNIST_CLASS_NAMES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASS_NAMES = (
    'T-shirt/top',
    'Trouser',
    'Pullover',
    'Dress',
    'Coat',
    'Sandal',
    'Shirt',
    'Sneaker',
    'Bag',
    'Ankle boot',
)


class MnistDigits(NamedTuple):
    """One split of a digit source: ``images`` uint8 (N, 28, 28), ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    source: str  # where the digits came from, for logs and dataset cards
    class_names: Tuple[str, ...] = MNIST_CLASS_NAMES


# ----------------------------------------------------------------------------------------- IDX
MAX_IDX_BYTES = 1 << 30  # an IDX file's data; MNIST's largest is 47 MB


def _open_maybe_gzip(path: Path):
    with open(path, 'rb') as f:
        is_gzip = f.read(2) == b'\x1f\x8b'  # sniff, so a mis-named file still reads
    return gzip.open(path, 'rb') if is_gzip else open(path, 'rb')


def read_idx(path: Union[str, os.PathLike], expected_magic: Optional[int] = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (plain or gzip) into a uint8 array.

    Raises ``ValueError`` naming the file when the magic number, the dtype byte or the
    file length do not match the header.
    """
    path = Path(path)
    with _open_maybe_gzip(path) as f:  # the header first: a small gzip never expands past what it declares
        raw = f.read(4)
        ndim = raw[3] if len(raw) == 4 else 0
        raw += f.read(4 * ndim)
        if len(raw) == 4 + 4 * ndim:
            # a 0-d file holds one byte (the product of no sizes is 1)
            declared = int(
                np.prod([int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim)], dtype=np.int64)
            )
            if declared > MAX_IDX_BYTES:
                raise ValueError(
                    f'{path}: IDX header declares {declared} bytes of data, more than the '
                    f'{MAX_IDX_BYTES} this reader takes (MNIST-sized files hold under 50 MB)'
                )
            raw += f.read(declared + 1)  # one byte more tells trailing bytes
    if len(raw) < 4:
        raise ValueError(f'{path}: not an IDX file (only {len(raw)} bytes)')
    magic = int.from_bytes(raw[:4], 'big')
    dtype_byte, ndim = raw[2], raw[3]
    if raw[:2] != b'\x00\x00':
        raise ValueError(f'{path}: bad IDX magic number {magic} (0x{magic:08x}); first two bytes must be zero')
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f'{path}: IDX magic number is {magic} (0x{magic:08x}), expected {expected_magic}')
    if dtype_byte != _IDX_UINT8:
        raise ValueError(f'{path}: IDX dtype byte is 0x{dtype_byte:02x}; only 0x08 (unsigned byte) is supported')
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f'{path}: truncated IDX header ({len(raw)} bytes, need {header_len})')
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim))
    expected = header_len + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        what = 'truncated' if len(raw) < expected else 'has trailing bytes'
        raise ValueError(
            f'{path}: IDX file {what}: header says shape {shape} '
            f'({expected} bytes in all), file has {len(raw) if len(raw) < expected else "more"} bytes'
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def write_idx(path: Union[str, os.PathLike], array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file; gzip-compressed when ``path`` ends in ``.gz``."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f'write_idx writes uint8 only, got {array.dtype}')
    header = bytes([0, 0, _IDX_UINT8, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'wb') as f:
        f.write(header + array.tobytes())
    return path


def _find_idx_file(folder: Path, split: str, kind: str) -> Path:
    prefix, ndim = _IDX_PREFIX[split], {'images': 3, 'labels': 1}[kind]
    for stem in (f'{prefix}-{kind}-idx{ndim}-ubyte', f'{prefix}-{kind}.idx{ndim}-ubyte'):
        for name in (stem, stem + '.gz'):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f'{folder}: no {prefix}-{kind}-idx{ndim}-ubyte[.gz] file for split {split!r}')


def load_idx_folder(
    folder: Union[str, os.PathLike], split: str, class_names: Tuple[str, ...] = MNIST_CLASS_NAMES
) -> MnistDigits:
    """Read one split from a folder of MNIST-style IDX files (``train-*`` / ``t10k-*``)."""
    _check_split(split)
    folder = Path(folder)
    images_path, labels_path = _find_idx_file(folder, split, 'images'), _find_idx_file(folder, split, 'labels')
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise ValueError(f'{images_path}: images are {images.shape[1:]}, expected 28x28')
    if len(images) != len(labels):
        raise ValueError(f'{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels')
    if len(labels) and labels.max() >= len(class_names):
        raise ValueError(
            f'{labels_path}: labels must be 0-{len(class_names) - 1}, found {int(labels.max())} '
            f'(at index {int(labels.argmax())})'
        )
    return MnistDigits(images, labels, f'idx:{folder}', class_names)


# ------------------------------------------------------------------------------ built-in sample
@functools.lru_cache(maxsize=None)
def _sample_arrays() -> Dict[str, np.ndarray]:
    with resources.files(__package__).joinpath(SAMPLE_FILE).open('rb') as f, np.load(f) as npz:
        return {key: npz[key] for key in npz.files}


def load_sample(split: str) -> MnistDigits:
    """The built-in 5,000-digit MNIST sample: 400 (train) / 100 (test) digits per class, disjoint."""
    _check_split(split)
    arrays = _sample_arrays()
    return MnistDigits(arrays[f'{split}_images'], arrays[f'{split}_labels'].astype(np.int64), 'sample')


# ------------------------------------------------------------------------------------------ Hub
def _env_flag(name: str) -> bool:
    return os.environ.get(name, '').strip().upper() in {'1', 'ON', 'YES', 'TRUE'}


def hub_is_reachable(timeout: float = 1.5) -> bool:
    """Cheap check before trying the Hub: honours the offline variables, then one TCP connect."""
    if _env_flag('HF_HUB_OFFLINE') or _env_flag('HF_DATASETS_OFFLINE'):
        return False
    url = urllib.parse.urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co'))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_hub(split: str, repo_id: str = HUB_REPO_ID) -> MnistDigits:
    """One split of ``ylecun/mnist`` (columns ``image``, ``label``) through ``datasets``."""
    _check_split(split)
    import datasets  # deferred: importing datasets costs about a second

    ds = datasets.load_dataset(repo_id, split=split).with_format('numpy')
    images = np.asarray(ds['image'], dtype=np.uint8).reshape(-1, 28, 28)
    return MnistDigits(images, np.asarray(ds['label'], dtype=np.int64), f'hub:{repo_id}')


# ------------------------------------------------------------------------------------- choosing
def resolve_source(source: Optional[Union[str, os.PathLike]] = None) -> str:
    """Pick a source: explicit argument > env ``MNIST_DIR`` > Hub when reachable > built-in sample."""
    if source is not None and str(source) != 'auto':
        chosen, why = str(source), 'given explicitly'
    elif os.environ.get('MNIST_DIR'):
        chosen, why = os.environ['MNIST_DIR'], 'from MNIST_DIR'
    elif hub_is_reachable():
        chosen, why = 'hub', 'Hub reachable'
    else:
        chosen, why = 'sample', 'Hub unreachable or offline; using the built-in 5k sample'
    logger.info('MNIST source: %s (%s)', chosen, why)
    return chosen


@functools.lru_cache(maxsize=8)
def _load_resolved(source: str, split: str) -> MnistDigits:
    if source == 'sample':
        return load_sample(split)
    if source == 'hub':
        return load_hub(split)
    if source == 'fashion_mnist':
        folder = os.environ.get('FASHION_MNIST_DIR', FASHION_MNIST_DEBIAN_DIR)
        return load_idx_folder(folder, split, FASHION_MNIST_CLASS_NAMES)._replace(source='fashion_mnist')
    return load_idx_folder(source, split)


def load_mnist(split: str, source: Optional[Union[str, os.PathLike]] = None) -> MnistDigits:
    """Images and labels of one split from the chosen source (see :func:`resolve_source`).

    Results are cached per (source, split); treat the arrays as read-only.
    """
    _check_split(split)
    chosen = resolve_source(source)
    try:
        digits = _load_resolved(chosen, split)
    except Exception as error:  # the Hub answered the probe but the download failed
        if chosen != 'hub' or (source is not None and str(source) != 'auto'):
            raise
        logger.warning('loading %s from the Hub failed (%s); falling back to the built-in sample', split, error)
        digits = _load_resolved('sample', split)
    logger.info('loaded %d %s digits from %s', len(digits.labels), split, digits.source)
    return digits


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')


# ------------------------------------------------------------------------------------------ export
def export_parquet(out_dir: Union[str, os.PathLike], source: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Both splits of a source as ``data/{train,test}-00000-of-00001.parquet`` (image: Array2D uint8 28x28,
    label: ClassLabel with the source's class names), the layout ``datasets.load_dataset(str(out_dir))``
    reads, split slicing included (``split='train[:10%]'``). Used to train on Fashion-MNIST with
    ``train_accelerate.py --dataset hf:<out_dir>``."""
    import datasets

    out_dir = Path(out_dir)
    (out_dir / 'data').mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        digits = load_mnist(split, source)
        features = datasets.Features(
            {'image': datasets.Array2D((28, 28), 'uint8'), 'label': datasets.ClassLabel(names=list(digits.class_names))}
        )
        dataset = datasets.Dataset.from_dict({'image': digits.images, 'label': digits.labels}, features=features)
        dataset.to_parquet(str(out_dir / 'data' / f'{split}-00000-of-00001.parquet'))
    return out_dir
