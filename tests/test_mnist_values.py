"""``timm_capsules/data/mnist.py`` by value, beside tests/test_mnist_sources.py: every refusal of the IDX reader
and of ``load_idx_folder`` word for word (the file named first), the address and timeout the Hub probe connects
with (``socket.create_connection`` replaced by a recorder), the repository ``load_hub`` asks ``datasets`` for, the
log lines that say which source was chosen and why, the fallback for ``'auto'`` as for None, and the parquet
export of a small IDX folder (twice into one folder). Written for a mutmut run (tests/README.md)."""

import gzip
import logging
import socket

import datasets
import numpy as np
import pytest
from PIL import Image

from timm_capsules.data import mnist


@pytest.fixture
def clean_sources(monkeypatch):
    for name in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'MNIST_DIR', 'HF_ENDPOINT', 'FASHION_MNIST_DIR'):
        monkeypatch.delenv(name, raising=False)
    mnist._load_resolved.cache_clear()
    yield monkeypatch
    mnist._load_resolved.cache_clear()


def idx_bytes(shape, data=None, magic=b'\x00\x00\x08'):
    header = magic + bytes([len(shape)]) + b''.join(d.to_bytes(4, 'big') for d in shape)
    return header + (bytes(int(np.prod(shape))) if data is None else data)


def refusal(path, expected_magic=None):
    with pytest.raises(ValueError) as error:
        mnist.read_idx(path, expected_magic)
    return str(error.value)


# ---- read_idx -----------------------------------------------------------------------------------------------


def test_read_idx_refusals_word_for_word(tmp_path):
    path = tmp_path / 'f'
    path.write_bytes(b'\x00\x00\x08')
    assert refusal(path) == f'{path}: not an IDX file (only 3 bytes)'
    path.write_bytes(idx_bytes((2,), magic=b'\x01\x02\x08'))
    assert refusal(path) == f'{path}: bad IDX magic number 16910337 (0x01020801); first two bytes must be zero'
    path.write_bytes(idx_bytes((2,), magic=b'\x00\x01\x08'))
    assert refusal(path) == f'{path}: bad IDX magic number 67585 (0x00010801); first two bytes must be zero'
    path.write_bytes(idx_bytes((2, 3)))
    assert refusal(path, 2049) == f'{path}: IDX magic number is 2050 (0x00000802), expected 2049'
    path.write_bytes(idx_bytes((2,), magic=b'\x00\x00\x0b'))
    assert refusal(path) == f'{path}: IDX dtype byte is 0x0b; only 0x08 (unsigned byte) is supported'
    path.write_bytes(idx_bytes((2, 3))[:11])
    assert refusal(path) == f'{path}: truncated IDX header (11 bytes, need 12)'
    path.write_bytes(idx_bytes((2, 3))[:13])
    assert refusal(path) == (
        f'{path}: IDX file truncated: header says shape (2, 3) (18 bytes in all), file has 13 bytes'
    )
    path.write_bytes(idx_bytes((2, 3)) + b'\x01\x02')
    assert refusal(path) == (
        f'{path}: IDX file has trailing bytes: header says shape (2, 3) (18 bytes in all), file has more bytes'
    )
    path.write_bytes(idx_bytes((40000, 40000), data=b''))
    assert refusal(path) == (
        f'{path}: IDX header declares 1600000000 bytes of data, more than the 1073741824 this reader takes '
        '(MNIST-sized files hold under 50 MB)'
    )


def test_read_idx_header_declaring_dimensions_it_does_not_hold(tmp_path):
    path = tmp_path / 'f'
    path.write_bytes(b'\x00\x00\x08\x03' + (5).to_bytes(4, 'big'))  # three dimensions declared, one given
    assert refusal(path) == f'{path}: truncated IDX header (8 bytes, need 16)'
    path.write_bytes(b'\x00\x00\x08\x01')
    assert refusal(path) == f'{path}: truncated IDX header (4 bytes, need 8)'


def test_read_idx_of_a_zero_dimensional_file_tells_a_trailing_byte(tmp_path):
    """A 0-d IDX file holds one byte; one more is trailing (the reader once took the header's data as 0 bytes
    and read just the one, so it never saw what followed)."""
    path = tmp_path / 'f'
    path.write_bytes(bytes([0, 0, 8, 0, 7]))
    assert mnist.read_idx(path).tolist() == 7
    path.write_bytes(bytes([0, 0, 8, 0, 7, 9]))
    assert refusal(path) == (
        f'{path}: IDX file has trailing bytes: header says shape () (5 bytes in all), file has more bytes'
    )


