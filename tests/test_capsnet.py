"""The six paper CapsNets as timm models: exact sizes, the contract beyond timm's own suite, bad input."""

import pytest
import timm
import torch

import timm_capsules  # noqa: F401
from timm_capsules.data.constants import CIFAR100_LABELS

PAPER_PARAMS = {
    'capsnet_simple_cifar10': 561_297,
    'capsnet_simple_cifar100': 1_462_989,
    'capsnet_resnet_cifar10': 1_828_817,
    'capsnet_resnet_cifar100': 2_799_629,
    'capsnet_matrix_multimnist': 9_963_969,
    'capsnet_vector_multimnist': 42_478_017,
}


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registered_models_are_exactly_the_paper_models():
    assert set(timm.list_models('capsnet_*')) == set(PAPER_PARAMS)


@pytest.mark.parametrize('name', sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert num_params(model) == PAPER_PARAMS[name]


@pytest.mark.parametrize('name', sorted(PAPER_PARAMS))
def test_default_cfg_describes_the_model(name):
    model = timm.create_model(name, device='meta')
    cfg = model.pretrained_cfg
    assert cfg['hf_hub_id'] == f'timm-capsules/{name}.{cfg["tag"]}'
    assert cfg['input_size'] == (model.in_chans, *model.img_size)
    assert len(cfg['label_names']) == cfg['num_classes'] == model.num_classes
    assert cfg['paper_ids'] == 'arXiv:2002.04764'
    assert len(cfg['mean']) == len(cfg['std']) == model.in_chans


def test_cifar100_label_names_are_distinct():
    assert len(set(CIFAR100_LABELS)) == 100


def test_num_classes_and_in_chans_adapt_the_model():
    model = timm.create_model('capsnet_simple_cifar10', num_classes=7, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    model.reset_classifier(4)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    model.reset_classifier(0)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, model.head_hidden_size)


def test_forward_head_of_forward_features_is_forward():
    model = timm.create_model('capsnet_simple_cifar100', iterations=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, model.num_features, 1, 1)
        assert model.num_features == 2 * model.head_hidden_size  # snapshots of iterations 1 and 2
        torch.testing.assert_close(model.forward_head(features), model(x))
        assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)


def test_features_only_returns_every_level():
    model = timm.create_model('capsnet_resnet_cifar10', features_only=True)
    maps = model(torch.randn(2, 3, 32, 32))
    assert [m.shape[1:] for m in maps] == [(64, 32, 32), (128, 16, 16), (512, 16, 16), (512, 7, 7), (512, 5, 5)]
    assert model.feature_info.channels() == [64, 128, 512, 512, 512]


@pytest.mark.parametrize(
    'name', ['capsnet_resnet_cifar10', 'dynamic_capsnet_resnet_cifar10', 'em_capsnet_resnet_cifar10']
)
def test_features_only_counts_the_levels_of_the_model_as_built(name):
    """A ResNet backbone given three stages by ``backbone_args`` has three levels, not the default two: features_only
    returns every level the full model reports, down to the last capsule level (it used to drop the last one)."""
    three_stages = {'widths': (16, 32, 64), 'depths': (1, 1, 1), 'strides': (1, 2, 1)}
    model = timm.create_model(name, backbone_args=three_stages).eval()
    features = timm.create_model(name, backbone_args=three_stages, features_only=True).eval()
    missing, _ = features.model.load_state_dict(model.state_dict(), strict=False)  # the pruned head is unexpected
    assert not missing
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        maps = features(x)
        _, intermediates = model.forward_intermediates(x)
    assert features.feature_info.channels() == [info['num_chs'] for info in model.feature_info]
    assert len(maps) == len(model.feature_info) == len(intermediates) >= 5
    for got, expected in zip(maps, intermediates):
        torch.testing.assert_close(got, expected)


def test_device_and_dtype_arguments_are_honoured():
    model = timm.create_model('capsnet_simple_cifar10', device='meta', dtype=torch.float64)
    assert {p.device.type for p in model.parameters()} == {'meta'}
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_unknown_kwargs_are_not_swallowed():
    with pytest.raises(TypeError):
        timm.create_model('capsnet_simple_cifar10', not_an_argument=1)


# ---- bad input ------------------------------------------------------------------------------------


