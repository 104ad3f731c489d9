"""``timm_capsules/config_checks.py`` called directly, checked by value: which JSON values stand for which type
hint, every range and its exact message, the checkpoint fields, and the memory budget's message. Written for the
survivors of a mutmut run (tests/README.md); fast, nothing is built but on the meta device."""

import collections.abc
import typing
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import pytest
import torch

import timm_capsules  # noqa: F401
from timm_capsules import config_checks as checks
from timm_capsules.capsnet import CapsNet
from timm_capsules.config_checks import ConfigError

CAPSNET = 'capsnet_simple_cifar10'


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    return str(info.value)


# ---- what the model classes accept ------------------------------------------------------------------------


def test_architectures_and_their_classes():
    ours = checks.our_architectures()
    assert CAPSNET in ours and 'resnet18_cifar10' in ours and 'resnet18' not in ours
    assert all(name.startswith(('capsnet_', 'dynamic_', 'em_', 'cnn_', 'resnet18_')) for name in ours)
    assert checks.model_class(CAPSNET) is CapsNet


class Base:
    def __init__(self, depth: int = 2, width=8, name=None, **kwargs):
        pass


class Passes(Base):
    def __init__(self, *layers, depth: float = 0.5, scale: 'NoSuchType' = 1, **kwargs):  # noqa: F821
        super().__init__(**kwargs)


class Closed(Base):
    def __init__(self, alpha: bool = True):
        super().__init__()


def test_constructor_parameters_follow_kwargs_up_the_bases():
    # the subclass's own hint and default win; unresolvable annotations count as Any, missing ones as the
    # default's type; *args is no argument
    assert checks._constructor_parameters(Passes) == {
        'depth': (float, 0.5),
        'scale': (int, 1),
        'width': (int, 8),
        'name': (Any, None),
    }
    assert checks._constructor_parameters(Closed) == {'alpha': (bool, True)}


def test_type_names():
    assert checks._type_name(int) == 'int'
    assert checks._type_name(Optional[Dict[str, Any]]) == 'Optional[Dict[str, Any]]'
    assert checks._type_name(Tuple[int, ...]) == 'Tuple[int, ...]'


@pytest.mark.parametrize(
    'hint, good, bad',
    [
        (Any, [None, 'x', [1]], []),
        (type(None), [None], [0, '']),
        (Optional[int], [None, 3], [3.0, True]),
        (int | str, [3, 'x'], [None, 1.5]),
        (Literal['a', 'b'], ['a', 'b'], ['c', None]),
        (bool, [True, False], [1, 0, None]),
        (int, [0, -3], [True, 1.0, '1']),
        (float, [0, 1.5, -2], [True, float('nan'), float('inf'), '1']),
        (str, ['', 'x'], [1, None]),
        (Tuple[int, ...], [[], [1, 2, 3], (1,)], [[1, 'x'], 1, 'ab']),
        (Tuple[str, int], [['a', 1], ('a', 1)], [['a'], ['a', 1, 2], [1, 'a'], 'a1']),
        (List[int], [[1, 2], (3,)], [[1.5], 'ab', {1: 2}]),
        (Sequence[int], [[1, 2]], [[None], 1]),
        (Dict[str, int], [{}, {'a': 1}], [{'a': 'b'}, [['a', 1]]]),
        (Mapping[str, Any], [{'a': None}], [[1]]),
        (collections.abc.Callable, [], ['relu', None]),
        (CapsNet, [], [{}, 'CapsNet']),
    ],
)
def test_which_json_values_stand_for_a_hint(hint, good, bad):
    assert all(checks._matches(value, hint) for value in good), hint
    assert not any(checks._matches(value, hint) for value in bad), hint


def test_dict_keys_must_be_strings():
    assert not checks._matches({1: 1}, Dict[str, int])
    assert checks._matches({'a': 1}, typing.Dict)


# ---- ranges -------------------------------------------------------------------------------------------------


def _numbers(name, value, in_list=False):
    return _error(checks._check_numbers, f'arg.{name}', name, value, 'w', in_list)