@pytest.mark.parametrize('shape', [(2**30 + 1,), (2, 2**29 + 1), (1, 1, 2**30 + 1)])
def test_read_idx_refuses_by_all_four_bytes_of_each_size(tmp_path, shape):
    path = tmp_path / 'f'
    path.write_bytes(idx_bytes(shape, data=b''))
    declared = int(np.prod(shape))
    assert refusal(path) == (
        f'{path}: IDX header declares {declared} bytes of data, more than the 1073741824 this reader takes '
        '(MNIST-sized files hold under 50 MB)'
    )


@pytest.mark.parametrize('shape', [(2**24, 1), (1, 2**24)])
def test_read_idx_of_a_size_over_three_bytes(tmp_path, shape):
    """16 MiB of zeros (gzip: 16 kB): a size whose fourth byte counts, in the first and in the second place."""
    path = tmp_path / 'f.gz'
    path.write_bytes(gzip.compress(idx_bytes(shape), compresslevel=1))
    array = mnist.read_idx(path)
    assert array.shape == shape and not array.any()


def test_read_idx_reads_the_header_then_at_most_one_byte_past_the_data(tmp_path, monkeypatch):
    """A file with far more bytes than its header declares is not read whole: the reads asked for are the
    magic, the sizes, then the declared data and one byte."""
    asked = []
    real = mnist._open_maybe_gzip

    class Recorder:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, size=-1):
            asked.append(size)
            return self.f.read(size)

    monkeypatch.setattr(mnist, '_open_maybe_gzip', lambda path: Recorder(real(path)))
    path = tmp_path / 'f'
    path.write_bytes(idx_bytes((2, 3)) + bytes(1000))
    assert 'has trailing bytes' in refusal(path)
    assert asked == [4, 8, 7]
    asked.clear()
    path.write_bytes(idx_bytes((2, 3)))
    assert mnist.read_idx(path).shape == (2, 3) and asked == [4, 8, 7]


@pytest.mark.parametrize('shape', [(0,), (3,), (2, 5), (1, 2, 3), (2, 1, 1, 2)])
@pytest.mark.parametrize('compressed', [False, True])
def test_read_idx_reads_back_what_write_idx_wrote(tmp_path, shape, compressed):
    array = (np.arange(int(np.prod(shape)), dtype=np.int64) * 37 % 256).astype(np.uint8).reshape(shape)
    path = mnist.write_idx(tmp_path / ('a.idx.gz' if compressed else 'a.idx'), array)
    assert path == tmp_path / ('a.idx.gz' if compressed else 'a.idx')
    raw = path.read_bytes()
    assert (raw[:2] == b'\x1f\x8b') is compressed
    plain = gzip.decompress(raw) if compressed else raw
    assert plain == idx_bytes(shape, data=array.tobytes())  # the header by hand: zeros, 0x08, ndim, big-endian sizes
    back = mnist.read_idx(path, 0x0800 + len(shape))
    assert back.dtype == np.uint8 and back.shape == shape and np.array_equal(back, array)


def test_write_idx_of_a_non_contiguous_array_writes_its_values_in_order(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4).T  # Fortran order in memory
    back = mnist.read_idx(mnist.write_idx(tmp_path / 'x', array))
    assert back.shape == (4, 3) and np.array_equal(back, array)


# ---- load_idx_folder ----------------------------------------------------------------------------------------


