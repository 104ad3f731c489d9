"""``timm_capsules/data/diverse_multimnist_images.py`` checked by value: SplitMix64 against its published first
output and a pure-Python copy of the finaliser, the uniforms against a loop over Python integers, every generated
image, class, source and offset against a per-image reference written from the module docstring, the option
checks' exact messages, ``make_split``'s chunks and defaults, the stream's length, sharding and batches, and the
preview's tiles. Written for a mutmut run (tests/README.md); small sizes, built-in sample digits."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from timm_capsules.data import diverse_multimnist_images as dmi
from timm_capsules.data import mnist

pytestmark = pytest.mark.usefixtures('offline_mnist')

MASK = 2**64 - 1


def mix_reference(x: int) -> int:
    """SplitMix64's finaliser (Steele, Lea, Flood 2014), on Python integers."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def uniforms_reference(seed: int, split: str, index: int) -> list:
    key_image, key_slot = (
        int(k) for k in np.random.SeedSequence([seed, {'train': 0, 'test': 1}[split]]).generate_state(2, np.uint64)
    )
    state = mix_reference((index * 0x9E3779B97F4A7C15 + key_image) & MASK)
    slots = [(key_slot + j * 0xD1B54A32D192ED03) & MASK for j in range(1, 9)]
    return [(mix_reference(state ^ s) >> 11) / 2**53 for s in slots]


