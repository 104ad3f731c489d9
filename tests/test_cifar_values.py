"""``timm_capsules/data/cifar.py`` checked by value: which reader each kind of folder gets (the files a loaded
split is read from), the refusals' exact words, the label feature of each kind (class labels, lists of them, plain
integers) against a count by hand, the size of each image form, the pixels of ``image_transform`` against PIL's
own conversions written out (ITU-R 601 luma, replicated grey, bilinear resize), ``_to_pil`` on every array layout
it turns round, and the augmentation of ``ImageClassificationData`` against a pad-crop-flip done by hand with
numpy from the documented draws. Written for a mutmut run (tests/README.md); tiny images, no network."""

from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from timm_capsules.data import cifar
from timm_capsules.data.cifar import ImageClassificationData, LabelInfo

RNG = np.random.default_rng(11)
PIXELS = RNG.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)  # five 4x6 (height x width) RGB images


def split_of(images, labels, label_feature=None):
    features = datasets.Features(
        {'img': datasets.Image(), 'label': label_feature or datasets.ClassLabel(names=[f'c{i}' for i in range(10)])}
    )
    return datasets.Dataset.from_dict({'img': [Image.fromarray(p) for p in images], 'label': labels}, features=features)


@pytest.fixture
def local_cache(tmp_path, monkeypatch):
    """``datasets`` writes what load_dataset prepares under tmp_path, not the user's cache."""
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path / 'hf-cache')
    return tmp_path


def files_of(dataset):
    return [Path(f['filename']) for f in dataset.cache_files]


# ---- load_image_dataset ------------------------------------------------------------------------------------


@pytest.mark.parametrize('as_path', [False, True])
def test_a_saved_dataset_dict_is_read_from_its_own_folder(local_cache, as_path):
    folder = local_cache / 'dict'
    datasets.DatasetDict(train=split_of(PIXELS[:3], [1, 2, 3]), test=split_of(PIXELS[3:], [4, 5])).save_to_disk(
        str(folder)
    )
    where = folder if as_path else str(folder)
    test = cifar.load_image_dataset(where, 'test')
    assert test['label'] == [4, 5] and np.array_equal(np.asarray(test[1]['img']), PIXELS[4])
    assert all(f.parent == folder / 'test' for f in files_of(test))  # load_from_disk: the folder's own arrow files
    assert cifar.load_image_dataset(where, 'train')['label'] == [1, 2, 3]
    with pytest.raises(ValueError) as error:
        cifar.load_image_dataset(where, 'validation')
    assert str(error.value) == f"{where} has splits ['test', 'train'], not 'validation'"


def test_a_saved_single_split_is_that_split_whatever_is_asked(local_cache):
    folder = local_cache / 'single'
    split_of(PIXELS[:2], [7, 8]).save_to_disk(str(folder))
    for split in ('train', 'test', 'anything'):
        loaded = cifar.load_image_dataset(folder, split)
        assert isinstance(loaded, datasets.Dataset) and loaded['label'] == [7, 8]
        assert all(f.parent == folder for f in files_of(loaded))


@pytest.mark.parametrize('as_path', [False, True])
def test_any_other_folder_goes_to_load_dataset_with_the_split(local_cache, as_path):
    folder = local_cache / 'parquet'
    (folder / 'data').mkdir(parents=True)
    split_of(PIXELS[:3], [0, 1, 2]).to_parquet(str(folder / 'data' / 'train-00000-of-00001.parquet'))
    split_of(PIXELS[3:], [9, 9]).to_parquet(str(folder / 'data' / 'test-00000-of-00001.parquet'))
    where = folder if as_path else str(folder)
    test = cifar.load_image_dataset(where, 'test')
    assert isinstance(test, datasets.Dataset) and test['label'] == [9, 9]
    assert np.array_equal(np.asarray(test[0]['img']), PIXELS[3])
    assert cifar.load_image_dataset(where, 'train[1:]')['label'] == [1, 2]  # the split string reaches datasets
    assert all(local_cache / 'hf-cache' in f.parents for f in files_of(test))


# ---- check_columns, label_info ------------------------------------------------------------------------------


