"""``timm_capsules/hub_config_files.py`` checked by value: where the hub configs are looked for, every refusal of
``validate_hub_config`` with its exact message and the edges of its ranges, reading and listing them, the
summary of the per-seed results against ``statistics`` done by hand (hypothesis), what ``record_results`` writes,
and the model table row by row. Written for a mutmut run (tests/README.md); fast, no model is built."""

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import timm_capsules  # noqa: F401
from timm_capsules import hub_cards
from timm_capsules import hub_config_files as files
from timm_capsules.loading import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'hub_configs'
TAG = 'capsnet_simple_cifar10.cifar10'
WHERE = 'hub config'


def base():
    return json.loads((CONFIGS / f'{TAG}.json').read_text())


def refused(cfg, message, where=WHERE):
    with pytest.raises(ConfigError) as error:
        files.validate_hub_config(cfg, *([where] if where != WHERE else []))
    assert str(error.value) == f'{where}: {message}'


# ---- where ------------------------------------------------------------------------------------------


def test_hub_configs_dir_is_the_variable_then_the_checkout_then_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv(files.CONFIG_DIR_ENV, str(tmp_path / 'mine'))
    assert files.hub_configs_dir() == tmp_path / 'mine'
    monkeypatch.setenv(files.CONFIG_DIR_ENV, '')
    assert files.hub_configs_dir() == CONFIGS
    monkeypatch.delenv(files.CONFIG_DIR_ENV)
    assert files.hub_configs_dir() == CONFIGS
    package = tmp_path / 'src' / 'timm_capsules'
    package.mkdir(parents=True)
    monkeypatch.setattr(files, '__file__', str(package / 'hub_config_files.py'))
    assert files.hub_configs_dir() is None
    assert files.list_hub_configs() == []
    with pytest.raises(ConfigError) as error:
        files._config_path(TAG)
    assert str(error.value) == f'no hub_configs directory found (set ${files.CONFIG_DIR_ENV})'
    (package / 'hub_configs').mkdir()
    assert files.hub_configs_dir() == package / 'hub_configs'  # a wheel's
    (tmp_path / 'src' / 'hub_configs').mkdir()
    assert files.hub_configs_dir() == tmp_path / 'src' / 'hub_configs'  # the checkout's first
    (tmp_path / 'src' / 'hub_configs').rmdir()
    (tmp_path / 'src' / 'hub_configs').write_text('a file, not a folder')
    assert files.hub_configs_dir() == package / 'hub_configs'


def test_config_path_takes_a_json_path_or_a_tag(tmp_path, monkeypatch):
    assert files._config_path(tmp_path / 'x.json') == tmp_path / 'x.json'  # in a folder: as given
    assert files._config_path(TAG) == CONFIGS / f'{TAG}.json'
    assert files._config_path('a.b', tmp_path) == tmp_path / 'a.b.json'
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'here.json').write_text('{}')
    assert files._config_path('here.json') == Path('here.json')  # exists in the working directory
    assert files._config_path('gone.json', tmp_path / 'd') == tmp_path / 'd' / 'gone.json.json'


# ---- validate_hub_config ------------------------------------------------------------------------------


def test_a_valid_config_comes_back_as_a_new_dict():
    cfg = base()
    out = files.validate_hub_config(cfg)
    assert out == cfg and out is not cfg and type(out) is dict
    for tag in (p.stem for p in CONFIGS.glob('*.json')):
        files.validate_hub_config(json.loads((CONFIGS / f'{tag}.json').read_text()), 'x')


def test_not_an_object():
    refused([1], 'expected a JSON object')
    refused('text', 'expected a JSON object', where='here.json')


@pytest.mark.parametrize(
    'key',
    [
        'tag',
        'model',
        'repo_id',
        'status',
        'dataset',
        'architecture',
        'training',
        'results',
        'paper_results',
        'license',
        'tags',
    ],
)
def test_each_field_is_required(key):
    cfg = base()
    del cfg[key]
    refused(cfg, f'missing field {key!r}')


