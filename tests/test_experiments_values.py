"""``experiments.py``, the studies' command line, checked by value with nothing trained: the options as parsed and as
``--help`` shows them, ``--shard``'s parsing, what ``--list`` prints, which runs a call trains and in which order
(the training, the data export, the Accelerator and the clock replaced by recorders), the time limit and the failures'
lines (its ``report`` command: tests/test_experiments_report_values.py). Written for a mutmut run (tests/README.md);
fast."""

import argparse
import shutil
import sys
import types
from pathlib import Path

import pytest

from timm_capsules.experiments import plans, records
from timm_capsules.experiments.budget import GPU_ASSUMPTIONS
from timm_capsules.experiments.runner import command

from experiments_values_shared import ROOT, TRAIN, import_experiments


@pytest.fixture
def experiments(monkeypatch):
    return import_experiments(monkeypatch)


# ---- the command line -------------------------------------------------------------------------------------------


def _parsed(experiments, monkeypatch, argv):
    seen = []
    monkeypatch.setattr(experiments, 'run_studies', lambda args: seen.append(vars(args)) or 7)
    assert experiments.main(argv) == 7
    return seen[0]


DEFAULTS = dict(
    scale='cpu',
    only=None,
    list=False,
    records=ROOT / 'results',
    outputs=Path('outputs') / 'experiments',
    data_dir=Path('outputs') / 'experiments' / 'data',
    stop_after_steps=None,
    probe_images=500,
    shard=None,
    time_limit=None,
    prepare=False,
)


def test_options_and_their_defaults(experiments, monkeypatch):
    assert _parsed(experiments, monkeypatch, ['table1']) == dict(
        DEFAULTS, studies=['table1'], seeds=[0, 1, 2], train_args=[]
    )
    assert _parsed(experiments, monkeypatch, ['affine', 'table1', '--scale', 'gpu', '--', '--epochs', '1']) == dict(
        DEFAULTS, studies=['affine', 'table1'], scale='gpu', seeds=[0, 1], train_args=['--epochs', '1']
    )
    assert _parsed(experiments, monkeypatch, ['table1', 'all', '--scale', 'paper', '--seeds', '0', '--']) == dict(
        DEFAULTS, studies=list(plans.STUDIES), scale='paper', seeds=[], train_args=[]
    )
    given = [
        'iterations',
        '--seeds',
        '4',
        '--only',
        'a',
        'b',
        '--list',
        '--records',
        'r',
        '--outputs',
        'o',
        '--data-dir',
        'd',
        '--stop-after-steps',
        '5',
        '--probe-images',
        '7',
        '--shard',
        '1/3',
        '--time-limit',
        '2.5',
        '--prepare',
        '--',
        '--x',
        '--',
        'y',
    ]
    parsed = _parsed(experiments, monkeypatch, given)
    assert parsed == dict(
        studies=['iterations'],
        scale='cpu',
        seeds=[0, 1, 2, 3],
        only=['a', 'b'],
        list=True,
        records=Path('r'),
        outputs=Path('o'),
        data_dir=Path('d'),
        stop_after_steps=5,
        probe_images=7,
        shard=(1, 3),
        time_limit=2.5,
        prepare=True,
        train_args=['--x', '--', 'y'],
    )
    assert [type(parsed[k]) for k in ('stop_after_steps', 'probe_images', 'time_limit')] == [int, int, float]
    monkeypatch.setattr(sys, 'argv', ['experiments.py', 'multimnist', '--seeds', '1'])
    assert _parsed(experiments, monkeypatch, None) == dict(DEFAULTS, studies=['multimnist'], seeds=[0], train_args=[])


def test_report_is_its_own_command_line(experiments, monkeypatch):
    seen = []
    monkeypatch.setattr(experiments, 'report_main', lambda argv, train_args: seen.append((argv, train_args)) or 5)
    assert experiments.main(['report', '--scale', 'gpu', '--', '--epochs', '2']) == 5
    assert experiments.main(['report']) == 5
    assert seen == [(['--scale', 'gpu'], ['--epochs', '2']), ([], [])]


