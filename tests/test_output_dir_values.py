"""Values of timm_capsules/train/output_dir.py, function by function, without training: the folder checks and
their exact messages, the lock (held, taken over, released, its owner file), the folder a stopped run leaves
(none), the free-space rule by hand, the one-line write failures and strict JSON with its non-finite places."""

import errno
import json
import os
import socket
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from timm_capsules.train import output_dir as od
from timm_capsules.train.output_dir import (
    check_free_space,
    check_output_dir,
    finite_json,
    output_dir_for_the_run,
    output_dir_lock,
    write_failure,
    write_json,
)

ERROR = 'train_accelerate.py: error: '


def stopped(function, *args):
    with pytest.raises(SystemExit) as stop:
        function(*args)
    return str(stop.value.code)


def test_names():
    assert (od.LOCK_NAME, od.OWNER_NAME) == ('.train.lock', '.train.lock.owner')
    assert od.OWNED_NAMES == ('model.safetensors', 'config.json', 'metrics.json', 'training_curves.png', '.tmp_model')


def test_main_launch_process_is_rank_zero(monkeypatch):
    monkeypatch.delenv('RANK', raising=False)
    assert od.is_main_launch_process() is True
    for rank, main in (('0', True), ('1', False), ('3', False)):
        monkeypatch.setenv('RANK', rank)
        assert od.is_main_launch_process() is main


def test_check_output_dir_makes_the_folder_and_returns_it(tmp_path):
    out = tmp_path / 'a' / 'b'
    assert check_output_dir(str(out)) == out and out.is_dir()
    assert check_output_dir(out) == out  # there already
    (out / 'checkpoints' / 'step_1').mkdir(parents=True)
    assert check_output_dir(out) == out


def test_check_output_dir_refusals(tmp_path):
    file = tmp_path / 'file'
    file.write_text('x')
    assert stopped(check_output_dir, file) == f'{ERROR}--output-dir {file}: is a file, not a folder'
    assert stopped(check_output_dir, file / 'run') == (
        f'{ERROR}--output-dir {file / "run"}: cannot create it (Not a directory: {file / "run"})'
    )
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'checkpoints').write_text('')
    assert stopped(check_output_dir, out) == (
        f'{ERROR}--output-dir {out}: {out / "checkpoints"} is a file, not a folder'
    )


def test_check_output_dir_not_writable(tmp_path, monkeypatch):
    asked = []

    def access(path, mode):  # as root every folder is writable: the answer is planted
        asked.append((path, mode))
        return False

    monkeypatch.setattr(od.os, 'access', access)
    out = tmp_path / 'out'
    assert stopped(check_output_dir, out) == f'{ERROR}--output-dir {out}: not writable'
    assert asked == [(out, os.W_OK | os.X_OK)]


@pytest.mark.parametrize(
    'where',
    [
        'checkpoints',
        'checkpoints/step_00000002',
        'checkpoints/.tmp_step_00000004',
        *od.OWNED_NAMES,
    ],
)
def test_check_output_dir_refuses_a_symbolic_link_where_the_run_writes(tmp_path, where):
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    out = tmp_path / 'out'
    (out / 'checkpoints').mkdir(parents=True)
    link = out / where
    if link.is_dir():
        link.rmdir()
    link.symlink_to(elsewhere)
    assert stopped(check_output_dir, out) == (
        f'{ERROR}--output-dir {out}: {link} is a symbolic link (to {elsewhere}); a run replaces and deletes only '
        f'real files and folders: remove the link or choose another --output-dir'
    )


def test_check_output_dir_leaves_other_links_alone(tmp_path):
    out = tmp_path / 'out'
    (out / 'checkpoints').mkdir(parents=True)
    (out / 'data').symlink_to(tmp_path)
    (out / 'checkpoints' / 'other').symlink_to(tmp_path)
    assert check_output_dir(out) == out