def image_reference(digits, seed, split, index, p_single=1 / 6, max_shift=4, canvas_size=36, overlay='sum_clip'):
    """One image, from the docstring: one digit with probability p_single, else two of different classes."""
    u = uniforms_reference(seed, split, index)
    labels = [int(c) for c in digits.labels]
    n = len(labels)
    first = min(int(u[1] * n), n - 1)
    second_class = (labels[first] + 1 + min(int(u[2] * 9), 8)) % 10
    of_class = [k for k in range(n) if labels[k] == second_class]  # in order of the source split
    second = of_class[min(int(u[3] * len(of_class)), len(of_class) - 1)]
    span = 2 * max_shift + 1
    shifts = [min(int(v * span), span - 1) - max_shift for v in u[4:8]]
    centre = (canvas_size - 28) // 2
    offsets = [(centre + shifts[0], centre + shifts[1]), (centre + shifts[2], centre + shifts[3])]
    two = u[0] >= p_single

    def placed(k, at):
        canvas = np.zeros((canvas_size, canvas_size), np.int64)
        canvas[at[0] : at[0] + 28, at[1] : at[1] + 28] = digits.images[k]
        return canvas

    a = placed(first, offsets[0])
    if not two:
        return a.astype(np.uint8), [labels[first], -1], [first, -1], [list(offsets[0]), [-1, -1]]
    b = placed(second, offsets[1])
    image = {'sum_clip': np.minimum(a + b, 255), 'max': np.maximum(a, b), 'mean': (a + b + 1) // 2}[overlay]
    return image.astype(np.uint8), [labels[first], second_class], [first, second], [list(o) for o in offsets]


def test_mix64_is_splitmix64():
    # SplitMix64 seeded with 0: its first output is the finaliser of the golden gamma (published test vector)
    assert int(dmi._mix64(np.array([0x9E3779B97F4A7C15], np.uint64))[0]) == 0xE220A8397B1DCDAF
    values = np.random.default_rng(0).integers(0, 2**64, 200, dtype=np.uint64, endpoint=False)
    values = np.concatenate([values, np.array([0, 1, MASK], np.uint64)])
    assert [int(v) for v in dmi._mix64(values)] == [mix_reference(int(v)) for v in values]


@pytest.mark.parametrize('seed, split', [(0, 'train'), (7, 'test'), (2**32 - 1, 'train')])
def test_uniforms_are_the_hash_of_seed_split_index_and_slot(seed, split):
    indices = np.array([0, 1, 2, 17, 10**6, 2**40])
    got = dmi._uniforms(seed, split, indices)
    assert got.shape == (6, 8) and got.dtype == np.float64
    assert got.tolist() == [uniforms_reference(seed, split, int(i)) for i in indices]


OPTIONS = [
    dict(seed=3, split='train'),
    dict(seed=4, split='test', p_single=0.5, max_shift=2, canvas_size=33, overlay='max'),
    dict(seed=5, split='train', p_single=0.3, max_shift=0, canvas_size=30, overlay='mean'),
    dict(seed=6, split='test', p_single=0.0, max_shift=1, canvas_size=31),
    dict(seed=6, split='test', p_single=1.0, overlay='max'),
]


@pytest.mark.parametrize('options', OPTIONS)
def test_every_image_is_the_per_image_reference(train_digits, test_digits, options):
    digits = train_digits if options['split'] == 'train' else test_digits
    indices = [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, *range(200, 260), 10**9]
    batch = dmi.generate(digits, indices, **options)
    size = options.get('canvas_size', 36)
    assert batch.images.shape == (len(indices), size, size) and batch.images.dtype == np.uint8
    assert batch.targets.dtype == np.float32 and batch.num_digits.dtype == np.uint8
    for k, index in enumerate(indices):
        image, classes, sources, offsets = image_reference(digits, index=index, **options)
        np.testing.assert_array_equal(batch.images[k], image, err_msg=f'image {index}')
        assert batch.classes[k].tolist() == classes and batch.sources[k].tolist() == sources
        assert batch.offsets[k].tolist() == offsets
        assert batch.num_digits[k] == 1 + (classes[1] >= 0)
        assert batch.targets[k].tolist() == [float(c in classes) for c in range(10)]
    if options.get('p_single') == 0.0:
        assert (batch.num_digits == 2).all()
    if options.get('p_single') == 1.0:
        assert (batch.num_digits == 1).all()


def test_a_digit_at_the_canvas_corner_and_clipping(train_digits):
    """The largest shift puts the digit's frame at the far corner; two bright digits clip at 255."""
    bright = train_digits._replace(images=np.full_like(train_digits.images, 200))
    batch = dmi.generate(bright, np.arange(400), seed=1, max_shift=4)
    assert batch.images.max() == 255 and (batch.images == 200).any()
    corner = np.flatnonzero((batch.offsets[:, 0] == [8, 8]).all(axis=1))
    assert len(corner) and (batch.images[corner][:, 8:, 8:] > 0).all()


def test_the_digit_bank_indexes_each_class_and_refuses_bad_digits(train_digits):
    bank = dmi._DigitBank.of(train_digits)
    assert bank.class_count.tolist() == [400] * 10 and bank.class_start.tolist() == list(range(0, 4000, 400))
    labels = np.asarray(train_digits.labels)
    for c in range(10):
        assert bank.by_class[400 * c : 400 * (c + 1)].tolist() == np.flatnonzero(labels == c).tolist()
    with pytest.raises(ValueError) as error:
        dmi._DigitBank.of(train_digits._replace(images=train_digits.images.astype(np.int16)))
    assert str(error.value) == 'digits must be uint8 (N, 28, 28), got int16 (4000, 28, 28)'
    with pytest.raises(ValueError) as error:
        dmi._DigitBank.of(train_digits._replace(images=train_digits.images[:, :, :27]))
    assert str(error.value) == 'digits must be uint8 (N, 28, 28), got uint8 (4000, 28, 27)'
    nine = labels < 9
    with pytest.raises(ValueError) as error:
        dmi._DigitBank.of(train_digits._replace(images=train_digits.images[nine], labels=labels[nine]))
    assert str(error.value) == f'every class 0-9 needs at least one digit; counts {[400] * 9 + [0]}'
    eleven = train_digits._replace(labels=np.where(labels == 0, 10, labels))
    with pytest.raises(ValueError) as error:
        dmi._DigitBank.of(eleven)
    assert str(error.value) == f'every class 0-9 needs at least one digit; counts {[0] + [400] * 10}'


def test_the_bank_is_built_once_per_images_array(train_digits, monkeypatch):
    monkeypatch.setattr(dmi, '_BANKS', {})
    first = dmi._bank(train_digits)
    assert dmi._bank(train_digits) is first and list(dmi._BANKS) == [id(train_digits.images)]
    other = train_digits._replace(images=train_digits.images.copy())
    assert dmi._bank(other) is not first and dmi._bank(other).images is other.images
    dmi._BANKS[id(train_digits.images)] = dmi._DigitBank.of(other)  # a stale entry under a reused id
    assert dmi._bank(train_digits).images is train_digits.images


def test_paste_writes_each_digit_at_its_own_place():
    canvas = np.zeros((3, 31, 31), np.uint8)
    digits = np.arange(2 * 28 * 28).reshape(2, 28, 28).astype(np.uint8)
    dmi._paste(canvas, np.array([2, 0]), digits, np.array([3, 0]), np.array([1, 2]))
    want = np.zeros_like(canvas)
    want[2, 3:31, 1:29] = digits[0]
    want[0, 0:28, 2:30] = digits[1]
    np.testing.assert_array_equal(canvas, want)


@pytest.mark.parametrize(
    'args, message',
    [
        (('val', 0.5, 4, 36, 'max'), "split must be one of ('train', 'test'), got 'val'"),
        (('train', 0.5, 4, 36, 'min'), "overlay must be one of ('sum_clip', 'max', 'mean'), got 'min'"),
        (('test', -0.1, 4, 36, 'max'), 'p_single must be in [0, 1], got -0.1'),
        (('test', 1.01, 4, 36, 'max'), 'p_single must be in [0, 1], got 1.01'),
        (('test', float('nan'), 4, 36, 'max'), 'p_single must be in [0, 1], got nan'),
        (('test', 0.5, -1, 36, 'max'), 'canvas_size 36 cannot hold a 28 px digit shifted by up to -1 px'),
        (('test', 0.5, 3, 33, 'mean'), 'canvas_size 33 cannot hold a 28 px digit shifted by up to 3 px'),
    ],
)
def test_options_are_refused_with_the_reason(args, message):
    with pytest.raises(ValueError) as error:
        dmi._check_options(*args)
    assert str(error.value) == message


def test_options_at_their_bounds_are_accepted():
    for args in (('train', 0.0, 0, 28, 'sum_clip'), ('test', 1.0, 3, 34, 'mean'), ('train', 0.5, 4, 36, 'max')):
        assert dmi._check_options(*args) is None


def test_make_split_cuts_chunks_and_defaults_to_the_papers_sizes(train_digits, test_digits, monkeypatch):
    calls = []
    real = dmi.generate

    def generate(d, idx, **kw):
        calls.append((d, list(idx), kw))
        assert len(calls) <= 20, 'more chunks than 10,000 and 60,000 images make'  # fails fast, not after hours
        return real(d, idx[:1], **kw)

    monkeypatch.setattr(dmi, 'generate', generate)
    monkeypatch.setattr(dmi, 'CHUNK_SIZE', 4000)
    dmi.make_split('test', digits=test_digits)
    dmi.make_split('train', source='sample')
    chunks = [(c[1][0], c[1][-1], len(c[1])) for c in calls]
    assert chunks == [(0, 3999, 4000), (4000, 7999, 4000), (8000, 9999, 2000)] + [
        (s, s + 3999, 4000) for s in range(0, 60_000, 4000)
    ]
    assert calls[0][0] is test_digits and np.array_equal(calls[3][0].images, train_digits.images)
    assert calls[0][2] == dict(seed=0, split='test') and calls[3][2] == dict(seed=0, split='train')


def test_make_split_matches_generate_and_passes_the_options(train_digits, monkeypatch):
    monkeypatch.setattr(dmi, 'CHUNK_SIZE', 7)
    options = dict(p_single=0.4, max_shift=1, canvas_size=32, overlay='max')
    split = dmi.make_split('train', 23, digits=train_digits, seed=9, **options)
    whole = dmi.generate(train_digits, np.arange(23), seed=9, split='train', **options)
    for got, want in zip(split, whole):
        np.testing.assert_array_equal(got, want)
    empty = dmi.make_split('test', 0, source='sample')
    assert [column.shape for column in empty] == [(0, 36, 36), (0, 10), (0,), (0, 2), (0, 2), (0, 2, 2)]
    assert empty.images.dtype == np.uint8 and empty.targets.dtype == np.float32


def test_make_split_shows_a_progress_bar_only_when_asked(monkeypatch, test_digits):
    bars = []

    def tqdm(iterable, desc, disable):
        bars.append((desc, disable))
        return iterable

    monkeypatch.setattr(dmi, 'tqdm', tqdm)
    dmi.make_split('test', 3, digits=test_digits)
    dmi.make_split('train', 3, source='sample', progress=True)
    assert bars == [('DiverseMultiMNIST test', True), ('DiverseMultiMNIST train', False)]


def stream_of(stream, count=None):
    return list(itertools.islice(iter(stream), count))


def test_stream_length_and_its_refusal(train_digits):
    def length(**kw):
        return len(dmi.DiverseMultiMNISTStream(digits=train_digits, **kw))

    assert length(num_samples=10) == 10 and length(num_samples=10, start=4) == 6 and length(num_samples=3, start=9) == 0
    assert length(num_samples=10, batch_size=4) == 3 and length(num_samples=12, batch_size=4) == 3
    assert length(num_samples=13, batch_size=4, start=1) == 3
    with pytest.raises(TypeError) as error:
        length()
    assert str(error.value) == 'an endless stream has no length; pass num_samples'


def test_stream_defaults(train_digits, monkeypatch):
    stream = dmi.DiverseMultiMNISTStream(source='sample')
    assert (stream.split, stream.seed, stream.batch_size, stream.num_samples, stream.start) == (
        'train',
        0,
        None,
        None,
        0,
    )
    assert (stream.rank, stream.world_size, stream.chunk_size) == (None, None, dmi.CHUNK_SIZE)
    assert stream.options == dict(p_single=1 / 6, max_shift=4, canvas_size=36, overlay='sum_clip')
    assert stream.digits.images is train_digits.images or np.array_equal(stream.digits.images, train_digits.images)
    test = dmi.DiverseMultiMNISTStream('test', digits=None, source='sample', p_single=0.2, max_shift=1, canvas_size=30,
                                       overlay='mean')  # fmt: skip
    assert test.digits.images.shape == (1000, 28, 28)
    assert test.options == dict(p_single=0.2, max_shift=1, canvas_size=30, overlay='mean')
    with pytest.raises(ValueError, match='overlay must be one of'):
        dmi.DiverseMultiMNISTStream(digits=train_digits, overlay='min')


def test_stream_rank_and_world_come_from_the_arguments_then_torch_distributed(train_digits, monkeypatch):
    def rank_world(**kw):
        return dmi.DiverseMultiMNISTStream(digits=train_digits, **kw)._rank_and_world()

    assert rank_world() == (0, 1)
    assert (
        rank_world(rank=2) == (2, 1)
        and rank_world(world_size=3) == (0, 3)
        and rank_world(rank=1, world_size=4) == (1, 4)
    )
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.distributed, 'get_rank', lambda: 5)
    monkeypatch.setattr(torch.distributed, 'get_world_size', lambda: 8)
    assert rank_world() == (5, 8) and rank_world(rank=1) == (1, 1)
    monkeypatch.setattr(torch.distributed, 'is_available', lambda: False)
    assert rank_world() == (0, 1)