def test_tag_model_status_and_repo():
    message = "tag {!r} must be '<model>.<tag>' of model 'capsnet_simple_cifar10'"
    refused(dict(base(), tag='capsnet_simple_cifar10'), message.format('capsnet_simple_cifar10'))
    refused(dict(base(), tag='capsnet_simple_cifar100.cifar10'), message.format('capsnet_simple_cifar100.cifar10'))
    refused(
        dict(base(), tag='vit_tiny_patch16_224.cifar10', model='vit_tiny_patch16_224'),
        "'vit_tiny_patch16_224' is not a registered timm_capsules architecture",
    )
    refused(
        dict(base(), status='Published'), "status must be one of ('published', 'not yet published'), got 'Published'"
    )
    files.validate_hub_config(dict(base(), status='published'))
    for repo in ('name', 'a/b/c', 3, None):
        refused(dict(base(), repo_id=repo), 'repo_id must be "org/name"')


def test_dataset_fields():
    for dataset in ([], {'hub_ids': []}, {'name': 3}):
        refused(dict(base(), dataset=dataset), 'dataset.name missing')
    for hub_ids in (None, 'ylecun/mnist', ['a', 3]):
        refused(
            dict(base(), dataset=dict(base()['dataset'], hub_ids=hub_ids)),
            'dataset.hub_ids must be a list of Hub dataset ids',
        )
    for classes in (0, -1, 1.0, True, None):
        refused(
            dict(base(), dataset=dict(base()['dataset'], num_classes=classes)),
            'dataset.num_classes must be a positive int',
        )
    files.validate_hub_config(dict(base(), dataset=dict(base()['dataset'], num_classes=1, hub_ids=[])))


def test_architecture_counts():
    arch = base()['architecture']
    for params in (0, -5, 2.0, True, None):
        refused(dict(base(), architecture=dict(arch, params=params)), 'architecture.params must be a positive int')
    files.validate_hub_config(dict(base(), architecture=dict(arch, params=1)))
    message = 'architecture.routing_iterations must be null (no routing) or an int in 1..64'
    for iterations in (0, 65, 2.0, True, '2'):
        refused(dict(base(), architecture=dict(arch, routing_iterations=iterations)), message)
    for iterations in (None, 1, 64):
        files.validate_hub_config(dict(base(), architecture=dict(arch, routing_iterations=iterations)))
    no_key = dict(arch)
    del no_key['routing_iterations']
    files.validate_hub_config(dict(base(), architecture=no_key))


def test_training_preset():
    message = 'training.preset must be one of timm_capsules.presets.PRESETS, got {!r}'
    refused(dict(base(), training={}), message.format(None))
    refused(dict(base(), training=['cifar10_simple']), message.format(None))
    refused(dict(base(), training={'preset': 'c10'}), message.format('c10'))
    refused(
        dict(base(), training={'preset': 'cifar100_simple'}),
        "training.preset 'cifar100_simple' trains 'capsnet_simple_cifar100', not 'capsnet_simple_cifar10'",
    )


@pytest.mark.parametrize('key', ['results', 'paper_results'])
def test_results_are_percentages(key):
    refused(dict(base(), **{key: [1]}), f'{key} must be an object')
    for stat in ('mean', 'std', 'best'):
        for value in (-0.01, 100.01, math.nan, math.inf, True, '50'):
            cfg = base()
            cfg[key][stat] = value
            refused(cfg, f'{key}.{stat} must be null or a percentage, got {value!r}')
    cfg = base()
    cfg[key]['checkpoint'] = 101
    if key == 'results':
        refused(cfg, 'results.checkpoint must be null or a percentage, got 101')
    else:
        files.validate_hub_config(cfg)  # the paper publishes no weights
    for edge in (0, 100, 0.0, 100.0):
        cfg = base()
        cfg[key]['checkpoint'] = edge
        if key == 'paper_results':
            cfg[key].update(mean=edge, std=edge, best=edge)
        files.validate_hub_config(cfg)


