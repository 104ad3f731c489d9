"""The MNIST sources by value, beyond the IDX round trips of test_data.py: the offline switches and the Hub
probe (against a socket this test opens), the Hub path on a local dataset folder in ``ylecun/mnist``'s layout,
the fallback rules of ``load_mnist``, Fashion-MNIST's folder variable, the parquet export read back with plain
``datasets``, and every refusal of ``read_idx`` and ``load_idx_folder`` with the words that name the problem."""

import gzip
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


@pytest.mark.parametrize(
    'value, on',
    [
        ('1', True),
        ('ON', True),
        ('yes', True),
        (' true ', True),
        ('TRUE', True),
        ('0', False),
        ('', False),
        ('off', False),
        ('no', False),
        ('2', False),
    ],
)
def test_offline_flags_read_as_the_hub_libraries_read_them(clean_sources, value, on):
    clean_sources.setenv('HF_HUB_OFFLINE', value)
    assert mnist._env_flag('HF_HUB_OFFLINE') is on
    assert mnist._env_flag('HF_DATASETS_OFFLINE') is False  # unset


def test_hub_probe_connects_to_the_endpoint_and_honours_both_offline_flags(clean_sources):
    with socket.socket() as server:
        server.bind(('127.0.0.1', 0))
        server.listen()
        port = server.getsockname()[1]
        clean_sources.setenv('HF_ENDPOINT', f'http://127.0.0.1:{port}')
        assert mnist.hub_is_reachable() is True
        for flag in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'):
            clean_sources.setenv(flag, '1')
            assert mnist.hub_is_reachable() is False  # no connection tried
            clean_sources.delenv(flag)
    # the port is closed now: refused, so not reachable
    assert mnist.hub_is_reachable(timeout=0.5) is False


def _hub_layout(folder, images, labels):
    """A local folder in ylecun/mnist's layout: PNG images and int labels in a parquet file per split."""
    for split in mnist.SPLITS:
        ds = datasets.Dataset.from_dict(
            {'image': [Image.fromarray(image) for image in images], 'label': labels.tolist()},
            features=datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(num_classes=10)}),
        )
        (folder / 'data').mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(folder / 'data' / f'{split}-00000-of-00001.parquet'))
    return folder


def test_the_hub_path_reads_ylecun_mnist_layout_into_uint8_digits(tmp_path, train_digits):
    images, labels = train_digits.images[:12], train_digits.labels[:12]
    repo = _hub_layout(tmp_path / 'mnist', images, labels)
    digits = mnist.load_hub('test', repo_id=str(repo))
    assert digits.images.dtype == np.uint8 and digits.images.shape == (12, 28, 28)
    assert np.array_equal(digits.images, images) and np.array_equal(digits.labels, labels)
    assert digits.labels.dtype == np.int64 and digits.source == f'hub:{repo}'
    with pytest.raises(ValueError, match='split must be one of'):
        mnist.load_hub('validation', repo_id=str(repo))


def test_source_is_logged_with_the_reason_it_was_chosen(clean_sources, tmp_path, caplog):
    caplog.set_level('INFO', logger=mnist.__name__)
    clean_sources.setattr(mnist, 'hub_is_reachable', lambda: False)
    assert mnist.resolve_source('auto') == 'sample'
    assert 'using the built-in 5k sample' in caplog.text
    clean_sources.setenv('MNIST_DIR', str(tmp_path))
    assert mnist.resolve_source() == str(tmp_path)
    assert 'from MNIST_DIR' in caplog.text
    assert mnist.resolve_source(tmp_path / 'given') == str(tmp_path / 'given')  # a path object, explicitly
    assert 'given explicitly' in caplog.text


def test_a_failing_hub_falls_back_only_when_the_hub_was_chosen_automatically(clean_sources, caplog):
    calls = []

    def broken_hub(split):
        calls.append(split)
        raise ConnectionError('reset by peer')

    clean_sources.setattr(mnist, 'hub_is_reachable', lambda: True)
    clean_sources.setattr(mnist, 'load_hub', broken_hub)
    digits = mnist.load_mnist('test')
    assert digits.source == 'sample' and len(digits.labels) == 1000 and calls == ['test']
    assert 'falling back to the built-in sample' in caplog.text
    with pytest.raises(ConnectionError, match='reset by peer'):
        mnist.load_mnist('test', 'hub')  # asked for by name: no silent substitute
    assert mnist.load_mnist('train', 'sample').source == 'sample'


