"""Loading, offline: a briefly trained model is pushed with --dry-run, the folder is placed in a hand-made
Hugging Face cache (HF_HUB_OFFLINE=1), and every way of loading it (``pretrained=True``, ``hf-hub:``,
``local-dir:``) gives the original model back, although its hub config still says "not yet published". Plus
what ``timm_capsules/loading.py`` checks: weights that are not there, config.json validation and the integrity
errors."""

import ast
import json
from pathlib import Path

import pytest
import timm
import torch
from hub_cache import offline_hub_cache
from hub_published import ROOT, TAGS, copy_repo
from safetensors.torch import load_file, save_file

import timm_capsules  # noqa: F401
from timm_capsules import hub, loading
from timm_capsules.loading import ConfigError, WeightsError, WeightsNotPublishedError

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
    call = message[message.index('timm.create_model(') :].split(', or use')[0]
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
    assert (
        f'accelerate launch train_accelerate.py --preset {cfg["training"]["preset"]} --output_dir <output_dir>'
        in message
    )
    if cfg['model'] == simple.name:  # the advice, followed to the letter, loads what the training command writes
        with torch.no_grad():
            assert torch.equal(_follow_the_advice(message, simple.checkpoint).eval()(simple.x), simple.logits)


@pytest.mark.parametrize(
    'name, preset',
    [('resnet18_cifar10', 'cifar10_resnet18'), ('dynamic_capsnet_simple_cifar100', 'cifar100_dynamic_simple')],
)
def test_every_family_says_how_to_train_missing_weights(name, preset, tmp_path):
    with offline_hub_cache(tmp_path):
        with pytest.raises(WeightsNotPublishedError, match=f'--preset {preset} --output_dir'):
            timm.create_model(name, pretrained=True)