def test_results_summary_is_the_per_seed_numbers():
    def with_results(**results):
        cfg = base()
        cfg['results'].update(results)
        return cfg

    files.validate_hub_config(with_results(per_seed=[90.0, 92.0], num_seeds=2, mean=91.0, std=1.41, best=92.0))
    files.validate_hub_config(with_results(per_seed=[90.0], num_seeds=None, mean=90.0, std=None, best=90.0))
    message = 'results.num_seeds must equal the number of results.per_seed entries'
    refused(with_results(per_seed=[90.0, 92.0], num_seeds=3, mean=91.0, std=1.41, best=92.0), message)
    refused(with_results(per_seed=[], num_seeds=1), message)
    refused(with_results(per_seed=[90.0], num_seeds=1.0, mean=90.0, best=90.0), message)
    files.validate_hub_config(with_results(per_seed=[], num_seeds=0))
    refused(
        with_results(per_seed=[90.0, 92.0], num_seeds=2, mean=91.0, std=1.41, best=91.0),
        'results.best=91.0 does not match results.per_seed (expected 92.0); use `python -m timm_capsules.hub record`',
    )
    refused(
        with_results(per_seed=[90.0, 92.0], num_seeds=2, mean=91.0, std=1.0, best=92.0),
        'results.std=1.0 does not match results.per_seed (expected 1.41); use `python -m timm_capsules.hub record`',
    )
    refused(
        with_results(per_seed=[90.0, 92.0], num_seeds=2, mean=90.0, std=1.41, best=92.0),
        'results.mean=90.0 does not match results.per_seed (expected 91.0); use `python -m timm_capsules.hub record`',
    )
    for stat in ('mean', 'std', 'best'):
        refused(with_results(**{stat: 50.0}), 'results.mean/std/best need results.per_seed')
        no_seeds = with_results(**{stat: 50.0})
        del no_seeds['results']['per_seed']
        refused(no_seeds, 'results.mean/std/best need results.per_seed')


def test_tags_hold_timm_and_image_classification():
    message = "tags must be a list containing 'timm' and 'image-classification'"
    refused(dict(base(), tags=['timm']), message)
    refused(dict(base(), tags=['image-classification']), message)
    refused(dict(base(), tags='timm image-classification'), message)
    refused(dict(base(), tags=('timm', 'image-classification')), message)
    files.validate_hub_config(dict(base(), tags=['image-classification', 'timm']))


# ---- reading and listing ------------------------------------------------------------------------------


def test_load_hub_config_by_tag_path_or_dict(tmp_path):
    assert files.load_hub_config(TAG) == base() == files.load_hub_config(CONFIGS / f'{TAG}.json')
    assert files.load_hub_config(str(CONFIGS / f'{TAG}.json')) == base()
    assert files.load_hub_config(base()) == base()
    with pytest.raises(ConfigError) as error:
        files.load_hub_config(dict(base(), status='x'))
    assert str(error.value).startswith('hub config: status must be')
    with pytest.raises(ConfigError) as error:
        files.load_hub_config(tmp_path / 'none.json')
    assert str(error.value) == f'no hub config {tmp_path / "none.json"}'
    with pytest.raises(ConfigError) as error:
        files.load_hub_config('no.such')
    assert str(error.value) == f'no hub config {CONFIGS / "no.such.json"}'
    bad = tmp_path / 'bad.json'
    bad.write_text('{"tag": ')
    with pytest.raises(ConfigError, match=rf'^{bad}: not valid JSON \(Expecting value: line 1 column 9'):
        files.load_hub_config(bad)
    bad.write_bytes(b'\xff\xfe{}')
    with pytest.raises(ConfigError, match=rf'^{bad}: not valid JSON \(.*codec'):
        files.load_hub_config(bad)
    (tmp_path / 'x.json').write_text(json.dumps(dict(base(), status='?')))
    with pytest.raises(ConfigError, match=rf'^{tmp_path / "x.json"}: status must be'):
        files.load_hub_config(tmp_path / 'x.json')
    (tmp_path / 'x.json').write_text(json.dumps(base()), encoding='utf-8')
    with pytest.raises(ConfigError) as error:
        files.load_hub_config(tmp_path / 'x.json')
    assert str(error.value) == f'{tmp_path / "x.json"}: file name must be {TAG}.json'
    (tmp_path / 'ü.json').write_text(json.dumps(dict(base(), tag=TAG, license='ü')), encoding='utf-8')
    copy_ = tmp_path / f'{TAG}.json'
    (tmp_path / 'ü.json').rename(copy_)
    assert files.load_hub_config(copy_)['license'] == 'ü'


