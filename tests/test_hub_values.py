"""``timm_capsules/hub.py`` checked by value: each refusal of ``check_checkpoint``, ``push_checkpoint`` and the
upload folder check with its exact message, which hub config a checkpoint is matched to, the push with ``HfApi``
replaced (what it is called with, what it writes back into the hub config), and the checkpoint's tag or repo id
choosing the card; the cache and the command line are in tests/test_hub_cli_values.py. Written for a mutmut run
(tests/README.md); fast: one small model, never trained, no network."""

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import timm_capsules
from timm_capsules import hub, hub_cards
from timm_capsules.loading import ConfigError, NonFiniteWeightsWarning, WeightsError

from hub_values_shared import NAME, REPO, ROOT, TAG, UPLOAD, config_copy, install_fake_api, make_checkpoint


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory)


@pytest.fixture
def fake_api(monkeypatch):
    return install_fake_api(monkeypatch)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- check_checkpoint ---------------------------------------------------------------------------------


def test_check_checkpoint_returns_the_model_it_loads(checkpoint):
    folder, model = checkpoint
    loaded = hub.check_checkpoint(folder)
    assert type(loaded) is type(model) and same_weights(loaded, model) and loaded.iterations == 2
    assert hub.check_checkpoint(folder, iterations=3).iterations == 3  # keywords go to the model


def test_check_checkpoint_refuses_what_is_not_a_folder(tmp_path):
    with pytest.raises(ConfigError) as error:
        hub.check_checkpoint(tmp_path / 'missing')
    assert str(error.value) == f'{tmp_path / "missing"}: not a directory'
    (tmp_path / 'file').write_text('x')
    with pytest.raises(ConfigError, match='file: not a directory$'):
        hub.check_checkpoint(str(tmp_path / 'file'))


def test_check_checkpoint_reads_the_config_before_the_weights(tmp_path):
    (tmp_path / 'config.json').write_text('{"architecture": 3}')
    with pytest.raises(ConfigError):  # not the WeightsError of the missing weights
        hub.check_checkpoint(tmp_path)


def test_check_checkpoint_without_safetensors_names_the_pickles(checkpoint, tmp_path):
    folder = tmp_path / 'repo'
    folder.mkdir()
    shutil.copy(checkpoint[0] / 'config.json', folder)
    with pytest.raises(WeightsError) as error:
        hub.check_checkpoint(folder)
    assert str(error.value) == f'{folder}: no model.safetensors'
    for name in ('b.pt', 'a.bin', 'notes.txt', 'c.ckpt', 'd.json'):
        (folder / name).write_bytes(b'x')
    with pytest.raises(WeightsError) as error:
        hub.check_checkpoint(folder)
    assert str(error.value) == (
        f"{folder}: no model.safetensors (found pickle files ['a.bin', 'b.pt', 'c.ckpt']; only safetensors are "
        'published: re-export with timm.models.save_for_hf(..., safe_serialization=True))'
    )


def test_check_checkpoint_names_non_finite_tensors_without_a_warning(checkpoint, tmp_path):
    folder = tmp_path / 'diverged'
    shutil.copytree(checkpoint[0], folder)
    weights = load_file(folder / 'model.safetensors')
    weights['primary.norm.bias'][0] = float('nan')
    save_file(weights, folder / 'model.safetensors')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with pytest.raises(WeightsError, match=r'1 tensor\(s\) hold NaN or infinity .*: primary.norm.bias$'):
            hub.check_checkpoint(folder)
    assert not [w for w in caught if issubclass(w.category, NonFiniteWeightsWarning)]


# ---- which hub config --------------------------------------------------------------------------------


def two_configs_of_one_model(tmp_path, monkeypatch):
    configs = tmp_path / 'hub_configs'
    configs.mkdir()
    base = json.loads((ROOT / 'hub_configs' / f'{TAG}.json').read_text())
    for tag in (TAG, f'{NAME}.cifar100'):
        cfg = dict(base, tag=tag, repo_id=f'someone/{tag}')
        (configs / f'{tag}.json').write_text(json.dumps(cfg))
    shutil.copy(ROOT / 'hub_configs' / 'capsnet_resnet_cifar10.cifar10.json', configs)
    monkeypatch.setenv(hub.CONFIG_DIR_ENV, str(configs))
    return configs


