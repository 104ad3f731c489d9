"""Tests of the paper's comparison systems as models: the baseline models' parameter counts, their losses, short
real training runs and the CapsNet ablations (their routing functions: ``test_routing_baselines.py``)."""

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import timm_capsules  # noqa: F401  (registers the models)
from timm_capsules.cnn_baselines import BaselineCNN
from timm_capsules.dynamic_capsnet import DynamicCapsNet
from timm_capsules.em_capsnet import EMCapsNet
from timm_capsules.data import diverse_multimnist as dmm
from timm_capsules.data import mnist
from timm_capsules.losses import margin_loss, spread_loss

import test_routing_baselines as naive_routings  # the naive loops (a module, so its tests are not collected here)


# ----------------------------------------------------------------------------------- parameter counts
# (exact count we get, the paper's figure in millions as printed)
PARAMS = {
    'dynamic_capsnet_simple_cifar10': (7_992_320, 7.99),
    'dynamic_capsnet_simple_cifar100': (31_585_280, 31.59),
    'dynamic_capsnet_resnet_cifar10': (12_450_880, 12.45),
    'dynamic_capsnet_resnet_cifar100': (36_043_840, 36.04),
    'em_capsnet_simple_cifar10': (452_500, 0.45),
    'em_capsnet_simple_cifar100': (498_760, 0.50),
    'em_capsnet_resnet_cifar10': (1_710_036, 1.71),
    'em_capsnet_resnet_cifar100': (1_756_296, 1.76),
    'cnn_baseline_cifar10': (18_919_434, 18.92),
    'cnn_baseline_cifar100': (19_011_684, 19.01),
    'resnet18_cifar10': (11_173_962, 11.17),
    'cnn_baseline_multimnist': (19_553_162, 19.55),
    'cnn_fc_multimnist': (42_490_762, 42.49),
    'dynamic_capsnet_vector_multimnist': (42_477_568, 42.48),
}


def test_every_baseline_is_registered():
    assert set(PARAMS) | {'resnet18_cifar100'} == set(timm.list_models(module=timm_capsules.MODEL_MODULES[1:]))


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_parameter_count(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    exact, paper = PARAMS[name]
    assert round(count / 1e4) / 100 == paper, f"{name}: {count:,} does not round to the paper's {paper}M"
    assert count == exact


def test_cifar_resnet18_is_timms_resnet_with_a_cifar_stem():
    model = timm.create_model('resnet18_cifar10')
    assert isinstance(model, timm.models.ResNet)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert [info['reduction'] for info in model.feature_info] == [1, 1, 2, 4, 8]
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 4, 4)


def test_em_model_stays_finite_under_bf16_autocast_with_extreme_images():
    torch.manual_seed(3)
    model = EMCapsNet(
        in_chans=1,
        img_size=20,
        backbone_args=dict(out_chs=16),
        primary_caps=4,
        capsule_layers=(('conv', 4, 3, 2), ('conv', 4, 3, 1)),
    )
    for scale in (1e6, 1e-6, 0.0):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(torch.randn(2, 1, 20, 20) * scale)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ------------------------------------------------------------------------------------ losses
def test_margin_loss_by_hand():
    lengths = torch.tensor([[0.95, 0.3, 0.05], [0.5, 0.0, 0.8]])
    # image 0, class 0: 0 + class 1: 0.5 * 0.2^2 + class 2: 0; image 1 (classes 0 and 2): 0.4^2 + 0 + 0.1^2
    expected = ((0.5 * 0.2**2) + (0.4**2 + 0.1**2)) / 2
    assert margin_loss(lengths, torch.tensor([[1.0, 0, 0], [1, 0, 1]])).item() == pytest.approx(expected)
    assert margin_loss(lengths[:1], torch.tensor([0])).item() == pytest.approx(0.5 * 0.2**2)


def test_spread_loss_by_hand():
    a = torch.tensor([[0.9, 0.8, 0.1]])
    # target 0: (0.2 - 0.1)^2 from class 1, nothing from class 2 (gap 0.8 > margin)
    assert spread_loss(a, torch.tensor([0]), margin=0.2).item() == pytest.approx(0.01)
    assert spread_loss(a, torch.tensor([2]), margin=0.2).item() == pytest.approx(1.0**2 + 0.9**2)
    multi = spread_loss(a, torch.tensor([[1.0, 1.0, 0.0]]), margin=0.9)
    assert multi.item() == pytest.approx(0.1**2 + 0.2**2)