def test_check_columns_names_what_is_missing_and_what_is_there():
    dataset = split_of(PIXELS[:1], [0])
    cifar.check_columns(dataset, 'img', 'label')  # both there: nothing
    with pytest.raises(ValueError) as error:
        cifar.check_columns(dataset, 'image', 'label')
    assert str(error.value) == (
        "dataset has no column 'image' (columns: ['img', 'label']); pass --image-column / --label-column"
    )
    with pytest.raises(ValueError) as error:
        cifar.check_columns(dataset, 'img', 'fine_label', 'cifar100 (train)')
    assert str(error.value) == (
        "cifar100 (train) has no column 'fine_label' (columns: ['img', 'label']); pass --image-column / --label-column"
    )
    with pytest.raises(ValueError) as error:
        cifar.check_columns(dataset, 'image', 'labels', name='x')
    assert str(error.value) == (
        "x has no column 'image' or 'labels' (columns: ['img', 'label']); pass --image-column / --label-column"
    )


def test_label_info_of_class_labels_and_lists_of_them():
    names = ('cat', 'dog', 'eel')
    single = split_of(PIXELS[:2], [2, 0], datasets.ClassLabel(names=list(names)))
    assert cifar.label_info(single, 'label') == LabelInfo(3, names, False)
    info = cifar.label_info(single, 'label')
    assert type(info.names) is tuple and type(info.num_classes) is int
    listed = split_of(PIXELS[:2], [[0, 2], []], datasets.List(datasets.ClassLabel(names=list(names))))
    assert cifar.label_info(listed, 'label') == LabelInfo(3, names, True)
    sequence = split_of(PIXELS[:2], [[1], [0]], datasets.Sequence(datasets.ClassLabel(names=list(names))))
    assert cifar.label_info(sequence, 'label') == LabelInfo(3, names, True)
    large = split_of(PIXELS[:2], [[1], [0, 2]], datasets.LargeList(datasets.ClassLabel(names=list(names))))
    assert cifar.label_info(large, 'label') == LabelInfo(3, names, True)
    plain = split_of(PIXELS[:2], [[4], [0, 2]], datasets.LargeList(datasets.Value('int64')))
    assert cifar.label_info(plain, 'label') == LabelInfo(5, None, True)  # was int() of a list: a TypeError


def test_label_info_of_an_old_style_list_feature():
    """A feature written as a plain Python list (``[ClassLabel]``, the form of older ``datasets``): its element."""
    stub = SimpleNamespace(features={'tags': [datasets.ClassLabel(names=['a', 'b'])]})
    assert cifar.label_info(stub, 'tags') == LabelInfo(2, ('a', 'b'), True)
    plain = {'features': {'tags': [datasets.Value('int64')]}, 'tags': [[3], [0, 6], []]}
    stub = type('Stub', (), {'features': plain['features'], '__getitem__': lambda self, key: plain[key]})()
    assert cifar.label_info(stub, 'tags') == LabelInfo(7, None, True)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=8))
def test_label_info_counts_plain_integer_classes_from_the_data(labels):
    dataset = datasets.Dataset.from_dict({'y': labels})
    info = cifar.label_info(dataset, 'y')
    top = 0
    for y in labels:
        top = y if y > top else top
    assert info == LabelInfo(top + 1, None, False) and type(info.num_classes) is int


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), max_size=4), min_size=1, max_size=6))
def test_label_info_counts_plain_integer_lists_from_the_data(rows):
    dataset = datasets.Dataset.from_dict(
        {'y': rows}, features=datasets.Features({'y': datasets.List(datasets.Value('int64'))})
    )
    flat = [y for row in rows for y in row]
    if not flat:
        with pytest.raises(ValueError) as error:
            cifar.label_info(dataset, 'y')
        assert str(error.value) == "label column 'y' is empty"
        return
    assert cifar.label_info(dataset, 'y') == LabelInfo(max(flat) + 1, None, True)


def test_an_empty_plain_label_column_is_refused():
    dataset = datasets.Dataset.from_dict({'label': []}, features=datasets.Features({'label': datasets.Value('int64')}))
    with pytest.raises(ValueError) as error:
        cifar.label_info(dataset, 'label')
    assert str(error.value) == "label column 'label' is empty"