def test_hub_config_is_found_by_repo_then_tag_then_model(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.CONFIG_DIR_ENV, str(ROOT / 'hub_configs'))
    find = hub._find_hub_config
    resnet = 'timm-capsules/capsnet_resnet_cifar10.cifar10'
    assert find(resnet, NAME, 'cifar10')['tag'] == 'capsnet_resnet_cifar10.cifar10'  # the repo wins
    assert find(None, NAME, 'cifar10')['tag'] == TAG
    assert find('x/unknown', NAME, None)['tag'] == TAG  # the only config of the model
    assert find('', 'capsnet_resnet_cifar100', 'nothing')['tag'] == 'capsnet_resnet_cifar100.cifar100'
    two_configs_of_one_model(tmp_path, monkeypatch)
    assert find(None, NAME, 'cifar100')['repo_id'] == f'someone/{NAME}.cifar100'
    assert find(f'someone/{NAME}.cifar100', NAME, 'cifar10')['tag'] == f'{NAME}.cifar100'
    assert find(None, NAME, 'cifar10')['tag'] == TAG
    with pytest.raises(ConfigError) as error:
        find('x/unknown', NAME, None)
    assert str(error.value) == (
        f"no hub config for repo 'x/unknown' / architecture {NAME!r}: pass config= (one of "
        f"['{NAME}.cifar10', '{NAME}.cifar100', 'capsnet_resnet_cifar10.cifar10']) or add "
        'hub_configs/<model>.<tag>.json'
    )
    with pytest.raises(ConfigError, match=r"^no hub config for repo None / architecture 'capsnet_vector_multimnist'"):
        find(None, 'capsnet_vector_multimnist', 'diverse_multimnist')


# ---- the upload folder --------------------------------------------------------------------------------


def upload_folder(tmp_path, weights, names=('README.md', 'config.json')):
    folder = tmp_path / 'upload'
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_text('{}')
    save_file(weights, folder / 'model.safetensors')
    return folder


def test_upload_folder_holds_exactly_the_three_files(tmp_path):
    model = torch.nn.Linear(2, 2)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hub._check_upload_folder(upload_folder(tmp_path / 'ok', weights), model)
    for names, got in (
        (('config.json',), "['config.json', 'model.safetensors']"),
        (('README.md', 'config.json', 'extra.txt'), "['README.md', 'config.json', 'extra.txt', 'model.safetensors']"),
        (('README.md', 'config.json', 'x.bin'), "['README.md', 'config.json', 'model.safetensors', 'x.bin']"),
    ):
        folder = upload_folder(tmp_path / str(len(got)), weights, names)
        with pytest.raises(WeightsError) as error:
            hub._check_upload_folder(folder, model)
        assert str(error.value) == (
            f'{folder}: the upload folder must hold exactly {UPLOAD} (never a pickle), got {got}'
        )


def test_upload_folder_weights_must_be_finite_and_the_models(tmp_path):
    model = torch.nn.Linear(2, 2)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for case, changed in (
        ('bias', dict(weights, bias=weights['bias'] + 1)),  # one of two tensors differs
        ('keys', {'weight': weights['weight']}),
        ('more', dict(weights, extra=torch.zeros(1))),
    ):
        folder = upload_folder(tmp_path / case, changed)
        with pytest.raises(WeightsError) as error:
            hub._check_upload_folder(folder, model)
        assert str(error.value) == f'{folder / "model.safetensors"} does not load back into the checkpoint model'
    with torch.no_grad():
        model.bias[0] = float('inf')
    folder = upload_folder(tmp_path / 'inf', {k: v.detach().clone() for k, v in model.state_dict().items()})
    with pytest.raises(WeightsError, match=r'1 tensor\(s\) hold NaN or infinity .*: bias$'):
        hub._check_upload_folder(folder, model)


# ---- push_checkpoint ----------------------------------------------------------------------------------