# --------------------------------------------------------------------------- short real training runs
@pytest.fixture(scope='module')
def multimnist_batch():
    batch = dmm.make_split('train', 8, digits=mnist.load_sample('train'), seed=0)
    images = torch.from_numpy(batch.images).float()[:, None] / 255.0
    return images, torch.from_numpy(batch.targets)


def _train(model, images, targets, loss_fn, optimizer, steps):
    losses = []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(images), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _assert_learns(losses):
    assert all(math.isfinite(loss) for loss in losses)
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.7 * first, f'loss did not drop: {losses}'


# the families' own classes and code paths at reduced widths, so that a few dozen steps take seconds
@pytest.mark.slow
def test_dynamic_capsnet_trains_on_diverse_multimnist(multimnist_batch):
    torch.manual_seed(0)
    images, targets = multimnist_batch
    model = DynamicCapsNet(
        in_chans=1,
        img_size=36,
        backbone_args=dict(out_chs=16),
        primary_caps=4,
        primary_dim=8,
        primary_kernel_size=3,
        primary_stride=2,
        capsule_layers=(('conv', 4, 3, 1),),
        class_dim=8,
    )
    losses = _train(model, images, targets, margin_loss, torch.optim.Adam(model.parameters(), 1e-2), 20)
    _assert_learns(losses)


@pytest.mark.slow
def test_em_capsnet_trains_on_diverse_multimnist(multimnist_batch):
    torch.manual_seed(0)
    images, targets = multimnist_batch
    model = EMCapsNet(
        in_chans=1,
        img_size=36,
        backbone_args=dict(out_chs=16),
        primary_caps=4,
        capsule_layers=(('conv', 4, 3, 2), ('conv', 4, 3, 1)),
    )
    losses = _train(
        model,
        images,
        targets,
        lambda a, t: spread_loss(a, t, margin=0.5),
        torch.optim.Adam(model.parameters(), 1e-2),
        20,
    )
    _assert_learns(losses)


def test_cnn_baselines_train_on_diverse_multimnist(multimnist_batch):
    images, targets = multimnist_batch
    stages = ((16, 3, 2, 1, False, False), (16, 3, 2, 0, False, True), (16, 3, 1, 0, False, True))
    for head, extra in (('pool', ((24, 1, 1, 0, False, False),)), ('fc', ())):
        torch.manual_seed(0)
        model = BaselineCNN(in_chans=1, img_size=36, stages=stages + extra, head=head, head_hidden_size=24)
        losses = _train(
            model,
            images,
            targets,
            F.binary_cross_entropy_with_logits,
            torch.optim.SGD(model.parameters(), 0.1, momentum=0.9),
            20,
        )
        _assert_learns(losses)


@pytest.mark.slow
def test_cifar_resnet_trains():
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    model = timm.create_model('resnet18_cifar10', layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))
    losses = _train(model, images, labels, F.cross_entropy, torch.optim.SGD(model.parameters(), 0.1, momentum=0.9), 12)
    _assert_learns(losses)


# --------------------------------------------------------------------------------- models, contract
@pytest.mark.parametrize('name', ['dynamic_capsnet_simple_cifar10', 'em_capsnet_simple_cifar10'])
def test_capsule_baseline_outputs_are_probabilities(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and (out >= 0).all() and (out <= 1).all()
    assert out.std() > 0  # not saturated to a constant


def test_head_routes_forward_features():
    """forward_head(forward_features(x)) is the model: features carry everything the class capsules need."""
    torch.manual_seed(0)
    model = EMCapsNet(
        in_chans=1,
        img_size=20,
        backbone_args=dict(out_chs=16),
        primary_caps=4,
        capsule_layers=(('conv', 4, 3, 2), ('conv', 4, 3, 1)),
    ).eval()
    x = torch.randn(2, 1, 20, 20)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 4 * 17, 2, 2)
        activations = features[:, 4 * 16 :]
        assert ((activations > 0) & (activations < 1)).all()
        torch.testing.assert_close(model.forward_head(features), model(x))


