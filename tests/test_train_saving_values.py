"""Values of timm_capsules/train/saving.py without training: the weights' digest against one computed by hand,
the digests per rank, the saved model read back (config.json, safetensors, labels, normalisation) and the
failed save that leaves the previous model, the push's choice and arguments, and what ``save_results``
writes and hands to the curves."""

import hashlib
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import timm
import timm_capsules  # noqa: F401
from timm_capsules import hub
from timm_capsules.train import saving
from timm_capsules.train.saving import push_to_hub, save_model, save_results, weights_digest, write_digest

ERROR = 'train_accelerate.py: error: '


def tiny():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    model.register_buffer('count', torch.arange(3))
    return model


def test_weights_digest_by_hand():
    model = tiny()
    digest = hashlib.sha256()
    for name in ['0.bias', '0.weight', '1.bias', '1.weight', 'count']:  # sorted by name
        tensor = model.state_dict()[name]
        digest.update(name.encode() + tensor.numpy().tobytes())
    assert weights_digest(model) == digest.hexdigest()
    transposed = tiny()
    with torch.no_grad():  # the same numbers, not contiguous: the digest of the values, not of the storage
        transposed[1].weight = torch.nn.Parameter(transposed[1].weight.detach().t().contiguous().t())
    assert not transposed[1].weight.is_contiguous()
    assert weights_digest(transposed) == digest.hexdigest()
    renamed = torch.nn.Sequential()
    renamed.add_module('a', torch.nn.Linear(2, 3))
    with torch.no_grad():
        renamed.a.weight.copy_(model[0].weight)
        renamed.a.bias.copy_(model[0].bias)
    first = torch.nn.Sequential(model[0])
    assert weights_digest(renamed) != weights_digest(first)  # the names count