def test_bad_arguments_are_one_line(experiments, capsys):
    for argv, line in [
        (['tables'], "argument STUDY: invalid choice: 'tables'"),
        (['table1', '--scale', 'tpu'], "argument --scale: invalid choice: 'tpu' (choose from 'cpu', 'gpu', 'paper')"),
        (['table1', '--shard', '2/2'], 'argument --shard: shard 2/2: I must be in 0..N-1'),
        (['table1', '--seeds', 'two'], "argument --seeds: invalid int value: 'two'"),
        (['--list'], 'the following arguments are required: STUDY'),
    ]:
        with pytest.raises(SystemExit) as info:
            experiments.main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith('usage: experiments.py [-h] ') and line in err, (argv, err)


def test_shard_is_i_of_n(experiments):
    assert experiments.shard('0/4') == (0, 4) and experiments.shard('3/4') == (3, 4) and experiments.shard('0/1')
    for text, message in [
        ('4/4', 'shard 4/4: I must be in 0..N-1'),
        ('-1/4', 'shard -1/4: I must be in 0..N-1'),
        ('0/0', 'shard 0/0: I must be in 0..N-1'),
        ('1', "'1' is not I/N (e.g. 0/4)"),
        ('1/2/3', "'1/2/3' is not I/N (e.g. 0/4)"),
        ('a/4', "'a/4' is not I/N (e.g. 0/4)"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError) as info:
            experiments.shard(text)
        assert str(info.value) == message and info.value.__suppress_context__ is ('is not' in message)


HELP = """usage: experiments.py [-h] [--scale {cpu,gpu,paper}] [--seeds SEEDS] [--only WORD [WORD ...]] [--list] \
[--records RECORDS] [--outputs OUTPUTS] [--data-dir DATA_DIR] [--stop-after-steps N] [--probe-images PROBE_IMAGES] \
[--shard I/N] [--time-limit SECONDS] [--prepare] STUDY [STUDY ...]

DESCRIPTION

positional arguments:
  STUDY                 table1, iterations, ablations, multimnist, affine or all ("report" instead: tables and plots, \
see report --help)

options:
  -h, --help            show this help message and exit
  --scale {cpu,gpu,paper}
                        reduced CPU protocol, the Fashion-MNIST studies for one GPU, or the paper
  --seeds SEEDS         seeds per configuration (0, 1, ...; default 3 at cpu scale, as the tables of docs/results.md, \
else 2)
  --only WORD [WORD ...]
                        only runs whose id contains one of these
  --list                list the runs and their commands, run nothing
  --records RECORDS     where run records go (one JSON per run)
  --outputs OUTPUTS     checkpoints and trained models of the runs
  --data-dir DATA_DIR   where the exported datasets go
  --stop-after-steps N  debug: stop each run after N optimizer steps as if killed (a rerun continues it)
  --probe-images PROBE_IMAGES
                        two-digit images for the part-whole probe
  --shard I/N           only every N-th run to do, from the I-th (shards started side by side share one GPU)
  --time-limit SECONDS  start no run that would end past this many seconds (gpu scale: by gpu_estimate)
  --prepare             write the datasets the runs need, train nothing
"""

REPORT_HELP = """usage: experiments.py report [-h] [--scale {cpu,gpu,paper}] [--records RECORDS] [--plots PLOTS] \
[--write docs/results.md] [--data-dir DATA_DIR] [--record-hub]

tables and plots from the run records

options:
  -h, --help            show this help message and exit
  --scale {cpu,gpu,paper}
  --records RECORDS
  --plots PLOTS         where the PNG plots go
  --write docs/results.md
                        replace the text between <!-- experiments:begin --> and <!-- experiments:end --> (gpu: \
experiments-gpu) in this file (else print it)
  --data-dir DATA_DIR   the runs' --data-dir (part of their ids)
  --record-hub          fill the hub configs' measured results from matching runs (paper scale)
"""


def test_help(experiments, capsys):
    with pytest.raises(SystemExit) as info:
        experiments.main(['--help'])
    # the description: the module docstring's first paragraph, as argparse fills it to the width
    first = (ROOT / 'experiments.py').read_text().split('"""')[1].split('\n\n')[0]
    description = argparse.HelpFormatter('x', width=300 - 2)._fill_text(first, 298, '')
    assert info.value.code == 0 and capsys.readouterr().out == HELP.replace('DESCRIPTION', description)
    with pytest.raises(SystemExit) as info:
        experiments.main(['report', '--help'])
    assert info.value.code == 0 and capsys.readouterr().out == REPORT_HELP


# ---- which runs a call trains -----------------------------------------------------------------------------------


class Recorder:
    """The runner's parts that touch the disk, the Accelerator or the training, replaced: what they were given."""

    def __init__(self, experiments, monkeypatch, outcomes=None, clock=None):
        self.prepared, self.executed, self.accelerators, self.ended = [], [], [], []
        self.outcomes = outcomes or {}  # run id -> a record, {} or an exception
        self.estimates = {}
        monkeypatch.setattr(experiments, 'prepare_data', lambda *args: self.prepared.append(args))
        monkeypatch.setattr(experiments, 'shared_accelerator', self.accelerator)
        monkeypatch.setattr(experiments, 'execute', self.execute)
        monkeypatch.setattr(experiments, 'gpu_estimate', self.estimate)
        if clock is not None:
            times = iter(clock)
            monkeypatch.setattr(experiments, 'time', types.SimpleNamespace(time=lambda: next(times)))

    def estimate(self, run):
        return self.estimates.setdefault(run.run_id, 10.0 + 7 * len(self.estimates) + run.seed / 4)

    def accelerator(self, run, output_dir):
        accelerator = types.SimpleNamespace(made_for=(run.run_id, output_dir))
        accelerator.end_training = lambda: self.ended.append(accelerator)
        self.accelerators.append(accelerator)
        return accelerator

    def execute(self, *args):
        self.executed.append(args)
        outcome = self.outcomes.get(args[0].run_id, {})
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _main(experiments, *argv):
    return experiments.main([str(a) for a in argv])


def _by_seed(runs):
    return [run for seed in sorted({run.seed for run in runs}) for run in runs if run.seed == seed]


def _affine(seeds=2):
    """The cpu scale's affine runs of two of its models, 'CapsNet-' and 'CNN-', first seeds first."""
    runs = plans.plan('cpu', ['affine'], range(seeds))
    return _by_seed([run for run in runs if 'CapsNet-' in run.run_id or 'CNN-' in run.run_id])


def test_a_call_trains_the_runs_left_first_seeds_first_on_one_accelerator(experiments, tmp_path, monkeypatch, capsys):
    runs = _affine()
    assert len(runs) == 4 and [run.seed for run in runs] == [0, 0, 1, 1]
    done = records.record_path(tmp_path / 'records', 'cpu', runs[1])
    done.parent.mkdir(parents=True)
    shutil.copy(ROOT / 'results' / 'cpu' / done.name, done)  # a committed record: that run is finished
    outcomes = {
        runs[0].run_id: dict(metric='top1', metrics=dict(top1=0.912345, top5=1.0), training_time_s=12.5),
        runs[2].run_id: SystemExit('the model does not fit'),
        runs[3].run_id: {},  # not the main process: no record
    }
    calls = Recorder(experiments, monkeypatch, outcomes)
    options = ['--records', tmp_path / 'records', '--outputs', tmp_path / 'out', '--only', 'CapsNet-', 'CNN-']
    with pytest.raises(SystemExit) as info:
        _main(experiments, 'affine', '--seeds', 2, *options, '--probe-images', 9, '--stop-after-steps', 4)
    todo = [runs[0], runs[2], runs[3]]
    assert str(info.value) == f'1 of 3 runs failed: {runs[2].run_id}'
    assert calls.prepared == [('cpu', todo, plans.DATA)]
    assert [args[0] for args in calls.executed] == todo
    [accelerator] = calls.accelerators
    assert accelerator.made_for == (runs[0].run_id, tmp_path / 'out' / 'cpu' / runs[0].run_id)
    assert all(
        args[1:] == ('cpu', tmp_path / 'records', tmp_path / 'out', 9, accelerator, TRAIN, 4) for args in calls.executed
    )
    assert calls.ended == [accelerator]
    assert capsys.readouterr().out.splitlines() == [
        '4 runs in affine at scale cpu: 1 finished, 3 to run',
        f'== run 1/3: {runs[0].run_id}',
        f'== {runs[0].run_id}: top1 0.9123, 12 s',
        f'== run 2/3: {runs[2].run_id}',
        f'== {runs[2].run_id} failed: the model does not fit',
        f'== run 3/3: {runs[3].run_id}',
    ]


def test_only_shard_prepare_and_a_finished_call(experiments, tmp_path, monkeypatch, capsys):
    every = _by_seed(plans.plan('cpu', ['table1', 'multimnist'], range(3), tmp_path / 'd'))
    calls = Recorder(experiments, monkeypatch)
    only = ['IDA', 'multimnist-CNN']
    chosen = [run for run in every if 'IDA' in run.run_id or 'multimnist-CNN' in run.run_id]
    assert 0 < len(chosen) < len(every) and any('IDA' not in run.run_id for run in chosen)
    shard = chosen[1::3]
    common = ['table1', 'multimnist', '--records', tmp_path / 'r', '--data-dir', tmp_path / 'd', '--only', *only]
    assert _main(experiments, *common, '--shard', '1/3', '--prepare') == 0
    assert calls.prepared == [('cpu', shard, tmp_path / 'd')] and calls.executed == [] and calls.accelerators == []
    assert capsys.readouterr().out == (
        f'{len(shard)} runs in table1, multimnist at scale cpu (shard 1/3): 0 finished, {len(shard)} to run\n'
    )
    assert _main(experiments, *common, '--shard', '0/1') == 0
    assert [args[0] for args in calls.executed] == chosen and calls.ended == calls.accelerators
    calls.prepared.clear()
    assert _main(experiments, 'table1', '--only', 'no such run', '--records', tmp_path / 'r') == 0
    assert calls.prepared == [('cpu', [], plans.DATA)] and calls.ended == calls.accelerators  # none made, none ended


def test_a_run_s_error_ends_the_call_when_it_is_the_only_one_or_not_a_message(experiments, tmp_path, monkeypatch):
    runs = _affine()
    common = ['affine', '--seeds', 2, '--records', tmp_path / 'r', '--outputs', tmp_path / 'o', '--only']
    for only, error in [([runs[0].run_id], SystemExit('one line')), (['CapsNet-'], SystemExit(3)), (['CNN-'], None)]:
        error = error or KeyboardInterrupt()
        first = runs[0] if only != ['CNN-'] else runs[1]
        calls = Recorder(experiments, monkeypatch, {first.run_id: error})
        with pytest.raises(type(error)) as info:
            _main(experiments, *common, *only)
        assert info.value is error and len(calls.executed) == 1 and calls.ended == calls.accelerators
        assert len(calls.ended) == 1


def test_time_limit(experiments, tmp_path, monkeypatch, capsys):
    runs = _affine()
    common = ['affine', '--seeds', 2, '--records', tmp_path / 'r', '--time-limit', 5, '--only', 'CapsNet-', 'CNN-']
    # the clock at the start, then before each run: 0 s, 4 s, exactly 5 s (still starts), 5.5 s (too late)
    calls = Recorder(experiments, monkeypatch, clock=[100.0, 100.0, 104.0, 105.0, 105.5])
    assert _main(experiments, *common) == 0
    assert [args[0] for args in calls.executed] == runs[:3]
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == '== time limit: 1 runs left for a next call (a finished run is never rerun)'
    assert out[-2] == f'== run 3/4: {runs[2].run_id}'

    # at gpu scale a run starts only if its estimate ends before the limit
    gpu = _by_seed(plans.plan('gpu', ['ablations'], range(1)))
    calls = Recorder(experiments, monkeypatch, clock=[0.0, 0.0, 30.0, 60.0])
    calls.estimates = {gpu[0].run_id: 20.0, gpu[1].run_id: 30.0, gpu[2].run_id: 40.0}
    limit = ['--time-limit', 60, '--records', tmp_path / 'r', '--scale', 'gpu', '--seeds', 1]
    assert _main(experiments, 'ablations', *limit) == 0
    assert [args[0] for args in calls.executed] == gpu[:2]
    assert f'== time limit: {len(gpu) - 2} runs left for a next call' in capsys.readouterr().out
    calls = Recorder(experiments, monkeypatch, clock=[0.0, 0.0])
    calls.estimates = {gpu[0].run_id: 61.0}
    assert _main(experiments, 'ablations', *limit) == 0
    assert calls.executed == [] and calls.accelerators == []  # nothing started, no Accelerator to end

    calls = Recorder(experiments, monkeypatch, clock=[0.0] + [1e9] * 4)  # no limit: the clock is not asked
    assert _main(experiments, 'affine', '--seeds', 2, '--records', tmp_path / 'r2', '--only', 'CapsNet-', 'CNN-') == 0
    assert len(calls.executed) == 4


# ---- --list -----------------------------------------------------------------------------------------------------


def test_list_names_the_runs_their_state_and_commands(experiments, tmp_path, monkeypatch, capsys):
    runs = _by_seed(plans.plan('cpu', ['table1'], range(2)))
    folder = tmp_path / 'records' / 'cpu'
    folder.mkdir(parents=True)
    shutil.copy(ROOT / 'results' / 'cpu' / f'{runs[0].run_id}.json', folder)
    damaged = records.record_path(tmp_path / 'records', 'cpu', runs[1])
    damaged.write_text('{"run_id": ')
    problem = records.read_record(damaged)[1]
    calls = Recorder(experiments, monkeypatch)
    assert _main(experiments, 'table1', '--seeds', 2, '--list', '--records', tmp_path / 'records') == 0
    out = capsys.readouterr()
    assert out.err == f'warning: {damaged}: damaged run record ({problem}): the run is run again\n'
    assert out.out.splitlines() == [
        f'{len(runs)} runs in table1 at scale cpu: 1 finished, {len(runs) - 1} to run',
        f'the commands below read {plans.DATA / "fashion_mnist"}: experiments.py without --list writes it there first',
    ] + [
        f'[{"done" if run is runs[0] else "todo"}] {run.run_id} ({", ".join(run.studies)}): {command(run)}'
        for run in runs
    ]
    assert calls.prepared == calls.executed == []


def test_list_names_each_dataset_folder_the_commands_read(experiments, tmp_path, capsys):
    data = tmp_path / 'data'
    for studies, scale, folders in [
        (['all'], 'cpu', ['affine_mnist', 'fashion_mnist']),
        (['affine'], 'cpu', ['affine_mnist']),
        (['multimnist'], 'cpu', []),
        (['affine'], 'paper', ['affine_mnist_full']),  # not affine_mnist, whose name is a part of its
    ]:
        argv = [*studies, '--scale', scale, '--seeds', 1, '--list', '--records', tmp_path, '--data-dir', data]
        assert _main(experiments, *argv) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('the commands below')]
        shown = ', '.join(str(data / folder) for folder in folders)
        which = 'it' if len(folders) == 1 else 'them'
        expected = [f'the commands below read {shown}: experiments.py without --list writes {which} there first']
        assert lines == (expected if folders else []), (studies, scale)


