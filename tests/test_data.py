"""Tests of timm_capsules.data: IDX reading, MNIST sources, DiverseMultiMNIST generation,
the training stream, the datasets builder and the exported Hub-layout folder."""

import gzip
import hashlib
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from ci import unavailable

from timm_capsules.data import diverse_multimnist as dmm
from timm_capsules.data import diverse_multimnist_images
from timm_capsules.data import mnist

from mnist_digits import digit_hashes

pytestmark = pytest.mark.usefixtures('offline_mnist')

FASHION_DIR = Path(mnist.FASHION_MNIST_DEBIAN_DIR)


def place_alone(digit: np.ndarray, row: int, col: int, size: int = 36) -> np.ndarray:
    """Reference placement, one image at a time with np.pad (independent of the vectorised code)."""
    return np.pad(digit, ((row, size - 28 - row), (col, size - 28 - col))).astype(np.int64)


def bounding_box(image: np.ndarray) -> tuple:
    rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


# ------------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_idx_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    mnist.write_idx(tmp_path / f't10k-images-idx3-ubyte{suffix}', images)
    mnist.write_idx(tmp_path / f't10k-labels-idx1-ubyte{suffix}', labels)
    if suffix:  # really compressed, and the header really is big-endian 2051
        assert gzip.open(tmp_path / 't10k-images-idx3-ubyte.gz').read(4) == (2051).to_bytes(4, 'big')
    digits = mnist.load_idx_folder(tmp_path, 'test')
    np.testing.assert_array_equal(digits.images, images)
    np.testing.assert_array_equal(digits.labels, labels)
    assert digits.labels.dtype == np.int64 and digits.images.dtype == np.uint8


def test_idx_rejects_wrong_magic(tmp_path):
    path = mnist.write_idx(tmp_path / 'train-images-idx3-ubyte', np.zeros((3, 28), np.uint8))  # 2 dims: 2050
    with pytest.raises(ValueError, match=r'train-images-idx3-ubyte.*magic number is 2050.*expected 2051'):
        mnist.read_idx(path, mnist.IDX_IMAGES_MAGIC)
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + (2).to_bytes(4, 'big') + bytes(8))  # float32 dtype byte
    with pytest.raises(ValueError, match='dtype byte is 0x0d'):
        mnist.read_idx(path)