@pytest.mark.parametrize(
    'options',
    [
        dict(num_samples=11, batch_size=4, chunk_size=8),
        dict(num_samples=11, batch_size=4, chunk_size=3),
        dict(num_samples=11, chunk_size=4),
        dict(num_samples=11, batch_size=4, chunk_size=8, start=1),
        dict(num_samples=9, chunk_size=4, start=3),
        dict(num_samples=10, batch_size=3, rank=1, world_size=3, chunk_size=5),
        dict(num_samples=7, rank=2, world_size=3, chunk_size=2, start=2),
    ],
)
def test_stream_yields_the_images_of_its_positions(train_digits, generate_calls, options):
    """Rank r of W yields global images r, r + W, ...: sample p of the rank is image p * W + r."""
    stream = dmi.DiverseMultiMNISTStream(digits=train_digits, seed=3, p_single=0.4, **options)
    batch_size, start = options.get('batch_size'), options.get('start', 0)
    rank, world = options.get('rank', 0), options.get('world_size', 1)
    positions = list(range(start * (batch_size or 1), options['num_samples']))
    want = dmi.generate(train_digits, [p * world + rank for p in positions], seed=3, p_single=0.4)
    items = stream_of(stream)
    if batch_size is None:
        assert len(items) == len(positions)
        images, targets = torch.stack([i for i, _ in items]), torch.stack([t for _, t in items])
    else:
        sizes = [len(i) for i, _ in items]
        assert sizes == [min(batch_size, len(positions) - k) for k in range(0, len(positions), batch_size)]
        images, targets = torch.cat([i for i, _ in items]), torch.cat([t for _, t in items])
    assert images.dtype == torch.float32 and images.shape[1:] == (1, 36, 36)
    assert torch.equal(images, torch.from_numpy(want.images).unsqueeze(1).float() / 255)
    assert torch.equal(targets, torch.from_numpy(want.targets))


