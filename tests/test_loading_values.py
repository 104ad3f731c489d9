"""``timm_capsules/loading.py``'s helpers called directly, checked by value: the messages of the config.json reader,
the state-dict check on a hand-made module, the weights-file check, the training command and where each error says
the weights and the config came from. Written for the survivors of a mutmut run (tests/README.md); fast, no Hub."""

import json
import re
import sys

import httpx2
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

import timm_capsules  # noqa: F401
from timm_capsules import loading
from timm_capsules.loading import ConfigError, NonFiniteWeightsWarning, WeightsError

# ---- config.json ------------------------------------------------------------------------------------------


def _write(tmp_path, cfg):
    path = tmp_path / 'config.json'
    path.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    'cfg, message',
    [
        ({'architecture': 'resnet18', 'pretrained_cfg': [1]}, '"pretrained_cfg" must be an object'),
        ({'architecture': 'resnet18', 'model_args': 'x'}, '"model_args" must be an object'),
        ({'architecture': 3}, 'missing "architecture"'),
        ([], 'expected a JSON object'),
        ({'architecture': 'no_such_model'}, "unknown architecture 'no_such_model' (import the package that registers"),
        (b'\xff\xfe{', 'not valid JSON ('),
        ('[' * 100000 + ']' * 100000, 'nested too deeply to be a config.json'),
    ],
)
def test_config_json_reader_names_the_file_and_the_fault(tmp_path, cfg, message):
    path = tmp_path / 'config.json'
    if isinstance(cfg, bytes):
        path.write_bytes(cfg)  # not UTF-8
    else:
        _write(tmp_path, cfg)
    with pytest.raises(ConfigError) as info:
        loading._read_config_json_for_timm(str(path))
    assert str(info.value).startswith(f'{path}: {message}'), str(info.value)


def test_config_json_reader_passes_another_architecture_with_its_own_arguments(tmp_path):
    cfg = {'architecture': 'resnet18', 'model_args': {'layers': [1, 1, 1, 1], 'features_only': True}}
    assert loading._read_config_json_for_timm(_write(tmp_path, cfg)) == cfg  # a build argument is not unknown
    with pytest.raises(ConfigError) as info:
        loading._read_config_json_for_timm(_write(tmp_path, dict(cfg, model_args={'iterations': 3, 'img_size': 32})))
    assert str(info.value) == (
        f"{tmp_path / 'config.json'}: model_args has arguments ['img_size', 'iterations'] that resnet18 (ResNet) "
        'does not take; is "architecture" the model these args are for?'
    )


def test_read_config_json_of_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=f'^{tmp_path}: no config.json$'):
        loading.read_config_json(tmp_path)
    cfg = {'architecture': 'capsnet_simple_cifar10', 'model_args': {}}
    _write(tmp_path, cfg)
    with pytest.raises(ConfigError, match=f'^{tmp_path / "config.json"}: missing "pretrained_cfg" object$'):
        loading.read_config_json(str(tmp_path))
    pretrained_cfg = {'num_classes': 10, 'input_size': [3, 32, 32], 'mean': [0.5] * 3, 'std': [0.25] * 3}
    _write(tmp_path, dict(cfg, pretrained_cfg=dict(pretrained_cfg, label_names=list('abcdefghij')), num_classes=7))
    with pytest.raises(
        ConfigError, match=f'^{tmp_path / "config.json"}: label_names must have num_classes=7 entries, got 10'
    ):
        loading.read_config_json(tmp_path)  # timm's top-level num_classes overrides pretrained_cfg's
    _write(tmp_path, dict(cfg, pretrained_cfg=pretrained_cfg, num_classes=7))
    assert loading.read_config_json(tmp_path)['num_classes'] == 7


# ---- the state dict ---------------------------------------------------------------------------------------


class Tiny(torch.nn.Module):
    """A first conv and a classifier, as timm's pretrained_cfg names them."""

    def __init__(self, num_classes=4, in_chans=3, cfg=None):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        self.stem = torch.nn.Conv2d(in_chans, 2, 2)  # a 2x2 kernel: no side equals the 3 channels
        self.head = torch.nn.Linear(2, num_classes)
        base = dict(num_classes=4, classifier='head', first_conv='stem', input_size=(3, 8, 8), architecture='tiny')
        self.pretrained_cfg = {**base, **(cfg or {})}


def _message(state_dict, model):
    with pytest.raises(WeightsError) as info:
        loading.check_state_dict(state_dict, model)
    return str(info.value)