def test_idx_folder_refusals_word_for_word(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        mnist.load_idx_folder(tmp_path, 'train')
    assert str(error.value) == f"{tmp_path}: no train-images-idx3-ubyte[.gz] file for split 'train'"
    images, labels = tmp_path / 't10k-images-idx3-ubyte', tmp_path / 't10k-labels-idx1-ubyte.gz'
    mnist.write_idx(images, np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError) as error:
        mnist.load_idx_folder(tmp_path, 'test')
    assert str(error.value) == f"{tmp_path}: no t10k-labels-idx1-ubyte[.gz] file for split 'test'"
    mnist.write_idx(labels, np.array([3, 4, 5], np.uint8))
    with pytest.raises(ValueError) as error:
        mnist.load_idx_folder(tmp_path, 'test')
    assert str(error.value) == f'{images} holds 2 images but {labels} holds 3 labels'
    mnist.write_idx(images, np.zeros((3, 29, 28), np.uint8))
    with pytest.raises(ValueError) as error:
        mnist.load_idx_folder(tmp_path, 'test')
    assert str(error.value) == f'{images}: images are (29, 28), expected 28x28'
    mnist.write_idx(images, np.zeros((3, 28, 28), np.uint8))
    mnist.write_idx(labels, np.array([3, 2, 2], np.uint8))
    with pytest.raises(ValueError) as error:
        mnist.load_idx_folder(tmp_path, 'test', ('a', 'b'))
    assert str(error.value) == f'{labels}: labels must be 0-1, found 3 (at index 0)'
    digits = mnist.load_idx_folder(tmp_path, 'test', ('a', 'b', 'c', 'd'))  # 3 is the last of four classes
    assert digits.labels.tolist() == [3, 2, 2] and digits.class_names == ('a', 'b', 'c', 'd')
    with pytest.raises(ValueError) as error:
        mnist.load_idx_folder(tmp_path, 'valid')
    assert str(error.value) == "split must be one of ('train', 'test'), got 'valid'"


def test_idx_folder_takes_the_plain_file_before_the_gzip_one(tmp_path):
    for name, array in (
        ('train-images-idx3-ubyte', np.full((1, 28, 28), 1, np.uint8)),
        ('train-images-idx3-ubyte.gz', np.full((1, 28, 28), 2, np.uint8)),
        ('train-images.idx3-ubyte', np.full((1, 28, 28), 3, np.uint8)),
        ('train-labels.idx1-ubyte', np.array([4], np.uint8)),
        ('train-labels.idx1-ubyte.gz', np.array([5], np.uint8)),
    ):
        mnist.write_idx(tmp_path / name, array)
    digits = mnist.load_idx_folder(tmp_path, 'train')
    assert digits.images.max() == 1 and digits.labels.tolist() == [4]


# ---- the Hub ------------------------------------------------------------------------------------------------


@pytest.fixture
def connections(clean_sources):
    calls = []

    def connect(address, timeout=None):
        calls.append((address, timeout))
        return socket.socket()  # closed by the probe's with

    clean_sources.setattr(socket, 'create_connection', connect)
    return calls


@pytest.mark.parametrize(
    'endpoint, address',
    [
        (None, ('huggingface.co', 443)),
        ('https://hub.example.org', ('hub.example.org', 443)),
        ('http://127.0.0.1:8080/path', ('127.0.0.1', 8080)),
    ],
)
def test_hub_probe_connects_to_the_endpoint_s_host_and_port(clean_sources, connections, endpoint, address):
    if endpoint:
        clean_sources.setenv('HF_ENDPOINT', endpoint)
    assert mnist.hub_is_reachable() is True
    assert mnist.hub_is_reachable(timeout=0.25) is True
    assert connections == [(address, 1.5), (address, 0.25)]


def test_hub_probe_says_unreachable_on_any_os_error(clean_sources):
    def refuse(address, timeout=None):
        raise ConnectionRefusedError('no')

    clean_sources.setattr(socket, 'create_connection', refuse)
    assert mnist.hub_is_reachable() is False


def test_load_hub_asks_datasets_for_ylecun_mnist_by_default(clean_sources, train_digits):
    asked = []
    images, labels = train_digits.images[:3], train_digits.labels[:3]

    def load_dataset(repo_id, split=None):
        asked.append((repo_id, split))
        return datasets.Dataset.from_dict(
            {'image': [Image.fromarray(im) for im in images], 'label': labels.tolist()},
            features=datasets.Features({'image': datasets.Image(), 'label': datasets.Value('int64')}),
        )

    clean_sources.setattr(datasets, 'load_dataset', load_dataset)
    digits = mnist.load_hub('train')
    assert asked == [('ylecun/mnist', 'train')] and digits.source == 'hub:ylecun/mnist'
    assert digits.images.dtype == np.uint8 and np.array_equal(digits.images, images)
    assert digits.labels.dtype == np.int64 and np.array_equal(digits.labels, labels)


# ---- choosing, falling back, logging ------------------------------------------------------------------------


def messages(caplog):
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == mnist.__name__]