def test_an_endless_stream_goes_on_past_its_first_chunk(train_digits):
    stream = dmi.DiverseMultiMNISTStream(digits=train_digits, seed=2, chunk_size=5, batch_size=2, start=3)
    batches = stream_of(stream, 6)
    images = torch.cat([i for i, _ in batches])
    want = dmi.generate(train_digits, np.arange(6, 18), seed=2)
    assert [len(i) for i, _ in batches] == [2] * 6
    assert torch.equal(images[:, 0], torch.from_numpy(want.images).float() / 255)
    samples = stream_of(dmi.DiverseMultiMNISTStream(digits=train_digits, seed=2, chunk_size=3), 8)
    want = dmi.generate(train_digits, np.arange(8), seed=2)
    assert torch.equal(torch.stack([i for i, _ in samples])[:, 0], torch.from_numpy(want.images).float() / 255)


def test_stream_worker_takes_every_kth_item(train_digits, generate_calls, monkeypatch):
    info = type('Info', (), {'id': 1, 'num_workers': 3})()
    monkeypatch.setattr(torch.utils.data, 'get_worker_info', lambda: info)
    stream = dmi.DiverseMultiMNISTStream(digits=train_digits, seed=4, num_samples=20, batch_size=2, chunk_size=4)
    batches = stream_of(stream)
    want = dmi.generate(train_digits, [p for item in (1, 4, 7) for p in (2 * item, 2 * item + 1)], seed=4)
    assert [len(i) for i, _ in batches] == [2, 2, 2]
    assert torch.equal(torch.cat([i for i, _ in batches])[:, 0], torch.from_numpy(want.images).float() / 255)