def test_state_dict_adaptations_timm_makes_are_accepted():
    source = Tiny().state_dict()
    assert loading.check_state_dict(source, Tiny()) is source
    # another num_classes: the classifier is dropped, anything under 'head.' may differ or be missing
    other_head = {k: v for k, v in source.items() if not k.startswith('head.')}
    assert loading.check_state_dict(other_head, Tiny(num_classes=6)) is other_head
    assert loading.check_state_dict(dict(other_head, **{'head.weight': torch.zeros(9, 9)}), Tiny(num_classes=6))
    # another in_chans: the first conv's input channels (3 in the checkpoint) may differ, nothing else
    assert loading.check_state_dict(source, Tiny(in_chans=1))
    assert loading.check_state_dict(source, Tiny(in_chans=1, cfg=dict(input_size=None)))  # timm's default: 3
    model = Tiny(in_chans=1, cfg=dict(input_size=(1, 8, 8)))  # the checkpoint said 1 channel, it has 3
    assert 'stem.weight: checkpoint (2, 3, 2, 2), model (2, 1, 2, 2)' in _message(source, model)


def test_state_dict_mismatches_are_listed_by_kind():
    source = Tiny().state_dict()
    model = Tiny(cfg=dict(file='/w/model.safetensors'))
    broken = dict(source, **{'head.weight': torch.zeros(4, 3), 'stem.bias': 'oops', 'extra': torch.zeros(1)})
    del broken['head.bias']
    broken = {'extra': broken.pop('extra'), **broken}  # every name is checked, after one that is not the model's
    assert _message(broken, model) == (
        'the weights from /w/model.safetensors do not fit tiny (built with 4 classes, 3 input channels):'
        '\n  shape mismatches (2):\n    stem.bias: not a tensor (str)\n    head.weight: checkpoint (4, 3), model (4, 2)'
        '\n  missing from the checkpoint (1):\n    head.bias'
        '\n  not in the model (1):\n    extra'
    )
    bare = Tiny()
    del bare.pretrained_cfg, bare.num_classes, bare.in_chans
    assert _message({}, bare).startswith(
        'the weights from the checkpoint do not fit Tiny (built with ? classes, ? input channels):'
        '\n  missing from the checkpoint (4):'
    )
    # the first conv's own shape must still fit in every other way, and only the first conv may change
    wrong_out = dict(source, **{'stem.weight': torch.zeros(5, 3, 2, 2)})
    assert 'stem.weight: checkpoint (5, 3, 2, 2), model (2, 1, 2, 2)' in _message(wrong_out, Tiny(in_chans=1))
    wrong_kernel = dict(source, **{'stem.weight': torch.zeros(2, 3, 1, 2)})
    assert 'stem.weight: checkpoint (2, 3, 1, 2), model (2, 1, 2, 2)' in _message(wrong_kernel, Tiny(in_chans=1))
    flat = dict(source, **{'stem.weight': torch.zeros(2, 3, 4)})
    assert 'stem.weight: checkpoint (2, 3, 4), model (2, 1, 2, 2)' in _message(flat, Tiny(in_chans=1))


# a list names its first 20 entries and counts the rest
MORE = {1: '', 20: '', 21: ' and 1 more', 23: ' and 3 more'}


@pytest.mark.parametrize('count', sorted(MORE))
def test_long_lists_of_tensors_are_cut_at_20(tmp_path, count):
    names = [f't{i:02d}' for i in range(count)]
    source = Tiny().state_dict()
    message = _message(dict(source, **{name: torch.zeros(1) for name in names}), Tiny(cfg=dict(hf_hub_id='a/b')))
    more = ['...' + MORE[count]] if MORE[count] else []
    assert message == (
        'the weights from a/b do not fit tiny (built with 4 classes, 3 input channels):'
        f'\n  not in the model ({count}):\n    ' + '\n    '.join(names[:20] + more)
    )
    # under an adapted classifier ('head.' when num_classes differs) no name is unexpected, and each is checked
    nan = {f'head.{name}': torch.full((1,), float('nan')) for name in names}
    with pytest.warns(NonFiniteWeightsWarning) as record:
        loading.check_state_dict(dict(source, **nan), Tiny(num_classes=6, cfg=dict(hf_hub_id='a/b')))
    shown = ', '.join(f'head.{name}' for name in names[:20]) + MORE[count]
    assert [str(w.message) for w in record] == [
        f'a/b: {count} tensor(s) hold NaN or infinity (a diverged run?): {shown}'
    ]
    path = tmp_path / 'model.safetensors'
    save_file(dict(nan, ok=torch.zeros(2, 3)), path)
    with pytest.raises(WeightsError) as info:
        loading.check_weights_file(path)
    assert str(info.value) == f'{path}: {count} tensor(s) hold NaN or infinity (a diverged run?): {shown}'