def test_results_are_cached_per_source_and_split(clean_sources):
    first = mnist.load_mnist('train', 'sample')
    assert mnist.load_mnist('train', 'sample').images is first.images
    assert mnist.load_mnist('test', 'sample').images is not first.images


def test_fashion_mnist_folder_comes_from_its_variable(clean_sources, tmp_path, train_digits):
    mnist.write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', train_digits.images[:5])
    mnist.write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', train_digits.labels[:5].astype(np.uint8))
    clean_sources.setenv('FASHION_MNIST_DIR', str(tmp_path))
    digits = mnist.load_mnist('test', 'fashion_mnist')
    assert digits.source == 'fashion_mnist' and digits.class_names == mnist.FASHION_MNIST_CLASS_NAMES
    assert np.array_equal(digits.images, train_digits.images[:5])
    assert np.array_equal(digits.labels, train_digits.labels[:5])


def test_parquet_export_reads_back_with_plain_datasets(clean_sources, tmp_path, train_digits, test_digits):
    out = mnist.export_parquet(tmp_path / 'export', 'sample')
    assert out == tmp_path / 'export'
    assert sorted(p.name for p in (out / 'data').iterdir()) == [
        'test-00000-of-00001.parquet',
        'train-00000-of-00001.parquet',
    ]
    loaded = datasets.load_dataset(str(out))
    for split, digits in (('train', train_digits), ('test', test_digits)):
        ds = loaded[split].with_format('numpy')
        assert np.array_equal(np.asarray(ds['image'], dtype=np.uint8), digits.images)
        assert np.array_equal(ds['label'], digits.labels)
        assert loaded[split].features['label'].names == list(mnist.MNIST_CLASS_NAMES)
        assert loaded[split].features['image'] == datasets.Array2D((28, 28), 'uint8')
    assert datasets.load_dataset(str(out), split='train[:10]').num_rows == 10


# ---- every refusal of the IDX reader names the file and the problem ----------------------------------------


def _idx_bytes(array, dtype_byte=0x08, zero_prefix=b'\x00\x00'):
    return (
        zero_prefix
        + bytes([dtype_byte, array.ndim])
        + b''.join(d.to_bytes(4, 'big') for d in array.shape)
        + array.tobytes()
    )


@pytest.mark.parametrize(
    'data, message',
    [
        (b'\x00\x00', r'not an IDX file \(only 2 bytes\)'),
        (b'', r'not an IDX file \(only 0 bytes\)'),
        (_idx_bytes(np.zeros((2, 3), np.uint8), zero_prefix=b'\x01\x00'), 'first two bytes must be zero'),
        (_idx_bytes(np.zeros((2, 3), np.uint8), dtype_byte=0x0D), 'IDX dtype byte is 0x0d; only 0x08'),
        (_idx_bytes(np.zeros((2, 3), np.uint8))[:7], r'truncated IDX header \(7 bytes, need 12\)'),
        (
            _idx_bytes(np.zeros((2, 3), np.uint8))[:-1],
            r'IDX file truncated: header says shape \(2, 3\) \(18 bytes in all\), '
            r'file has 17 bytes',
        ),
        (
            _idx_bytes(np.zeros((2, 3), np.uint8)) + b'\x00',
            r'has trailing bytes: header says shape \(2, 3\) \(18 bytes in '
            r'all\), file has more bytes',
        ),
    ],
)
def test_read_idx_refuses_with_the_reason(tmp_path, data, message):
    path = tmp_path / 'bad-idx'
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as error:
        mnist.read_idx(path)
    assert str(error.value).startswith(f'{path}: ')


def test_read_idx_checks_the_declared_size_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, 'MAX_IDX_BYTES', 6)
    path = tmp_path / 'big'
    path.write_bytes(_idx_bytes(np.zeros((2, 3), np.uint8)))
    assert mnist.read_idx(path).shape == (2, 3)  # exactly the limit: read
    path.write_bytes(_idx_bytes(np.zeros((7,), np.uint8)))
    with pytest.raises(ValueError, match='declares 7 bytes of data, more than the 6 this reader takes'):
        mnist.read_idx(path)