def test_preview_tiles_and_their_labels(tmp_path, figure, test_digits):
    out = dmi.preview(tmp_path / 'a' / 'grid.png', count=7, columns=3, seed=2, source='sample', max_shift=2)
    assert out == tmp_path / 'a' / 'grid.png' and out.is_file()
    (fig,) = figure
    assert tuple(fig.get_size_inches()) == pytest.approx((1.3 * 3, 1.5 * 3))
    want = dmi.make_split('test', 7, digits=test_digits, seed=2, max_shift=2)
    assert len(fig.axes) == 9
    for k, ax in enumerate(fig.axes):
        assert not ax.axison
        if k >= 7:
            assert not ax.images and ax.get_title() == ''
            continue
        np.testing.assert_array_equal(ax.images[0].get_array(), want.images[k])
        assert ax.images[0].get_clim() == (0, 255) and ax.images[0].get_cmap().name == 'gray'
        classes = sorted(c for c in want.classes[k].tolist() if c >= 0)
        assert ax.get_title() == ','.join(map(str, classes)) and ax.title.get_fontsize() == 9
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (390, 450)


def test_preview_defaults(tmp_path, figure, monkeypatch):
    out = dmi.preview(tmp_path / 'p.png', source='sample')
    (fig,) = figure
    assert len(fig.axes) == 24 and tuple(fig.get_size_inches()) == pytest.approx((1.3 * 8, 1.5 * 3))
    want = dmi.make_split('test', 24, source='sample', seed=0)
    np.testing.assert_array_equal(fig.axes[23].images[0].get_array(), want.images[23])
    assert out.is_file()
    dmi.preview(tmp_path / 'q.png', count=2, split='train', source='sample', columns=2)
    train = dmi.make_split('train', 2, source='sample')
    np.testing.assert_array_equal(figure[1].axes[1].images[0].get_array(), train.images[1])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), index=st.integers(0, 2**40), split=st.sampled_from(['train', 'test']))
