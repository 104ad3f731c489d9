"""Tests of timm_capsules/train/data_sources.py: CIFAR-style and multi-label Hub-style datasets (save_to_disk,
parquet, imagefolder, splits, --resize), what data reaches the model (normalised DiverseMultiMNIST, the
augmentations), the MNIST source actually used, and --extra-test-split."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import timm
import timm_capsules  # noqa: F401

from train_fixtures import (
    TINY_MODEL,
    TINY,
    independent_metrics,
    assert_metrics,
    multimnist_test_images,
    spy_on_model,
    evaluated_images,
    image_examples,
    make_image_dataset,
    as_tensors,
    CIFAR_TINY,
    CIFAR_MEAN,
    CIFAR_STD,
)


def test_cifar_style_dataset(run, tmp_path):
    data = make_image_dataset(tmp_path / 'cifar10', size=32, mode='RGB')
    out = tmp_path / 'out'
    results = run(
        CIFAR_TINY
        + [
            '--data-dir',
            data,
            '--batch-size',
            4,
            '--epochs',
            2,
            '--opt',
            'sgd',
            '--lr',
            0.01,
            '--sched',
            'multistep',
            '--decay-milestones',
            1,
            '--log-every',
            1,
            '--output-dir',
            out,
        ]
    )
    assert results['task'] == 'single-label' and results['completed_steps'] == 6  # 3 batches x 2 epochs
    # each record holds the lr after its step's scheduler update, i.e. the next step's. Milestone 1 = update 3,
    # but timm's multistep compares it with t + 1, so the decay already applies to step 3, epoch 0's last
    assert [r['lr'] for r in results['history']['train']] == pytest.approx([0.01] + [0.001] * 5)
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert reloaded.pretrained_cfg['label_names'] == [f'c{i}' for i in range(10)]
    assert tuple(reloaded.pretrained_cfg['mean']) == pytest.approx(CIFAR_MEAN)
    # top-1, top-5 and loss recomputed from the saved model on the 7 test images
    images, targets = as_tensors(*image_examples(32, 'RGB')['test'], CIFAR_MEAN, CIFAR_STD)
    assert_metrics(results['final'], independent_metrics(reloaded, images, targets, multi_label=False))
    assert json.loads((out / 'metrics.json').read_text())['final'] == results['final']
    labels = targets.tolist()  # chance: always the most frequent test class
    assert results['chance_level'] == pytest.approx(max(labels.count(y) for y in labels) / 7)


def test_multilabel_hub_style_dataset(run, tmp_path):
    data = make_image_dataset(tmp_path / 'multi', size=36, mode='L', multi_label=True)
    results = run(
        TINY_MODEL
        + [
            '--dataset',
            f'hf:{data}',
            '--image-column',
            'img',
            '--batch-size',
            4,
            '--max-train-steps',
            2,
            '--output-dir',
            tmp_path / 'out',
        ]
    )
    assert results['task'] == 'multi-label' and results['metric'] == 'exact_match'
    images, targets = as_tensors(*image_examples(36, 'L', multi_label=True)['test'], (0.0,), (1.0,), multi_label=True)
    assert_metrics(results['final'], independent_metrics(results['model_object'], images, targets, multi_label=True))


@pytest.mark.parametrize('form', ['save_to_disk', 'parquet', 'imagefolder'])
def test_data_dir_forms(run, tmp_path, monkeypatch, form):
    """The three --data-dir forms of the README; an imagefolder names its image column `image`."""
    data = make_image_dataset(tmp_path / form, size=32, mode='RGB', form=form)
    calls = spy_on_model(monkeypatch)
    out = tmp_path / 'out'
    results = run(
        CIFAR_TINY
        + ['--data-dir', data, '--batch-size', 4, '--max-train-steps', 2, '--output-dir', out]
        + (['--image-column', 'image'] if form == 'imagefolder' else [])
    )
    examples = image_examples(32, 'RGB')
    names = [f'c{i}' for i in range(10)]
    if form == 'imagefolder':  # the classes are the folders that occur, in sorted order
        names = sorted({f'c{y}' for _, labels in examples.values() for y in labels})
    assert timm.create_model(f'local-dir:{out}', pretrained=True).pretrained_cfg['label_names'] == names
    images, labels = examples['test']
    expected, targets = as_tensors(images, [names.index(f'c{y}') for y in labels], CIFAR_MEAN, CIFAR_STD)
    seen = evaluated_images(calls)  # before the model runs again below, in front of the spy
    assert seen.shape == (7, 3, 32, 32)
    assert_metrics(results['final'], independent_metrics(results['model_object'], expected, targets, False))
    if form == 'imagefolder':  # an imagefolder lists its files in its own order: compare image sums
        seen, expected = seen.sum((1, 2, 3)).sort().values, expected.sum((1, 2, 3)).sort().values
    torch.testing.assert_close(seen, expected)


def test_resize_brings_images_to_the_models_size(run, tmp_path, monkeypatch):
    data = make_image_dataset(tmp_path / 'small', size=28, mode='RGB', plain=True)
    common = CIFAR_TINY + ['--data-dir', data, '--batch-size', 4, '--max-train-steps', 1]
    with pytest.raises(SystemExit, match="takes 32x32 images but the dataset's are 28x28; pass --resize"):
        run(common + ['--output-dir', tmp_path / 'refused'])
    calls = spy_on_model(monkeypatch)
    run(common + ['--resize', '--output-dir', tmp_path / 'out'])
    assert all(call['images'].shape[1:] == (3, 32, 32) for call in calls)
    # one colour per image: resized to 32x32 it is the same colour, normalised with CIFAR-10's mean and std
    images, labels = image_examples(28, 'RGB', plain=True)['test']
    expected, _ = as_tensors([image.resize((32, 32)) for image in images], labels, CIFAR_MEAN, CIFAR_STD)
    torch.testing.assert_close(evaluated_images(calls), expected)


@pytest.mark.parametrize(
    'form, names, n, train_split, test_split, test_images',
    [
        ('save_to_disk', ('training', 'validation', 'test'), (8, 5, 3), 'training', 'validation', slice(None)),
        ('parquet', ('train', 'test'), (12, 7), 'train[:8]', 'train[8:]', slice(8, None)),  # datasets' slicing
    ],
)
def test_split_options(run, tmp_path, monkeypatch, form, names, n, train_split, test_split, test_images):
    data = make_image_dataset(tmp_path / 'data', size=32, mode='RGB', n=n, form=form, split_names=names)
    calls = spy_on_model(monkeypatch)
    results = run(
        CIFAR_TINY
        + [
            '--data-dir',
            data,
            '--train-split',
            train_split,
            '--test-split',
            test_split,
            '--batch-size',
            4,
            '--epochs',
            1,
            '--output-dir',
            tmp_path / 'out',
        ]
    )
    assert results['completed_steps'] == 2  # 8 training images at batch 4
    assert sum(call['training'] for call in calls) == 2
    images, labels = image_examples(32, 'RGB', n, split_names=names)[test_split.partition('[')[0]]
    expected = as_tensors(images[test_images], labels[test_images], CIFAR_MEAN, CIFAR_STD)
    torch.testing.assert_close(evaluated_images(calls), expected[0])
    assert_metrics(results['final'], independent_metrics(results['model_object'], *expected, multi_label=False))


def test_missing_split_names_the_ones_there(run, tmp_path):
    data = make_image_dataset(tmp_path / 'data', size=32, mode='RGB', n=(4, 2))
    with pytest.raises(
        SystemExit,
        match=r"cannot load split 'validation' of .*data: .* has splits \['test', "
        r"'train'\], not 'validation'$",
    ):
        run(CIFAR_TINY + ['--data-dir', data, '--test-split', 'validation', '--output-dir', tmp_path / 'out'])
    assert not (tmp_path / 'out' / 'metrics.json').exists()


# ------------------------------------------------------------------- what reaches the model, and how
@pytest.mark.parametrize('workers', [0, 2])
def test_multimnist_data_reaches_the_model_normalised(run, tmp_path, monkeypatch, workers):
    """Training batches are the DiverseMultiMNIST stream of --seed and the test images make_split(--test-size,
    --data-seed), both normalised with the model's mean and std, whatever the DataLoader worker count."""
    from timm_capsules.data import DiverseMultiMNISTStream

    calls = spy_on_model(monkeypatch)
    mean, std = 0.1307, 0.3081  # not the capsule nets' (0, 1), which would leave a missing normalisation unseen
    run(
        TINY
        + [
            '--model-arg',
            f"pretrained_cfg_overlay={{'mean': ({mean},), 'std': ({std},)}}",
            '--seed',
            3,
            '--data-seed',
            5,
            '--num-workers',
            workers,
            '--max-train-steps',
            3,
            '--output-dir',
            tmp_path,
        ]
    )
    stream = iter(DiverseMultiMNISTStream('train', source='sample', seed=3, batch_size=8))
    trained = [call['images'] for call in calls if call['training']]
    assert len(trained) == 3
    for images in trained:
        torch.testing.assert_close(images, (next(stream)[0] - mean) / std)
    torch.testing.assert_close(evaluated_images(calls), multimnist_test_images(37, mean, std, seed=5)[0])