def test_wrong_channel_count_names_the_expected_shape():
    model = timm.create_model('capsnet_simple_cifar10')
    with pytest.raises(ValueError, match=r'\(batch, 3, 32, 32\)'):
        model(torch.randn(1, 1, 32, 32))


def test_wrong_image_size_names_the_expected_shape():
    model = timm.create_model('capsnet_matrix_multimnist')
    with pytest.raises(ValueError, match=r'\(batch, 1, 36, 36\)'):
        model(torch.randn(1, 1, 28, 28))


def test_image_too_small_for_the_capsule_stack():
    with pytest.raises(ValueError, match='too small for the capsule stack'):
        timm.create_model('capsnet_simple_cifar10', img_size=12)


def test_non_square_matrix_pose_is_rejected():
    with pytest.raises(ValueError, match='square pose dimension'):
        timm.create_model('capsnet_simple_cifar10', pose_dim=12)


@pytest.mark.parametrize('iterations', [0, -2, 65, 1_000_000_000])
def test_iterations_outside_1_to_64_are_rejected_before_anything_is_built(iterations):
    with pytest.raises(ValueError, match=f'iterations must be between 1 and 64, got {iterations}'):
        timm.create_model('capsnet_simple_cifar10', iterations=iterations)
    assert timm.create_model('capsnet_simple_cifar10', iterations=64).iterations == 64


def test_unknown_routing_is_rejected():
    with pytest.raises(ValueError, match='concurrent'):
        timm.create_model('capsnet_simple_cifar10', routing='dynamic')


# ---- any timm model as backbone --------------------------------------------------------------------


@pytest.mark.parametrize(
    'backbone, img_size, level',
    [
        ('resnet18', 32, 1),  # deepest ResNet level still >= 7x7 at 32x32: layer1, 8x8
        ('convnext_atto', 64, 1),  # stride-8 stage, 8x8
        ('vit_tiny_patch16_224', 128, 11),  # tokens as an 8x8 map through timm's feature getter
    ],
)
def test_any_timm_model_feeds_the_primary_capsules(backbone, img_size, level):
    model = timm.create_model('capsnet_resnet_cifar10', backbone=backbone, img_size=img_size)
    assert model.backbone.out_index == level
    assert model.primary.conv.in_channels == model.backbone.num_features
    x = torch.randn(2, 3, img_size, img_size)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_timm_backbone_level_can_be_chosen():
    model = timm.create_model('capsnet_resnet_cifar10', backbone='resnet18', backbone_out_index=0, img_size=32)
    assert model.backbone.num_features == 64 and model.backbone.grid == (16, 16)
    with pytest.raises(ValueError, match='feature levels'):
        timm.create_model('capsnet_resnet_cifar10', backbone='resnet18', backbone_out_index=9)