def test_idx_rejects_truncated_file(tmp_path):
    path = mnist.write_idx(tmp_path / 'train-images-idx3-ubyte', np.ones((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r'train-images-idx3-ubyte: IDX file truncated.*\(4, 28, 28\)'):
        mnist.read_idx(path, mnist.IDX_IMAGES_MAGIC)


def test_idx_rejects_count_mismatch(tmp_path):
    mnist.write_idx(tmp_path / 'train-images-idx3-ubyte.gz', np.zeros((5, 28, 28), np.uint8))
    mnist.write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match='holds 5 images but .*train-labels-idx1-ubyte.gz holds 4 labels'):
        mnist.load_idx_folder(tmp_path, 'train')


def test_fashion_mnist_from_debian_package():
    folder = Path(os.environ.get('FASHION_MNIST_DIR', FASHION_DIR))
    if not any(folder.glob('train-images-idx3-ubyte*')):
        unavailable(f'Fashion-MNIST not in {folder} (Debian package dataset-fashion-mnist)')
    # The first ten labels of each split, as published by Zalando: a swapped split or a mis-read
    # label file fails here even though both splits are balanced.
    first_labels = {'train': [9, 0, 0, 3, 0, 2, 7, 2, 5, 5], 'test': [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]}
    for split, size in (('train', 60_000), ('test', 10_000)):
        digits = mnist.load_mnist(split, 'fashion_mnist')
        assert digits.images.shape == (size, 28, 28) and digits.images.dtype == np.uint8
        assert np.bincount(digits.labels).tolist() == [size // 10] * 10  # balanced classes 0-9
        assert digits.labels[:10].tolist() == first_labels[split]
        assert digits.images.max() == 255 and digits.class_names[9] == 'Ankle boot'
        assert digits.source == 'fashion_mnist'


# ---------------------------------------------------------------------------------------- sources
def test_builtin_sample_banks(train_digits, test_digits):
    assert train_digits.images.shape == (4000, 28, 28) and test_digits.images.shape == (1000, 28, 28)
    assert np.bincount(train_digits.labels).tolist() == [400] * 10
    assert np.bincount(test_digits.labels).tolist() == [100] * 10
    train_hashes, test_hashes = digit_hashes(train_digits.images), digit_hashes(test_digits.images)
    assert len(train_hashes) == 4000 and len(test_hashes) == 1000 and not train_hashes & test_hashes
    assert (Path(mnist.__file__).parent / 'MNIST_SAMPLE.md').read_text().count('CC BY-SA 3.0')


def test_source_choice_order(tmp_path, monkeypatch, caplog):
    reachable = {'value': True}
    monkeypatch.setattr(mnist, 'hub_is_reachable', lambda: reachable['value'])
    caplog.set_level(logging.INFO, logger=mnist.__name__)
    monkeypatch.setenv('MNIST_DIR', str(tmp_path))
    assert mnist.resolve_source('sample') == 'sample'  # explicit beats everything
    assert mnist.resolve_source(None) == str(tmp_path)  # then MNIST_DIR
    assert 'from MNIST_DIR' in caplog.text
    monkeypatch.delenv('MNIST_DIR')
    assert mnist.resolve_source('auto') == 'hub'  # then the Hub when reachable
    reachable['value'] = False
    assert mnist.resolve_source() == 'sample'  # then the built-in sample
    assert 'built-in 5k sample' in caplog.text


def test_offline_skips_network_and_hub_failure_falls_back(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError('tried to connect although HF_HUB_OFFLINE=1')

    monkeypatch.setattr(socket, 'create_connection', no_network)
    assert mnist.hub_is_reachable() is False
    assert mnist.load_mnist('test').source == 'sample'
    # Hub answers the probe but the download fails: auto falls back, an explicit "hub" does not.
    monkeypatch.setattr(mnist, 'hub_is_reachable', lambda: True)
    monkeypatch.setattr(mnist, 'load_hub', lambda split: (_ for _ in ()).throw(ConnectionError('no route')))
    mnist._load_resolved.cache_clear()
    assert mnist.load_mnist('test').source == 'sample'
    with pytest.raises(ConnectionError, match='no route'):
        mnist.load_mnist('test', 'hub')
    mnist._load_resolved.cache_clear()


# ------------------------------------------------------------------------------------ generation
@pytest.fixture(scope='module')
def generated(train_digits):
    return dmm.generate(train_digits, np.arange(3000), seed=3, split='train')


def test_generation_statistics(generated):
    n = len(generated.images)
    single = generated.num_digits == 1
    sigma = np.sqrt(n * (1 / 6) * (5 / 6))
    assert abs(single.sum() - n / 6) < 4 * sigma
    two = ~single
    assert (generated.classes[two, 0] != generated.classes[two, 1]).all()
    assert (generated.classes[single, 1] == -1).all() and (generated.classes[:, 0] >= 0).all()
    # Every ordered class pair occurs: the second class is uniform over the other nine.
    assert len({tuple(pair) for pair in generated.classes[two]}) == 90
    expected = np.zeros((n, 10), np.float32)
    for k, classes in enumerate(generated.classes):
        expected[k, classes[classes >= 0]] = 1
    np.testing.assert_array_equal(generated.targets, expected)
    assert (generated.targets.sum(1) == generated.num_digits).all()
    assert generated.images.shape == (n, 36, 36) and generated.images.dtype == np.uint8


def test_shifts_within_four_pixels(generated, train_digits):
    present = generated.offsets[generated.classes >= 0]  # (digits, 2)
    assert present.min() == 0 and present.max() == 8  # every shift from -4 to +4 is used ...
    assert len(np.unique(present)) == 9
    two = generated.num_digits == 2
    same = (generated.offsets[two, 0] == generated.offsets[two, 1]).all(axis=1)
    assert same.mean() < 0.05  # ... independently per digit (1/81 expected)
    # Single-digit images, checked from the pixels alone: the digit's bounding box moved by <= 4 px.
    for k in np.flatnonzero(~two)[:300]:
        source = train_digits.images[generated.sources[k, 0]]
        moved = np.subtract(bounding_box(generated.images[k]), bounding_box(source))
        assert moved[0] == moved[1] and moved[2] == moved[3]  # a pure translation
        assert 0 <= moved[0] <= 8 and 0 <= moved[2] <= 8, moved


@pytest.mark.parametrize('canvas_size, max_shift', [(40, 2), (31, 1), (28, 0)])
def test_canvas_size_and_max_shift_options(train_digits, canvas_size, max_shift):
    batch = dmm.generate(train_digits, np.arange(600), seed=7, canvas_size=canvas_size, max_shift=max_shift)
    assert batch.images.shape == (600, canvas_size, canvas_size)
    # Shifts are measured from the centred position, which rounds down on an odd margin (31 - 28 = 3).
    centre = (canvas_size - 28) // 2
    shifts = batch.offsets[batch.classes >= 0] - centre
    assert shifts.min() == -max_shift and shifts.max() == max_shift  # the whole range, and no more
    assert len(np.unique(shifts)) == 2 * max_shift + 1
    for k in range(0, 600, 5):  # the offsets really are where the pixels are
        (r1, c1), (r2, c2) = batch.offsets[k]
        image = place_alone(train_digits.images[batch.sources[k, 0]], r1, c1, canvas_size)
        if batch.num_digits[k] == 2:
            image = np.minimum(image + place_alone(train_digits.images[batch.sources[k, 1]], r2, c2, canvas_size), 255)
        np.testing.assert_array_equal(batch.images[k], image, err_msg=f'image {k}')
    # Single-digit images, from the pixels alone: the bounding box moved by (centre +- max_shift) px.
    for k in np.flatnonzero(batch.num_digits == 1):
        moved = np.subtract(bounding_box(batch.images[k]), bounding_box(train_digits.images[batch.sources[k, 0]]))
        assert moved[0] == moved[1] and moved[2] == moved[3]
        assert abs(moved[0] - centre) <= max_shift and abs(moved[2] - centre) <= max_shift, moved
    stream = dmm.DiverseMultiMNISTStream(
        digits=train_digits, seed=7, num_samples=40, batch_size=40, canvas_size=canvas_size, max_shift=max_shift
    )
    images, _ = next(iter(stream))
    assert images.shape == (40, 1, canvas_size, canvas_size)
    np.testing.assert_array_equal((images[:, 0] * 255).round().byte().numpy(), batch.images[:40])


def test_canvas_too_small_for_the_shift_is_rejected(train_digits):
    with pytest.raises(ValueError, match='canvas_size 35 cannot hold a 28 px digit shifted by up to 4 px'):
        dmm.generate(train_digits, np.arange(3), canvas_size=35)
    with pytest.raises(ValueError, match='canvas_size 36 cannot hold a 28 px digit shifted by up to -1 px'):
        dmm.DiverseMultiMNISTStream(digits=train_digits, max_shift=-1)


@pytest.mark.parametrize('overlay', ['sum_clip', 'max', 'mean'])
def test_overlay_rule_pixelwise(train_digits, overlay):
    batch = dmm.generate(train_digits, np.arange(400), seed=5, overlay=overlay)
    saturated = 0
    for k in range(len(batch.images)):
        (r1, c1), (r2, c2) = batch.offsets[k]
        a = place_alone(train_digits.images[batch.sources[k, 0]], r1, c1)
        if batch.num_digits[k] == 1:
            expected = a
        else:
            b = place_alone(train_digits.images[batch.sources[k, 1]], r2, c2)
            saturated += (a + b > 255).sum()
            expected = {'sum_clip': np.minimum(a + b, 255), 'max': np.maximum(a, b), 'mean': (a + b + 1) // 2}[overlay]
        np.testing.assert_array_equal(batch.images[k], expected, err_msg=f'image {k}')
    assert saturated > 0  # the clipping branch was exercised


def test_train_and_test_use_disjoint_source_digits(train_digits, test_digits):
    train = dmm.make_split('train', 1500, source='sample', seed=0)
    test = dmm.make_split('test', 1500, source='sample', seed=0)
    # Rebuild every test image from the test bank alone: the test split really uses test digits.
    for k in range(0, 1500, 7):
        (r1, c1), (r2, c2) = test.offsets[k]
        image = place_alone(test_digits.images[test.sources[k, 0]], r1, c1)
        if test.num_digits[k] == 2:
            image = np.minimum(image + place_alone(test_digits.images[test.sources[k, 1]], r2, c2), 255)
        np.testing.assert_array_equal(test.images[k], image)
    used_train = digit_hashes(train_digits.images[train.sources[train.sources >= 0]])
    used_test = digit_hashes(test_digits.images[test.sources[test.sources >= 0]])
    assert len(used_train) > 1000 and len(used_test) > 500 and not used_train & used_test


def test_generation_independent_of_chunking_and_order(train_digits):
    whole = dmm.generate(train_digits, np.arange(500), seed=9)
    order = np.random.default_rng(0).permutation(500)
    shuffled = dmm.generate(train_digits, order, seed=9)
    np.testing.assert_array_equal(shuffled.images, whole.images[order])
    np.testing.assert_array_equal(dmm.generate(train_digits, np.arange(200, 300), seed=9).images, whole.images[200:300])
    other = dmm.generate(train_digits, np.arange(500), seed=10)
    assert (other.images != whole.images).any(axis=(1, 2)).mean() > 0.99
    test_split = dmm.generate(mnist.load_sample('test'), np.arange(500), seed=9, split='test')
    assert (test_split.num_digits != whole.num_digits).any()  # the split keys the randomness too


# ------------------------------------------------------------------------------------------ stream
def stream_images(stream, workers=0, batched=False):
    loader = torch.utils.data.DataLoader(stream, batch_size=None if batched else 50, num_workers=workers)
    images, targets = zip(*loader)
    return torch.cat(images), torch.cat(targets)


def as_multiset(images: torch.Tensor) -> list:
    return sorted(hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images)


def test_stream_samples_match_generator(train_digits):
    stream = dmm.DiverseMultiMNISTStream(digits=train_digits, seed=2, num_samples=300, chunk_size=128)
    images, targets = stream_images(stream)
    reference = dmm.generate(train_digits, np.arange(300), seed=2)
    assert images.shape == (300, 1, 36, 36) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    np.testing.assert_array_equal((images[:, 0] * 255).round().byte().numpy(), reference.images)
    np.testing.assert_array_equal(targets.numpy(), reference.targets)


def test_stream_workers_give_same_images(train_digits):
    sample_mode = dict(digits=train_digits, seed=4, num_samples=400, chunk_size=64)
    one, _ = stream_images(dmm.DiverseMultiMNISTStream(**sample_mode), workers=1)
    two, _ = stream_images(dmm.DiverseMultiMNISTStream(**sample_mode), workers=2)
    assert len(one) == len(two) == 400 and as_multiset(one) == as_multiset(two)
    batch_mode = dict(digits=train_digits, seed=4, num_samples=400, batch_size=32, chunk_size=64)
    one, _ = stream_images(dmm.DiverseMultiMNISTStream(**batch_mode), workers=1, batched=True)
    two, _ = stream_images(dmm.DiverseMultiMNISTStream(**batch_mode), workers=2, batched=True)
    assert torch.equal(one, two)  # batch mode: even the order is the same
    other, _ = stream_images(dmm.DiverseMultiMNISTStream(**{**batch_mode, 'seed': 5}), batched=True)
    assert not set(as_multiset(other)) & set(as_multiset(one))


@pytest.mark.parametrize('batch_size, start, workers', [(None, 137, 0), (16, 7, 0), (16, 7, 2)])
def test_stream_resume_is_the_tail(train_digits, batch_size, start, workers):
    options = dict(digits=train_digits, seed=6, num_samples=320, batch_size=batch_size, chunk_size=64)
    full, full_targets = stream_images(dmm.DiverseMultiMNISTStream(**options), batched=batch_size is not None)
    tail, tail_targets = stream_images(
        dmm.DiverseMultiMNISTStream(**options, start=start), workers=workers, batched=batch_size is not None
    )
    skipped = start * (batch_size or 1)
    assert torch.equal(tail, full[skipped:]) and torch.equal(tail_targets, full_targets[skipped:])


def test_stream_resume_generates_nothing_it_skips(train_digits, monkeypatch):
    generated_indices = []
    real_generate = dmm.generate
    monkeypatch.setattr(
        diverse_multimnist_images,
        'generate',
        lambda digits, indices, **kw: (
            generated_indices.append(np.asarray(indices)),
            real_generate(digits, indices, **kw),
        )[1],
    )
    stream = dmm.DiverseMultiMNISTStream(digits=train_digits, batch_size=8, start=10**9, chunk_size=8)
    next(iter(stream))
    assert np.concatenate(generated_indices).min() == 8 * 10**9


def test_stream_ranks_are_disjoint(train_digits):
    options = dict(digits=train_digits, seed=8, num_samples=200, batch_size=25)
    ranks = [
        stream_images(dmm.DiverseMultiMNISTStream(**options, rank=r, world_size=2), batched=True)[0] for r in (0, 1)
    ]
    assert not set(as_multiset(ranks[0])) & set(as_multiset(ranks[1]))
    single, _ = stream_images(dmm.DiverseMultiMNISTStream(**{**options, 'num_samples': 400}), batched=True)
    assert as_multiset(torch.cat(ranks)) == as_multiset(single)  # together: the one-process stream


# ----------------------------------------------------------------------------- builder and export
def builder_arrays(tmp_path, **config):
    builder = dmm.DiverseMultiMNIST(cache_dir=str(tmp_path), source='sample', **config)
    builder.download_and_prepare()
    return {split: builder.as_dataset(split).with_format('numpy')[:] for split in ('train', 'test')}


def test_builder_deterministic_and_matches_make_split(tmp_path):
    config = dict(train_size=300, test_size=200, seed=11)
    first = builder_arrays(tmp_path / 'a', **config)
    second = builder_arrays(tmp_path / 'b', **config)
    for split in ('train', 'test'):
        assert first[split]['image'].tobytes() == second[split]['image'].tobytes()
    reference = dmm.make_split('test', 200, source='sample', seed=11)
    np.testing.assert_array_equal(first['test']['image'], reference.images)
    np.testing.assert_array_equal(first['test']['target'], reference.targets)
    for labels, target in zip(first['test']['labels'], first['test']['target']):
        assert list(labels) == np.flatnonzero(target).tolist()
    other = builder_arrays(tmp_path / 'c', **{**config, 'seed': 12})
    assert first['train']['image'].tobytes() != other['train']['image'].tobytes()


def test_image_feature_round_trips(tmp_path):
    dataset = dmm.load_diverse_multimnist(
        'test', cache_dir=tmp_path, source='sample', train_size=0, test_size=40, image_feature='image'
    )
    reference = dmm.make_split('test', 40, source='sample')
    images = np.stack([np.asarray(example['image']) for example in dataset])
    np.testing.assert_array_equal(images, reference.images)
    streamed = dmm.load_diverse_multimnist('test', streaming=True, cache_dir=tmp_path, source='sample', test_size=40)
    np.testing.assert_array_equal(np.asarray(next(iter(streamed))['image']), reference.images[0])


def assert_split_is(dataset, reference):
    """A loaded split holds exactly the generator's images, targets, digit counts and labels, in order."""
    columns = dataset.with_format('numpy')[:]
    np.testing.assert_array_equal(columns['image'], reference.images)
    np.testing.assert_array_equal(columns['target'], reference.targets)
    np.testing.assert_array_equal(columns['num_digits'], reference.num_digits)
    assert dataset['labels'] == [sorted(c[c >= 0].tolist()) for c in reference.classes]


@pytest.mark.parametrize('canvas_size, max_shift', [(36, 4), (40, 2)])
def test_export_loads_with_plain_load_dataset(tmp_path, monkeypatch, canvas_size, max_shift):
    import datasets
    from huggingface_hub import DatasetCard

    out = tmp_path / 'diverse_multimnist'
    dmm.main(
        [
            'export',
            str(out),
            '--source',
            'sample',
            '--train-size',
            '120',
            '--test-size',
            '80',
            '--seed',
            '1',
            '--cache-dir',
            str(tmp_path / 'cache'),
            '--canvas-size',
            str(canvas_size),
            '--max-shift',
            str(max_shift),
        ]
    )
    assert sorted(p.name for p in (out / 'data').iterdir()) == [
        'test-00000-of-00001.parquet',
        'train-00000-of-00001.parquet',
    ]
    options = dict(source='sample', canvas_size=canvas_size, max_shift=max_shift)
    expected_features = dmm.DiverseMultiMNIST(cache_dir=str(tmp_path / 'cache'), **options).info.features
    assert expected_features['image'].shape == (canvas_size, canvas_size)
    monkeypatch.chdir(tmp_path)
    # An explicit cache_dir: datasets reads HF_DATASETS_CACHE once, at import, so setting the variable
    # here would let a cache left by an earlier run answer instead of this export.
    hf_cache = tmp_path / 'hf_cache'
    loaded = datasets.load_dataset('diverse_multimnist', cache_dir=str(hf_cache))  # by name, from the parent
    assert all(Path(f['filename']).is_relative_to(hf_cache) for ds in loaded.values() for f in ds.cache_files)
    assert {split: len(ds) for split, ds in loaded.items()} == {'train': 120, 'test': 80}
    for split, size in (('train', 120), ('test', 80)):
        assert loaded[split].features == expected_features
        assert_split_is(loaded[split], dmm.make_split(split, size, seed=1, **options))
    reference = dmm.make_split('test', 80, seed=1, **options)
    streamed = datasets.load_dataset(str(out), split='test', streaming=True, cache_dir=str(hf_cache))
    first = next(iter(streamed))
    assert streamed.features == expected_features
    np.testing.assert_array_equal(np.asarray(first['image'], np.uint8), reference.images[0])
    card = DatasetCard.load(out / 'README.md')
    splits = {entry['split'] for entry in card.data.configs[0]['data_files']}
    assert splits == {'train', 'test'} and card.data.license == 'cc-by-sa-3.0'
    info = card.data.to_dict()['dataset_info']
    assert {s['name']: s['num_examples'] for s in info['splits']} == {'train': 120, 'test': 80}
    assert f'on a {canvas_size}x{canvas_size} canvas' in card.text and f'up to {max_shift} px' in card.text
    assert f'| canvas_size | `{canvas_size}` |' in card.text and 'Tsai' in card.text


class FakeHub:
    """The Hub, in memory: ``repos[repo_id][path] = bytes``. Stands in for the HfApi that ``datasets``
    pushes through and for the card download/upload of ``huggingface_hub.repocard``; no network."""

    def __init__(self, downloads: Path):
        self.repos, self.created, self.downloads = {}, [], downloads
        hub = self

        class Api:
            def __init__(self, **kwargs):
                pass

            def repo_info(self, repo_id, **kwargs):
                if repo_id not in hub.repos:
                    from huggingface_hub.utils import RepositoryNotFoundError

                    error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # needs no HTTP response
                    Exception.__init__(error, repo_id)
                    raise error
                return type('RepoInfo', (), {'id': repo_id, 'sha': '0' * 40})()

            def create_repo(self, repo_id, repo_type=None, private=False, **kwargs):
                import huggingface_hub

                hub.created.append(dict(repo_id=repo_id, repo_type=repo_type, private=private))
                hub.repos.setdefault(repo_id, {})
                return huggingface_hub.RepoUrl(f'https://huggingface.co/datasets/{repo_id}')

            def preupload_lfs_files(self, repo_id, additions, **kwargs):
                for operation in additions:  # datasets deletes the parquet file right after this call
                    operation.test_bytes = Path(operation.path_or_fileobj).read_bytes()

            def create_commit(self, repo_id, operations, **kwargs):
                for op in operations:
                    data = getattr(op, 'test_bytes', op.path_or_fileobj)
                    hub.repos[repo_id][op.path_in_repo] = data if isinstance(data, bytes) else Path(data).read_bytes()
                return type('CommitInfo', (), {'oid': 'a' * 40})()

        self.Api = Api

    def hf_hub_download(self, repo_id, filename, repo_type=None, **kwargs):
        path = self.downloads / repo_id / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.repos[repo_id][filename])
        return str(path)

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, repo_type=None, **kwargs):
        assert repo_type == 'dataset'
        self.repos[repo_id][path_in_repo] = Path(path_or_fileobj).read_bytes()


def test_push_uploads_parquet_and_card_to_the_hub(tmp_path, monkeypatch):
    import datasets
    import fsspec
    import huggingface_hub.repocard
    from huggingface_hub import DatasetCard

    hub = FakeHub(tmp_path / 'downloads')
    for module in (datasets.dataset_dict, datasets.arrow_dataset):
        monkeypatch.setattr(module, 'HfApi', hub.Api)
    # push_to_hub lists the repo's existing files and card through HfFileSystem: a new repo is an empty
    # local folder (the path datasets builds is relative, so it lands under tmp_path)
    monkeypatch.setattr(datasets.dataset_dict, 'HfFileSystem', lambda **kwargs: fsspec.filesystem('file'))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.repocard, 'hf_hub_download', hub.hf_hub_download)
    monkeypatch.setattr(huggingface_hub.repocard, 'upload_file', hub.upload_file)
    monkeypatch.setattr(DatasetCard, 'validate', lambda self, repo_type=None: None)  # a POST to the Hub

    dmm.main(
        [
            'push',
            'my-org/dmm',
            '--source',
            'sample',
            '--train-size',
            '30',
            '--test-size',
            '20',
            '--seed',
            '3',
            '--canvas-size',
            '32',
            '--max-shift',
            '2',
            '--private',
            '--cache-dir',
            str(tmp_path / 'cache'),
        ]
    )
    assert hub.created == [dict(repo_id='my-org/dmm', repo_type='dataset', private=True)]
    files = hub.repos['my-org/dmm']
    assert sorted(files) == ['README.md', 'data/test-00000-of-00001.parquet', 'data/train-00000-of-00001.parquet']
    # what was uploaded loads back into exactly the generator's images
    repo = tmp_path / 'downloaded'
    for name, data in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data)
    loaded = datasets.load_dataset(str(repo), cache_dir=str(tmp_path / 'hf_cache'))
    options = dict(source='sample', seed=3, canvas_size=32, max_shift=2)
    for split, size in (('train', 30), ('test', 20)):
        assert_split_is(loaded[split], dmm.make_split(split, size, **options))
    card = DatasetCard(files['README.md'].decode())
    assert card.data.license == 'cc-by-sa-3.0'
    info = card.data.to_dict()['dataset_info']  # push_to_hub's YAML is kept under our text
    assert {s['name']: s['num_examples'] for s in info['splits']} == {'train': 30, 'test': 20}
    for needle in ('on a 32x32 canvas', 'up to 2 px', '| train_size | `30` |', '| seed | `3` |', 'CC BY-SA 3.0'):
        assert needle in card.text, needle  # our card text replaced push_to_hub's