def test_numbers_by_name():
    passes = [
        ('num_classes', 0),
        ('primary_padding', 0),
        ('backbone_out_index', 0),
        ('pose_dim', 1),
        ('pose_dim', 2**16),
        ('max_votes', 2**40),
        ('bn_eps', 1e-9),
        ('drop_rate', 0.0),
        ('drop_rate', 1.0),
        ('bn_momentum', 1.0),
        ('scale', 3.5),
        ('flag', True),
        ('name', 'x'),
        ('sizes', [0] * 256),
        ('args', {f'k{i}': 1 for i in range(256)}),
    ]
    for name, value in passes:
        checks._check_numbers(f'arg.{name}', name, value, 'w')
    checks._check_numbers('arg.layers', 'layers', [0, 2**16], 'w', in_list=False)  # entries of a list may be 0
    assert _numbers('pose_dim', 0) == 'w: arg.pose_dim must be positive, got 0'
    assert _numbers('pose_dim', 2**16 + 1) == 'w: arg.pose_dim must be at most 65536, got 65537'
    assert _numbers('num_classes', -1) == 'w: arg.num_classes must not be negative, got -1'
    assert _numbers('stem_padding', -1) == 'w: arg.stem_padding must not be negative, got -1'
    assert _numbers('out_index', -1) == 'w: arg.out_index must not be negative, got -1'
    assert _numbers('pose_dim', -1, in_list=True) == 'w: arg.pose_dim must not be negative, got -1'
    assert _numbers('max_votes', 2**40 + 1) == f'w: arg.max_votes must be at most {2**40}, got {2**40 + 1}'
    assert _numbers('bn_eps', 0.0) == 'w: arg.bn_eps must be positive, got 0.0'
    assert _numbers('scale', -0.5) == 'w: arg.scale must not be negative, got -0.5'
    assert _numbers('drop_rate', 1.5) == 'w: arg.drop_rate must be in [0, 1], got 1.5'
    assert _numbers('bn_momentum', 1.01) == 'w: arg.bn_momentum must be in [0, 1], got 1.01'
    assert _numbers('sizes', [1] * 257) == 'w: arg.sizes must hold at most 256 entries, got 257'
    assert _numbers('args', {f'k{i}': 1 for i in range(257)}) == 'w: arg.args must hold at most 256 entries, got 257'
    assert _numbers('args', {'out_chs': 0}) == 'w: arg.args.out_chs must be positive, got 0'
    assert _numbers('args', {'stem_padding': -1}) == 'w: arg.args.stem_padding must not be negative, got -1'
    assert _numbers('sizes', [[1, -1]]) == 'w: arg.sizes must not be negative, got -1'


def _range(name, value):
    return _error(checks._check_range, name, value, 'w')


def test_ranges_the_types_cannot_say():
    for name, value in [
        ('iterations', 1),
        ('iterations', 64),
        ('img_size', 1),
        ('img_size', [1, 2]),
        ('capsule_layers', [['conv', 1, 1, 1], ['fc', 1]]),
        ('global_pool', None),
        ('global_pool', 'max'),
        ('backbone', 'simple'),
        ('backbone', 'resnet'),
        ('backbone', 'resnet18'),
    ]:
        checks._check_range(name, value, 'w')
    assert _range('iterations', 0) == 'w: model_args.iterations must be between 1 and 64, got 0'
    assert _range('iterations', 65) == 'w: model_args.iterations must be between 1 and 64, got 65'
    assert _range('img_size', 0) == 'w: model_args.img_size must be positive, got 0'
    assert _range('img_size', [4, 0]) == 'w: model_args.img_size must be positive, got [4, 0]'
    shape = "w: model_args.capsule_layers: each layer is ['conv', capsules, kernel, stride] or ['fc', capsules], got "
    assert _range('capsule_layers', [['conv', 1, 1]]) == shape + "['conv', 1, 1]"
    assert _range('capsule_layers', [['fc', 1, 1, 1]]) == shape + "['fc', 1, 1, 1]"
    assert _range('capsule_layers', [['pool', 1]]) == shape + "['pool', 1]"
    sizes = 'w: model_args.capsule_layers: sizes must be positive, got '
    assert _range('capsule_layers', [['fc', 1], ['conv', 4, 0, 1]]) == sizes + "['conv', 4, 0, 1]"
    assert _range('capsule_layers', [['fc', 0]]) == sizes + "['fc', 0]"
    assert _range('global_pool', 'median') == "w: model_args.global_pool: unknown pool type 'median'"
    assert _range('backbone', 'resnet9000') == (
        "w: model_args.backbone must be 'simple', 'resnet' or a timm model name, got 'resnet9000'"
    )
    # then the numbers inside, with the argument's own name
    assert _range('primary_padding', -1) == 'w: model_args.primary_padding must not be negative, got -1'
    assert _range('img_size', 2**16 + 1) == 'w: model_args.img_size must be at most 65536, got 65537'