def test_dry_run_writes_the_card_of_the_hub_config(checkpoint, tmp_path, caplog):
    folder, model = checkpoint
    with caplog.at_level(logging.WARNING, logger='timm_capsules.hub'):
        out = hub.push_checkpoint(folder, dry_run=tmp_path / 'out')
    assert out == tmp_path / 'out' and isinstance(out, Path)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ('timm_capsules.hub', logging.WARNING, f'{TAG}: no measured results in its hub config; the card will say so')
    ]
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    card = hub_cards.model_card(hub.load_hub_config(TAG), published=True)
    assert (out / 'README.md').read_text(encoding='utf-8') == card
    assert json.loads((out / 'config.json').read_text())['architecture'] == NAME
    assert load_file(out / 'model.safetensors').keys() == model.state_dict().keys()


def test_dry_run_of_measured_results_logs_nothing(checkpoint, tmp_path, caplog):
    cfg = hub.load_hub_config(TAG)
    cfg['results'].update(per_seed=[90.0], num_seeds=1, mean=90.0, best=90.0, checkpoint=90.0)
    with caplog.at_level(logging.WARNING, logger='timm_capsules.hub'):
        out = hub.push_checkpoint(checkpoint[0], config=cfg, dry_run=tmp_path / 'out')
    assert caplog.records == []
    assert (out / 'README.md').read_text(encoding='utf-8') == hub_cards.model_card(cfg, published=True)


def test_dry_run_refusals(checkpoint, tmp_path):
    folder = checkpoint[0]
    (tmp_path / 'a_file').write_text('x')
    with pytest.raises(FileExistsError) as error:  # before anything else: the checkpoint is not even read
        hub.push_checkpoint(tmp_path / 'no_checkpoint', dry_run=tmp_path / 'a_file')
    assert str(error.value) == f'{tmp_path / "a_file"}: the dry-run folder is a file (give a new or empty folder)'
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('x')
    with pytest.raises(FileExistsError) as error:
        hub.push_checkpoint(folder, dry_run=tmp_path / 'full')
    assert str(error.value) == f'{tmp_path / "full"} is not empty'
    (tmp_path / 'empty').mkdir()
    assert hub.push_checkpoint(folder, dry_run=tmp_path / 'empty') == tmp_path / 'empty'


def test_push_refuses_another_model_than_the_hub_configs(checkpoint, tmp_path):
    folder = checkpoint[0]
    with pytest.raises(ConfigError) as error:
        hub.push_checkpoint(folder, config='capsnet_resnet_cifar10.cifar10', dry_run=tmp_path / 'a')
    assert str(error.value) == (
        f"checkpoint architecture {NAME!r} is not 'capsnet_resnet_cifar10' of hub config capsnet_resnet_cifar10.cifar10"
    )
    cfg = hub.load_hub_config(TAG)
    cfg['architecture']['params'] += 1
    with pytest.raises(ConfigError) as error:
        hub.push_checkpoint(folder, config=cfg, dry_run=tmp_path / 'b')
    assert str(error.value) == (
        f'checkpoint (561,297 params, 2 routing iterations) does not match hub config {TAG} (561,298 params, 2 '
        'iterations): its card would describe another model'
    )
    cfg = hub.load_hub_config(TAG)
    cfg['architecture']['routing_iterations'] = 3
    with pytest.raises(ConfigError, match=r'\(561,297 params, 2 routing iterations\) .* \(561,297 params, 3 iter'):
        hub.push_checkpoint(folder, config=cfg, dry_run=tmp_path / 'c')
    cfg = hub.load_hub_config(TAG)
    cfg['dataset']['num_classes'] = 100
    with pytest.raises(ConfigError) as error:
        hub.push_checkpoint(folder, config=cfg, dry_run=tmp_path / 'd')
    assert str(error.value) == 'checkpoint has 10 classes, CIFAR-10 has 100'
    assert not any((tmp_path / name).exists() for name in 'abcd')


def test_a_model_without_iterations_matches_only_a_config_without_them(checkpoint, tmp_path, monkeypatch):
    real = hub.check_checkpoint

    def without_iterations(folder):
        model = real(folder)
        del model.iterations
        return model

    monkeypatch.setattr(hub, 'check_checkpoint', without_iterations)
    with pytest.raises(ConfigError, match=r'^checkpoint \(561,297 params, None routing iterations\) does not'):
        hub.push_checkpoint(checkpoint[0], dry_run=tmp_path / 'a')


