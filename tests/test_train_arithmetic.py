"""The training script's arithmetic by value: the learning rate at every optimizer step, the steps of an epoch and
the images seen with gradient accumulation, the spread loss's margin at every step of an EM run, top-5 and the
chance level. Every expected number is computed here from the README's description, not by the script's code."""

import math

import pytest
import torch

import train_accelerate  # the script at the checkout's root (pytest's pythonpath)
from timm_capsules.train import metrics
from timm_capsules.data.registry import chance_level
from timm_capsules.train.metrics import evaluate

from train_fixtures import TINY  # the fixtures run and accelerator come from conftest.py

EPOCH, BATCH = 40, 8  # TINY's DiverseMultiMNIST epoch and batch


def updates_per_epoch(accumulation):
    """An epoch is at least --epoch-size images, in whole optimizer steps of batch x accumulation images."""
    return math.ceil(EPOCH / (BATCH * accumulation))


def lr_records(results):
    """{step: lr after that optimizer step} from the training log (--log-every 1)."""
    records = results['history']['train']
    assert [r['step'] for r in records] == list(range(1, results['completed_steps'] + 1))
    return {r['step']: r['lr'] for r in records}


@pytest.mark.parametrize('accumulation', [1, 2])
def test_epoch_length_steps_and_images_seen_with_accumulation(run, tmp_path, accumulation):
    epochs = 2
    results = run(
        TINY
        + [
            '--epochs',
            epochs,
            '--gradient-accumulation-steps',
            accumulation,
            '--log-every',
            1,
            '--sched',
            'none',
            '--output-dir',
            tmp_path,
        ]
    )
    per_epoch = updates_per_epoch(accumulation)  # 5 steps of 8 images, or 3 of 2 x 8
    assert per_epoch * BATCH * accumulation >= EPOCH > (per_epoch - 1) * BATCH * accumulation
    assert results['epochs'] == epochs and results['completed_steps'] == epochs * per_epoch
    assert results['images_seen'] == epochs * per_epoch * BATCH * accumulation
    # every logged step belongs to the epoch it falls in, and each epoch ends with an evaluation at its last step
    assert [r['epoch'] for r in results['history']['train']] == [
        (s - 1) // per_epoch for s in range(1, epochs * per_epoch + 1)
    ]
    assert [(r['epoch'], r['step']) for r in results['history']['eval']] == [
        (e, (e + 1) * per_epoch) for e in range(epochs)
    ]


@pytest.mark.parametrize('accumulation', [1, 2])
@pytest.mark.parametrize('sched', ['cosine', 'multistep'])
def test_learning_rate_at_every_optimizer_step(run, tmp_path, sched, accumulation):
    """The lr after s optimizer steps (the one step s + 1 uses), counted in optimizer steps, not in batches.
    cosine: lr / 2 (1 + cos(pi s / S)) over the run's S steps. multistep (milestones 1 and 2 of 3 epochs of U
    steps): lr x 0.1 per milestone m with s + 1 >= m U, timm's convention ("milestone m applies at t == m - 1",
    timm/scheduler/multistep_lr.py): the last step of the epoch before a milestone already runs decayed."""
    lr, epochs = 0.01, 3
    argv = TINY + [
        '--epochs',
        epochs,
        '--gradient-accumulation-steps',
        accumulation,
        '--log-every',
        1,
        '--sched',
        sched,
        '--warmup-epochs',
        0,
        '--lr',
        lr,
        '--output-dir',
        tmp_path,
    ]
    if sched == 'multistep':
        argv += ['--decay-milestones', 1, 2, '--decay-rate', 0.1]
    results = run(argv)
    per_epoch = updates_per_epoch(accumulation)
    total = epochs * per_epoch
    assert results['completed_steps'] == total
    if sched == 'cosine':
        expected = {s: lr / 2 * (1 + math.cos(math.pi * s / total)) for s in range(1, total + 1)}
    else:
        expected = {s: lr * 0.1 ** sum(s + 1 >= m * per_epoch for m in (1, 2)) for s in range(1, total + 1)}
    got = lr_records(results)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    if sched == 'multistep':  # by hand: the decays land on the last step of epochs 0 and 1
        assert [got[s] for s in (per_epoch - 2, per_epoch - 1, 2 * per_epoch - 2, 2 * per_epoch - 1)] == pytest.approx(
            [lr, lr / 10, lr / 10, lr / 100]
        )