def test_model_args_name_type_and_placement():
    checks.validate_model_args({}, CAPSNET)
    assert _error(checks.validate_model_args, [], CAPSNET, 'w') == 'w: "model_args" must be an object'
    assert _error(checks.validate_model_args, {'dtype': 'x', 'device': 'y'}, CAPSNET) == (
        "config.json: model_args must not set ['device', 'dtype']: where a model lives and its precision are chosen "
        'when loading (create_model(..., device=, dtype=)), not by a checkpoint'
    )
    unknown = _error(checks.validate_model_args, {'zeta': 1, 'alpha': 2}, 'cnn_baseline_cifar10', 'w')
    assert unknown.startswith("w: model_args has unknown arguments ['alpha', 'zeta'] (BaselineCNN takes ['bn_eps', ")
    long = [['fc', 1]] * 257
    assert _error(checks.validate_model_args, {'capsule_layers': long}, CAPSNET, 'w') == (
        'w: model_args.capsule_layers must hold at most 256 entries, got 257'
    )
    assert _error(checks.validate_model_args, {'backbone_args': {str(i): 1 for i in range(257)}}, CAPSNET, 'w') == (
        'w: model_args.backbone_args must hold at most 256 entries, got 257'
    )
    assert _error(checks.validate_model_args, {'iterations': 2.0}, CAPSNET, 'w') == (
        'w: model_args.iterations must be int, got 2.0'
    )
    assert _error(checks.validate_model_args, {'iterations': 99}, CAPSNET, 'w').endswith('between 1 and 64, got 99')


# ---- the checkpoint's fields ----------------------------------------------------------------------------------

GOOD = dict(num_classes=2, input_size=[1, 8, 8], mean=[0.5], std=[0.25])


def _checkpoint(model_args=None, architecture=None, **changes):
    cfg = {k: v for k, v in dict(GOOD, **changes).items() if v is not ...}
    return _error(checks.validate_checkpoint_config, cfg, model_args, architecture, 'w')


def test_checkpoint_fields():
    checks.validate_checkpoint_config(dict(GOOD))
    checks.validate_checkpoint_config(dict(GOOD, num_classes=0, label_names=[], classifier=['a', 'b'], first_conv='c'))
    checks.validate_checkpoint_config(dict(GOOD, label_names={'0': 'a', '1': 'b'}, std=(1,)), {'num_classes': 2})
    checks.validate_checkpoint_config(dict(GOOD, input_size=(3, 2**16, 1), mean=[0] * 3, std=[1] * 3), {'in_chans': 3})
    assert _error(checks.validate_checkpoint_config, [], None, None, 'w') == 'w: pretrained_cfg must be an object'
    assert _checkpoint(architecture='resnet18').startswith(
        "w: unknown architecture 'resnet18' (timm_capsules has ['capsnet_matrix_multimnist', "
    )
    for value in (..., -1, True, 2.0):
        assert (
            _checkpoint(num_classes=value)
            == f'w: num_classes must be an int >= 0, got {value if value is not ... else None!r}'
        )
    assert _checkpoint(num_classes=2**16 + 1) == 'w: num_classes must be at most 65536, got 65537'
    for value in (..., [1, 8], (1, 8, 8, 8), [1, 8, 0], [1, 8.0, 8], '1,8,8'):
        shown = None if value is ... else value
        assert _checkpoint(input_size=value) == (
            f'w: input_size must be [channels, height, width] of positive ints, got {shown!r}'
        )
    assert _checkpoint(input_size=[1, 8, 2**16 + 1]) == 'w: input_size entries must be at most 65536, got [1, 8, 65537]'
    for key in ('mean', 'std'):
        for value in (..., [0.5, 0.5], [float('nan')], ['0.5'], 0.5):
            shown = None if value is ... else value
            assert _checkpoint(**{key: value}) == f'w: {key} must hold 1 numbers (one per input channel), got {shown!r}'
    assert _checkpoint(std=[0]) == 'w: std must be positive'
    assert _checkpoint(std=[-1]) == 'w: std must be positive'
    assert _checkpoint(label_names=['a']) == 'w: label_names must have num_classes=2 entries, got 1'
    assert _checkpoint(label_names='ab') == 'w: label_names must have num_classes=2 entries, got 2'
    for key in ('classifier', 'first_conv'):
        for value in (3, ['a', 3], {'a': 'b'}):
            assert _checkpoint(**{key: value}) == f'w: {key} must be a module name or a list of them, got {value!r}'
    assert _checkpoint({'num_classes': 3}) == 'w: model_args.num_classes=3 disagrees with num_classes=2'
    assert _checkpoint({'in_chans': 3}) == 'w: model_args.in_chans=3 disagrees with input_size[0]=1'
    assert _checkpoint({'iterations': 0}, CAPSNET) == 'w: model_args.iterations must be between 1 and 64, got 0'


