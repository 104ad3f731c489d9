"""``timm_capsules/hub.py`` checked by value, continued from tests/test_hub_values.py: the cache layout with its
commit computed a second way (sha1 by hand), and the command line's output, exit codes and help. Written for a
mutmut run (tests/README.md); fast: one small model, never trained, no network."""

import hashlib
import json
from pathlib import Path

import pytest

from timm_capsules import hub, hub_cards

from hub_values_shared import NAME, REPO, TAG, config_copy, install_fake_api, make_checkpoint


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory)


@pytest.fixture
def fake_api(monkeypatch):
    return install_fake_api(monkeypatch)


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