# ---- image_size ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'image',
    [
        Image.new('RGB', (6, 4)),  # PIL: size is (width, height)
        Image.new('L', (6, 4)),
        torch.zeros(3, 4, 6),  # a tensor has a size() method, not PIL's size
        torch.zeros(1, 4, 6),
        np.zeros((3, 4, 6), np.uint8).tolist(),  # CHW lists, as Array3D columns read back
        np.zeros((1, 4, 6), np.uint8).tolist(),
        np.zeros((4, 6, 3), np.uint8).tolist(),  # HWC
        np.zeros((4, 6, 1), np.uint8).tolist(),
        np.zeros((4, 6), np.uint8).tolist(),  # HW
        np.zeros((3, 6), np.uint8).tolist(),  # HW with three rows: not mistaken for channels (2-d)
        np.zeros((4, 6, 3), np.uint8),  # a numpy-formatted column: its size is an int, not PIL's (width, height)
        np.zeros((3, 4, 6), np.float32),
    ],
    ids=[
        'pil-rgb',
        'pil-l',
        'tensor-chw',
        'tensor-1hw',
        'list-chw',
        'list-1hw',
        'list-hwc',
        'list-hw1',
        'hw',
        'hw3',
        'numpy-hwc',
        'numpy-chw',
    ],
)
def test_image_size_is_height_then_width_in_each_form(image):
    expected = (3, 6) if np.asarray(image).shape == (3, 6) else (4, 6)
    size = cifar.image_size([{'picture': image}], 'picture')
    assert tuple(size) == expected and all(type(v) is int for v in size)


# ---- image_transform and _to_pil ----------------------------------------------------------------------------