def test_list_hub_configs_in_the_model_files_order(tmp_path, monkeypatch):
    tags = [cfg['tag'] for cfg in files.list_hub_configs()]
    assert tags == [
        'capsnet_simple_cifar10.cifar10',
        'capsnet_simple_cifar100.cifar100',
        'capsnet_resnet_cifar10.cifar10',
        'capsnet_resnet_cifar100.cifar100',
        'capsnet_matrix_multimnist.diverse_multimnist',
        'capsnet_vector_multimnist.diverse_multimnist',
    ]  # the order of capsnet.py's default_cfgs
    assert [cfg['tag'] for cfg in files.list_hub_configs(str(CONFIGS))] == tags
    folder = tmp_path / 'configs'
    folder.mkdir()
    for tag in ('capsnet_resnet_cifar10.cifar10', 'capsnet_simple_cifar10.cifar10'):
        shutil.copy(CONFIGS / f'{tag}.json', folder)
    other = dict(base(), tag='capsnet_simple_cifar10.b', repo_id='x/b')
    (folder / 'capsnet_simple_cifar10.b.json').write_text(json.dumps(other))
    (folder / 'notes.txt').write_text('not a config')
    expected = ['capsnet_simple_cifar10.b', 'capsnet_simple_cifar10.cifar10', 'capsnet_resnet_cifar10.cifar10']
    assert [cfg['tag'] for cfg in files.list_hub_configs(folder)] == expected
    monkeypatch.setenv(files.CONFIG_DIR_ENV, str(folder))
    assert [cfg['tag'] for cfg in files.list_hub_configs()] == expected


def test_registry_order_of_a_model_its_file_does_not_list(monkeypatch):
    import timm_capsules.capsnet as capsnet

    cfg = base()
    order = files._registry_order(cfg)
    names = list(capsnet.default_cfgs)
    assert order == ('timm_capsules.capsnet', names.index('capsnet_simple_cifar10'), TAG)
    monkeypatch.setattr(capsnet, 'default_cfgs', {'a': 1, 'b': 2})
    assert files._registry_order(cfg) == ('timm_capsules.capsnet', 2, TAG)
    monkeypatch.delattr(capsnet, 'default_cfgs')
    assert files._registry_order(cfg) == ('timm_capsules.capsnet', 0, TAG)


# ---- results ------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=6))
def test_summary_is_mean_sample_std_and_best_by_hand(values):
    summary = files._summarise(values)
    n = len(values)
    mean = math.fsum(values) / n
    assert summary['mean'] == round(mean, 2)
    assert summary['best'] == round(max(values), 2)
    if n == 1:
        assert summary['std'] is None
    else:
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
        assert abs(summary['std'] - round(std, 2)) <= 0.010001  # a tie at the rounding edge may go either way