# ---- compile and low precision ---------------------------------------------------------------------


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = timm.create_model('capsnet_simple_cifar10', iterations=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_keeps_routing_finite_and_close():
    torch.manual_seed(0)
    model = timm.create_model('capsnet_simple_cifar10', iterations=3).eval()
    x = torch.randn(4, 3, 32, 32) * 50  # large activations stress softmax and LayerNorm
    with torch.no_grad():
        expected = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            got = model(x)
    assert torch.isfinite(got).all()
    assert (got.float() - expected).abs().max() < 0.1 * expected.abs().max() + 0.1


@pytest.mark.slow
@pytest.mark.parametrize('name', timm.list_models(module=timm_capsules.MODEL_MODULES))
def test_every_model_compiles_as_one_graph(name):
    """README: torch.compile(fullgraph=True) captures every registered model without a graph break. The
    'aot_eager' backend runs dynamo and AOT autograd (fake kernels, custom-op autograd) for forward and
    backward, without inductor's code generation, which test_torch_compile_matches_eager covers once."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = timm.create_model(name).train()
    cfg = model.pretrained_cfg
    x = torch.randn(2, *cfg['input_size'])
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.sum(), list(model.parameters()), allow_unused=True)
    out = torch.compile(model, backend='aot_eager', fullgraph=True)(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(out.sum(), list(model.parameters()), allow_unused=True)
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4 * e.abs().max().item() + 1e-6)
    torch._dynamo.reset()


# ---- the keywords timm's own scripts pass (train.py, validate.py, benchmark.py, inference.py) -------------

FAMILIES = [
    'capsnet_resnet_cifar10',
    'dynamic_capsnet_resnet_cifar10',
    'em_capsnet_simple_cifar10',
    'cnn_baseline_cifar10',
    'resnet18_cifar10',
]


@pytest.mark.parametrize('name', FAMILIES)
def test_timm_script_keywords_are_accepted_and_honoured(name):
    """train.py passes drop_rate, drop_path_rate, drop_block_rate, global_pool, bn_momentum, bn_eps (None ones
    are dropped by timm.create_model); benchmark.py passes global_pool='fast'."""
    torch.manual_seed(0)
    model = timm.create_model(name, drop_rate=0.5, drop_block_rate=None, bn_momentum=0.01, bn_eps=1e-3)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.momentum == 0.01 and m.eps == 1e-3 for m in norms)
    x = torch.randn(2, *model.pretrained_cfg['input_size'])
    model.train()
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(model(x), first)  # dropout before the classifier is active in training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))  # and off in evaluation
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), model(x))
    pooled = timm.create_model(name, global_pool='fast', num_classes=0).eval()
    with torch.no_grad():
        assert pooled(x).shape == (2, pooled.num_features)


@pytest.mark.parametrize('name', FAMILIES)
def test_channels_last_weights_and_input_change_nothing(name):
    """train.py --channels-last (and the speed harness's flag) converts every 4-d weight, the capsule layers'
    included, and the input: the logits and every gradient stay those of the contiguous model."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()  # eval: BatchNorm's batch statistics would amplify rounding
    x = torch.randn(2, *model.pretrained_cfg['input_size'])
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    model = model.to(memory_format=torch.channels_last)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())  # the conversion happened
    out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5 * expected_grad.abs().max().item())


@pytest.mark.parametrize('name', ['capsnet_resnet_cifar10', 'dynamic_capsnet_resnet_cifar10', 'resnet18_cifar10'])
def test_drop_path_rate_gives_residual_backbones_stochastic_depth(name):
    from timm.layers import DropPath

    rates = [m.drop_prob for m in timm.create_model(name, drop_path_rate=0.2).modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2) and rates == sorted(rates)  # rising with depth, as in timm
    assert not [m for m in timm.create_model(name).modules() if isinstance(m, DropPath)]


@pytest.mark.parametrize(
    'name, kwargs, message',
    [
        ('capsnet_simple_cifar10', dict(drop_path_rate=0.1), 'no residual blocks'),
        ('cnn_baseline_cifar10', dict(drop_path_rate=0.1), 'no residual blocks'),
        ('em_capsnet_simple_cifar10', dict(drop_block_rate=0.1), 'no DropBlock'),
    ],
)
def test_keywords_that_cannot_be_honoured_are_errors(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model(name, **kwargs)


def test_model_data_config_is_the_size_the_model_was_built_for():
    from timm_capsules.base import model_data_config

    config = model_data_config(timm.create_model('capsnet_resnet_cifar10', img_size=48))
    assert config['input_size'] == (3, 48, 48) and config['fixed_input_size'] is True
    assert config['mean'] == (0.4914, 0.4822, 0.4465)
    grey = model_data_config(timm.create_model('resnet18_cifar10', in_chans=1))
    assert grey['input_size'] == (1, 32, 32) and grey['fixed_input_size'] is False
    assert grey['mean'] == pytest.approx(((0.4914 + 0.4822 + 0.4465) / 3,))  # one entry per channel


def test_pretrained_cfg_describes_the_model_as_built():
    """timm's scripts read input_size/mean/std from pretrained_cfg: after img_size= / in_chans= overrides it
    must describe the model that was built (the default cfg is left alone)."""
    model = timm.create_model('capsnet_matrix_multimnist', in_chans=3, img_size=40)
    assert model.pretrained_cfg['input_size'] == (3, 40, 40) and len(model.pretrained_cfg['std']) == 3
    assert timm.create_model('capsnet_matrix_multimnist').pretrained_cfg['input_size'] == (1, 36, 36)
    assert timm.create_model('cnn_baseline_cifar10', img_size=64).pretrained_cfg['input_size'] == (3, 64, 64)
