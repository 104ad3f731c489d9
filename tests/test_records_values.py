"""``timm_capsules/experiments/records.py`` called directly, checked by value: where a record lives, the machine and
commit a record names (read here a second way), a record written whole, every kind of damage with its exact
message, the warnings of the loaders, and the rows and metric values a study's table reads. Written for a mutmut
run (tests/README.md); fast, hand-made records in a temporary folder."""

import json
import math
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

from timm_capsules.experiments import records
from timm_capsules.experiments.plans import Run
from timm_capsules.experiments.records import (
    damaged_records,
    load_records,
    metric_values,
    read_record,
    record_path,
    rows_of,
    write_record,
)


def run(name, studies=('table1',), seed=0, **row):
    return Run(f'{name}-seed{seed}', tuple(studies), dict(row or {'kind': name}), 'fashion_mnist', seed, 10, [])


def sound(run_id, /, **changes):
    record = dict(
        run_id=run_id,
        metric='top1',
        metrics={'top1': 0.75, 'top5': 0.9, 'per_class': [0.5, 1.0]},
        model='capsnet_simple_cifar10',
        machine='a machine',
        num_parameters=1234,
        wall_time_s=12.5,
    )
    record.update(changes)
    return record


def put(folder, run_id, record):
    path = folder / 'cpu' / f'{run_id}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return path


# ---- where, which machine, which commit ----------------------------------------------------------------------


def test_record_path_is_the_scale_folder_and_the_run_id():
    assert record_path(Path('/r'), 'gpu', run('IDA', seed=3)) == Path('/r/gpu/IDA-seed3.json')


def test_machine_names_the_cpu_of_proc_cpuinfo_its_cores_and_torch():
    cpu = None
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line[line.index(':') + 1 :].strip()
                break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    gpu = f', {torch.cuda.get_device_name()}' if torch.cuda.is_available() else ''
    assert records.machine() == f'{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}'


def fake_cpuinfo(monkeypatch, tmp_path, text):
    path = tmp_path / 'cpuinfo'
    if text is not None:
        path.write_text(text)
    real = Path
    monkeypatch.setattr(records, 'Path', lambda name: path if name == '/proc/cpuinfo' else real(name))


def test_machine_takes_the_first_model_name_whole(monkeypatch, tmp_path):
    text = 'processor\t: 0\nvendor_id\t: X\nmodel name\t: Chip: Mark 2 @ 3GHz \nmodel name\t: other\n'
    fake_cpuinfo(monkeypatch, tmp_path, text)
    assert records.machine().startswith(f'Chip: Mark 2 @ 3GHz, {os.cpu_count()} cores')


@pytest.mark.parametrize('text', [None, 'processor\t: 0\nflags\t: fpu\n'])
def test_machine_without_a_model_name_falls_back_to_platform(monkeypatch, tmp_path, text):
    fake_cpuinfo(monkeypatch, tmp_path, text)
    monkeypatch.setattr(platform, 'processor', lambda: '')
    monkeypatch.setattr(platform, 'machine', lambda: 'weird64')
    assert records.machine().startswith(f'weird64, {os.cpu_count()} cores')
    monkeypatch.setattr(platform, 'processor', lambda: 'proc9')
    assert records.machine().startswith(f'proc9, {os.cpu_count()} cores')


def git_head():
    folder = Path(records.__file__).resolve().parent
    done = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=folder, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def test_commit_is_the_environment_variable_when_set(monkeypatch):
    monkeypatch.setenv('TIMM_CAPSULES_COMMIT', 'abc123')
    assert records.commit() == 'abc123'


@pytest.mark.parametrize('value', [None, ''])
def test_commit_is_git_head_of_the_package_otherwise(monkeypatch, value):
    if value is None:
        monkeypatch.delenv('TIMM_CAPSULES_COMMIT', raising=False)
    else:
        monkeypatch.setenv('TIMM_CAPSULES_COMMIT', value)
    assert records.commit() == git_head()


def test_commit_is_none_without_git_or_outside_a_repository(monkeypatch, tmp_path):
    monkeypatch.delenv('TIMM_CAPSULES_COMMIT', raising=False)
    monkeypatch.setenv('PATH', str(tmp_path))  # no git to run
    assert records.commit() is None
    monkeypatch.setenv('PATH', os.defpath)
    monkeypatch.setenv('GIT_DIR', str(tmp_path / 'no_repository'))  # git runs and fails
    assert records.commit() is None


