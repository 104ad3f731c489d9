"""The Hub side, end to end and offline: a briefly trained model is pushed with --dry-run, the folder is
placed in a hand-made Hugging Face cache (HF_HUB_OFFLINE=1), and every way of loading it gives the
original model back, although its hub config still says "not yet published". Plus: model cards, the README
table, hub_configs, config.json validation and the integrity errors."""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

import timm
from timm.models import save_for_hf

import timm_capsules  # noqa: F401
from timm_capsules import hub, hub_cards, loading
from timm_capsules.loading import ConfigError, WeightsError, WeightsNotPublishedError
from timm_capsules.presets import get_preset

from hub_cache import offline_hub_cache

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / 'hub_configs'
TAGS = sorted(p.stem for p in CONFIG_DIR.glob('*.json'))
OUR_TAGS = sorted(
    name for name in timm.list_models(module='capsnet', pretrained=True)
    if timm.models.get_pretrained_cfg(name).hf_hub_id)


def _train_few_steps(name: str, steps: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    channels, height, width = model.pretrained_cfg['input_size']
    model.train()
    for _ in range(steps):
        x = torch.randn(2, channels, height, width)
        y = torch.randint(0, model.num_classes, (2,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(before['head.fc.weight'], model.state_dict()['head.fc.weight'])  # it did train
    return model.eval()


class Published:
    """A trained model, its checkpoint folder, its dry-run upload folder and a Hub cache holding it."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.tag = timm.models.get_pretrained_cfg(name).tag
        self.full_tag = f'{name}.{self.tag}'
        self.repo_id = f'timm-capsules/{self.full_tag}'
        self.model = _train_few_steps(name)
        self.checkpoint = root / 'checkpoint'
        save_for_hf(self.model, self.checkpoint, safe_serialization=True)
        self.dry_run = hub.push_checkpoint(self.checkpoint, self.repo_id, dry_run=root / 'upload')
        self.cache = root / 'hub_cache'
        self.snapshot = hub.install_in_cache(self.dry_run, self.repo_id, self.cache)
        channels, height, width = self.model.pretrained_cfg['input_size']
        self.x = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.logits = self.model(self.x)
            self.features = self.model.forward_features(self.x)


@pytest.fixture(scope='module')
def simple(tmp_path_factory) -> Published:
    return Published(tmp_path_factory.mktemp('simple'), 'capsnet_simple_cifar10')


@pytest.fixture(scope='module')
def resnet(tmp_path_factory) -> Published:
    return Published(tmp_path_factory.mktemp('resnet'), 'capsnet_resnet_cifar10')


@pytest.fixture
def offline(simple):
    with offline_hub_cache(simple.cache):
        yield simple


def _copy_repo(published: Published, folder: Path) -> Path:
    shutil.copytree(published.dry_run, folder)
    return folder


# ---- the dry-run folder ------------------------------------------------------------------------------


def test_dry_run_folder_is_exactly_what_is_published(simple):
    names = sorted(p.name for p in simple.dry_run.iterdir())
    assert names == ['README.md', 'config.json', 'model.safetensors']  # no pickle anywhere
    weights = load_file(simple.dry_run / 'model.safetensors')
    original = simple.model.state_dict()
    assert weights.keys() == original.keys()
    assert all(torch.equal(weights[k], original[k]) for k in original)
    config = json.loads((simple.dry_run / 'config.json').read_text())
    assert config['architecture'] == simple.name and config['num_classes'] == 10
    assert config['pretrained_cfg']['classifier'] == ['head.capsules', 'head.fc']
    card = hub_cards.validate_card((simple.dry_run / 'README.md').read_text(), hub.load_hub_config(simple.full_tag))
    assert card.data.library_name == 'timm' and 'not yet published' not in card.text


def test_cache_layout(simple):
    repo = simple.cache / 'models--timm-capsules--capsnet_simple_cifar10.cifar10'
    commit = (repo / 'refs' / 'main').read_text()
    assert len(commit) == 40 and int(commit, 16) >= 0
    assert sorted(p.name for p in (repo / 'snapshots' / commit).iterdir()) == ['README.md', 'config.json', 'model.safetensors']


def test_dry_run_refuses_a_non_empty_folder(simple, tmp_path):
    (tmp_path / 'stale.bin').write_bytes(b'x')
    with pytest.raises(FileExistsError, match=f'{tmp_path} is not empty'):
        hub.push_checkpoint(simple.checkpoint, dry_run=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['stale.bin']  # nothing written next to it


# ---- loading: pretrained=True, hf-hub:, local-dir: ------------------------------------------------------


@pytest.mark.parametrize('source', ['registry', 'registry_tag', 'hf-hub', 'local-dir', 'checkpoint'])
def test_pretrained_gives_the_original_logits(offline, source):
    """The cached weights load although the installed hub config still says "not yet published": the Hub
    (here its offline cache) decides, so weights published later load with today's package."""
    assert hub.load_hub_config(offline.full_tag)['status'] == hub.NOT_PUBLISHED
    name = {
        'registry': offline.name,
        'registry_tag': offline.full_tag,
        'hf-hub': f'hf-hub:{offline.repo_id}',
        'local-dir': f'local-dir:{offline.dry_run}',
        'checkpoint': f'local-dir:{offline.checkpoint}',
    }[source]
    model = timm.create_model(name, pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(offline.x), offline.logits)
        assert torch.equal(model.forward_routing(offline.x).logits, offline.logits)


@pytest.mark.parametrize('source', ['registry', 'hf-hub'])
def test_num_classes_change_adapts_only_the_head(offline, source):
    name = offline.name if source == 'registry' else f'hf-hub:{offline.repo_id}'
    model = timm.create_model(name, pretrained=True, num_classes=5).eval()
    original = offline.model.state_dict()
    for key, value in model.state_dict().items():
        if key in ('head.capsules.weight', 'head.fc.weight', 'head.fc.bias'):
            continue  # timm drops the classifier ('head.capsules', 'head.fc') when num_classes changes
        assert torch.equal(value, original[key]), key
    assert model.head.capsules.weight.shape[1] == 5
    with torch.no_grad():
        assert torch.equal(model.forward_features(offline.x), offline.features)
        assert model(offline.x).shape == (2, 5)
    pooled = timm.create_model(name, pretrained=True, num_classes=0).eval()
    with torch.no_grad():
        assert torch.equal(pooled(offline.x), offline.model.forward_head(offline.features, pre_logits=True))


def _check_in_chans_1(model, published):
    original = published.model.state_dict()
    first = published.model.pretrained_cfg['first_conv'] + '.weight'
    for key, value in model.state_dict().items():
        if key == first:  # timm's adapt_input_conv: 3 -> 1 channel sums the RGB filters
            torch.testing.assert_close(value, original[key].sum(dim=1, keepdim=True))
        else:
            assert torch.equal(value, original[key]), key
    gray = published.x[:, :1]
    with torch.no_grad():
        torch.testing.assert_close(model(gray), published.model(gray.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('source', ['registry', 'local-dir'])
def test_in_chans_change_adapts_only_the_first_conv(offline, source):
    name = offline.name if source == 'registry' else f'local-dir:{offline.dry_run}'
    _check_in_chans_1(timm.create_model(name, pretrained=True, in_chans=1).eval(), offline)


def test_resnet_backbone_round_trip(resnet):
    """BatchNorm buffers, a bias-free first conv ('backbone.conv1') and both adaptations."""
    with offline_hub_cache(resnet.cache):
        model = timm.create_model(resnet.name, pretrained=True).eval()
        with torch.no_grad():
            assert torch.equal(model(resnet.x), resnet.logits)
        _check_in_chans_1(timm.create_model(f'hf-hub:{resnet.repo_id}', pretrained=True, in_chans=1).eval(), resnet)
        adapted = timm.create_model(resnet.name, pretrained=True, in_chans=1, num_classes=3).eval()
        assert adapted.head.capsules.weight.shape[1] == 3


def test_features_only_pretrained(offline):
    features = timm.create_model(offline.name, pretrained=True, features_only=True).eval()
    with torch.no_grad():
        expected = offline.model.forward_intermediates(offline.x, intermediates_only=True)
        got = features(offline.x)
    assert len(got) == len(expected) >= 3
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


# ---- weights that are not there ------------------------------------------------------------------------


def _follow_the_advice(message: str, output_dir: Path) -> torch.nn.Module:
    call = message[message.index('timm.create_model('):].split(', or use')[0]
    assert call == "timm.create_model('local-dir:<output_dir>', pretrained=True)"
    return eval(call.replace('<output_dir>', str(output_dir)), {'timm': timm})


@pytest.mark.parametrize('tag', TAGS)
def test_weights_not_in_the_cache_say_how_to_train_them(tag, simple, tmp_path):
    cfg = hub.load_hub_config(tag)
    with offline_hub_cache(tmp_path / 'empty_cache'):
        with pytest.raises(WeightsNotPublishedError) as info:
            timm.create_model(cfg['model'], pretrained=True)
    message = str(info.value)
    assert f'no pretrained weights for {tag}: HF_HUB_OFFLINE=1 and the Hugging Face cache' in message
    assert str(tmp_path / 'empty_cache') in message and cfg['repo_id'] in message
    assert f"accelerate launch train_accelerate.py --preset {cfg['training']['preset']} --output_dir <output_dir>" in message
    if cfg['model'] == simple.name:  # the advice, followed to the letter, loads what the training command writes
        with torch.no_grad():
            assert torch.equal(_follow_the_advice(message, simple.checkpoint).eval()(simple.x), simple.logits)


@pytest.mark.parametrize('name, preset', [('resnet18_cifar10', 'cifar10_resnet18'),
                                          ('dynamic_capsnet_simple_cifar100', 'cifar100_dynamic_simple')])
def test_every_family_says_how_to_train_missing_weights(name, preset, tmp_path):
    with offline_hub_cache(tmp_path):
        with pytest.raises(WeightsNotPublishedError, match=f'--preset {preset} --output_dir'):
            timm.create_model(name, pretrained=True)


def test_a_cached_repo_without_weights_is_not_published(simple, tmp_path):
    folder = _copy_repo(simple, tmp_path / 'repo')
    (folder / 'model.safetensors').unlink()
    hub.install_in_cache(folder, simple.repo_id, tmp_path / 'cache')
    with offline_hub_cache(tmp_path / 'cache'):
        with pytest.raises(WeightsNotPublishedError, match=f'no pretrained weights for {simple.full_tag}'):
            timm.create_model(simple.name, pretrained=True)


# ---- integrity -----------------------------------------------------------------------------------------


def _corrupt(path: Path, how: str):
    data = path.read_bytes()
    path.unlink()  # the cache snapshot may hard-link the dry-run file: never write through the link
    if how == 'truncated':
        path.write_bytes(data[:len(data) // 2])
    else:  # a damaged header
        path.write_bytes(b'\xff' * 8 + data[8:])


@pytest.mark.parametrize('how', ['truncated', 'corrupted'])
def test_unreadable_weights_give_a_clear_error(simple, tmp_path, how):
    repo = _copy_repo(simple, tmp_path / 'repo')
    _corrupt(repo / 'model.safetensors', how)
    with pytest.raises(WeightsError, match='corrupted or truncated') as info:
        timm.create_model(f'local-dir:{repo}', pretrained=True)
    assert str(repo) in str(info.value)
    cache = tmp_path / 'cache'
    snapshot = hub.install_in_cache(repo, simple.repo_id, cache)
    with offline_hub_cache(cache):
        with pytest.raises(WeightsError, match=f'{simple.repo_id}.*corrupted or truncated'):
            timm.create_model(simple.name, pretrained=True)
    with pytest.raises(WeightsError, match='corrupted or truncated'):
        hub.check_checkpoint(snapshot)


def test_weights_of_another_architecture_are_rejected(simple, tmp_path):
    repo = _copy_repo(simple, tmp_path / 'repo')
    other = timm.create_model('capsnet_simple_cifar100')  # 128-ch backbone, 6x6 poses, 20 + 100 capsules
    (repo / 'model.safetensors').unlink()
    save_file(other.state_dict(), repo / 'model.safetensors')
    with pytest.raises(WeightsError) as info:
        timm.create_model(f'local-dir:{repo}', pretrained=True)
    message = str(info.value)
    assert 'shape mismatches' in message
    assert 'backbone.conv.weight: checkpoint (128, 3, 3, 3), model (256, 3, 3, 3)' in message
    assert 'capsule_layers.2.weight' in message and 'not in the model' in message


def test_missing_and_renamed_tensors_are_listed_even_when_the_head_is_adapted(simple, tmp_path):
    repo = _copy_repo(simple, tmp_path / 'repo')
    weights = load_file(repo / 'model.safetensors')
    weights['capsule_layers.0.norm.gain'] = weights.pop('capsule_layers.0.norm.weight')
    del weights['primary.norm.bias']
    (repo / 'model.safetensors').unlink()
    save_file(weights, repo / 'model.safetensors')
    # num_classes=5 makes timm load non-strictly: without our check these would be silently random
    with pytest.raises(WeightsError) as info:
        timm.create_model(f'local-dir:{repo}', pretrained=True, num_classes=5)
    message = str(info.value)
    assert 'missing from the checkpoint (2)' in message
    assert 'capsule_layers.0.norm.weight' in message and 'primary.norm.bias' in message
    assert 'not in the model (1)' in message and 'capsule_layers.0.norm.gain' in message


MALFORMED = {  # case: (how to break config.json, what the error says[, what it says when loading])
    'num_classes is a string': (lambda c: c.update(num_classes='ten'), "num_classes must be an int >= 0, got 'ten'"),
    'input_size has two entries': (
        lambda c: (c['pretrained_cfg'].update(input_size=[3, 32]), c['model_args'].pop('img_size')),
        r'input_size must be \[channels, height, width\] of positive ints, got [\[(]3, 32[\])]'),  # timm: tuple
    'mean has the wrong length': (lambda c: c['pretrained_cfg'].update(mean=[0.5, 0.5]),
                                  r'mean must hold 3 numbers \(one per input channel\), got [\[(]0.5, 0.5[\])]'),
    'label_names has the wrong length': (lambda c: c['pretrained_cfg'].update(label_names=['cat', 'dog']),
                                         'label_names must have num_classes=10 entries, got 2'),
    'unknown model argument': (lambda c: c['model_args'].update(capsule_magic=3),
                               r"model_args has unknown arguments \['capsule_magic'\] \(CapsNet takes \["),
    'model_args in_chans disagrees': (  # timm builds for 4 channels first, so loading trips over the mean
        lambda c: c['model_args'].update(in_chans=4), r'model_args.in_chans=4 disagrees with input_size\[0\]=3',
        r'mean must hold 4 numbers'),
    'iterations is not an int': (lambda c: c['model_args'].update(iterations='2'),
                                 "model_args.iterations must be int, got '2'"),
    'iterations is huge': (lambda c: c['model_args'].update(iterations=10 ** 9),
                           'model_args.iterations must be between 1 and 64, got 1000000000'),
    'backbone is unknown': (lambda c: c['model_args'].update(backbone='resnet9000'),
                            "model_args.backbone must be 'simple', 'resnet' or a timm model name, got 'resnet9000'"),
    'backbone_args is a list': (lambda c: c['model_args'].update(backbone_args=[256]),
                                r'model_args.backbone_args must be Optional\[Dict\[str, Any\]\], got \[256\]'),
    'capsule layer of an unknown kind': (
        lambda c: c['model_args'].update(capsule_layers=[['conv', 32, 3, 2], ['pool', 32]]),
        r"model_args.capsule_layers: each layer is \['conv', capsules, kernel, stride\] or \['fc', capsules\], "
        r"got \['pool', 32\]"),
    'capsule layer with a negative size': (lambda c: c['model_args'].update(capsule_layers=[['conv', -32, 3, 2]]),
                                           r"model_args.capsule_layers: sizes must be positive, got \['conv', -32, 3, 2\]"),
    'no primary capsules': (lambda c: c['model_args'].update(primary_caps=0),
                            'model_args.primary_caps must be positive, got 0'),
    'backbone without channels': (lambda c: c['model_args'].update(backbone_args={'out_chs': 0}),
                                  'model_args.backbone_args.out_chs must be positive, got 0'),
    'negative padding': (lambda c: c['model_args'].update(primary_padding=-1),
                         'model_args.primary_padding must not be negative, got -1'),
    'global_pool is unknown': (lambda c: c['model_args'].update(global_pool='median'),
                               "model_args.global_pool: unknown pool type 'median'"),
    'max_votes is zero': (lambda c: c['model_args'].update(max_votes=0), 'model_args.max_votes must be positive, got 0'),
    'img_size is negative': (  # timm copies img_size into input_size before any model code runs
        lambda c: c['model_args'].update(img_size=[-32, 32]), r'model_args.img_size must be positive, got \[-32, 32\]',
        r'input_size must be \[channels, height, width\] of positive ints, got [\[(]3, -32, 32[\])]'),
    'device is set': (lambda c: c['model_args'].update(device='cuda'), r"model_args must not set \['device'\]"),
    'dtype is set': (lambda c: c['model_args'].update(dtype='float16'), r"model_args must not set \['dtype'\]"),
    'drop_rate above one': (lambda c: c['model_args'].update(drop_rate=1.5),
                            r'model_args.drop_rate must be in \[0, 1\], got 1.5'),
    # right types and ranges, but no such model: the constructor's own objection, naming the file
    'capsule stack too large for the grid': (
        lambda c: c['model_args'].update(capsule_layers=[['conv', 32, 17, 1]]),
        'its model_args do not build capsnet_simple_cifar10: input size .* too small for the capsule stack'),
}


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_malformed_config_is_rejected_before_weights_are_read(simple, tmp_path, case):
    repo = _copy_repo(simple, tmp_path / 'repo')
    config = json.loads((repo / 'config.json').read_text())
    breaks, message, *load_message = MALFORMED[case]
    breaks(config)
    (repo / 'config.json').write_text(json.dumps(config))
    _corrupt(repo / 'model.safetensors', 'corrupted')  # reading the weights first would raise WeightsError
    with pytest.raises(ConfigError, match=f'{repo / "config.json"}: .*{(load_message or [message])[0]}'):
        timm.create_model(f'local-dir:{repo}', pretrained=True)
    with pytest.raises(ConfigError, match=f'config.json.*{message}'):
        hub.check_checkpoint(repo)


UNPARSEABLE = {  # case: (config.json text from the original, the error)
    'unknown architecture': (lambda c: json.dumps(dict(c, architecture='capsnet_does_not_exist')),
                             r"unknown architecture 'capsnet_does_not_exist' \(import the package"),
    'not json': (lambda c: '{"architecture": "capsnet_simple_cifar10",',
                 r'not valid JSON \(Expecting property name enclosed in double quotes: line 1 column 43'),
    'not an object': (lambda c: '["capsnet_simple_cifar10"]', 'expected a JSON object'),
    'no architecture': (lambda c: json.dumps({k: v for k, v in c.items() if k != 'architecture'}),
                        'missing "architecture"'),
    'model_args is a list': (lambda c: json.dumps(dict(c, model_args=[1])), '"model_args" must be an object'),
}


@pytest.mark.parametrize('source', ['local-dir', 'hf-hub'])
@pytest.mark.parametrize('case', sorted(UNPARSEABLE))
def test_unparseable_config_names_the_file(simple, tmp_path, case, source):
    """timm parses config.json before any model code runs; the error still names the file."""
    repo = _copy_repo(simple, tmp_path / 'repo')
    config = json.loads((repo / 'config.json').read_text())
    text, message = UNPARSEABLE[case]
    (repo / 'config.json').write_text(text(config))
    _corrupt(repo / 'model.safetensors', 'corrupted')  # reading the weights first would raise WeightsError
    if source == 'local-dir':
        path = repo / 'config.json'
        with pytest.raises(ConfigError, match=f'^{path}: {message}'):
            timm.create_model(f'local-dir:{repo}', pretrained=True)
        with pytest.raises(ConfigError, match=f'^{path}: {message}'):
            hub.check_checkpoint(repo)
    else:
        path = hub.install_in_cache(repo, 'someone/broken', tmp_path / 'cache') / 'config.json'
        with offline_hub_cache(tmp_path / 'cache'):
            with pytest.raises(ConfigError, match=f'^{path}: {message}'):
                timm.create_model('hf-hub:someone/broken', pretrained=True)


def test_valid_config_json_reads_as_before(simple):
    """The reader that names broken files gives timm exactly what json.load gives for a valid one."""
    from timm.models import _hub
    path = simple.dry_run / 'config.json'
    assert _hub.load_cfg_from_json(path) == json.loads(path.read_text())
    assert _hub.load_cfg_from_json is loading._read_config_json_for_timm


def test_model_argument_types_come_from_the_constructor():
    validate = loading.validate_model_args
    validate({'iterations': 3, 'img_size': [32, 40], 'capsule_layers': [['conv', 8, 3, 1], ['fc', 4]],
              'backbone_args': {'out_chs': 64}, 'max_votes': None, 'global_pool': 'fast'}, 'capsnet_simple_cifar10')
    # a family whose class passes **kwargs on to timm's ResNet: the base class's arguments count too
    validate({'layers': [1, 1, 1, 1], 'num_classes': 3, 'drop_rate': 0.2}, 'resnet18_cifar10', 'x.json')
    with pytest.raises(ConfigError, match=r"^x.json: model_args.block must be .*, got 'BasicBlock'"):
        validate({'block': 'BasicBlock'}, 'resnet18_cifar10', 'x.json')  # a class: nothing JSON can hold
    with pytest.raises(ConfigError, match=r'model_args.layers must be Tuple\[int, \.\.\.\], got \[1, 1.5\]'):
        validate({'layers': [1, 1.5]}, 'resnet18_cifar10', 'x.json')
    with pytest.raises(ConfigError, match=r"unknown arguments \['iterations'\] \(BaselineCNN takes"):
        validate({'iterations': 2}, 'cnn_baseline_cifar10', 'x.json')
    with pytest.raises(ConfigError, match=r'model_args.matrix_pose must be bool, got 1'):
        validate({'matrix_pose': 1}, 'capsnet_simple_cifar10', 'x.json')
    validate({'global_pool': None, 'drop_rate': 0.0, 'bn_eps': 1e-5, 'bn_momentum': 0.1}, 'cnn_baseline_cifar10')
    for args, message in [({'bn_eps': 0.0}, 'bn_eps must be positive, got 0.0'),
                          ({'drop_rate': -0.1}, 'drop_rate must not be negative, got -0.1'),
                          ({'bn_momentum': 2.0}, r'bn_momentum must be in \[0, 1\], got 2.0'),
                          ({'head_hidden_size': 0}, 'head_hidden_size must be positive, got 0')]:
        with pytest.raises(ConfigError, match=f'^x.json: model_args.{message}$'):
            validate(args, 'cnn_baseline_cifar10', 'x.json')


def test_config_and_constructor_share_the_iterations_bound():
    """config.json validation refuses exactly what the constructor refuses (one bound, no drift)."""
    from timm_capsules.capsnet import CapsNet
    top = loading.MAX_ITERATIONS
    loading.validate_model_args({'iterations': top}, 'capsnet_simple_cifar10')
    assert CapsNet(backbone_args={'out_chs': 8}, iterations=top, device='meta').iterations == top
    with pytest.raises(ConfigError, match=f'must be between 1 and {top}, got {top + 1}'):
        loading.validate_model_args({'iterations': top + 1}, 'capsnet_simple_cifar10')
    with pytest.raises(ValueError, match=f'iterations must be between 1 and {top}, got {top + 1}'):
        CapsNet(backbone_args={'out_chs': 8}, iterations=top + 1, device='meta')


def _package_imports(name):
    """The modules of the package that ``timm_capsules/<name>.py`` imports (any import, also inside functions)."""
    ours = set()
    for node in ast.walk(ast.parse((ROOT / 'timm_capsules' / f'{name}.py').read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or '').startswith('timm_capsules')):
            ours.add(node.module)
        elif isinstance(node, ast.Import):
            ours.update(alias.name for alias in node.names if alias.name.startswith('timm_capsules'))
    return ours


def test_loading_imports_no_model_module():
    """The model files import loading.py; it imports nothing of the package but the config checks, the presets
    and the memory budget, and those import nothing but the memory budget, which imports nothing of ours: no
    import cycle."""
    assert _package_imports('loading') == {'config_checks', 'presets', 'memory_budget'}
    assert _package_imports('config_checks') == {'memory_budget'}
    assert _package_imports('presets') == _package_imports('memory_budget') == set()


def test_pickle_checkpoints_are_not_published(simple, tmp_path):
    folder = tmp_path / 'pickled'
    save_for_hf(simple.model, folder, safe_serialization=False)  # pytorch_model.bin only
    with pytest.raises(WeightsError, match='pickle'):
        hub.check_checkpoint(folder)
    with pytest.raises(WeightsError, match='pickle'):
        hub.push_checkpoint(folder, dry_run=tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_push_rejects_a_checkpoint_that_is_not_the_carded_model(simple, tmp_path):
    model = timm.create_model(simple.name, iterations=3)  # same parameters, different routing
    save_for_hf(model, tmp_path / 'ckpt', safe_serialization=True)
    with pytest.raises(ConfigError, match='routing iterations'):
        hub.push_checkpoint(tmp_path / 'ckpt', dry_run=tmp_path / 'out')


def _with_non_finite(published: Published, folder: Path) -> Path:
    repo = _copy_repo(published, folder)
    weights = load_file(repo / 'model.safetensors')
    weights['primary.norm.bias'][3] = float('nan')
    weights['capsule_layers.1.weight'][0, 0, 0] = float('-inf')
    (repo / 'model.safetensors').unlink()
    save_file(weights, repo / 'model.safetensors')
    return repo


def test_check_and_push_reject_non_finite_weights(simple, tmp_path, capsys):
    repo = _with_non_finite(simple, tmp_path / 'diverged')
    assert hub.main(['check', '--checkpoint', str(repo)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {repo / 'model.safetensors'}: 2 tensor(s) hold NaN or infinity (a diverged run?): "
                   f"capsule_layers.1.weight, primary.norm.bias\n")
    out = tmp_path / 'upload'
    with pytest.raises(WeightsError, match=r'2 tensor\(s\) hold NaN or infinity .*: capsule_layers.1.weight, primary.norm.bias'):
        hub.push_checkpoint(repo, config=simple.full_tag, dry_run=out)
    assert not out.exists()  # nothing staged


def test_cli_never_ends_in_a_traceback(simple, tmp_path, capsys):
    """Model arguments of the right type that the constructor still refuses, or any other failure: one error
    line, exit 2."""
    missing = tmp_path / 'no_such_folder'
    assert hub.main(['cache', '--folder', str(missing), '--repo-id', 'a/b', '--cache-dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {missing}: FileNotFoundError: ') and err.count('\n') == 1
    repo = _copy_repo(simple, tmp_path / 'repo')
    config = json.loads((repo / 'config.json').read_text())
    config['model_args']['pose_dim'] = 15  # matrix poses need a square pose dimension
    (repo / 'config.json').write_text(json.dumps(config))
    assert hub.main(['check', '--checkpoint', str(repo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {repo / 'config.json'}: its model_args do not build capsnet_simple_cifar10: ")
    assert err.count('\n') == 1 and 'Traceback' not in err


# ---- real push (HfApi replaced: no network) ----------------------------------------------------------


def test_push_uploads_the_dry_run_folder_and_marks_the_tag_published(simple, tmp_path, monkeypatch):
    import huggingface_hub

    uploaded = {}

    class FakeApi:
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

        def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None):
            uploaded.update(repo_id=repo_id, files={p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
            return type('Commit', (), {'oid': 'a' * 40, 'commit_url': 'https://example/commit'})()

    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    config = tmp_path / f'{simple.full_tag}.json'
    shutil.copy(CONFIG_DIR / config.name, config)
    hub.main(['push', '--config', str(config), '--checkpoint', str(simple.checkpoint)])
    assert uploaded['repo_id'] == simple.repo_id
    assert uploaded['files'] == {p.name: p.read_bytes() for p in simple.dry_run.iterdir()}
    written = json.loads(config.read_text())
    assert written['status'] == hub.PUBLISHED and written['hub_commit'] == 'a' * 40
    assert json.loads((CONFIG_DIR / config.name).read_text())['status'] == hub.NOT_PUBLISHED  # untouched


# ---- command line: python -m timm_capsules.hub ----------------------------------------------------------


def _cells(table: str, tag: str) -> list:
    row = next(line for line in table.splitlines() if line.startswith(f'| `{tag}` |'))
    return [cell.strip() for cell in row.strip('|').split('|')]


def test_cli_record_reaches_config_card_and_readme_table(tmp_path, monkeypatch, capsys):
    configs = tmp_path / 'hub_configs'
    shutil.copytree(CONFIG_DIR, configs)
    monkeypatch.setenv(hub.CONFIG_DIR_ENV, str(configs))
    config = configs / 'capsnet_resnet_cifar10.cifar10.json'
    # mean 93.5567 rounds up to 93.56, sample std 0.4600 (the population std would be 0.38)
    assert hub.main(['record', '--config', str(config), '--top1', '93.10', '93.55', '94.02',
                     '--checkpoint-top1', '93.55']) == 0
    results = json.loads(config.read_text())['results']
    expected = dict(per_seed=[93.10, 93.55, 94.02], num_seeds=3, mean=93.56, std=0.46, best=94.02, checkpoint=93.55)
    assert {key: results[key] for key in expected} == expected
    assert json.loads(capsys.readouterr().out) == results  # it prints what it wrote

    card_path = tmp_path / 'card.md'
    assert hub.main(['card', '--config', str(config), '--published', '--output', str(card_path)]) == 0
    card = ModelCard(card_path.read_text())
    assert card.data.eval_results[0].metric_value == 93.55  # the uploaded weights' accuracy, not the best seed
    assert '| 93.56 ± 0.46 | 94.02 | 3 | 93.55 |' in card.text

    readme = tmp_path / 'README.md'
    readme.write_text(f'# intro\n\n{hub.TABLE_BEGIN}\n| stale |\n{hub.TABLE_END}\n\nafter\n')
    assert hub.main(['table', '--check', str(readme)]) == 1
    assert capsys.readouterr().out == 'README model table is out of date\n'
    assert '| stale |' in readme.read_text()  # --check never writes
    assert hub.main(['table', '--write', str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f'# intro\n\n{hub.TABLE_BEGIN}\n| tag |') and text.endswith(f'{hub.TABLE_END}\n\nafter\n')
    assert _cells(text, 'capsnet_resnet_cifar10.cifar10') == [
        '`capsnet_resnet_cifar10.cifar10`', 'CIFAR-10', '1,828,817', '2', 'not yet published', 'top-1 accuracy (%)',
        '93.56 ± 0.46 (94.02), 3', '94.85 (95.14)', '`--preset cifar10_resnet`']
    assert _cells(text, 'capsnet_simple_cifar10.cifar10')[6] == '—'  # nothing recorded there
    capsys.readouterr()
    assert hub.main(['table', '--check', str(readme)]) == 0
    assert hub.main(['table']) == 0
    printed = capsys.readouterr().out
    assert printed.endswith(f'{hub.TABLE_END}\n') and printed.split(hub.TABLE_BEGIN)[1] in text


def test_cli_check_says_ok_or_names_the_bad_tensor(simple, tmp_path, capsys):
    assert hub.main(['check', '--checkpoint', str(simple.checkpoint)]) == 0
    assert capsys.readouterr().out == f'{simple.checkpoint}: OK (capsnet_simple_cifar10, 561,297 params)\n'
    bad = _copy_repo(simple, tmp_path / 'bad')
    weights = load_file(bad / 'model.safetensors')
    weights['backbone.conv.weight'] = weights['backbone.conv.weight'][:128].contiguous()
    del weights['primary.norm.bias']
    (bad / 'model.safetensors').unlink()
    save_file(weights, bad / 'model.safetensors')
    result = subprocess.run([sys.executable, '-m', 'timm_capsules.hub', 'check', '--checkpoint', str(bad)],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert result.returncode == 2 and result.stdout == '' and 'Traceback' not in result.stderr, result.stderr
    assert result.stderr.startswith('error: ') and str(bad) in result.stderr
    assert 'shape mismatches (1):\n    backbone.conv.weight: checkpoint (128, 3, 3, 3), model (256, 3, 3, 3)' in result.stderr
    assert 'missing from the checkpoint (1):\n    primary.norm.bias' in result.stderr


def test_cli_cache_makes_a_folder_loadable_offline(simple, tmp_path, capsys):
    cache = tmp_path / 'cache'
    assert hub.main(['cache', '--folder', str(simple.dry_run), '--repo-id', 'someone/my-capsnet',
                     '--cache-dir', str(cache)]) == 0
    snapshot = Path(capsys.readouterr().out.strip())
    repo = cache / 'models--someone--my-capsnet'
    assert snapshot.parent == repo / 'snapshots' and (repo / 'refs' / 'main').read_text() == snapshot.name
    for name in ('README.md', 'config.json', 'model.safetensors'):
        assert (snapshot / name).read_bytes() == (simple.dry_run / name).read_bytes()
    with offline_hub_cache(cache):  # HF_HUB_OFFLINE=1: only the cache can answer
        model = timm.create_model('hf-hub:someone/my-capsnet', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(simple.x), simple.logits)


# ---- hub_configs, cards, README table ----------------------------------------------------------------


def test_every_published_tag_has_a_hub_config():
    assert TAGS == OUR_TAGS and len(TAGS) == 6
    for tag in TAGS:
        cfg = hub.load_hub_config(tag)
        assert timm.models.get_pretrained_cfg(tag).hf_hub_id == cfg['repo_id'] == f'timm-capsules/{tag}'


@pytest.mark.parametrize('tag', TAGS)
def test_hub_config_describes_the_registered_model(tag):
    cfg = hub.load_hub_config(tag)
    model = timm.create_model(cfg['model'], device='meta')
    assert sum(p.numel() for p in model.parameters()) == cfg['architecture']['params']
    assert model.iterations == cfg['architecture']['routing_iterations']
    assert list(model.pretrained_cfg['input_size']) == cfg['architecture']['input_size']
    assert model.num_classes == cfg['dataset']['num_classes']
    assert cfg['license'] == 'apache-2.0' == model.pretrained_cfg['license']
    assert cfg['results']['mean'] is None and cfg['results']['num_seeds'] is None  # nothing trained yet


def test_paper_results_are_the_papers():
    paper = {tag: hub.load_hub_config(tag)['paper_results'] for tag in TAGS}
    assert (paper['capsnet_resnet_cifar10.cifar10']['mean'], paper['capsnet_resnet_cifar10.cifar10']['best']) == (94.85, 95.14)
    assert (paper['capsnet_resnet_cifar100.cifar100']['mean'], paper['capsnet_resnet_cifar100.cifar100']['best']) == (76.27, 78.02)


@pytest.mark.parametrize('tag', TAGS)
@pytest.mark.parametrize('published', [False, True])
def test_cards_render_and_parse(tag, published):
    cfg = hub.load_hub_config(tag)
    text = hub.render_card(cfg, published=published)
    card = ModelCard(text)
    assert card.data.library_name == 'timm' and card.data.license == 'apache-2.0'
    assert card.data.pipeline_tag == 'image-classification'
    assert card.data.datasets == cfg['dataset']['hub_ids'] and 'capsule-network' in card.data.tags
    assert card.data.eval_results is None  # no measured accuracy exists yet
    assert ('not yet published' in card.text) is not published
    command = loading.training_command(cfg['model'], cfg['training']['preset'])
    assert command == f"accelerate launch train_accelerate.py --preset {cfg['training']['preset']} --output_dir <output_dir>"
    for needle in ('forward_routing', 'features_only=True', 'RoutingTrace', f"{cfg['architecture']['params']:,}",
                   command, 'Capsules with Inverted Dot-Product Attention Routing'):
        assert needle in card.text
    paper = cfg['paper_results']
    if paper['best'] is not None:
        assert f"{paper['mean']:.2f}" in card.text and f"{paper['best']:.2f}" in card.text


def test_recorded_results_reach_card_and_table(tmp_path):
    config = tmp_path / 'capsnet_resnet_cifar10.cifar10.json'
    shutil.copy(CONFIG_DIR / config.name, config)
    cfg = hub.record_results(config, [94.61, 94.93, 95.02], checkpoint=95.02)
    assert cfg['results'] == dict(cfg['results'], num_seeds=3, mean=94.85, std=0.22, best=95.02)
    card = ModelCard(hub.render_card(config, published=True))
    assert card.data.eval_results[0].metric_value == 95.02
    assert '94.85 ± 0.22' in card.text
    row = [line for line in hub.render_model_table([cfg]).splitlines() if 'capsnet_resnet_cifar10' in line][0]
    assert '94.85 ± 0.22 (95.02), 3' in row and '1,828,817' in row
    # a summary typed in by hand that disagrees with the per-seed numbers is rejected
    cfg['results']['best'] = 96.0
    with pytest.raises(ConfigError, match='per_seed'):
        hub.validate_hub_config(cfg)


def test_readme_model_table_is_generated_from_hub_configs():
    readme = (ROOT / 'README.md').read_text()
    table = hub.readme_table(readme)
    assert table is not None, (
        f'README.md needs the model table between {hub.TABLE_BEGIN} and {hub.TABLE_END}: '
        f'python -m timm_capsules.hub table')
    assert table == hub.render_model_table(), 'README model table is stale: python -m timm_capsules.hub table --write README.md'
    for tag in TAGS:
        assert f'`{tag}`' in table


@pytest.mark.parametrize('tag', TAGS)
def test_card_recipe_is_the_preset(tag):
    """The card states the recipe of the preset its hub config names, read from timm_capsules.presets."""
    cfg = hub.load_hub_config(tag)
    text = ModelCard(hub.render_card(cfg)).text
    training = text[text.index('- **Training:**'):text.index('## Model Usage')]
    preset = get_preset(cfg['training']['preset'])
    assert preset['model'] == cfg['model']
    for key, value in preset.items():
        if key not in ('model', 'dataset'):
            assert f'\n  - {key}: {value}\n' in training, key
    loss = 'binary cross-entropy per class' if 'multimnist' in tag else 'cross-entropy'
    assert f'\n  - loss: {loss}\n' in training
    mean = list(timm.models.get_pretrained_cfg(tag).mean)
    assert f'\n  - mean: {mean}\n' in training


def test_hub_config_training_section_names_a_preset_of_its_model(tmp_path):
    cfg = hub.load_hub_config('capsnet_resnet_cifar10.cifar10')
    assert cfg['training'] == {'preset': 'cifar10_resnet'}  # the recipe itself lives in timm_capsules.presets
    with pytest.raises(ConfigError, match=r"training.preset must be one of timm_capsules.presets.PRESETS, got 'c10'"):
        hub.validate_hub_config(dict(cfg, training={'preset': 'c10'}))
    with pytest.raises(ConfigError, match="training.preset 'cifar10_simple' trains 'capsnet_simple_cifar10', not 'capsnet_resnet_cifar10'"):
        hub.validate_hub_config(dict(cfg, training={'preset': 'cifar10_simple'}))


# ---- other families: the tooling is not CapsNet-only -------------------------------------------------


def _family_hub_config(name: str, model: torch.nn.Module) -> dict:
    tag = timm.models.get_pretrained_cfg(name).tag
    base = hub.load_hub_config('capsnet_simple_cifar10.cifar10')
    return dict(
        base, tag=f'{name}.{tag}', model=name, repo_id=f'timm-capsules/{name}.{tag}',
        architecture=dict(params=sum(p.numel() for p in model.parameters()), input_size=[3, 32, 32],
                          routing_iterations=getattr(model, 'iterations', None)),
        training={'preset': 'cifar10_em_simple' if name.startswith('em_') else 'cifar10_cnn'})


@pytest.mark.parametrize('name', ['em_capsnet_simple_cifar10', 'cnn_baseline_cifar10'])
def test_other_families_are_carded_pushed_and_loaded(name, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    cfg = _family_hub_config(name, model)
    configs = tmp_path / 'hub_configs'
    configs.mkdir()
    (configs / f"{cfg['tag']}.json").write_text(json.dumps(cfg))
    monkeypatch.setenv(hub.CONFIG_DIR_ENV, str(configs))
    save_for_hf(model, tmp_path / 'checkpoint', safe_serialization=True)
    upload = hub.push_checkpoint(tmp_path / 'checkpoint', dry_run=tmp_path / 'upload')
    card = ModelCard((upload / 'README.md').read_text())
    assert card.text.lstrip().startswith(f"# Model card for {cfg['tag']}") and ('forward_routing' in card.text) is False
    assert f"--preset {cfg['training']['preset']} --output_dir" in card.text
    row = hub.render_model_table().splitlines()[2]
    iterations = '—' if cfg['architecture']['routing_iterations'] is None else '3'
    assert row.startswith(f"| `{cfg['tag']}` | CIFAR-10 | {cfg['architecture']['params']:,} | {iterations} |")
    hub.install_in_cache(upload, cfg['repo_id'], tmp_path / 'cache')
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with offline_hub_cache(tmp_path / 'cache'), torch.no_grad():
        assert torch.equal(timm.create_model(name, pretrained=True).eval()(x), model(x))
