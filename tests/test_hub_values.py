"""``timm_capsules/hub.py`` checked by value: each refusal of ``check_checkpoint``, ``push_checkpoint`` and the
upload folder check with its exact message, which hub config a checkpoint is matched to, the push with
``HfApi`` replaced (what it is called with, what it writes back into the hub config), the cache layout with its
commit computed a second way (sha1 by hand), and the command line's output, exit codes and help. Written for a
mutmut run (tests/README.md); fast: one small model, never trained, no network."""

import hashlib
import json
import logging
import shutil
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf

import timm_capsules
from timm_capsules import hub, hub_cards
from timm_capsules.loading import ConfigError, NonFiniteWeightsWarning, WeightsError

ROOT = Path(__file__).resolve().parents[1]
NAME, TAG = 'capsnet_simple_cifar10', 'capsnet_simple_cifar10.cifar10'
REPO = f'timm-capsules/{TAG}'
UPLOAD = "['README.md', 'config.json', 'model.safetensors']"


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model(NAME).eval()
    folder = tmp_path_factory.mktemp('hub_values') / 'checkpoint'
    save_for_hf(model, folder, safe_serialization=True)
    return folder, model


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


class FakeApi:
    """HfApi without the network: records what it is asked."""

    calls = []
    oid = 'a' * 40
    url = 'https://example/commit'

    def __init__(self, **kwargs):
        FakeApi.calls.append(('init', kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(('create_repo', repo_id, kwargs))
        return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs['folder_path']).iterdir())
        FakeApi.calls.append(('upload_folder', dict(kwargs, folder_path=files)))
        attributes = {'__str__': lambda self: 'a commit'}
        if FakeApi.url:
            attributes['commit_url'] = FakeApi.url
        if FakeApi.oid:
            attributes['oid'] = FakeApi.oid
        return type('Commit', (), attributes)()


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls, FakeApi.oid, FakeApi.url = [], 'a' * 40, 'https://example/commit'
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    return FakeApi


def config_copy(tmp_path):
    path = tmp_path / f'{TAG}.json'
    shutil.copy(ROOT / 'hub_configs' / path.name, path)
    return path


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


# ---- the cache ----------------------------------------------------------------------------------------


def test_install_in_cache_lays_out_a_download(tmp_path, monkeypatch):
    folder = tmp_path / 'upload'
    (folder / 'sub').mkdir(parents=True)
    (folder / 'sub' / 'ignored').write_text('not a top-level file')
    big = bytes(range(256)) * 5000  # over one read chunk
    (folder / 'b.bin').write_bytes(big)
    (folder / 'a.txt').write_text('hello')
    by_hand = hashlib.sha1(b'a.txt' + b'hello' + b'b.bin' + big).hexdigest()
    cache = tmp_path / 'cache'
    snapshot = hub.install_in_cache(folder, 'org/name', cache_dir=str(cache))
    repo = cache / 'models--org--name'
    assert snapshot == repo / 'snapshots' / by_hand
    assert sorted(p.name for p in snapshot.iterdir()) == ['a.txt', 'b.bin']
    assert (snapshot / 'b.bin').read_bytes() == big and (snapshot / 'a.txt').read_text() == 'hello'
    assert (repo / 'refs' / 'main').read_text() == by_hand
    assert sorted(p.name for p in (repo / 'refs').iterdir()) == ['main']
    # again, at another revision, after a file changed: a new snapshot, the old one kept
    (folder / 'a.txt').write_text('hello again')
    again = hub.install_in_cache(folder, 'org/name', cache, revision='v2')
    assert again.name == hashlib.sha1(b'a.txt' + b'hello again' + b'b.bin' + big).hexdigest()
    assert (repo / 'refs' / 'v2').read_text() == again.name and (repo / 'refs' / 'main').read_text() == by_hand
    # the same snapshot twice: each file replaced, copied where hard links fail
    (snapshot / 'a.txt').unlink()
    (snapshot / 'a.txt').write_text('stale')
    monkeypatch.setattr(hub.os, 'link', lambda a, b: (_ for _ in ()).throw(OSError('no links here')))
    (folder / 'a.txt').write_text('hello')
    assert hub.install_in_cache(folder, 'org/name', cache) == snapshot
    assert (snapshot / 'a.txt').read_text() == 'hello'


def test_install_in_cache_defaults_to_the_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'default'))
    folder = tmp_path / 'f'
    folder.mkdir()
    (folder / 'x').write_text('y')
    snapshot = hub.install_in_cache(folder, 'o/n')
    assert snapshot.parent.parent == tmp_path / 'default' / 'models--o--n'
    assert (tmp_path / 'default' / 'models--o--n' / 'refs' / 'main').read_text() == snapshot.name


# ---- the command line ---------------------------------------------------------------------------------