@pytest.mark.parametrize(
    'cfg, source',
    [
        (dict(file='/w/m.safetensors', hf_hub_id='a/b'), '/w/m.safetensors'),
        (dict(hf_hub_id='a/b'), 'a/b'),
        ({}, 'the checkpoint'),
    ],
)
def test_non_finite_weights_warning_names_the_source_and_the_caller(cfg, source):
    weights = Tiny().state_dict()
    weights['stem.bias'][0] = float('nan')
    callers = []

    class Seen(Tiny):  # check_state_dict asks the model for its state_dict itself: note who called it
        def state_dict(self, *args, **kwargs):
            frame = sys._getframe(2)
            callers.append((frame.f_code.co_filename, frame.f_lineno))
            return super().state_dict(*args, **kwargs)

    with pytest.warns(NonFiniteWeightsWarning) as record:
        loading.check_state_dict(weights, Seen(cfg=cfg))
    assert [str(w.message) for w in record] == [
        f'{source}: 1 tensor(s) hold NaN or infinity (a diverged run?): stem.bias'
    ]
    # stacklevel=2: the line that asked for the check; this test's, unless a wrapper (mutmut's trampoline) is between
    assert (record[0].filename, record[0].lineno) == callers[0] and callers[0][0] != loading.__file__
    assert record[0].filename == __file__ or 'mutmut' in callers[0][0]


def test_non_finite_tensors_and_a_readable_weights_file(tmp_path):
    assert loading.non_finite_tensors(
        {'i': torch.tensor([1]), 'f': torch.tensor([1.0]), 'n': -torch.tensor([1.0]) / 0}
    ) == ['n']
    path = tmp_path / 'model.safetensors'
    save_file({'a': torch.zeros(2, 3), 'b': torch.zeros(4, dtype=torch.int64)}, path)
    assert loading.check_weights_file(str(path)) == {'a': (2, 3), 'b': (4,)}
    with pytest.raises(WeightsError, match=f'^{re.escape(str(tmp_path / "none"))}: not a readable safetensors file'):
        loading.check_weights_file(tmp_path / 'none')


# ---- where things came from, and what to do -----------------------------------------------------------------


def test_training_command():
    assert loading.training_command('capsnet_simple_cifar10') == (
        'accelerate launch train_accelerate.py --preset cifar10_simple --output_dir <output_dir>'
    )
    assert loading.training_command('capsnet_simple_cifar10', 'mine') == (
        'accelerate launch train_accelerate.py --preset mine --output_dir <output_dir>'
    )
    assert loading.training_command('resnet18') == (
        'accelerate launch train_accelerate.py --model resnet18 --output_dir <output_dir>'
    )


def test_weights_and_config_locations():
    assert loading._weights_location({'source': 'local-dir', 'file': '/w'}) == '/w'
    assert loading._weights_location({'file': '/w', 'hf_hub_id': 'a/b'}) == '/w'
    assert loading._weights_location({'hf_hub_id': 'a/b'}) == 'Hub repo a/b (cached file model.safetensors)'
    assert loading._weights_location({}) == 'the checkpoint'
    assert loading._config_location({'source': 'local-dir', 'file': '/w'}) == '/w/config.json'
    assert loading._config_location({'source': 'hf-hub', 'hf_hub_id': 'a/b'}) == 'config.json of hf-hub:a/b'


@pytest.mark.parametrize('offline', [True, False])
def test_why_the_hub_gave_no_weights(monkeypatch, offline):
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', offline)
    response = httpx2.Response(404, request=httpx2.Request('GET', 'https://huggingface.co/a/b'))
    mode = 'HF_HUB_OFFLINE=1' if offline else 'the Hub cannot be reached'
    reasons = {
        LocalEntryNotFoundError('x'): f'{mode} and the Hugging Face cache ({constants.HF_HUB_CACHE}) does not hold a/b',
        GatedRepoError('x', response=response): None,
        RepositoryNotFoundError('x', response=response): 'the Hub has no repo a/b',
        RevisionNotFoundError('x', response=response): 'the Hub repo a/b has no such revision',
        EntryNotFoundError('x'): 'the Hub repo a/b holds no weights file',
        OSError('x'): None,
    }
    for error, reason in reasons.items():
        assert loading._not_found_reason(error, 'a/b') == reason, type(error)