def test_uniforms_of_any_seed_and_index(seed, index, split):
    assert dmi._uniforms(seed, split, np.array([index]))[0].tolist() == uniforms_reference(seed, split, index)


def test_the_bank_keeps_each_class_in_the_order_of_the_source(test_digits):
    order = np.random.default_rng(0).permutation(1000)  # classes mixed, so only a stable sort keeps the order
    mixed = test_digits._replace(images=test_digits.images[order], labels=np.asarray(test_digits.labels)[order])
    bank = dmi._DigitBank.of(mixed)
    for c in range(10):
        start = bank.class_start[c]
        assert bank.by_class[start : start + 100].tolist() == np.flatnonzero(mixed.labels == c).tolist()


@pytest.fixture
def generate_calls(monkeypatch):
    """The indices of each call of generate; a stream that goes on past 50 calls fails instead of hanging."""
    calls, real = [], dmi.generate

    def spy(digits, indices, **kw):
        calls.append(np.asarray(indices).tolist())
        if len(calls) > 50:
            raise RuntimeError('the stream does not stop')
        return real(digits, indices, **kw)

    monkeypatch.setattr(dmi, 'generate', spy)
    return calls


def test_stream_generates_chunk_size_images_a_call_and_stops(train_digits, generate_calls, monkeypatch):
    def consume(**kw):
        generate_calls.clear()
        return stream_of(dmi.DiverseMultiMNISTStream(digits=train_digits, **kw))

    assert [len(i) for i, _ in consume(num_samples=11, batch_size=2, chunk_size=5)] == [2, 2, 2, 2, 2, 1]
    assert generate_calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]  # two batches a call
    assert len(consume(num_samples=7, batch_size=4, chunk_size=3)) == 2
    assert generate_calls == [[0, 1, 2, 3], [4, 5, 6]]  # a chunk smaller than a batch: one batch a call
    assert len(consume(num_samples=5, chunk_size=2, rank=1, world_size=2)) == 5
    assert generate_calls == [[1, 3], [5, 7], [9]]
    info = type('Info', (), {'id': 1, 'num_workers': 3})()
    monkeypatch.setattr(torch.utils.data, 'get_worker_info', lambda: info)
    assert len(consume(num_samples=20, batch_size=2, chunk_size=4)) == 3
    assert generate_calls == [[2, 3, 8, 9], [14, 15]]  # items 1, 4 then 7 of 10