def test_push_uploads_and_marks_the_config_published(checkpoint, tmp_path, fake_api):
    path = config_copy(tmp_path)
    commit = hub.push_checkpoint(checkpoint[0], config=path, token='tok')
    assert commit.oid == 'a' * 40
    assert fake_api.calls == [
        ('init', dict(token='tok', library_name='timm_capsules', library_version=timm_capsules.__version__)),
        ('create_repo', REPO, dict(private=False, exist_ok=True)),
        (
            'upload_folder',
            dict(
                repo_id=REPO,
                folder_path=['README.md', 'config.json', 'model.safetensors'],
                revision=None,
                commit_message=f'Upload {TAG} (cifar10_simple)',
            ),
        ),
    ]
    expected = dict(json.loads((ROOT / 'hub_configs' / path.name).read_text()), status='published')
    expected['hub_commit'] = 'a' * 40
    assert path.read_text(encoding='utf-8') == json.dumps(expected, indent=2) + '\n'


def test_push_options_reach_the_api(checkpoint, tmp_path, fake_api):
    path = config_copy(tmp_path)
    before = path.read_text()
    hub.push_checkpoint(
        checkpoint[0], repo_id='me/mine', config=path, commit_message='msg', private=True, revision='dev'
    )
    assert fake_api.calls[1:] == [
        ('create_repo', 'me/mine', dict(private=True, exist_ok=True)),
        (
            'upload_folder',
            dict(
                repo_id='me/mine',
                folder_path=['README.md', 'config.json', 'model.safetensors'],
                revision='dev',
                commit_message='msg',
            ),
        ),
    ]
    assert path.read_text() == before  # another repo: the hub config's own is not published


def test_push_leaves_the_config_alone_when_asked_or_given_as_a_dict(checkpoint, tmp_path, fake_api):
    path = config_copy(tmp_path)
    before = path.read_text()
    hub.push_checkpoint(checkpoint[0], config=path, update_config=False)
    assert path.read_text() == before
    cfg = hub.load_hub_config(path)
    hub.push_checkpoint(checkpoint[0], config=cfg)
    assert path.read_text() == before and cfg['status'] == 'not yet published'


def test_push_found_by_its_architecture_writes_the_config_of_the_configs_folder(
    checkpoint, tmp_path, fake_api, monkeypatch
):
    configs = tmp_path / 'hub_configs'
    configs.mkdir()
    path = config_copy(configs)
    monkeypatch.setenv(hub.CONFIG_DIR_ENV, str(configs))
    fake_api.oid = None  # a commit without an oid
    hub.push_checkpoint(checkpoint[0])
    written = json.loads(path.read_text())
    assert written['status'] == 'published' and written['hub_commit'] is None
    assert fake_api.calls[1][1] == REPO


def test_push_finds_the_hub_config_by_repo_then_by_the_checkpoints_tag(checkpoint, tmp_path, monkeypatch):
    two_configs_of_one_model(tmp_path, monkeypatch)
    real = timm.models.get_pretrained_cfg  # the card's mean and std of a tag timm does not know
    renamed = {f'{NAME}.cifar100': 'capsnet_simple_cifar100.cifar100'}
    monkeypatch.setattr(timm.models, 'get_pretrained_cfg', lambda tag, *a, **k: real(renamed.get(tag, tag), *a, **k))
    out = hub.push_checkpoint(checkpoint[0], dry_run=tmp_path / 'a')  # the checkpoint's tag: cifar10
    assert (out / 'README.md').read_text(encoding='utf-8').startswith('---\n') and f'for {TAG}\n' in (
        out / 'README.md'
    ).read_text(encoding='utf-8')
    other = f'someone/{NAME}.cifar100'
    out = hub.push_checkpoint(checkpoint[0], repo_id=other, dry_run=tmp_path / 'b')
    assert f'# Model card for {NAME}.cifar100\n' in (out / 'README.md').read_text(encoding='utf-8')