def test_lock_writes_its_owner_and_cleans_up(tmp_path, monkeypatch, capsys):
    out = tmp_path
    (out / '.tmp_model').mkdir()
    (out / '.tmp_model' / 'x').write_text('half')
    (out / 'checkpoints' / '.tmp_step_00000002').mkdir(parents=True)
    (out / 'checkpoints' / 'step_00000001').mkdir()
    monkeypatch.setattr(sys, 'argv', ['train_accelerate.py', '--lr', '1'])
    with output_dir_lock(str(out)) as held:
        assert held == out
        owner = json.loads((out / od.OWNER_NAME).read_text())
        assert set(owner) == {'pid', 'host', 'started', 'argv'}
        assert (owner['pid'], owner['host'], owner['argv']) == (
            os.getpid(),
            socket.gethostname(),
            ['train_accelerate.py', '--lr', '1'],
        )
        assert len(owner['started']) == 19 and owner['started'][4] == '-' and owner['started'][13] == ':'
        assert not (out / '.tmp_model').exists() and not (out / 'checkpoints' / '.tmp_step_00000002').exists()
        assert (out / 'checkpoints' / 'step_00000001').is_dir()
        # a second run into the folder stops at once, naming the first
        message = stopped(lambda: output_dir_lock(out).__enter__())
        assert message == (
            f'{ERROR}--output-dir {out} is in use by another run (PID {owner["pid"]} on {owner["host"]}, started '
            f'{owner["started"]}); wait for it to end or choose another --output-dir'
        )
        for damaged in ('{', '[]', '{"pid": 1}', 'null'):
            (out / od.OWNER_NAME).write_text(damaged)
            message = stopped(lambda: output_dir_lock(out).__enter__())
            assert '(PID unknown)' in message, damaged
    assert not (out / od.OWNER_NAME).exists()
    assert capsys.readouterr().err == ''
    with output_dir_lock(out):  # released: free again
        pass


def test_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, capsys):
    (tmp_path / od.OWNER_NAME).write_text(json.dumps(dict(pid=123, host='h', started='2026-01-02 03:04:05')))
    with output_dir_lock(tmp_path):
        assert json.loads((tmp_path / od.OWNER_NAME).read_text())['pid'] == os.getpid()
    assert capsys.readouterr().err == (
        f'warning: --output-dir {tmp_path}: a run that ended without releasing it (PID 123, started '
        f'2026-01-02 03:04:05) left its lock; taken over\n'
    )
    for other in ('[1]', 'garbage', '"x"'):
        (tmp_path / od.OWNER_NAME).write_text(other)
        with output_dir_lock(tmp_path):
            pass
        assert capsys.readouterr().err == '', other


def test_lock_released_after_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        with output_dir_lock(tmp_path):
            raise RuntimeError
    assert not (tmp_path / od.OWNER_NAME).exists()
    with output_dir_lock(tmp_path):
        pass


def test_lock_that_cannot_be_taken_names_the_cause(tmp_path, monkeypatch):
    import filelock

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, 'Permission denied', str(tmp_path / od.LOCK_NAME))

    monkeypatch.setattr(filelock.FileLock, 'acquire', refuse)
    assert stopped(lambda: output_dir_lock(tmp_path).__enter__()) == (
        f'{ERROR}--output-dir {tmp_path}: cannot lock it (Permission denied: {tmp_path / od.LOCK_NAME})'
    )


def test_the_run_s_folder_is_removed_when_nothing_was_written(tmp_path, monkeypatch):
    monkeypatch.delenv('RANK', raising=False)
    out = tmp_path / 'new'
    with output_dir_for_the_run(SimpleNamespace(output_dir=str(out))) as held:
        assert held == out and (out / od.OWNER_NAME).exists()
    assert not out.exists()
    with pytest.raises(SystemExit):
        with output_dir_for_the_run(SimpleNamespace(output_dir=str(out))):
            raise SystemExit('stopped')
    assert not out.exists()
    with output_dir_for_the_run(SimpleNamespace(output_dir=str(out))):
        (out / 'metrics.json').write_text('{}')
    assert sorted(p.name for p in out.iterdir()) == [od.LOCK_NAME, 'metrics.json']
    existing = tmp_path / 'existing'
    existing.mkdir()
    with output_dir_for_the_run(SimpleNamespace(output_dir=str(existing))):
        pass
    assert existing.is_dir()  # it was there before: left


def test_other_ranks_neither_check_nor_lock(tmp_path, monkeypatch):
    monkeypatch.setenv('RANK', '1')
    file = tmp_path / 'file'
    file.write_text('x')
    with output_dir_for_the_run(SimpleNamespace(output_dir=str(file))) as held:
        assert held == file
    assert file.read_text() == 'x'
    monkeypatch.setenv('RANK', '0')
    assert stopped(lambda: output_dir_for_the_run(SimpleNamespace(output_dir=str(file))).__enter__()).endswith(
        'is a file, not a folder'
    )


@pytest.mark.parametrize('checkpointing', [False, True])
@pytest.mark.parametrize('margin', [-1, 0, 1])
def test_free_space_is_the_weights_once_or_three_times_and_64_kib(tmp_path, monkeypatch, checkpointing, margin):
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2).double())
    model.register_buffer('count', torch.zeros(7, dtype=torch.int16))
    weights = (3 * 5 + 5) * 4 + (5 * 2 + 2) * 8 + 7 * 2
    need = weights * (3 if checkpointing else 1) + 65536
    free = need + margin
    asked = []
    monkeypatch.setattr(od.shutil, 'disk_usage', lambda path: asked.append(path) or SimpleNamespace(free=free))
    if margin >= 0:
        check_free_space(tmp_path, model, checkpointing)
        assert asked == [tmp_path]
        return
    message = stopped(check_free_space, tmp_path, model, checkpointing)
    what = 'checkpoint' if checkpointing else 'model'
    assert message == (
        f'{ERROR}--output-dir {tmp_path}: {free / 2**20:.2f} MiB free on its disk, a {what} of this model needs '
        f'about {need / 2**20:.2f} MiB'
    )