def test_read_idx_magic_is_checked_when_asked_and_gzip_is_sniffed(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / 'images-without-gz-suffix'
    path.write_bytes(gzip.compress(_idx_bytes(array)))
    assert np.array_equal(mnist.read_idx(path, mnist.IDX_IMAGES_MAGIC), array)
    with pytest.raises(ValueError, match=r'IDX magic number is 2051 \(0x00000803\), expected 2049'):
        mnist.read_idx(path, mnist.IDX_LABELS_MAGIC)
    scalar = tmp_path / 'zero-dims'
    scalar.write_bytes(bytes([0, 0, 8, 0, 7]))
    assert mnist.read_idx(scalar).tolist() == 7  # a 0-d file holds one byte
    scalar.write_bytes(bytes([0, 0, 8, 0]))
    with pytest.raises(ValueError, match=r'truncated: header says shape \(\) \(5 bytes in all\), file has 4 bytes'):
        mnist.read_idx(scalar)
    with pytest.raises(ValueError, match='write_idx writes uint8 only, got int64'):
        mnist.write_idx(tmp_path / 'x', np.zeros(3, np.int64))


@pytest.mark.parametrize('stem_style', ['{prefix}-{kind}-idx{ndim}-ubyte', '{prefix}-{kind}.idx{ndim}-ubyte'])
@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_idx_folders_in_both_naming_styles(tmp_path, train_digits, stem_style, suffix):
    for split, prefix in (('train', 'train'), ('test', 't10k')):
        for kind, ndim, array in (('images', 3, train_digits.images[:4]), ('labels', 1, train_digits.labels[:4])):
            name = stem_style.format(prefix=prefix, kind=kind, ndim=ndim) + suffix
            mnist.write_idx(tmp_path / name, array.astype(np.uint8))
    for split in mnist.SPLITS:
        digits = mnist.load_idx_folder(tmp_path, split)
        assert np.array_equal(digits.images, train_digits.images[:4]) and digits.labels.dtype == np.int64
        assert digits.source == f'idx:{tmp_path}' and digits.class_names == mnist.MNIST_CLASS_NAMES


def test_idx_folder_refusals_name_the_files(tmp_path, train_digits):
    with pytest.raises(FileNotFoundError, match=r"no t10k-images-idx3-ubyte\[.gz\] file for split 'test'"):
        mnist.load_idx_folder(tmp_path, 'test')
    images, labels = tmp_path / 'train-images-idx3-ubyte', tmp_path / 'train-labels-idx1-ubyte'
    mnist.write_idx(labels, np.array([0, 1, 2], np.uint8))
    mnist.write_idx(images, np.zeros((3, 28, 27), np.uint8))
    with pytest.raises(ValueError, match=r'images are \(28, 27\), expected 28x28'):
        mnist.load_idx_folder(tmp_path, 'train')
    mnist.write_idx(images, np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match='holds 2 images but .* holds 3 labels'):
        mnist.load_idx_folder(tmp_path, 'train')
    mnist.write_idx(images, np.zeros((3, 28, 28), np.uint8))
    mnist.write_idx(labels, np.array([0, 10, 2], np.uint8))
    with pytest.raises(ValueError, match=r'labels must be 0-9, found 10 \(at index 1\)'):
        mnist.load_idx_folder(tmp_path, 'train')
    assert len(mnist.load_idx_folder(tmp_path, 'train', tuple('abcdefghijk')).labels) == 3  # 11 classes: fine
    mnist.write_idx(images, np.zeros((0, 28, 28), np.uint8))
    mnist.write_idx(labels, np.zeros((0,), np.uint8))
    assert len(mnist.load_idx_folder(tmp_path, 'train').labels) == 0  # an empty split is not an error


def test_the_built_in_sample_has_400_and_100_digits_per_class(train_digits, test_digits):
    for digits, per_class in ((train_digits, 400), (test_digits, 100)):
        assert digits.images.shape == (10 * per_class, 28, 28) and digits.images.dtype == np.uint8
        assert np.bincount(digits.labels).tolist() == [per_class] * 10 and digits.labels.dtype == np.int64
        assert digits.source == 'sample'
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\), got 'val'"):
        mnist.load_sample('val')


def test_idx_folder_checks_each_files_magic_number(tmp_path):
    """The magic number says how many dimensions: images are 3-d (2051), labels 1-d (2049)."""
    images, labels = tmp_path / 'train-images-idx3-ubyte', tmp_path / 'train-labels-idx1-ubyte'
    mnist.write_idx(images, np.zeros(3, np.uint8))
    mnist.write_idx(labels, np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match=r'train-images-idx3-ubyte: IDX magic number is 2049 .*expected 2051'):
        mnist.load_idx_folder(tmp_path, 'train')
    mnist.write_idx(images, np.zeros((3, 28, 28), np.uint8))
    mnist.write_idx(labels, np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r'train-labels-idx1-ubyte: IDX magic number is 2051 .*expected 2049'):
        mnist.load_idx_folder(tmp_path, 'train')