def test_cli_card_prints_or_writes_the_card(capsys, tmp_path):
    assert hub.main(['card', '--config', TAG]) == 0
    cfg = hub.load_hub_config(TAG)
    assert capsys.readouterr().out == hub_cards.model_card(cfg, published=False)
    assert hub.main(['card', '--config', TAG, '--published', '--output', str(tmp_path / 'c.md')]) == 0
    assert capsys.readouterr().out == ''
    assert (tmp_path / 'c.md').read_text(encoding='utf-8') == hub_cards.model_card(cfg, published=True)


def test_cli_table(capsys, tmp_path):
    assert hub.main(['table']) == 0
    assert capsys.readouterr().out == f'{hub.TABLE_BEGIN}\n{hub.render_model_table()}{hub.TABLE_END}\n'
    doc = tmp_path / 'doc.md'
    doc.write_text(f'x\n{hub.TABLE_BEGIN}\n{hub.render_model_table()}{hub.TABLE_END}\n')
    assert hub.main(['table', '--check', str(doc)]) == 0
    assert hub.main(['table', '--write', str(doc)]) == 0
    assert capsys.readouterr().out == 'model table is up to date\n' * 2
    doc.write_text(f'x\n{hub.TABLE_BEGIN}\nold\n{hub.TABLE_END}\n')
    assert hub.main(['table', '--check', str(doc)]) == 1
    assert hub.main(['table', '--write', str(doc)]) == 0
    assert capsys.readouterr().out == 'model table is out of date\nmodel table rewritten\n'
    assert doc.read_text() == f'x\n{hub.TABLE_BEGIN}\n{hub.render_model_table()}{hub.TABLE_END}\n'
    assert hub.main(['table', '--check', str(tmp_path / 'none.md')]) == 2
    assert capsys.readouterr().err.startswith('error: : FileNotFoundError: ')


def test_cli_check_record_and_cache(checkpoint, capsys, tmp_path):
    folder = checkpoint[0]
    assert hub.main(['check', '--checkpoint', str(folder)]) == 0
    assert capsys.readouterr().out == f'{folder}: OK ({NAME}, 561,297 params)\n'
    path = config_copy(tmp_path)
    assert hub.main(['record', '--config', str(path), '--top1', '90', '91.5', '--checkpoint-top1', '91.5']) == 0
    results = json.loads(path.read_text())['results']
    assert results['per_seed'] == [90.0, 91.5] and results['checkpoint'] == 91.5 and results['mean'] == 90.75
    assert capsys.readouterr().out == json.dumps(results, indent=2) + '\n'
    out = tmp_path / 'upload'
    assert hub.main(['push', '--config', TAG, '--checkpoint', str(folder), '--dry-run', str(out)]) == 0
    assert capsys.readouterr().out == f'{out}\n'
    assert hub.main(['cache', '--folder', str(out), '--repo-id', 'a/b', '--cache-dir', str(tmp_path / 'c')]) == 0
    snapshot = Path(capsys.readouterr().out.strip())
    assert snapshot.parent == tmp_path / 'c' / 'models--a--b' / 'snapshots'
    assert sorted(p.name for p in snapshot.iterdir()) == ['README.md', 'config.json', 'model.safetensors']


def test_cli_push_prints_the_commit_url_and_passes_its_options(checkpoint, capsys, tmp_path, fake_api):
    path = config_copy(tmp_path)
    argv = ['push', '--config', str(path), '--checkpoint', str(checkpoint[0]), '--repo-id', 'me/x']
    assert hub.main(argv + ['--commit-message', 'm', '--private', '--revision', 'r']) == 0
    assert capsys.readouterr().out == 'https://example/commit\n'
    assert fake_api.calls[1] == ('create_repo', 'me/x', dict(private=True, exist_ok=True))
    assert fake_api.calls[2][1]['revision'] == 'r' and fake_api.calls[2][1]['commit_message'] == 'm'
    assert hub.main(argv) == 0
    assert fake_api.calls[4] == ('create_repo', 'me/x', dict(private=False, exist_ok=True))
    assert fake_api.calls[5][1]['revision'] is None
    assert fake_api.calls[5][1]['commit_message'] == f'Upload {TAG} (cifar10_simple)'
    capsys.readouterr()
    fake_api.url = None  # a commit without a url: the commit itself is printed
    assert hub.main(argv) == 0
    assert capsys.readouterr().out == 'a commit\n'