def test_list_at_gpu_scale_shows_each_estimate_and_the_total(experiments, tmp_path, monkeypatch, capsys):
    runs = _by_seed(plans.plan('gpu', ['iterations'], range(2)))
    folder = tmp_path / 'cpu_records' / 'gpu'
    folder.mkdir(parents=True)
    committed = {p.stem for p in (ROOT / 'results' / 'gpu').glob('*.json')}
    done = [run for run in runs if run.run_id in committed]
    assert done, 'the gpu records hold none of its iterations runs'
    for run in done:
        shutil.copy(ROOT / 'results' / 'gpu' / f'{run.run_id}.json', folder)
    calls = Recorder(experiments, monkeypatch)
    argv = ['iterations', '--scale', 'gpu', '--seeds', 2, '--list', '--records', tmp_path / 'cpu_records']
    assert _main(experiments, *argv) == 0
    out = capsys.readouterr().out.splitlines()
    listed = [line for line in out if line.startswith('[')]
    assert listed == [
        f'[{"done" if run in done else "todo"}] {run.run_id} ({", ".join(run.studies)})'
        f' [~{calls.estimates[run.run_id]:.0f} s]: {command(run)}'
        for run in runs
    ]
    total = 0.0
    for run in runs:
        if run not in done:
            total += calls.estimates[run.run_id]
    shards = GPU_ASSUMPTIONS['shards']
    assert shards == 4
    assert out[-1] == (
        f'estimated GPU time of the {len(runs) - len(done)} runs to do: {total / 60:.1f} min on one shard, '
        f'{total / 4 / 60:.1f} min over 4 shards (assumptions: {GPU_ASSUMPTIONS})'
    )