def test_summary_of_known_numbers():
    assert files._summarise([93.10, 93.55, 94.02]) == dict(mean=93.56, std=0.46, best=94.02)
    assert files._summarise([1, 2]) == dict(mean=1.5, std=0.71, best=2.0)
    assert files._summarise([50]) == dict(mean=50.0, std=None, best=50.0)
    assert files._summarise([10.004, 10.008]) == dict(mean=10.01, std=0.0, best=10.01)


def test_record_results_writes_the_summary(tmp_path):
    path = tmp_path / f'{TAG}.json'
    shutil.copy(CONFIGS / path.name, path)
    cfg = files.record_results(path, [90, 92])
    expected = base()
    expected['results'].update(per_seed=[90.0, 92.0], num_seeds=2, mean=91.0, std=1.41, best=92.0)
    assert cfg == expected and cfg['results']['checkpoint'] is None
    assert path.read_text(encoding='utf-8') == json.dumps(expected, indent=2) + '\n'
    assert all(type(v) is float for v in cfg['results']['per_seed'])
    cfg = files.record_results(str(path), [100.0, 0.0, 50], checkpoint=100)
    assert cfg['results']['checkpoint'] == 100.0 and type(cfg['results']['checkpoint']) is float
    assert json.loads(path.read_text())['results']['checkpoint'] == 100.0
    assert cfg['results']['num_seeds'] == 3 and cfg['results']['per_seed'] == [100.0, 0.0, 50.0]
    cfg = files.record_results(path, [70], checkpoint=0)
    assert cfg['results']['checkpoint'] == 0.0 and cfg['results']['std'] is None


@pytest.mark.parametrize('top1', [[], [101], [-1], [50, math.nan], [True], ['50']])
def test_record_results_refuses_what_is_no_percentage(top1, tmp_path):
    path = tmp_path / f'{TAG}.json'
    shutil.copy(CONFIGS / path.name, path)
    with pytest.raises(ConfigError) as error:
        files.record_results(path, top1)
    assert str(error.value) == f'accuracies must be percentages in [0, 100], got {list(top1)!r}'
    assert path.read_text() == (CONFIGS / path.name).read_text()


def test_record_results_refuses_a_checkpoint_out_of_range(tmp_path):
    path = tmp_path / f'{TAG}.json'
    shutil.copy(CONFIGS / path.name, path)
    with pytest.raises(ConfigError) as error:
        files.record_results(path, [50], checkpoint=120)
    assert str(error.value) == f'{path}: results.checkpoint must be null or a percentage, got 120.0'
    assert path.read_text() == (CONFIGS / path.name).read_text()


def test_render_card_is_published_as_its_status_says():
    cfg = base()
    assert files.render_card(TAG) == hub_cards.model_card(cfg, published=False)
    assert files.render_card(cfg, published=True) == hub_cards.model_card(cfg, published=True)
    cfg['status'] = 'published'
    assert files.render_card(cfg) == hub_cards.model_card(cfg, published=True)
    assert files.render_card(cfg, published=False) == hub_cards.model_card(cfg, published=False)


# ---- the model table ----------------------------------------------------------------------------------

HEADER = (
    '| tag | dataset | params | iterations | status | metric | ours: mean ± std (best), seeds | paper: mean (best) '
    '| train with |\n|---|---|---:|---:|---|---|---|---|---|\n'
)