EM_TINY = [
    '--model',
    'em_capsnet_simple_cifar10',
    '--model-kwargs',
    'in_chans=1',
    'img_size=36',
    "backbone_args={'out_chs': 8}",
    'primary_caps=2',
    "capsule_layers=[('conv', 2, 3, 2)]",
    'iterations=2',
    '--mnist-source',
    'sample',
    '--batch-size',
    4,
    '--epoch-size',
    16,
    '--test-size',
    8,
    '--lr',
    0.01,
]


@pytest.mark.parametrize('accumulation', [1, 2])
def test_spread_loss_margin_grows_by_optimizer_step_in_an_em_run(run, tmp_path, monkeypatch, accumulation):
    """The spread loss's margin goes linearly from 0.2 at the first optimizer step towards 0.9 over the run's
    steps (Hinton et al., 2018): 0.2 + 0.7 s / S at step s = 0 .. S - 1, the same for every batch of a step;
    evaluation uses 0.9."""
    margins = []
    real = train_accelerate.classification_loss  # training's, and evaluation's below

    def recording(outputs, targets, output_type, multi_label, margin=0.2, reduction='mean'):
        if reduction == 'mean':  # training; evaluation asks for one loss per image
            assert output_type == 'activations'
            margins.append(margin)
        else:
            assert margin == 0.9
        return real(outputs, targets, output_type, multi_label, margin, reduction)

    monkeypatch.setattr(train_accelerate, 'classification_loss', recording)
    monkeypatch.setattr(metrics, 'classification_loss', recording)
    epochs = 2
    results = run(
        EM_TINY + ['--epochs', epochs, '--gradient-accumulation-steps', accumulation, '--output-dir', tmp_path]
    )
    steps = epochs * math.ceil(16 / (4 * accumulation))  # 8 steps of one batch, or 4 of two
    assert results['completed_steps'] == steps and len(margins) == steps * accumulation
    expected = [0.2 + 0.7 * s / steps for s in range(steps) for _ in range(accumulation)]
    assert margins == pytest.approx(expected)
    assert (margins[0], margins[len(margins) // 2], margins[-1]) == pytest.approx(
        (0.2, 0.2 + 0.7 * (steps // 2) / steps, 0.2 + 0.7 * (steps - 1) / steps)
    )


def test_top5_with_fewer_than_five_classes_counts_every_image(accelerator):
    """With three classes top-5 is every class; with seven, rank 4 counts and rank 5 does not."""
    from torch.utils.data import DataLoader, TensorDataset

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    def metrics(scores, targets):
        loader = accelerator.prepare(DataLoader(TensorDataset(scores, targets), batch_size=2))
        return evaluate(Fixed(), loader, accelerator, False, scores.shape[1])

    three = metrics(torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), torch.tensor([2, 0, 0]))
    assert (three['top1'], three['top5']) == pytest.approx((1 / 3, 1.0))
    # seven classes, scores falling with the index: the target's rank is its index
    seven = metrics(torch.arange(7, 0, -1.0).expand(4, 7).clone(), torch.tensor([0, 4, 5, 6]))
    assert (seven['top1'], seven['top5']) == pytest.approx((1 / 4, 2 / 4))


def test_chance_level_is_the_most_frequent_answer():
    assert chance_level([3, 1, 3, 2]) == 0.5
    assert chance_level([(1, 2), (2,), (1, 2), (0, 9), (2,), (1, 2)]) == 0.5  # label sets, 3 of 6
    assert chance_level([7]) == 1.0 and chance_level([]) == 0.0