def test_commit_is_head_of_the_repository_holding_the_package(monkeypatch, tmp_path):
    """The package's folder decides the repository: a copy of the module inside a repository with a commit
    names that commit, whatever the working directory."""
    monkeypatch.delenv('TIMM_CAPSULES_COMMIT', raising=False)
    for name in ('GIT_DIR', 'GIT_WORK_TREE'):
        monkeypatch.delenv(name, raising=False)
    repository = tmp_path / 'repository'
    (repository / 'package').mkdir(parents=True)
    git = ['git', '-c', 'user.name=t', '-c', 'user.email=t@example.org']
    subprocess.run(git + ['init', '-q'], cwd=repository, check=True)
    subprocess.run(git + ['commit', '-q', '--allow-empty', '-m', 'one'], cwd=repository, check=True)
    head = subprocess.run(['git', 'log', '-1', '--format=%H'], cwd=repository, capture_output=True, text=True)
    assert len(head.stdout.strip()) == 40
    monkeypatch.setattr(records, '__file__', str(repository / 'package' / 'records.py'))
    monkeypatch.chdir(tmp_path)  # not a repository
    assert records.commit() == head.stdout.strip()


def test_machine_names_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *device: 'Some GPU 80GB')
    assert records.machine().endswith(f' cores, Some GPU 80GB, torch {torch.__version__}')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert records.machine().endswith(f'{os.cpu_count()} cores, torch {torch.__version__}')


# ---- writing ----------------------------------------------------------------------------------------------


def test_write_record_makes_the_folders_and_leaves_one_indented_file(tmp_path):
    path = tmp_path / 'a' / 'b' / 'IDA-seed0.json'
    write_record(path, sound('IDA-seed0'))
    assert json.loads(path.read_text()) == sound('IDA-seed0')
    lines = path.read_text().splitlines()
    assert lines[0] == '{' and lines[1] == ' "run_id": "IDA-seed0",'  # indent 1
    assert os.listdir(path.parent) == ['IDA-seed0.json']
    write_record(path, sound('IDA-seed0', model='other'))  # replaces
    assert json.loads(path.read_text())['model'] == 'other' and os.listdir(path.parent) == ['IDA-seed0.json']


# ---- reading -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'value, finite',
    [(1, True), (0, True), (-2.5, True), (1e300, True), (True, False), (False, False), (math.nan, False)]
    + [(math.inf, False), (-math.inf, False), ('1', False), (None, False), ([1], False)],
)
def test_finite_number(value, finite):
    assert records._finite_number(value) is finite


def test_a_sound_record_reads_back_as_itself(tmp_path):
    record = sound('IDA-seed0', part_whole_probe={'own_fraction': 0.6})
    assert read_record(put(tmp_path, 'IDA-seed0', record)) == (record, None)
    bare = sound('IDA-seed1', metrics={'top1': 1}, num_parameters=0, wall_time_s=0)
    assert read_record(put(tmp_path, 'IDA-seed1', bare)) == (bare, None)


def test_unreadable_records(tmp_path):
    path = put(tmp_path, 'x', '{"run_id": "x", ')
    record, problem = read_record(path)
    assert record is None and problem.startswith('not readable JSON (') and problem.endswith(')')
    assert 'Expecting' in problem
    path.write_bytes(b'\xff\xfe\x00{}')
    assert read_record(path)[1].startswith('not readable JSON (') and 'decode' in read_record(path)[1]
    assert read_record(tmp_path / 'missing.json')[1].startswith('not readable JSON ([Errno 2]')
    path.write_text('[' * 100000 + ']' * 100000)
    assert read_record(path)[1].startswith('not readable JSON (')
    path.write_text('[1, 2]')
    assert read_record(path) == (None, 'not a JSON object')


@pytest.mark.parametrize(
    'key, value, message',
    [
        ('run_id', None, '"run_id" must be a str, got None'),
        ('metric', 3, '"metric" must be a str, got 3'),
        ('metrics', [0.5], '"metrics" must be a dict, got [0.5]'),
        ('model', {'a': 1}, '"model" must be a str, got {\'a\': 1}'),
        ('machine', None, '"machine" must be a str, got None'),
    ],
)
def test_a_field_of_the_wrong_kind(tmp_path, key, value, message):
    assert read_record(put(tmp_path, 'r', sound('r', **{key: value}))) == (None, message)


def test_a_missing_field(tmp_path):
    record = sound('r')
    del record['machine']
    assert read_record(put(tmp_path, 'r', record)) == (None, '"machine" must be a str, got None')


def test_a_record_under_another_name(tmp_path):
    assert read_record(put(tmp_path, 'r', sound('s'))) == (None, "\"run_id\" is 's', not the file's name")


def test_metrics_that_are_not_finite_numbers(tmp_path):
    metrics = {'top1': 0.5, 'a': 'high', 'b': [0.1, None], 'c': True, 'd': [0.2, 0.3], 'e': None}
    record, problem = read_record(put(tmp_path, 'r', sound('r', metrics=metrics)))
    assert problem == "metrics that are not finite numbers: {'a': 'high', 'b': [0.1, None], 'c': True, 'e': None}"
    path = put(tmp_path, 'r', json.dumps(sound('r')).replace('0.9', 'NaN'))
    assert read_record(path) == (None, "metrics that are not finite numbers: {'top5': nan}")