def test_a_test_split_stream_keys_its_images_by_the_test_split(test_digits, generate_calls):
    stream = dmi.DiverseMultiMNISTStream('test', digits=test_digits, seed=1, chunk_size=2)
    images = torch.stack([image for image, _ in stream_of(stream, 5)])
    assert generate_calls == [[0, 1], [2, 3], [4, 5]]
    want = dmi.generate(test_digits, np.arange(5), seed=1, split='test')
    assert torch.equal(images[:, 0], torch.from_numpy(want.images).float() / 255)


@pytest.fixture
def folder(tmp_path):
    """An IDX folder of one digit a class in each split, none of them in the built-in sample."""
    folder = tmp_path / 'idx'
    folder.mkdir()
    glyphs = np.zeros((10, 28, 28), np.uint8)
    for k in range(10):
        glyphs[k, 2 + k : 26, 3:25] = 25 * (k + 1)
    for stem in ('train', 't10k'):
        mnist.write_idx(folder / f'{stem}-images-idx3-ubyte', glyphs)
        mnist.write_idx(folder / f'{stem}-labels-idx1-ubyte', np.arange(10, dtype=np.uint8))
    return folder


def test_preview_of_one_tile_from_the_source_given(tmp_path, figure, folder):
    dmi.preview(tmp_path / 'p.png', count=1, columns=1, seed=4, source=str(folder))
    (ax,) = figure[0].axes
    want = dmi.generate(mnist.load_idx_folder(folder, 'test'), [0], seed=4, split='test')
    np.testing.assert_array_equal(ax.images[0].get_array(), want.images[0])


def test_stream_reads_the_digits_or_the_source_given(folder):
    digits = mnist.load_idx_folder(folder, 'train')
    want = dmi.generate(digits, np.arange(6), seed=2)
    for stream in (
        dmi.DiverseMultiMNISTStream(source=str(folder), seed=2, num_samples=6, batch_size=6),
        dmi.DiverseMultiMNISTStream(digits=digits, seed=2, num_samples=6, batch_size=6),
    ):
        ((images, _),) = stream_of(stream)
        assert torch.equal(images[:, 0], torch.from_numpy(want.images).float() / 255)


def test_make_split_reads_the_source_given(folder):
    split = dmi.make_split('test', 4, source=str(folder), seed=3)
    want = dmi.generate(mnist.load_idx_folder(folder, 'test'), np.arange(4), seed=3, split='test')
    np.testing.assert_array_equal(split.images, want.images)


def test_defaults_of_generate_and_an_empty_split_with_options(train_digits):
    np.testing.assert_array_equal(
        dmi.generate(train_digits, [0, 1, 2]).images, dmi.generate(train_digits, [0, 1, 2], seed=0).images
    )
    assert dmi.make_split('test', 0, source='sample', canvas_size=32, max_shift=2).images.shape == (0, 32, 32)


def test_preview_makes_its_folders_and_saves_at_100_dpi(tmp_path, figure):
    import matplotlib
    from PIL import Image

    out = tmp_path / 'a' / 'b' / 'p.png'
    with matplotlib.rc_context({'figure.dpi': 72}):
        dmi.preview(out, count=2, columns=2, source='sample')
    with Image.open(out) as image:
        assert image.size == (260, 150)  # figsize (1.3 x 2, 1.5) at 100 dpi


def test_a_bank_of_two_digits_a_class(train_digits):
    """With two digits a class, the last digit of a class is drawn half the time: the clamps must not bind."""
    labels = np.asarray(train_digits.labels)
    keep = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(10)])
    small = train_digits._replace(images=train_digits.images[keep], labels=labels[keep])
    batch = dmi.generate(small, np.arange(60), seed=8)
    for k in range(60):
        image, classes, sources, _ = image_reference(small, 8, 'train', k)
        np.testing.assert_array_equal(batch.images[k], image)
        assert batch.classes[k].tolist() == classes and batch.sources[k].tolist() == sources