def test_dynamic_capsnet_output_by_hand():
    """Sabour et al.: the primary capsules are squashed, every one (type, h, w) votes u_i W_ij for every class,
    three iterations of routing by agreement, and the model returns the class capsules' lengths."""
    torch.manual_seed(0)
    model = DynamicCapsNet(
        in_chans=1,
        img_size=20,
        backbone_args=dict(out_chs=16),
        primary_caps=4,
        primary_dim=8,
        primary_kernel_size=3,
        primary_stride=2,
        class_dim=8,
    ).eval()
    x = torch.randn(2, 1, 20, 20)
    with torch.no_grad():
        raw = model.primary(model.backbone(x)[-1]).poses  # (B, 4, 4, 4 types, 8)
        levels = model.forward_intermediates(x, intermediates_only=True)
        logits = model(x)
    assert [info['module'] for info in model.feature_info][-2:] == ['primary.conv', 'primary']
    squashed = raw * (
        raw.norm(dim=-1, keepdim=True) ** 2 / (1 + raw.norm(dim=-1, keepdim=True) ** 2) / raw.norm(dim=-1, keepdim=True)
    )
    torch.testing.assert_close(levels[-2], raw.flatten(3).permute(0, 3, 1, 2))  # channel n * d + e
    torch.testing.assert_close(levels[-1], squashed.flatten(3).permute(0, 3, 1, 2))
    children = squashed.permute(0, 3, 1, 2, 4).reshape(2, 64, 8).double()
    votes = torch.einsum('bic,ijct->bijt', children, model.head.weight.double())
    classes, _ = naive_routings.naive_dynamic_routing(votes, 3)
    torch.testing.assert_close(logits.double(), classes.norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_em_coordinate_addition_changes_votes():
    torch.manual_seed(0)
    kwargs = dict(
        in_chans=1,
        img_size=20,
        backbone_args=dict(out_chs=16),
        primary_caps=4,
        capsule_layers=(('conv', 4, 3, 2), ('conv', 4, 3, 1)),
    )
    with_coords = EMCapsNet(**kwargs).eval()
    without = EMCapsNet(**kwargs, coordinate_addition=False).eval()
    without.load_state_dict(with_coords.state_dict())
    coords = with_coords.head.coordinates.reshape(2, 2, 4, 4)
    assert coords[1, 0, 0, 3] == 0.75 and coords[0, 1, 1, 3] == 0.75 and coords[..., :, :3].abs().sum() == 0
    x = torch.randn(2, 1, 20, 20)
    with torch.no_grad():
        assert not torch.allclose(with_coords(x), without(x))


# ------------------------------------------------------------------------------ CapsNet ablations run
@pytest.mark.parametrize('ablation', [dict(layer_norm=False), dict(routing='sequential'), dict(activations=True)])
def test_capsnet_ablations_run(ablation):
    torch.manual_seed(0)
    base = timm.create_model('capsnet_simple_cifar10').eval()
    model = timm.create_model('capsnet_simple_cifar10', **ablation)
    ours = model.state_dict()
    # the ablation alone changes the outputs: every weight the two models share is the same
    model.load_state_dict(
        {k: v for k, v in base.state_dict().items() if k in ours and ours[k].shape == v.shape}, strict=False
    )
    assert any('.norm.' in key for key in ours) is ('layer_norm' not in ablation)
    assert model.routing == ablation.get('routing', 'concurrent')
    assert (ours['primary.conv.weight'].shape[0] == 32 * 17) is ('activations' in ablation)  # + 1 activation
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(x), base(x), rtol=1e-3, atol=1e-3)
    out = model.train()(x)
    out.sum().backward()
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert model.backbone.conv.weight.grad is not None and torch.isfinite(model.backbone.conv.weight.grad).all()


def test_an_input_too_small_for_the_dynamic_capsule_stack_is_refused_with_the_reason():
    """16 x 16 leaves the 9 x 9 primary capsule conv no room (found running timm's scripts at small inputs)."""
    with pytest.raises(ValueError, match=r'input size \(16, 16\) is too small for this capsule stack'):
        timm.create_model('dynamic_capsnet_simple_cifar10', img_size=16)
    assert timm.create_model('dynamic_capsnet_simple_cifar10', img_size=20, device='meta').img_size == (20, 20)