def test_cli_errors_are_one_line_naming_what_failed(checkpoint, capsys, tmp_path):
    assert hub.main(['check', '--checkpoint', str(tmp_path / 'none')]) == 2
    assert capsys.readouterr() == ('', f'error: {tmp_path / "none"}: not a directory\n')
    assert hub.main(['card', '--config', 'no_such.tag']) == 2
    assert capsys.readouterr().err == f'error: no hub config {hub.hub_configs_dir() / "no_such.tag.json"}\n'
    (tmp_path / 'file').write_text('x')
    argv = ['push', '--config', TAG, '--checkpoint', str(checkpoint[0]), '--dry-run', str(tmp_path / 'file')]
    assert hub.main(argv) == 2
    assert (
        capsys.readouterr().err
        == f'error: {tmp_path / "file"}: the dry-run folder is a file (give a new or empty folder)\n'
    )
    assert hub.main(['record', '--config', 'nothing.here', '--top1', '1']) == 2
    assert capsys.readouterr().err.startswith('error: no hub config ')
    # anything else: the type and where
    assert hub.main(['cache', '--folder', str(tmp_path / 'nf'), '--repo-id', 'a/b', '--cache-dir', str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f'error: {tmp_path / "nf"}: FileNotFoundError: ')
    bad = tmp_path / 'bad.json'
    bad.write_text('[]')
    assert hub.main(['card', '--config', str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1


def help_text(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        hub.main(argv)
    assert stop.value.code == 0
    return ' '.join(capsys.readouterr().out.split())


HELP = {
    'push': [
        'publish a checkpoint folder (or --dry-run it)',
        'hub_configs/<tag>.json (or the tag)',
        'folder with config.json + model.safetensors',
        'write the upload folder here; upload nothing',
        "override the hub config's repo_id",
        '--commit-message COMMIT_MESSAGE',
        '--revision REVISION',
        '--private',
        '--dry-run DIR',
    ],
    'card': ['render a model card', '--config CONFIG', '--output OUTPUT', 'render it as the published card'],
    'table': [
        'print the model table (docs/hub.md)',
        '--check DOC',
        '--write DOC',
        'exit 1 if the table in DOC (docs/hub.md) is out of date',
        'replace the table between the markers in DOC',
    ],
    'check': ['validate a checkpoint folder', '--checkpoint CHECKPOINT'],
    'record': [
        'write measured accuracies (one per seed) into a hub config',
        '--top1 TOP1 [TOP1 ...]',
        '--checkpoint-top1 CHECKPOINT_TOP1',
    ],
    'cache': [
        'place a dry-run folder in a local Hub cache (offline use)',
        '--folder FOLDER',
        '--repo-id REPO_ID',
        '--cache-dir CACHE_DIR',
    ],
}


def test_cli_help_describes_each_command(capsys):
    top = help_text(capsys, ['-h'])
    assert top.startswith('usage: python -m timm_capsules.hub [-h] {push,card,table,check,record,cache} ...')
    assert ' '.join(hub.__doc__.split('\n\n')[0].split()) in top and 'One JSON file' not in top
    for command, needles in HELP.items():
        text = help_text(capsys, [command, '-h'])
        assert text.startswith(f'usage: python -m timm_capsules.hub {command}')
        for needle in needles:
            if needle is not needles[0]:
                assert f' {needle} ' in f'{text} ', (command, needle)  # whole: nothing added before or after
        assert f' {needles[0]} ' in top, command  # the command's one-line help in the list of commands


@pytest.mark.parametrize(
    'argv',
    [
        [],
        ['push', '--checkpoint', 'x'],
        ['push', '--config', 'x'],
        ['card'],
        ['table', '--check', 'a', '--write', 'b'],
        ['check'],
        ['record', '--config', 'x'],
        ['record', '--top1', '1'],
        ['record', '--config', 'x', '--top1'],
        ['record', '--config', 'x', '--top1', 'one'],
        ['record', '--config', 'x', '--top1', '1', '--checkpoint-top1', 'one'],
        ['cache', '--folder', 'x'],
        ['cache', '--repo-id', 'x'],
    ],
)
def test_cli_refuses_incomplete_commands(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        hub.main(argv)
    assert stop.value.code == 2 and 'error:' in capsys.readouterr().err


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


def test_cli_push_reads_the_config_it_is_given(checkpoint, capsys, tmp_path):
    path = config_copy(tmp_path)
    hub.record_results(path, [90.0, 91.5])
    out = tmp_path / 'upload'
    argv = ['push', '--config', str(path), '--checkpoint', str(checkpoint[0]), '--dry-run', str(out), '--repo-id', REPO]
    assert hub.main(argv) == 0
    assert '| 90.75 ± 1.06 | 91.50 | 2 |' in (out / 'README.md').read_text(encoding='utf-8')


@pytest.mark.parametrize(
    'argv, function, where',
    [
        (['check', '--checkpoint', 'ck'], 'check_checkpoint', 'ck'),
        (['push', '--config', 'cfg', '--checkpoint', 'ck'], 'push_checkpoint', 'ck'),
        (['record', '--config', 'cfg', '--top1', '1'], 'record_results', 'cfg'),
        (['card', '--config', 'cfg'], 'render_card', 'cfg'),
        (['table'], 'render_model_table', ''),
    ],
)
def test_cli_any_other_failure_names_its_type_and_where(argv, function, where, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError('boom')

    monkeypatch.setattr(hub, function, fail)
    assert hub.main(argv) == 2
    assert capsys.readouterr() == ('', f'error: {where}: RuntimeError: boom\n')