def test_write_digest_per_rank(tmp_path):
    model = tiny()
    write_digest(tmp_path / 'new' / 'dir', model, 3)
    assert (tmp_path / 'new' / 'dir' / 'digest_rank3.txt').read_text() == weights_digest(model)
    write_digest(str(tmp_path), model, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['digest_rank0.txt', 'new']


@pytest.fixture(scope='module')
def model():
    return timm.create_model(
        'capsnet_matrix_multimnist',
        backbone_args={'out_chs': 8},
        primary_caps=4,
        pose_dim=4,
        capsule_layers=[('conv', 4, 3, 1)],
    )


def test_save_model_the_timm_way(tmp_path, model):
    save_model(model, str(tmp_path), ['zero', 'one'] + [str(i) for i in range(2, 10)], dict(mean=(0.25,), std=(0.5,)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', 'model.safetensors']
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['label_names'][:3] == ['zero', 'one', '2'] and config['num_classes'] == 10
    assert config['pretrained_cfg']['mean'] == [0.25] and config['pretrained_cfg']['std'] == [0.5]
    saved = load_file(tmp_path / 'model.safetensors')
    assert saved.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved[name], tensor), name
    reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    assert weights_digest(reloaded) == weights_digest(model)
    save_model(model, tmp_path, None, dict(mean=(0.0,), std=(1.0,)))  # no names: none saved
    assert 'label_names' not in json.loads((tmp_path / 'config.json').read_text())
    save_model(model, tmp_path, [], dict(mean=(0.0,), std=(1.0,)))
    assert 'label_names' not in json.loads((tmp_path / 'config.json').read_text())


def test_save_model_clears_a_half_written_one(tmp_path, model):
    (tmp_path / '.tmp_model').mkdir()
    (tmp_path / '.tmp_model' / 'junk.bin').write_text('x')
    save_model(model, tmp_path, None, dict(mean=(0.0,), std=(1.0,)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', 'model.safetensors']


def test_a_failed_save_leaves_the_previous_model(tmp_path, model, monkeypatch):
    save_model(model, tmp_path, None, dict(mean=(0.0,), std=(1.0,)))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = []

    def failing(model, folder, **kwargs):
        calls.append(kwargs)
        (tmp_path / '.tmp_model').mkdir()
        (tmp_path / '.tmp_model' / 'model.safetensors').write_text('half')
        raise RuntimeError('file write failed\nat pos 3')

    monkeypatch.setattr(saving.timm.models, 'save_for_hf', failing)
    with pytest.raises(SystemExit) as stop:
        save_model(model, tmp_path, ['a'], dict(mean=(0.1,), std=(0.2,)))
    assert str(stop.value.code) in (
        f'{ERROR}cannot write {tmp_path / ".tmp_model"}: file write failed; the model was not saved',
        f'{ERROR}no space left on device: {tmp_path / ".tmp_model"}; the model was not saved',
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert calls == [
        dict(model_config=dict(label_names=['a']), safe_serialization=True, data_config=dict(mean=(0.1,), std=(0.2,)))
    ]


def test_save_model_refuses_non_finite_weights(tmp_path):
    model = tiny()
    with torch.no_grad():
        model[0].bias[0] = float('inf')
    with pytest.raises(SystemExit, match='non-finite values'):
        save_model(model, tmp_path, None, dict(mean=(0.0,), std=(1.0,)))
    assert not any(tmp_path.iterdir())


@pytest.fixture
def pushes(monkeypatch):
    calls = []
    monkeypatch.setattr(hub, 'push_checkpoint', lambda *a, **k: calls.append(('hub', a, k)))
    monkeypatch.setattr(timm.models, 'push_to_hf_hub', lambda *a, **k: calls.append(('timm', a, k)))
    return calls


def test_push_to_hub_arguments(tmp_path, pushes):
    paper = timm.create_model('capsnet_simple_cifar10', device='meta')
    push_to_hub(paper, {}, tmp_path, 'me/a', True, ['x'])
    push_to_hub(paper, {'num_classes': 10}, tmp_path, 'me/b', False, None)
    push_to_hub(paper, {'num_classes': 10, 'iterations': 3}, tmp_path, 'me/c', False, [])
    push_to_hub(paper, {'iterations': 3}, tmp_path, 'me/d', False, ['a', 'b'])
    assert pushes[:2] == [
        ('hub', (tmp_path, 'me/a'), dict(private=True)),
        ('hub', (tmp_path, 'me/b'), dict(private=False)),
    ]
    assert pushes[2] == (
        'timm',
        (paper, 'me/c'),
        dict(model_config=None, private=False, safe_serialization=True),
    )
    assert pushes[3] == (
        'timm',
        (paper, 'me/d'),
        dict(model_config=dict(label_names=['a', 'b']), private=False, safe_serialization=True),
    )


def test_push_to_hub_of_a_model_without_a_hub_config(tmp_path, pushes):
    architectures = {cfg['model'] for cfg in hub.list_hub_configs()}
    other = timm.create_model('cnn_baseline_multimnist', device='meta')
    assert other.pretrained_cfg['architecture'] not in architectures
    push_to_hub(other, {}, tmp_path, 'me/cnn', True, None)
    assert [c[0] for c in pushes] == ['timm'] and pushes[0][2]['private'] is True


def test_save_results(tmp_path, model, monkeypatch, pushes):
    curves, references = [], []

    def reference(config, source, processes):
        references.append((config, source, processes))
        return dict(final=dict(exact_match=0.75))

    monkeypatch.setattr(saving, 'cnn_reference_record', reference)
    monkeypatch.setattr(saving, 'plot_curves', lambda *a: curves.append(a))
    config = SimpleNamespace(
        output_dir=str(tmp_path / 'runs' / 'out'),
        model='capsnet_matrix_multimnist',
        dataset='diverse_multimnist',
        push_to_hub=None,
        hub_private=True,
    )
    data = SimpleNamespace(label_names=['a'] * 10, source='sample', chance=0.2)
    history = dict(train=[dict(step=1, loss=float('nan'))], eval=[])
    results = dict(metric='exact_match', history=history, final=dict(exact_match=0.5))
    save_results(config, model, {}, data, dict(mean=(0.5,), std=(0.25,)), results, 2)
    out = tmp_path / 'runs' / 'out'  # made with its parents
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'metrics.json', 'model.safetensors']
    assert json.loads((out / 'metrics.json').read_text()) == dict(
        metric='exact_match',
        history=dict(train=[dict(step=1, loss=None)], eval=[]),
        final=dict(exact_match=0.5),
        non_finite_values=['history.train[0].loss'],
    )
    saved_config = json.loads((out / 'config.json').read_text())
    assert saved_config['pretrained_cfg']['std'] == [0.25] and saved_config['label_names'] == ['a'] * 10
    assert references == [(config, 'sample', 2)]
    assert curves == [
        (
            history,
            out / 'training_curves.png',
            'exact_match',
            'capsnet_matrix_multimnist on diverse_multimnist (sample)',
            0.2,
            ('CNN of similar size, same recipe', 0.75),
        )
    ]
    assert pushes == []
    monkeypatch.setattr(saving, 'cnn_reference_record', lambda *a: None)
    config.push_to_hub = 'me/run'
    save_results(config, model, {'pose_dim': 4}, data, dict(mean=(0.5,), std=(0.25,)), results, 1)
    assert curves[-1][-1] is None
    assert pushes == [
        (
            'timm',
            (model, 'me/run'),
            dict(model_config=dict(label_names=['a'] * 10), private=True, safe_serialization=True),
        )
    ]

    pushed = []
    monkeypatch.setattr(saving, 'push_to_hub', lambda *a: pushed.append(a))
    save_results(config, model, {}, data, dict(mean=(0.5,), std=(0.25,)), results, 1)
    assert pushed == [(model, {}, out, 'me/run', True, ['a'] * 10)]


def test_a_save_that_failed_before_writing_anything(tmp_path, model, monkeypatch):
    def failing(model, folder, **kwargs):
        raise PermissionError(13, 'Permission denied', folder)

    monkeypatch.setattr(saving.timm.models, 'save_for_hf', failing)
    with pytest.raises(SystemExit) as stop:
        save_model(model, tmp_path, None, dict(mean=(0.0,), std=(1.0,)))
    tmp = tmp_path / '.tmp_model'
    assert str(stop.value.code) == (
        f'{ERROR}cannot write {tmp}: [Errno 13] Permission denied: {str(tmp)!r}; the model was not saved'
    )
    assert not any(tmp_path.iterdir())