def luma(rgb):
    """PIL's RGB -> L: ITU-R 601-2 weights in 16-bit fixed point, rounded."""
    r, g, b = (rgb[..., k].astype(np.int64) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def test_transform_keeps_rgb_pixels_as_floats_in_chw():
    out = cifar.image_transform((3, 4, 6))(Image.fromarray(PIXELS[0]))
    assert out.dtype == torch.float32 and out.shape == (3, 4, 6)
    np.testing.assert_allclose(out.numpy(), PIXELS[0].transpose(2, 0, 1) / 255.0, rtol=0, atol=1e-7)


def test_transform_to_one_channel_takes_pils_luma():
    out = cifar.image_transform((1, 4, 6))(Image.fromarray(PIXELS[1]))
    assert out.shape == (1, 4, 6)
    np.testing.assert_allclose(out[0].numpy(), luma(PIXELS[1]) / 255.0, rtol=0, atol=1e-7)


@pytest.mark.parametrize('channels', [2, 3])  # anything but one channel is RGB
def test_transform_of_a_grey_image_to_rgb_repeats_it(channels):
    grey = PIXELS[2, :, :, 0]
    out = cifar.image_transform((channels, 4, 6))(Image.fromarray(grey))
    assert out.shape == (3, 4, 6)
    for c in range(3):
        np.testing.assert_allclose(out[c].numpy(), grey / 255.0, rtol=0, atol=1e-7)


def test_transform_resizes_to_height_and_width_only_when_asked():
    image = Image.fromarray(PIXELS[3])
    out = cifar.image_transform((3, 8, 5), resize=True)(image)
    by_pil = np.asarray(image.resize((5, 8), Image.BILINEAR))  # PIL takes (width, height)
    assert out.shape == (3, 8, 5)
    np.testing.assert_allclose(out.numpy(), by_pil.transpose(2, 0, 1) / 255.0, rtol=0, atol=1e-7)
    assert cifar.image_transform((3, 8, 5))(image).shape == (3, 4, 6)  # resize defaults to False: as it is
    assert cifar.image_transform((3, 8, 5), resize=False)(image).shape == (3, 4, 6)


def test_to_pil_passes_a_pil_image_through():
    image = Image.fromarray(PIXELS[0])
    assert cifar._to_pil(image) is image


@pytest.mark.parametrize(
    'array, mode, pixels',
    [
        (PIXELS[0], 'RGB', PIXELS[0]),  # HWC uint8
        (PIXELS[0].transpose(2, 0, 1), 'RGB', PIXELS[0]),  # CHW -> HWC
        (PIXELS[0].transpose(2, 0, 1).astype(np.int64).tolist(), 'RGB', PIXELS[0]),  # lists of Python ints
        (PIXELS[0, :, :, :1].transpose(2, 0, 1).tolist(), 'L', PIXELS[0, :, :, 0]),  # 1HW -> HW
        (PIXELS[0, :, :, :1], 'L', PIXELS[0, :, :, 0]),  # HW1 -> HW
        (PIXELS[0, :, :, 0].astype(np.int32), 'L', PIXELS[0, :, :, 0]),  # HW int32
        (PIXELS[0, :, :, 0].astype(np.uint16), 'L', PIXELS[0, :, :, 0]),  # HW uint16 within 0-255
        (PIXELS[0, :3], 'RGB', PIXELS[0, :3]),  # HWC with three rows: not taken for CHW
        (PIXELS[0, :3, :3], 'RGB', PIXELS[0, :3, :3]),  # 3x3x3: channels last (last axis 3)
        (PIXELS[0, :3, :, :1], 'L', PIXELS[0, :3, :, 0]),  # (3, 6, 1): grey HWC with three rows, not CHW
        (PIXELS[0, :, :2].transpose(2, 0, 1), 'RGB', PIXELS[0, :, :2]),  # (3, 4, 2): CHW two columns wide
        (PIXELS[0, :1, :, :1].transpose(2, 0, 1), 'L', PIXELS[0, :1, :, 0]),  # (1, 1, 6): one row of grey
    ],
)
def test_to_pil_turns_each_array_layout_into_that_image(array, mode, pixels):
    image = cifar._to_pil(array)
    assert image.mode == mode and np.array_equal(np.asarray(image), pixels)


def test_to_pil_casts_integers_only_within_0_to_255():
    edges = np.array([[0, 255], [17, 128]], np.int64)
    image = cifar._to_pil(edges)
    assert image.mode == 'L' and np.array_equal(np.asarray(image), edges)  # both ends of the range: cast
    assert cifar._to_pil(edges[:, ::-1].tolist()).mode == 'L'
    for out_of_range in (edges - 1, edges + 1):  # not a byte image: left for PIL, which refuses int64
        with pytest.raises(TypeError):
            cifar._to_pil(out_of_range)
    floats = cifar._to_pil(np.full((2, 3), 0.5, np.float32))  # floats are never cast
    assert floats.mode == 'F' and np.asarray(floats).dtype == np.float32


# ---- ImageClassificationData --------------------------------------------------------------------------------


def draws(seed, epoch, index, padding):
    """The documented draws: a torch generator seeded from SeedSequence([seed, epoch, index]) (63 bits), three
    integers in 0..2 * padding: top, left, flip (odd: flip)."""
    key = int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]) % 2**63
    generator = torch.Generator()
    generator.manual_seed(key)
    return torch.randint(0, 2 * padding + 1, (3,), generator=generator).tolist()


def pad_crop_flip(image, top, left, flip, padding):
    """The window by hand: a zero canvas with the image at (padding, padding), cut at (top, left), mirrored."""
    channels, height, width = image.shape
    canvas = np.zeros((channels, height + 2 * padding, width + 2 * padding), image.dtype)
    canvas[:, padding : padding + height, padding : padding + width] = image
    window = canvas[:, top : top + height, left : left + width]
    return window[:, :, ::-1] if flip else window


def tensor_images(n=12, channels=2, height=5, width=7):
    return [
        torch.arange(channels * height * width, dtype=torch.float32).view(channels, height, width) + 1 + 100 * k
        for k in range(n)
    ]


def make_data(images, **options):
    return ImageClassificationData(
        [dict(img=im, label=k % 10) for k, im in enumerate(images)],
        lambda x: x,
        'img',
        'label',
        LabelInfo(10, None, False),
        mean=(0.0,) * images[0].shape[0],
        std=(1.0,) * images[0].shape[0],
        **options,
    )