def test_model_table_rows():
    plain = base()
    measured = copy.deepcopy(plain)
    measured['results'].update(per_seed=[90.0, 92.0], num_seeds=2, mean=91.0, std=1.41, best=92.0)
    measured['paper_results'].update(mean=85.5, best=None)
    measured['status'] = 'published'
    one = copy.deepcopy(plain)
    one['results'].update(per_seed=[90.0], mean=90.0, best=90.0)
    one['paper_results'].update(mean=None, best=87.0)
    one['architecture']['routing_iterations'] = None
    one['results']['metric'] = 'top-1: of the ten classes'
    table = files.render_model_table([plain, measured, one])
    assert table == HEADER + (
        '| `capsnet_simple_cifar10.cifar10` | CIFAR-10 | 561,297 | 2 | not yet published | top-1 accuracy (%) | — | — '
        '| `--preset cifar10_simple` |\n'
        '| `capsnet_simple_cifar10.cifar10` | CIFAR-10 | 561,297 | 2 | '
        '[published](https://huggingface.co/timm-capsules/capsnet_simple_cifar10.cifar10) | top-1 accuracy (%) '
        '| 91.00 ± 1.41 (92.00), 2 | 85.50 (—) | `--preset cifar10_simple` |\n'
        '| `capsnet_simple_cifar10.cifar10` | CIFAR-10 | 561,297 | — | not yet published | top-1 '
        '| 90.00 (90.00), None | — (87.00) | `--preset cifar10_simple` |\n'
    )
    with pytest.raises(ConfigError):
        files.render_model_table([dict(plain, status='?')])
    assert files.render_model_table([]) == HEADER


def test_model_table_of_the_committed_configs():
    table = files.render_model_table()
    rows = table.splitlines()[2:]
    assert [row.split(' | ')[0] for row in rows] == [f'| `{cfg["tag"]}`' for cfg in files.list_hub_configs()]
    assert table == files.render_model_table(files.list_hub_configs())


def test_readme_table_between_the_markers():
    begin, end = files.TABLE_BEGIN, files.TABLE_END
    assert files._table_block('| a |\n') == f'{begin}\n| a |\n{end}'
    assert files.readme_table(f'x\n{begin}\n\n| a |\n| b |\n\n{end}\ny') == '| a |\n| b |\n'
    assert files.readme_table(f'{begin}| a |{end}') == '| a |\n'
    assert files.readme_table(f'{begin}{end}') == '\n'
    assert files.readme_table(f'x {begin} only') is None
    assert files.readme_table(f'x {end} only') is None
    assert files.readme_table(f'{end} before {begin}') is None
    assert files.readme_table('nothing') is None
    # the first pair of markers; a table's own spaces and letters kept, only its blank lines cut
    assert files.readme_table(f'{begin}\n| a |\n{end}\n{begin}\n| b |\n{end}') == '| a |\n'
    assert files.readme_table(f'{begin}\n\n  X| a |X  \n\n{end}') == '  X| a |X  \n'


def test_update_readme_table(tmp_path):
    doc = tmp_path / 'doc.md'
    table = files.render_model_table()
    current = f'intro\n{files.TABLE_BEGIN}\n{table}{files.TABLE_END}\nafter ü\n'
    doc.write_text(current, encoding='utf-8')
    assert files.update_readme_table(doc) is True and files.update_readme_table(str(doc), write=True) is True
    assert doc.read_text(encoding='utf-8') == current
    stale = f'intro\n{files.TABLE_BEGIN}\nold\n{files.TABLE_END}\nafter ü\n'
    doc.write_text(stale, encoding='utf-8')
    assert files.update_readme_table(doc) is False and doc.read_text(encoding='utf-8') == stale
    assert files.update_readme_table(doc, write=True) is False
    assert doc.read_text(encoding='utf-8') == current
    doc.write_text('no markers', encoding='utf-8')
    with pytest.raises(ConfigError) as error:
        files.update_readme_table(doc, write=True)
    assert str(error.value) == f'{doc} has no <!-- model-table --> ... <!-- /model-table --> markers'


def test_update_readme_table_rewrites_the_first_table(tmp_path):
    doc = tmp_path / 'doc.md'
    begin, end = files.TABLE_BEGIN, files.TABLE_END
    doc.write_text(f'a\n{begin}\nold\n{end}\nb\n{begin}\nsecond\n{end}\nc\n', encoding='utf-8')
    assert files.update_readme_table(doc, write=True) is False
    table = files.render_model_table()
    assert doc.read_text() == f'a\n{begin}\n{table}{end}\nb\n{begin}\nsecond\n{end}\nc\n'
    assert files.update_readme_table(doc) is True