def test_each_choice_is_logged_with_its_reason(clean_sources, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=mnist.__name__)
    reachable = {'value': True}
    clean_sources.setattr(mnist, 'hub_is_reachable', lambda: reachable['value'])
    assert mnist.resolve_source(tmp_path) == str(tmp_path)
    clean_sources.setenv('MNIST_DIR', str(tmp_path / 'env'))
    assert mnist.resolve_source('auto') == str(tmp_path / 'env')
    clean_sources.setenv('MNIST_DIR', '')  # empty: as if unset
    assert mnist.resolve_source() == 'hub'
    reachable['value'] = False
    assert mnist.resolve_source('auto') == 'sample'
    assert messages(caplog) == [
        ('INFO', f'MNIST source: {tmp_path} (given explicitly)'),
        ('INFO', f'MNIST source: {tmp_path / "env"} (from MNIST_DIR)'),
        ('INFO', 'MNIST source: hub (Hub reachable)'),
        ('INFO', 'MNIST source: sample (Hub unreachable or offline; using the built-in 5k sample)'),
    ]


@pytest.mark.parametrize('source', [None, 'auto'])
def test_a_failing_hub_chosen_automatically_falls_back_to_the_sample(clean_sources, caplog, source):
    caplog.set_level(logging.INFO, logger=mnist.__name__)
    clean_sources.setattr(mnist, 'hub_is_reachable', lambda: True)

    def broken(split):
        raise ConnectionError('reset')

    clean_sources.setattr(mnist, 'load_hub', broken)
    digits = mnist.load_mnist('test', source)
    assert digits.source == 'sample' and len(digits.labels) == 1000
    assert messages(caplog) == [
        ('INFO', 'MNIST source: hub (Hub reachable)'),
        ('WARNING', 'loading test from the Hub failed (reset); falling back to the built-in sample'),
        ('INFO', 'loaded 1000 test digits from sample'),
    ]


def test_a_failing_folder_is_never_replaced(clean_sources, tmp_path):
    clean_sources.setattr(mnist, 'hub_is_reachable', lambda: True)
    clean_sources.setenv('MNIST_DIR', str(tmp_path))
    with pytest.raises(FileNotFoundError):
        mnist.load_mnist('train')  # from MNIST_DIR, empty: the error, not the sample
    with pytest.raises(FileNotFoundError):
        mnist.load_mnist('train', tmp_path)


def test_load_mnist_reads_a_folder_and_logs_the_count(clean_sources, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=mnist.__name__)
    mnist.write_idx(tmp_path / 'train-images-idx3-ubyte', np.ones((4, 28, 28), np.uint8))
    mnist.write_idx(tmp_path / 'train-labels-idx1-ubyte', np.array([9, 8, 7, 6], np.uint8))
    digits = mnist.load_mnist('train', str(tmp_path))
    assert digits.labels.tolist() == [9, 8, 7, 6] and digits.source == f'idx:{tmp_path}'
    assert messages(caplog)[-1] == ('INFO', f'loaded 4 train digits from idx:{tmp_path}')
    with pytest.raises(ValueError) as error:
        mnist.load_mnist('validation', str(tmp_path))
    assert str(error.value) == "split must be one of ('train', 'test'), got 'validation'"


# ---- export -------------------------------------------------------------------------------------------------


def test_export_of_an_idx_folder_twice_into_one_folder(clean_sources, tmp_path):
    source = tmp_path / 'idx'
    source.mkdir()
    rng = np.random.default_rng(4)
    arrays = {}
    for split, prefix, n in (('train', 'train', 5), ('test', 't10k', 3)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        mnist.write_idx(source / f'{prefix}-images-idx3-ubyte', images)
        mnist.write_idx(source / f'{prefix}-labels-idx1-ubyte', labels)
        arrays[split] = images, labels
    out = tmp_path / 'a' / 'b'
    for _ in range(2):  # the second export writes over the first
        assert mnist.export_parquet(out, str(source)) == out
    assert [p.name for p in out.iterdir()] == ['data']
    assert sorted(p.name for p in (out / 'data').iterdir()) == [
        'test-00000-of-00001.parquet',
        'train-00000-of-00001.parquet',
    ]
    for split, (images, labels) in arrays.items():
        ds = datasets.Dataset.from_parquet(str(out / 'data' / f'{split}-00000-of-00001.parquet'))
        assert ds.features['label'].names == list(mnist.MNIST_CLASS_NAMES)
        assert ds.features['image'] == datasets.Array2D((28, 28), 'uint8')
        assert np.array_equal(np.asarray(ds.with_format('numpy')['image'], np.uint8), images)
        assert ds['label'] == labels.tolist()