# ---- the memory budget ------------------------------------------------------------------------------------------


def test_memory_estimate_builds_on_the_meta_device_without_downloading():
    built = []

    class Model(CapsNet):
        def __init__(self, backbone_pretrained=True, **kwargs):
            built.append((backbone_pretrained, kwargs.get('device')))
            super().__init__(**kwargs)

    kwargs = dict(backbone_args={'out_chs': 8}, backbone_pretrained=True, device='cpu', dtype='x', other=1)
    weights, activations = checks.estimate_model_memory(Model, kwargs, (3, 32, 32))
    assert built == [(False, 'meta')]
    model = CapsNet(backbone_args={'out_chs': 8})
    assert weights == sum(p.numel() * 4 for p in model.state_dict().values())
    assert activations > 0


def test_memory_budget_message(monkeypatch):
    kwargs = dict(backbone_args={'out_chs': 8}, img_size=[32, 32], iterations=2, max_votes=4, drop_rate=0.0)
    weights, activations = checks.estimate_model_memory(CapsNet, kwargs)
    budget = weights / 2**30 * 1.01
    monkeypatch.setenv(checks.MEMORY_LIMIT_ENV, str(budget))  # the parameters fit, the activations do not
    message = _error(checks.check_memory_budget, CapsNet, kwargs, 'w')
    assert message == (
        f'w: model_args ask for {weights / 2**30:.3g} GiB of parameters and {activations / 2**30:.3g} GiB of '
        f'activations for one image, over the memory budget of {budget:.3g} GiB (set TIMM_CAPSULES_MEMORY_LIMIT_GB to '
        'allow more); its size arguments: backbone_args={"out_chs": 8}, img_size=[32, 32], iterations=2'
    )
    named = _error(checks.check_memory_budget, CapsNet, kwargs, 'w', (3, 32, 32), named={'iterations': 2})
    assert named.endswith('its size arguments: iterations=2')
    monkeypatch.setenv(checks.MEMORY_LIMIT_ENV, str(2**-30))  # one byte  # the parameters alone are over it
    assert _error(checks.check_memory_budget, CapsNet, kwargs, 'w').startswith(
        f'w: model_args ask for {weights / 2**30:.3g} GiB of parameters, over the memory budget of 9.31e-10 GiB (set'
    )
    monkeypatch.setenv(checks.MEMORY_LIMIT_ENV, str((weights + activations) / 2**30))
    checks.check_memory_budget(CapsNet, kwargs, 'w')  # exactly the budget fits
    monkeypatch.setenv(checks.MEMORY_LIMIT_ENV, '-1')
    assert _error(checks.check_memory_budget, CapsNet, kwargs, 'w') == (
        "TIMM_CAPSULES_MEMORY_LIMIT_GB='-1': expected a positive number of GiB"
    )


# ---- written for the survivors of the second run ----------------------------------------------------------------


def test_checkpoint_defaults_and_edges():
    # the file named by default; num_classes and every input size may be exactly MAX_SIZE
    assert _error(checks.validate_checkpoint_config, dict(GOOD, num_classes=-1)) == (
        'config.json: num_classes must be an int >= 0, got -1'
    )
    checks.validate_checkpoint_config(dict(GOOD, num_classes=2**16))