@pytest.mark.parametrize(
    'options, seed, padding, flips',
    [
        (dict(augment=True), 0, 4, True),  # the defaults: seed 0, padding 4, flip
        (dict(augment=True, seed=7, padding=2), 7, 2, True),
        (dict(augment=True, seed=3, flip=False), 3, 4, False),
        (dict(augment=True, seed=2**40 + 5, padding=1), 2**40 + 5, 1, True),
    ],
)
def test_augmentation_is_the_documented_pad_crop_flip(options, seed, padding, flips):
    images = tensor_images()
    data = make_data(images, **options)
    assert data.epoch == 0
    for epoch in (0, 0, 3):
        if epoch:
            data.set_epoch(epoch)
        for k, image in enumerate(images):
            top, left, flip = draws(seed, epoch, k, padding)
            expected = pad_crop_flip(image.numpy(), top, left, flips and flip % 2 == 1, padding)
            out, target = data[k]
            assert np.array_equal(out.numpy(), expected), (epoch, k)
            assert target.dtype == torch.int64 and target.item() == k % 10
        assert data.epoch == epoch


def test_augmentation_reaches_every_window_and_both_flips():
    seen = set()
    for index in range(1500):
        seen.add(tuple(draws(5, 0, index, 4)))
    tops, lefts, flips = ({d[i] for d in seen} for i in range(3))
    assert tops == lefts == flips == set(range(9))
    images = tensor_images(n=1, channels=1, height=3, width=3)
    data = make_data(images * 400, augment=True, seed=5)
    outputs = {tuple(data[k][0].flatten().tolist()) for k in range(400)}
    # 9 x 9 windows of the zero-padded 3x3, each maybe mirrored: 5 x 5 x 2 that hold a pixel, and the black one
    canvas = images[0].numpy()
    expected = {
        tuple(pad_crop_flip(canvas, t, l, f, 4).flatten().tolist()) for t in range(9) for l in range(9) for f in (0, 1)
    }
    assert len(expected) == 51 and outputs <= expected and len(outputs) > 40


def test_without_augment_the_image_is_only_normalised():
    images = tensor_images(n=3, channels=3, height=2, width=3)
    mean, std = (0.5, 10.0, -3.0), (2.0, 0.25, 4.0)
    data = ImageClassificationData(
        [dict(img=im, label=k) for k, im in enumerate(images)],
        lambda x: x * 2,
        'img',
        'label',
        LabelInfo(5, None, False),
        mean=mean,
        std=std,
    )
    assert len(data) == 3 and data.augment is False
    for k, image in enumerate(images):
        out, target = data[np.int64(k)]
        for c in range(3):
            torch.testing.assert_close(out[c], (image[c] * 2 - mean[c]) / std[c], rtol=0, atol=1e-6)
        assert out.dtype == torch.float32 and target.dtype == torch.int64 and target.item() == k


def test_augmentation_then_normalisation_per_channel():
    images = tensor_images(n=4, channels=2, height=3, width=4)
    data = ImageClassificationData(
        [dict(img=im, label=0) for im in images],
        lambda x: x,
        'img',
        'label',
        LabelInfo(1, None, False),
        mean=(1.0, -2.0),
        std=(0.5, 4.0),
        augment=True,
        padding=1,
        seed=9,
    )
    for k, image in enumerate(images):
        top, left, flip = draws(9, 0, k, 1)
        window = pad_crop_flip(image.numpy(), top, left, flip % 2 == 1, 1)
        expected = (window - np.array([1.0, -2.0])[:, None, None]) / np.array([0.5, 4.0])[:, None, None]
        np.testing.assert_allclose(data[k][0].numpy(), expected, rtol=0, atol=1e-6)


def test_multi_label_targets_are_multi_hot_floats():
    images = tensor_images(n=4, channels=1, height=2, width=2)
    tags = [[1, 4], [], [0], [2, 2, 3]]
    data = ImageClassificationData(
        [dict(img=im, tags=t) for im, t in zip(images, tags)],
        lambda x: x,
        'img',
        'tags',
        LabelInfo(6, None, True),
        mean=(0.0,),
        std=(1.0,),
    )
    for k, row in enumerate(tags):
        target = data[k][1]
        by_hand = [1.0 if c in row else 0.0 for c in range(6)]
        assert target.dtype == torch.float32 and target.tolist() == by_hand