@pytest.mark.parametrize('metrics', [{'top5': 0.9}, {'top1': [0.5, 0.5]}, {}])
def test_the_named_metric_must_be_a_number_among_the_metrics(tmp_path, metrics):
    problem = "its metric 'top1' is not a number among its metrics"
    assert read_record(put(tmp_path, 'r', sound('r', metrics=metrics))) == (None, problem)


@pytest.mark.parametrize('key', ['num_parameters', 'wall_time_s'])
@pytest.mark.parametrize('value', [-1, -0.5, None, '3', True])
def test_counts_must_be_numbers_from_zero(tmp_path, key, value):
    problem = f'"{key}" must be a number >= 0, got {value!r}'
    assert read_record(put(tmp_path, 'r', sound('r', **{key: value}))) == (None, problem)


def test_a_missing_count(tmp_path):
    record = sound('r')
    del record['wall_time_s']
    assert read_record(put(tmp_path, 'r', record)) == (None, '"wall_time_s" must be a number >= 0, got None')


@pytest.mark.parametrize('probe', [{'own_fraction': 'most'}, {'own': 0.5}, [0.5], 0.5, {'own_fraction': True}])
def test_a_probe_needs_a_numeric_own_fraction(tmp_path, probe):
    problem = f'"part_whole_probe" has no numeric own_fraction: {probe!r}'
    assert read_record(put(tmp_path, 'r', sound('r', part_whole_probe=probe))) == (None, problem)
    assert read_record(put(tmp_path, 'r', sound('r', part_whole_probe=None)))[1] is None


# ---- the loaders -------------------------------------------------------------------------------------------


def folder_of_three(tmp_path):
    """IDA-seed0 sound, IDA-seed1 damaged, IDA-seed2 missing, and a sound record of no planned run."""
    runs = [run('IDA', seed=seed) for seed in range(3)]
    put(tmp_path, 'IDA-seed0', sound('IDA-seed0'))
    put(tmp_path, 'IDA-seed1', sound('IDA-seed1', model=None))
    put(tmp_path, 'old-seed0', sound('old-seed0'))
    return runs


def test_damaged_records_names_each_damaged_planned_record(tmp_path):
    runs = folder_of_three(tmp_path)
    path = str(tmp_path / 'cpu' / 'IDA-seed1.json')
    assert damaged_records(tmp_path, 'cpu', runs) == {path: '"model" must be a str, got None'}
    assert damaged_records(tmp_path, 'gpu', runs) == {}
    (tmp_path / 'cpu' / 'IDA-seed2.json').mkdir()  # a folder is no record
    assert damaged_records(tmp_path, 'cpu', runs) == {path: '"model" must be a str, got None'}


def test_load_records_keeps_the_sound_planned_ones_and_warns_of_the_damaged(tmp_path, capsys):
    runs = folder_of_three(tmp_path)
    assert load_records(tmp_path, 'cpu', runs) == {'IDA-seed0': sound('IDA-seed0')}
    path = tmp_path / 'cpu' / 'IDA-seed1.json'
    expected = (
        f'warning: {path}: damaged run record, skipped (its run counts as not done): "model" must be a str, got None\n'
    )
    assert capsys.readouterr() == ('', expected)
    assert load_records(tmp_path, 'cpu', runs, warn=False) == {'IDA-seed0': sound('IDA-seed0')}
    assert capsys.readouterr() == ('', '')
    assert load_records(tmp_path, 'gpu', runs) == {}


# ---- rows and values ------------------------------------------------------------------------------------------


def test_rows_of_groups_the_seeds_of_a_row_in_plan_order():
    runs = [
        run('IDA', ('table1', 'iterations'), 0, kind='IDA', t=2),
        run('DR', ('table1',), 0, kind='DR'),
        run('IDA', ('table1', 'iterations'), 1, t=2, kind='IDA'),  # same row, keys in another order
        run('DR', ('table1',), 1, kind='DR'),
        run('EM', ('iterations',), 0, kind='EM'),
    ]
    found = {r.run_id: {'n': r.run_id} for r in runs if r.run_id != 'DR-seed1'}
    assert rows_of('table1', runs, found) == [
        ({'kind': 'IDA', 't': 2}, [{'n': 'IDA-seed0'}, {'n': 'IDA-seed1'}]),
        ({'kind': 'DR'}, [{'n': 'DR-seed0'}]),
    ]
    assert rows_of('iterations', runs, {}) == [({'kind': 'IDA', 't': 2}, []), ({'kind': 'EM'}, [])]
    assert rows_of('affine', runs, found) == []


def test_metric_values_take_each_records_metric_or_the_named_one():
    found = [
        {'metric': 'top1', 'metrics': {'top1': 0.5, 'f1': 0.2}},
        {'metric': 'exact_match', 'metrics': {'exact_match': 0.7}},
        {'metric': 'top1', 'metrics': {'top1': 0.9, 'f1': 0.4}},
    ]
    assert metric_values(found) == [0.5, 0.7, 0.9]
    assert metric_values(found, 'f1') == [0.2, 0.4]
    assert metric_values(found, 'top5') == [] and metric_values([]) == []