class FirstChannel(torch.nn.Module):
    """No ``device`` argument, no ``in_chans`` or ``img_size``: the estimate reads the input size it is given."""

    def __init__(self, width: int = 2):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, width, 3)

    def forward(self, x):
        return self.conv(x[:, :1])


class NoMeta(FirstChannel):
    def forward(self, x):
        raise NotImplementedError('no meta kernel')


def test_memory_estimate_of_a_model_without_device_argument_reads_the_input_size():
    weights = 4 * (2 * 9 + 2)  # the conv's float32 weight and bias
    small = checks.estimate_model_memory(FirstChannel, {'width': 2, 'device': 'cpu'}, (1, 8, 8))
    large = checks.estimate_model_memory(FirstChannel, {'width': 2}, (3, 32, 32))
    default = checks.estimate_model_memory(FirstChannel, {})  # timm's 3 x 224 x 224
    assert small[0] == large[0] == default[0] == weights
    # the output (2 x 6 x 6 floats) at least; more pixels, more bytes
    assert 4 * 2 * 6 * 6 <= small[1] < large[1] < default[1]
    assert checks.estimate_model_memory(NoMeta, {}) == (weights, None)


def test_memory_budget_with_the_input_size_and_without_activations(monkeypatch):
    weights, activations = checks.estimate_model_memory(FirstChannel, {}, (1, 8, 8))
    monkeypatch.setenv(checks.MEMORY_LIMIT_ENV, str((weights + activations) / 2**30))
    checks.check_memory_budget(FirstChannel, {}, 'w', (1, 8, 8))  # fits at 8 x 8, not at the default 224 x 224
    assert _error(checks.check_memory_budget, FirstChannel, {}, 'w').startswith('w: model_args ask for ')
    monkeypatch.setenv(checks.MEMORY_LIMIT_ENV, str(weights / 2**30))  # no activations told: the weights alone count
    checks.check_memory_budget(NoMeta, {}, 'w')


def test_memory_budget_names_the_size_arguments(monkeypatch):
    monkeypatch.setenv(checks.MEMORY_LIMIT_ENV, str(2**-30))
    named = dict(capsule_layers=[['fc', 10]], img_size=8, backbone_args={'out_chs': 8}, max_votes=4, drop_rate=0.5)
    assert _error(checks.check_memory_budget, CapsNet, {'backbone_args': {'out_chs': 8}}, 'w', named=named).endswith(
        'its size arguments: backbone_args={"out_chs": 8}, capsule_layers=[["fc", 10]], img_size=8'
    )


class Middle(Base):  # no constructor of its own: the walk goes on to Base's
    pass


class Leaf(Middle):
    def __init__(self, plain, *, size: int = 3, **kwargs):
        super().__init__(**kwargs)


def test_constructor_parameters_past_a_class_without_constructor_and_without_defaults():
    # an argument without annotation or default is Any with no default
    assert checks._constructor_parameters(Leaf) == {
        'plain': (Any, None),
        'size': (int, 3),
        'depth': (int, 2),
        'width': (int, 8),
        'name': (Any, None),
    }


def test_type_name_of_a_type_variable():
    assert checks._type_name(typing.TypeVar('T')) == '~T'  # str(), as for every hint that is not a plain class
    assert checks._type_name(list[int]) == 'list[int]'


def test_numbers_inside_lists_keep_the_argument_s_name():
    assert _numbers('bn_eps', [1e-5, 0.0]) == 'w: arg.bn_eps must be positive, got 0.0'
    assert _numbers('drop_rate', [0.5, 1.5]) == 'w: arg.drop_rate must be in [0, 1], got 1.5'
    checks._check_numbers('arg.max_votes', 'max_votes', [2**40, 0], 'w')
    assert _numbers('max_votes', [2**40 + 1]) == f'w: arg.max_votes must be at most {2**40}, got {2**40 + 1}'


def test_model_args_lists_may_hold_exactly_the_most_entries():
    checks.validate_model_args({'capsule_layers': [['fc', 1]] * 256}, CAPSNET)