def test_a_cached_repo_without_weights_is_not_published(simple, tmp_path):
    folder = copy_repo(simple, tmp_path / 'repo')
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
        path.write_bytes(data[: len(data) // 2])
    else:  # a damaged header
        path.write_bytes(b'\xff' * 8 + data[8:])


@pytest.mark.parametrize('how', ['truncated', 'corrupted'])
def test_unreadable_weights_give_a_clear_error(simple, tmp_path, how):
    repo = copy_repo(simple, tmp_path / 'repo')
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
    repo = copy_repo(simple, tmp_path / 'repo')
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
    repo = copy_repo(simple, tmp_path / 'repo')
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
        r'input_size must be \[channels, height, width\] of positive ints, got [\[(]3, 32[\])]',
    ),  # timm: tuple
    'mean has the wrong length': (
        lambda c: c['pretrained_cfg'].update(mean=[0.5, 0.5]),
        r'mean must hold 3 numbers \(one per input channel\), got [\[(]0.5, 0.5[\])]',
    ),
    'label_names has the wrong length': (
        lambda c: c['pretrained_cfg'].update(label_names=['cat', 'dog']),
        'label_names must have num_classes=10 entries, got 2',
    ),
    'unknown model argument': (
        lambda c: c['model_args'].update(capsule_magic=3),
        r"model_args has unknown arguments \['capsule_magic'\] \(CapsNet takes \[",
    ),
    'model_args in_chans disagrees': (  # timm builds for 4 channels first, so loading trips over the mean
        lambda c: c['model_args'].update(in_chans=4),
        r'model_args.in_chans=4 disagrees with input_size\[0\]=3',
        r'mean must hold 4 numbers',
    ),
    'iterations is not an int': (
        lambda c: c['model_args'].update(iterations='2'),
        "model_args.iterations must be int, got '2'",
    ),
    'iterations is huge': (
        lambda c: c['model_args'].update(iterations=10**9),
        'model_args.iterations must be between 1 and 64, got 1000000000',
    ),
    'backbone is unknown': (
        lambda c: c['model_args'].update(backbone='resnet9000'),
        "model_args.backbone must be 'simple', 'resnet' or a timm model name, got 'resnet9000'",
    ),
    'backbone_args is a list': (
        lambda c: c['model_args'].update(backbone_args=[256]),
        r'model_args.backbone_args must be Optional\[Dict\[str, Any\]\], got \[256\]',
    ),
    'capsule layer of an unknown kind': (
        lambda c: c['model_args'].update(capsule_layers=[['conv', 32, 3, 2], ['pool', 32]]),
        r"model_args.capsule_layers: each layer is \['conv', capsules, kernel, stride\] or \['fc', capsules\], "
        r"got \['pool', 32\]",
    ),
    'capsule layer with a negative size': (
        lambda c: c['model_args'].update(capsule_layers=[['conv', -32, 3, 2]]),
        r"model_args.capsule_layers: sizes must be positive, got \['conv', -32, 3, 2\]",
    ),
    'no primary capsules': (
        lambda c: c['model_args'].update(primary_caps=0),
        'model_args.primary_caps must be positive, got 0',
    ),
    'backbone without channels': (
        lambda c: c['model_args'].update(backbone_args={'out_chs': 0}),
        'model_args.backbone_args.out_chs must be positive, got 0',
    ),
    'negative padding': (
        lambda c: c['model_args'].update(primary_padding=-1),
        'model_args.primary_padding must not be negative, got -1',
    ),
    'global_pool is unknown': (
        lambda c: c['model_args'].update(global_pool='median'),
        "model_args.global_pool: unknown pool type 'median'",
    ),
    'max_votes is zero': (
        lambda c: c['model_args'].update(max_votes=0),
        'model_args.max_votes must be positive, got 0',
    ),
    'img_size is negative': (  # timm copies img_size into input_size before any model code runs
        lambda c: c['model_args'].update(img_size=[-32, 32]),
        r'model_args.img_size must be positive, got \[-32, 32\]',
        r'input_size must be \[channels, height, width\] of positive ints, got [\[(]3, -32, 32[\])]',
    ),
    'device is set': (lambda c: c['model_args'].update(device='cuda'), r"model_args must not set \['device'\]"),
    'dtype is set': (lambda c: c['model_args'].update(dtype='float16'), r"model_args must not set \['dtype'\]"),
    'drop_rate above one': (
        lambda c: c['model_args'].update(drop_rate=1.5),
        r'model_args.drop_rate must be in \[0, 1\], got 1.5',
    ),
    # right types and ranges, but no such model: the constructor's own objection, naming the file
    'capsule stack too large for the grid': (
        lambda c: c['model_args'].update(capsule_layers=[['conv', 32, 17, 1]]),
        'its model_args do not build capsnet_simple_cifar10: input size .* too small for the capsule stack',
    ),
}


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_malformed_config_is_rejected_before_weights_are_read(simple, tmp_path, case):
    repo = copy_repo(simple, tmp_path / 'repo')
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
    'unknown architecture': (
        lambda c: json.dumps(dict(c, architecture='capsnet_does_not_exist')),
        r"unknown architecture 'capsnet_does_not_exist' \(import the package",
    ),
    'not json': (
        lambda c: '{"architecture": "capsnet_simple_cifar10",',
        r'not valid JSON \(Expecting property name enclosed in double quotes: line 1 column 43',
    ),
    'not an object': (lambda c: '["capsnet_simple_cifar10"]', 'expected a JSON object'),
    'no architecture': (
        lambda c: json.dumps({k: v for k, v in c.items() if k != 'architecture'}),
        'missing "architecture"',
    ),
    'model_args is a list': (lambda c: json.dumps(dict(c, model_args=[1])), '"model_args" must be an object'),
}


@pytest.mark.parametrize('source', ['local-dir', 'hf-hub'])
@pytest.mark.parametrize('case', sorted(UNPARSEABLE))
def test_unparseable_config_names_the_file(simple, tmp_path, case, source):
    """timm parses config.json before any model code runs; the error still names the file."""
    repo = copy_repo(simple, tmp_path / 'repo')
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
    validate(
        {
            'iterations': 3,
            'img_size': [32, 40],
            'capsule_layers': [['conv', 8, 3, 1], ['fc', 4]],
            'backbone_args': {'out_chs': 64},
            'max_votes': None,
            'global_pool': 'fast',
        },
        'capsnet_simple_cifar10',
    )
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
    for args, message in [
        ({'bn_eps': 0.0}, 'bn_eps must be positive, got 0.0'),
        ({'drop_rate': -0.1}, 'drop_rate must not be negative, got -0.1'),
        ({'bn_momentum': 2.0}, r'bn_momentum must be in \[0, 1\], got 2.0'),
        ({'head_hidden_size': 0}, 'head_hidden_size must be positive, got 0'),
    ]:
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