def test_paper_augmentation():
    from timm_capsules.data.cifar import ImageClassificationData, LabelInfo

    images = [torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 6, 6) + k for k in range(50)]
    data = ImageClassificationData(
        [dict(img=im, label=0) for im in images],
        lambda x: x,
        'img',
        'label',
        LabelInfo(10, None, False),
        mean=(0.0, 0.0),
        std=(1.0, 1.0),
        augment=True,
        seed=5,
    )
    first = [data[k][0] for k in range(50)]
    assert all(torch.equal(a, data[k][0]) for k, a in enumerate(first))  # a pure function of (seed, epoch, index)
    data.set_epoch(1)
    assert any(not torch.equal(a, data[k][0]) for k, a in enumerate(first))
    for k, out in enumerate(first):  # every output is a 6x6 window of the zero-padded (maybe flipped) image
        padded = torch.nn.functional.pad(images[k], (4,) * 4)
        windows = [padded[:, t : t + 6, l : l + 6] for t in range(9) for l in range(9)]
        assert any(torch.equal(out, w) or torch.equal(out, w.flip(-1)) for w in windows)


# ----------------------------------------------------------------------------------------- reporting
@pytest.mark.parametrize('mnist_dir', [False, True])
def test_the_mnist_source_actually_used_is_reported(run, tmp_path, capsys, monkeypatch, mnist_dir):
    """--mnist-source auto resolves (offline here) to the built-in sample, or to $MNIST_DIR: metrics.json and the
    log say which, not 'auto'."""
    from timm_capsules.data import load_sample, write_idx

    expected = 'sample'
    if mnist_dir:
        folder = tmp_path / 'mnist'
        folder.mkdir()
        for split, prefix in (('train', 'train'), ('test', 't10k')):
            digits = load_sample(split)
            write_idx(folder / f'{prefix}-images-idx3-ubyte', digits.images)
            write_idx(folder / f'{prefix}-labels-idx1-ubyte', digits.labels.astype(np.uint8))
        monkeypatch.setenv('MNIST_DIR', str(folder))
        expected = f'idx:{folder}'
    else:
        monkeypatch.delenv('MNIST_DIR', raising=False)
    out = tmp_path / 'out'
    results = run(TINY + ['--mnist-source', 'auto', '--max-train-steps', 1, '--output-dir', out])
    metrics = json.loads((out / 'metrics.json').read_text())
    assert results['data_source'] == metrics['data_source'] == expected
    assert metrics['args']['mnist_source'] == 'auto'  # what was asked, beside what it resolved to
    assert f'on diverse_multimnist ({expected}):' in capsys.readouterr().out


