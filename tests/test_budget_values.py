"""``timm_capsules/experiments/budget.py`` checked by value: ``gpu_estimate`` against its formula written out by hand
for data-bound and GPU-bound runs of one to three epochs (the FLOP count replaced by known numbers), and
``train_gflop_per_image`` against a FLOP count by hand of a one-conv, one-linear model (created in place of the
run's model: what it is asked for, the images it is run on, the cache). The real models' counts against a real
step: tests/test_gpu_scale.py. Written for a mutmut run (tests/README.md); fast, nothing is trained."""

import pytest
import timm
import torch
from torch import nn

from timm_capsules.experiments import budget
from timm_capsules.experiments.plans import Run

A = dict(dense_tflops=35.0, routing_tflops=0.6, images_per_s_per_worker=830.0, workers=4, shards=4, overhead_s=4.0)


def test_the_assumptions_are_the_measured_ones():
    assert budget.GPU_ASSUMPTIONS == A


@pytest.fixture
def gflop(monkeypatch):
    """GFLOP per image by (arguments, override): 'total' for a model as given, 'dense' at one iteration."""
    asked = []

    def count(train_args, **override):
        asked.append((list(train_args), override))
        return {'total': 30.0, 'dense': 5.0}['dense' if override == {'iterations': 1} else 'total']

    monkeypatch.setattr(budget, 'train_gflop_per_image', count)
    return asked


def by_hand(images_seen, epochs, routing, test_images=10000):
    steps = images_seen + epochs * test_images / 3
    data_s = (images_seen + epochs * test_images) / (830.0 * 4)
    dense, total = (5.0, 30.0) if routing else (30.0, 30.0)
    gpu_s = steps * 4 * (dense / 35.0 + (total - dense) / 0.6) / 1e3
    return max(data_s, gpu_s) + 4.0


@pytest.mark.parametrize(
    'images_seen, epochs', [(30000, 1), (59999, 1), (60000, 1), (120000, 2), (179999, 2), (180000, 3)]
)
@pytest.mark.parametrize('routing', [True, False])
def test_gpu_estimate_by_hand(gflop, images_seen, epochs, routing):
    row = {'kind': 'IDA', 'iterations': 3} if routing else {'kind': 'CNN'}
    run = Run('r', ('s',), row, 'fashion_mnist', 0, images_seen, ['--model', 'm'])
    assert budget.gpu_estimate(run) == pytest.approx(by_hand(images_seen, epochs, routing), rel=1e-12, abs=0)
    assert gflop == [(['--model', 'm'], {})] + ([(['--model', 'm'], {'iterations': 1})] if routing else [])
    assert budget.gpu_estimate(run, 300) == pytest.approx(by_hand(images_seen, epochs, routing, 300), rel=1e-12, abs=0)


def test_gpu_estimate_data_bound(monkeypatch):
    """A model of no FLOPs takes its data's time: the images of training and evaluation through 4 x 830 per s."""
    monkeypatch.setattr(budget, 'train_gflop_per_image', lambda train_args, **override: 0.0)
    run = Run('r', ('s',), {'kind': 'CNN'}, 'fashion_mnist', 0, 120000, [])
    assert budget.gpu_estimate(run) == pytest.approx((120000 + 2 * 10000) / 3320 + 4.0, rel=1e-12, abs=0)


def test_gpu_estimate_gpu_bound(monkeypatch):
    """Routing FLOPs only (nothing dense): the steps, each a third for evaluation images, at 0.6 TFLOP/s per shard."""
    monkeypatch.setattr(budget, 'train_gflop_per_image', lambda train_args, **override: 0.0 if override else 6.0)
    run = Run('r', ('s',), {'iterations': 2}, 'fashion_mnist', 0, 60000, [])
    expected = (60000 + 10000 / 3) * 4 * 6.0 / 0.6 / 1e3
    assert budget.gpu_estimate(run) == pytest.approx(expected + 4.0, rel=1e-12, abs=0)


# ---- train_gflop_per_image -----------------------------------------------------------------------------------


@pytest.fixture
def tiny(monkeypatch):
    """timm.create_model makes a 3x3 conv to ``width`` (4) channels and a linear layer to the classes; the calls
    are kept."""
    calls = []

    def create(name, device=None, **kwargs):
        calls.append((name, device, dict(kwargs)))
        chans, width = kwargs.get('in_chans', 3), kwargs.get('width', 4)
        with torch.device(device):
            return nn.Sequential(
                nn.Conv2d(chans, width, 3), nn.Flatten(), nn.Linear(width * 26 * 26, kwargs['num_classes'])
            )

    monkeypatch.setattr(timm, 'create_model', create)
    monkeypatch.setattr(budget, '_GFLOP_CACHE', {})
    return calls


def flops_by_hand(chans, width=4, classes=10):
    """Per image: the conv forward and its weight gradient (the images need none), the linear layer's forward and
    both its gradients; 2 FLOPs a multiply-add."""
    conv = 2 * width * chans * 9 * 26 * 26
    linear = 2 * width * 26 * 26 * classes
    return (2 * conv + 3 * linear) / 1e9


def test_train_gflop_per_image_by_hand(tiny):
    args = ['--model', 'resnet18', '--model-arg', 'in_chans=1']
    assert budget.train_gflop_per_image(args) == pytest.approx(flops_by_hand(1), rel=1e-12, abs=0)
    assert tiny == [('resnet18', 'meta', {'in_chans': 1, 'num_classes': 10})]
    # the model's default channels (3) when the run names none
    assert budget.train_gflop_per_image(['--model', 'resnet18']) == pytest.approx(flops_by_hand(3), rel=1e-12, abs=0)
    assert tiny[-1] == ('resnet18', 'meta', {'num_classes': 10})


def test_train_gflop_per_image_passes_the_override_and_caches(tiny):
    args = ['--model', 'resnet18', '--model-arg', 'in_chans=1']
    first = budget.train_gflop_per_image(args)
    assert budget.train_gflop_per_image(list(args)) == first and len(tiny) == 1  # counted once
    assert budget.train_gflop_per_image(args, width=2) == pytest.approx(flops_by_hand(1, 2), rel=1e-12, abs=0)
    assert tiny[-1] == ('resnet18', 'meta', {'in_chans': 1, 'num_classes': 10, 'width': 2})
    assert budget.train_gflop_per_image(args, width=3) == pytest.approx(flops_by_hand(1, 3), rel=1e-12, abs=0)
    other = ['--model', 'resnet18', '--model-arg', 'in_chans=2']
    assert budget.train_gflop_per_image(other) == pytest.approx(flops_by_hand(2), rel=1e-12, abs=0)
    assert len(tiny) == 4 and len(budget._GFLOP_CACHE) == 4
    assert budget.train_gflop_per_image(args, width=2) == pytest.approx(flops_by_hand(1, 2), rel=1e-12, abs=0)
    assert len(tiny) == 4


def test_train_gflop_per_image_caches_an_override_in_any_order(tiny):
    args = ['--model', 'resnet18']
    first = budget.train_gflop_per_image(args, width=2, in_chans=3)
    assert budget.train_gflop_per_image(args, in_chans=3, width=2) == first and len(tiny) == 1
    assert first == pytest.approx(flops_by_hand(3, 2), rel=1e-12, abs=0)