def test_write_failure_names_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / 'model.safetensors'
    assert write_failure(path, OSError(errno.ENOSPC, 'No space')) == f'no space left on device: {path}'
    assert write_failure(path, OSError(errno.EACCES, 'Permission denied')) == (
        f'cannot write {path}: [Errno 13] Permission denied'
    )
    assert write_failure(path, RuntimeError('unexpected pos 12\nmore')) == f'cannot write {path}: unexpected pos 12'
    assert write_failure(path, RuntimeError()) == f'cannot write {path}: RuntimeError'
    seen = []

    def usage(free):
        def disk_usage(where):
            seen.append(where)
            return SimpleNamespace(free=free)

        return disk_usage

    monkeypatch.setattr(od.shutil, 'disk_usage', usage((1 << 20) - 1))
    assert write_failure(path, RuntimeError('file write failed')) == f'no space left on device: {path}'
    assert seen == [tmp_path]
    monkeypatch.setattr(od.shutil, 'disk_usage', usage(1 << 20))
    assert write_failure(path, RuntimeError('file write failed')) == f'cannot write {path}: file write failed'

    def gone(where):
        raise FileNotFoundError(where)

    monkeypatch.setattr(od.shutil, 'disk_usage', gone)
    assert write_failure(path, RuntimeError('x')) == f'cannot write {path}: x'


def test_finite_json_places():
    value = dict(a=1.0, b=float('nan'), c=[1, float('inf'), dict(d=float('-inf'))], e=(float('nan'),), f='nan', g=None)
    cleaned, found = finite_json(value)
    assert cleaned == dict(a=1.0, b=None, c=[1, None, dict(d=None)], e=[None], f='nan', g=None)
    assert found == ['b', 'c[1]', 'c[2].d', 'e[0]']
    assert finite_json(float('nan')) == (None, ['.'])
    assert finite_json([float('nan')]) == ([None], ['[0]'])
    assert finite_json({1: float('inf')}) == ({1: None}, ['1'])
    assert finite_json(3) == (3, [])
    assert finite_json(dict(x=[]), found=['y']) == (dict(x=[]), ['y'])


finite_values = st.recursive(
    st.one_of(st.floats(), st.integers(), st.text(max_size=3), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text('ab', max_size=2), inner, max_size=3)),
    max_leaves=10,
)


@settings(max_examples=15, deadline=None)
@given(value=finite_values)
def test_finite_json_replaces_exactly_the_non_finite_floats(value):
    def walk(v, where):  # every non-finite float's place, written out the same way by hand
        if isinstance(v, float) and (v != v or abs(v) == float('inf')):
            return [where or '.']
        if isinstance(v, dict):
            return [p for k, x in v.items() for p in walk(x, f'{where}.{k}' if where else str(k))]
        if isinstance(v, list):
            return [p for i, x in enumerate(v) for p in walk(x, f'{where}[{i}]')]
        return []

    cleaned, found = finite_json(value)
    assert found == walk(value, '')
    json.dumps(cleaned, allow_nan=False)


def test_write_json_is_strict_and_lists_the_non_finite_places(tmp_path):
    path = tmp_path / 'metrics.json'
    write_json(str(path), dict(loss=float('nan'), top1=0.5))
    text = path.read_text()
    assert text == json.dumps(dict(loss=None, top1=0.5, non_finite_values=['loss']), indent=2)
    write_json(path, dict(top1=0.5))
    assert path.read_text() == json.dumps(dict(top1=0.5), indent=2)
    write_json(path, [float('inf')])  # not a dict: nowhere to list them
    assert path.read_text() == json.dumps([None], indent=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['metrics.json']


def test_write_json_that_fails_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'metrics.json'
    path.write_text('{"old": 1}')

    def full(src, dst):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(od.os, 'replace', full)
    assert stopped(write_json, path, dict(new=2)) == f'{ERROR}no space left on device: {path}'
    assert path.read_text() == '{"old": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ['metrics.json']


def test_write_json_into_a_missing_folder_names_the_file(tmp_path):
    path = tmp_path / 'gone' / 'metrics.json'  # not even the temporary file can be made
    message = stopped(write_json, path, dict(a=1))
    assert message == (
        f"{ERROR}cannot write {path}: [Errno 2] No such file or directory: '{tmp_path / 'gone' / '.tmp_metrics.json'}'"
    )