def test_command_line_outputs_default_to_the_ignored_outputs_folder(tmp_path, monkeypatch):
    """Run in a checkout with no folder given, export and preview write under outputs/ (in .gitignore)."""
    import subprocess

    monkeypatch.chdir(tmp_path)
    dmm.main(['preview', '--source', 'sample', '--count', '4'])
    dmm.main(['export', '--source', 'sample', '--train-size', '4', '--test-size', '2'])
    assert (tmp_path / 'outputs' / 'diverse_multimnist_preview.png').is_file()
    assert sorted(p.name for p in (tmp_path / 'outputs' / 'diverse_multimnist').iterdir()) == ['README.md', 'data']
    ignored = subprocess.run(
        ['git', 'check-ignore', '-q', 'outputs/diverse_multimnist/README.md'], cwd=Path(__file__).resolve().parents[1]
    )
    assert ignored.returncode == 0  # the checkout's .gitignore covers it


def test_preview_writes_png(tmp_path):
    from PIL import Image

    out = dmm.preview(tmp_path / 'grid.png', count=10, source='sample', columns=5)
    with Image.open(out) as image:
        assert image.format == 'PNG' and image.size == (650, 300)  # figsize (1.3 x 5, 1.5 x 2 rows) at 100 dpi
        pixels = np.asarray(image.convert('L'))
    assert pixels.min() < 30 and pixels.max() > 225  # black tiles with bright digits on a white page