class Unflushed:
    """sys.stdout that keeps what was written until it is flushed: a log file's buffer."""

    def __init__(self):
        self.pending, self.flushed, self.late = '', '', []

    def write(self, text):
        if self.pending.endswith('\n'):  # a finished line not flushed before the next is written
            self.late.append(self.pending)
        self.pending += text
        return len(text)

    def flush(self):
        self.flushed, self.pending = self.flushed + self.pending, ''


def test_each_line_is_flushed_at_once_and_failures_before_the_time_limit_count(experiments, tmp_path, monkeypatch):
    runs = _affine()
    outcomes = {
        runs[0].run_id: dict(metric='top1', metrics=dict(top1=0.5), training_time_s=1.0),
        runs[1].run_id: SystemExit('bad'),
    }
    calls = Recorder(experiments, monkeypatch, outcomes, clock=[0.0, 0.0, 1.0, 2.0, 10.0])  # the 4th run: too late
    stream, unflushed = Unflushed(), []

    def execute(*args):  # what a log file would not yet hold when a run starts
        unflushed.append(stream.pending)
        return calls.execute(*args)

    monkeypatch.setattr(experiments, 'execute', execute)
    monkeypatch.setattr(sys, 'stdout', stream)
    argv = ['affine', '--seeds', 2, '--records', tmp_path / 'r', '--only', 'CapsNet-', 'CNN-', '--time-limit', 5]
    with pytest.raises(SystemExit) as info:
        _main(experiments, *argv)
    assert str(info.value) == f'1 of 4 runs failed: {runs[1].run_id}'  # of the runs to do
    assert unflushed == ['', '', ''] and stream.pending == '' and stream.late == []
    assert stream.flushed.splitlines() == [
        '4 runs in affine at scale cpu: 0 finished, 4 to run',
        f'== run 1/4: {runs[0].run_id}',
        f'== {runs[0].run_id}: top1 0.5000, 1 s',
        f'== run 2/4: {runs[1].run_id}',
        f'== {runs[1].run_id} failed: bad',
        f'== run 3/4: {runs[2].run_id}',
        '== time limit: 1 runs left for a next call (a finished run is never rerun)',
    ]


def test_every_failed_run_is_named_and_the_training_arguments_make_the_runs(experiments, tmp_path, monkeypatch, capsys):
    runs = plans.plan('cpu', ['affine'], range(1), plans.DATA, ['--epochs', '1'])
    chosen = [run for run in runs if 'CapsNet-' in run.run_id or 'CNN-' in run.run_id]
    assert len(chosen) == 2 and not {run.run_id for run in chosen} & {run.run_id for run in _affine(1)}
    calls = Recorder(experiments, monkeypatch, {run.run_id: SystemExit('no') for run in chosen})
    argv = ['affine', '--seeds', 1, '--records', tmp_path / 'r', '--only', 'CapsNet-', 'CNN-', '--', '--epochs', 1]
    with pytest.raises(SystemExit) as info:
        _main(experiments, *argv)
    assert str(info.value) == f'2 of 2 runs failed: {chosen[0].run_id}, {chosen[1].run_id}'
    assert [args[0] for args in calls.executed] == chosen