# ------------------------------------------------------------------- --augment and --extra-test-split
def crops(image, padding=4):
    """Every pad-and-crop window of a (C, H, W) image (the training augmentation's shifts)."""
    padded = F.pad(image, (padding,) * 4)
    H, W = image.shape[-2:]
    return [padded[:, r : r + H, c : c + W] for r in range(2 * padding + 1) for c in range(2 * padding + 1)]


@pytest.mark.parametrize('augment', ['none', 'crop', 'crop-flip'])
def test_augment_option(run, tmp_path, monkeypatch, augment):
    """none: the training batch is the plain images; crop: shifted windows, never mirrored; crop-flip (the
    paper's CIFAR recipe, the default): some images are mirrored."""
    data = make_image_dataset(tmp_path / 'data', size=32, mode='RGB')
    calls = spy_on_model(monkeypatch)
    run(
        CIFAR_TINY
        + [
            '--data-dir',
            data,
            '--batch-size',
            12,
            '--max-train-steps',
            1,
            '--augment',
            augment,
            '--output-dir',
            tmp_path / 'out',
        ]
    )
    seen = calls[0]['images']  # the one training batch: all 12 training images, shuffled
    assert calls[0]['training'] and seen.shape == (12, 3, 32, 32)
    plain, _ = as_tensors(*image_examples(32, 'RGB')['train'], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    seen = seen * std + mean  # back to [0, 1]; zero padding is 0 there

    def matches(image, candidates):
        return any(torch.allclose(image, c, atol=1e-5) for c in candidates)

    shifted = [any(matches(s, crops(p)) for p in plain) for s in seen]
    mirrored = [any(matches(s, crops(p.flip(-1))) for p in plain) and not shifted[k] for k, s in enumerate(seen)]
    if augment == 'none':
        assert all(matches(s, list(plain)) for s in seen)
    elif augment == 'crop':
        assert all(shifted) and not all(matches(s, list(plain)) for s in seen)
    else:
        assert all(a or b for a, b in zip(shifted, mirrored)) and any(mirrored)


def test_extra_test_split_is_evaluated_on_the_final_model(run, tmp_path):
    data = make_image_dataset(tmp_path / 'data', size=32, mode='RGB', form='parquet')
    out = tmp_path / 'out'
    results = run(
        CIFAR_TINY
        + [
            '--data-dir',
            data,
            '--batch-size',
            4,
            '--max-train-steps',
            2,
            '--extra-test-split',
            'train',
            '--extra-test-split',
            'test[:3]',
            '--output-dir',
            out,
        ]
    )
    examples = image_examples(32, 'RGB')
    for split, (images, labels) in (('train', examples['train']), ('test[:3]', [x[:3] for x in examples['test']])):
        expected = independent_metrics(
            results['model_object'], *as_tensors(images, labels, CIFAR_MEAN, CIFAR_STD), False
        )
        assert_metrics(results['extra_tests'][split], expected)
    assert json.loads((out / 'metrics.json').read_text())['extra_tests'] == results['extra_tests']
    with pytest.raises(SystemExit, match='--extra-test-split needs an image dataset'):
        run(TINY + ['--extra-test-split', 'train', '--output-dir', tmp_path / 'refused'])