# ------------------------------------------------------------------------------------ CIFAR-style data
def test_image_classification_data_normalises_and_encodes_targets():
    import datasets
    from PIL import Image

    from timm_capsules.data.cifar import ImageClassificationData, image_transform, label_info

    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    single = datasets.Dataset.from_dict(
        {'img': [Image.fromarray(p) for p in pixels], 'label': [7, 0, 3]},
        features=datasets.Features({'img': datasets.Image(), 'label': datasets.ClassLabel(num_classes=10)}),
    )
    info = label_info(single, 'label')
    assert info == (10, tuple(str(k) for k in range(10)), False)
    data = ImageClassificationData(single, image_transform((3, 8, 8)), 'img', 'label', info, mean=mean, std=std)
    image, target = data[2]
    by_hand = (pixels[2].transpose(2, 0, 1) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(image.numpy(), by_hand, rtol=1e-5, atol=1e-5)
    assert target.dtype == torch.int64 and target.item() == 3
    # multi-label: plain int lists (classes counted from the data); uint8 CHW arrays, which datasets reads
    # back as lists of Python ints (as in an exported DiverseMultiMNIST); grey, resized
    multi = datasets.Dataset.from_dict(
        {'img': [p.transpose(2, 0, 1) for p in pixels], 'tags': [[1], [0, 4], []]},
        features=datasets.Features(
            {'img': datasets.Array3D((3, 8, 8), 'uint8'), 'tags': datasets.Sequence(datasets.Value('int64'))}
        ),
    )
    info = label_info(multi, 'tags')
    assert info == (5, None, True)
    data = ImageClassificationData(
        multi, image_transform((1, 4, 4), resize=True), 'img', 'tags', info, mean=(0.5,), std=(0.25,)
    )
    image, target = data[1]
    assert image.shape == (1, 4, 4) and target.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    grey = Image.fromarray(pixels[1]).convert('L').resize((4, 4), Image.BILINEAR)  # torchvision's Resize
    np.testing.assert_allclose(image[0].numpy(), (np.asarray(grey) / 255.0 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)
    assert data[2][1].sum() == 0
