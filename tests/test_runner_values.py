"""``timm_capsules/experiments/runner.py`` checked by value: the command and the record of every committed run
rebuilt from its plan and the results its record holds (the commit, the machine, the threads and the times aside),
the shell quoting read back by ``shlex``, the runner's arguments by hand, and ``execute``, ``probe``,
``prepare_data`` and ``shared_accelerator`` with the training, the data export, the probe's inputs and the
Accelerator replaced by recorders. Written for a mutmut run (tests/README.md); fast, nothing is trained."""

import json
import shlex
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from timm_capsules.experiments import budget, plans, protocols, records, runner

ROOT = Path(__file__).resolve().parents[1]
DATA = Path('outputs/experiments/data')  # the committed runs' data directory
MADE_ELSEWHERE = ('commit', 'machine', 'threads', 'wall_time_s', 'resumed_from_checkpoint', 'estimated_s')
OLDER_FIELDS = ('part_whole_probe', 'train_images_per_s')  # added by execute; an earlier runner's


def committed(scale):
    return {path.stem: json.loads(path.read_text()) for path in sorted((ROOT / 'results' / scale).glob('*.json'))}


def results_of(record):
    """metrics.json's contents as far as the record keeps them."""
    final = {k: v for k, v in record['metrics'].items() if '/' not in k}
    extra = {}
    for key, value in record['metrics'].items():
        if '/' in key:
            split, name = key.split('/', 1)
            extra.setdefault(split, {})[name] = value
    return dict(
        model=record['model'],
        model_kwargs=record['model_kwargs'],
        data_source=record['data_source'],
        images_seen=record['image_budget'],
        metric=record['metric'],
        final=final,
        extra_tests=extra,
        chance_level=record['chance_level'],
        num_parameters=record['num_parameters'],
        training_time_s=record['training_time_s'],
        history={'eval': record['eval_history'], 'train': []},
    )


# ---- quote, command, run_argv -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'arg, quoted',
    [
        ('plain-_=.:/[]09aZ', 'plain-_=.:/[]09aZ'),
        ('train[:12800]', 'train[:12800]'),
        ('a b', "'a b'"),
        ("it's", "'it'\\''s'"),
        ('stages=((1, 2),)', "'stages=((1, 2),)'"),
        ('', ''),
        ('x,y', "'x,y'"),
        ('é', 'é'),  # a letter
    ],
)
def test_quote_by_hand(arg, quoted):
    assert runner.quote(arg) == quoted


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec='utf-8', exclude_characters='\0'), min_size=1), max_size=5))
def test_quote_reads_back_through_the_shell(args):
    assert shlex.split(' '.join(runner.quote(a) for a in args)) == args


@pytest.mark.parametrize('scale', ['cpu', 'gpu'])
def test_command_is_the_committed_records(scale):
    found = committed(scale)
    runs = [run for run in plans.plan(scale, plans.STUDIES, range(3), DATA) if run.run_id in found]
    assert len(runs) == len(found)
    for run in runs:
        assert runner.command(run) == found[run.run_id]['command'], run.run_id


def test_run_argv_by_hand():
    run = plans.Run('r', ('s',), {}, 'd', 7, 10, ['--model', 'm'])
    assert runner.run_argv(run, Path('out/x')) == [
        '--model',
        'm',
        '--seed',
        '7',
        '--output-dir',
        'out/x',
        '--checkpointing-steps',
        'epoch',
        '--resume-from-checkpoint',
        'latest',
    ]
    assert runner.run_argv(run, Path('o'), 5)[-2:] == ['--stop-after-steps', '5']
    assert runner.run_argv(run, Path('o'), 0) == runner.run_argv(run, Path('o'))
    assert run.train_args == ['--model', 'm']  # the run's own list is left alone


# ---- make_record ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('scale', ['cpu', 'gpu'])
def test_make_record_rebuilds_the_committed_records(scale, monkeypatch):
    monkeypatch.setattr(runner, 'commit', lambda: 'the commit')
    monkeypatch.setattr(runner, 'machine', lambda: 'the machine')
    found = committed(scale)
    for run in plans.plan(scale, plans.STUDIES, range(3), DATA):
        if run.run_id not in found:
            continue
        record = found[run.run_id]
        made = runner.make_record(run, scale, results_of(record), True, 12.5)
        import torch

        assert (made['commit'], made['machine'], made['threads']) == (
            'the commit',
            'the machine',
            torch.get_num_threads(),
        )
        assert (made['wall_time_s'], made['resumed_from_checkpoint']) == (12.5, True)
        kept = {k: v for k, v in record.items() if k not in MADE_ELSEWHERE + OLDER_FIELDS}
        if record['dataset'] == 'diverse_multimnist' and record['protocol'] != protocols.protocol_of(
            scale, 'diverse_multimnist'
        ):
            kept['protocol'] = protocols.protocol_of(scale, 'diverse_multimnist')  # three carry an older sentence
        assert {k: v for k, v in made.items() if k not in MADE_ELSEWHERE} == kept, run.run_id
        in_record = [k for k in made if k in record]
        assert in_record == [k for k in record if k in made], run.run_id  # the fields in their order
        if scale == 'gpu':
            assert made['estimated_s'] == round(budget.gpu_estimate(run), 1)
        else:
            assert 'estimated_s' not in made


def test_make_record_of_a_resumed_run_without_extra_tests():
    run = plans.Run('x-seed0', ('affine',), {'kind': 'K'}, 'paper_data', 0, 0, ['--a', 'b c'])
    results = dict(
        model='m',
        model_kwargs={},
        data_source='here',
        images_seen=5,
        metric='top1',
        final={'top1': 0.5},
        extra_tests={},
        chance_level=0.1,
        num_parameters=3,
        training_time_s=2.0,
        history={'eval': [{'step': 1}]},
    )
    made = runner.make_record(run, 'paper', results, False, 3.0)
    assert made['metrics'] == {'top1': 0.5} and made['protocol'] == 'paper recipe'
    assert made['command'] == "python train_accelerate.py --a 'b c' --seed 0"
    assert made['resumed_from_checkpoint'] is False and made['studies'] == ['affine']
    two = dict(results, extra_tests={'a': {'top1': 0.25, 'n': 2}, 'b': {'top1': 0.75}})
    made = runner.make_record(run, 'paper', two, False, 3.0)
    assert made['metrics'] == {'top1': 0.5, 'a/top1': 0.25, 'a/n': 2, 'b/top1': 0.75}


# ---- execute ------------------------------------------------------------------------------------------------------


class Trainer:
    """train(config, accelerator): records its config and gives back the given metrics."""

    def __init__(self, metrics):
        self.metrics, self.configs, self.model = metrics, [], object()

    def __call__(self, config, accelerator):
        self.configs.append(config)
        self.accelerators = getattr(self, 'accelerators', []) + [accelerator]
        return types.SimpleNamespace(metrics=self.metrics, model=self.model, output_dir=config.output_dir)


def small_run(probe=False):
    [run] = [run for run in plans.plan('cpu', ['affine'], [0], Path('d')) if run.row['kind'] == 'CNN']
    return run._replace(probe=probe)


def fake_results(run):
    return dict(
        model=run.row['model'],
        model_kwargs={'num_classes': 10},
        data_source='d',
        images_seen=96,
        metric='top1',
        final={'top1': 0.5, 'num_images': 24},
        extra_tests={'test_translated': {'top1': 0.75}},
        chance_level=0.11,
        num_parameters=4,
        training_time_s=1.5,
        history={'eval': [], 'train': []},
    )


def test_execute_trains_the_run_in_its_folder_and_writes_its_record(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, 'commit', lambda: 'c')
    run = small_run()
    train = Trainer(fake_results(run))
    main = types.SimpleNamespace(is_main_process=True)
    record = runner.execute(run, 'cpu', tmp_path / 'records', tmp_path / 'out', 9, main, train, None)
    [config] = train.configs
    assert config.output_dir == str(tmp_path / 'out' / 'cpu' / run.run_id)
    assert (config.seed, config.checkpointing_steps, config.resume_from_checkpoint) == (0, 'epoch', 'latest')
    assert config.stop_after_steps is None and config.epochs == 3
    path = records.record_path(tmp_path / 'records', 'cpu', run)
    assert json.loads(path.read_text()) == record
    assert record['resumed_from_checkpoint'] is False and record['commit'] == 'c'
    assert record['metrics'] == {'top1': 0.5, 'num_images': 24, 'test_translated/top1': 0.75}
    assert 'part_whole_probe' not in record and record['wall_time_s'] >= 0
    # a run with a checkpoint is a resumed one; an empty checkpoints folder is not
    (tmp_path / 'out' / 'cpu' / run.run_id / 'checkpoints').mkdir(parents=True)
    assert (
        runner.execute(run, 'cpu', tmp_path / 'r2', tmp_path / 'out', 9, main, train)['resumed_from_checkpoint']
        is False
    )
    (tmp_path / 'out' / 'cpu' / run.run_id / 'checkpoints' / 'epoch_0').mkdir()
    assert (
        runner.execute(run, 'cpu', tmp_path / 'r3', tmp_path / 'out', 9, main, train)['resumed_from_checkpoint'] is True
    )


def test_execute_passes_the_stop_and_ends_a_stopped_call(tmp_path):
    run = small_run()
    train = Trainer(dict(fake_results(run), stopped=True))
    main = types.SimpleNamespace(is_main_process=True)
    with pytest.raises(SystemExit) as stopped:
        runner.execute(run, 'cpu', tmp_path / 'records', tmp_path / 'out', 9, main, train, 4)
    assert stopped.value.code == 3 and train.configs[0].stop_after_steps == 4
    assert not (tmp_path / 'records').exists()
    train = Trainer(dict(fake_results(run), stopped=False))
    assert runner.execute(run, 'cpu', tmp_path / 'records', tmp_path / 'out', 9, main, train, 4)['seed'] == 0


def test_execute_on_another_process_writes_nothing(tmp_path):
    run = small_run(probe=True)
    other = types.SimpleNamespace(is_main_process=False)
    assert (
        runner.execute(run, 'cpu', tmp_path / 'records', tmp_path / 'out', 9, other, Trainer(fake_results(run))) == {}
    )
    assert not (tmp_path / 'records').exists()


def test_execute_probes_a_probe_run(tmp_path, monkeypatch):
    probed = []
    monkeypatch.setattr(
        runner, 'probe', lambda model, samples: probed.append((model, samples)) or {'own_fraction': 0.75}
    )
    run = small_run(probe=True)
    train = Trainer(fake_results(run))
    main = types.SimpleNamespace(is_main_process=True)
    record = runner.execute(run, 'cpu', tmp_path / 'records', tmp_path / 'out', 9, main, train)
    assert probed == [(train.model, 9)] and record['part_whole_probe'] == {'own_fraction': 0.75}
    assert json.loads(records.record_path(tmp_path / 'records', 'cpu', run).read_text())['part_whole_probe'] == {
        'own_fraction': 0.75
    }


# ---- probe, prepare_data, shared_accelerator ------------------------------------------------------------------------


def test_probe_runs_the_part_whole_probe_on_two_digit_sample_images(monkeypatch):
    from timm_capsules import parse_tree
    from timm_capsules.parse_tree import inputs

    calls = []

    def samples(n, source, two_digit_only):
        calls.append(('samples', n, source, two_digit_only))
        return 'images', 'masks', 'labels', 'other', 'the source'

    def prepare(model, images, masks):
        calls.append(('prepare', model, images, masks))
        return 'x', 'prepared masks'

    def part_whole(model, x, masks, labels):
        calls.append(('probe', model, x, masks, labels))
        return {'own_fraction': 0.6, 'per_image': [1, 2], 'n': 3}

    class Model:
        def eval(self):
            calls.append(('eval',))
            return 'the model in eval mode'

    monkeypatch.setattr(inputs, 'diverse_multimnist_samples', samples)
    monkeypatch.setattr(inputs, 'prepare_arrays', prepare)
    monkeypatch.setattr(parse_tree, 'part_whole_probe', part_whole)
    model = Model()
    assert runner.probe(model, 7) == {'own_fraction': 0.6, 'n': 3, 'chance': 0.5, 'source': 'the source'}
    assert calls == [
        ('samples', 7, 'sample', True),
        ('prepare', model, 'images', 'masks'),
        ('eval',),
        ('probe', 'the model in eval mode', 'x', 'prepared masks', 'labels'),
    ]
    calls.clear()
    runner.probe(model)
    assert calls[0] == ('samples', 500, 'sample', True)


@pytest.fixture
def exports(monkeypatch):
    from timm_capsules.data import affine_mnist, mnist

    done = []
    monkeypatch.setattr(mnist, 'export_parquet', lambda folder, name: done.append(('parquet', folder, name)))
    monkeypatch.setattr(affine_mnist, 'export', lambda folder, **sizes: done.append(('affine', folder, sizes)))
    return done


def test_prepare_data_exports_what_the_runs_read_once(tmp_path, exports, capsys):
    runs = plans.plan('cpu', plans.STUDIES, [0], tmp_path)
    runner.prepare_data('cpu', runs, tmp_path)
    assert exports == [
        ('parquet', tmp_path / 'fashion_mnist', 'fashion_mnist'),
        ('affine', tmp_path / 'affine_mnist', dict(train_size=20000, test_size=5000, source='sample')),
    ]
    out = capsys.readouterr().out
    assert out == (
        f'writing Fashion-MNIST to {tmp_path / "fashion_mnist"}\nwriting Affine MNIST to {tmp_path / "affine_mnist"}\n'
    )
    exports.clear()
    (tmp_path / 'fashion_mnist' / 'data').mkdir(parents=True)
    (tmp_path / 'affine_mnist').mkdir()
    (tmp_path / 'affine_mnist' / 'README.md').write_text('')
    runner.prepare_data('cpu', runs, tmp_path)
    assert exports == []


def test_prepare_data_of_each_scale(tmp_path, exports):
    fashion_only = [run for run in plans.plan('cpu', plans.STUDIES, [0], tmp_path) if run.dataset == 'fashion_mnist']
    runner.prepare_data('cpu', fashion_only, tmp_path)
    assert exports == [('parquet', tmp_path / 'fashion_mnist', 'fashion_mnist')]
    exports.clear()
    affine_only = [run for run in plans.plan('cpu', ['affine'], [0], tmp_path)]
    (tmp_path / 'fashion_mnist').mkdir()  # a folder without its data is exported again, when asked for
    runner.prepare_data('cpu', affine_only, tmp_path)
    assert [e[0] for e in exports] == ['affine']
    exports.clear()
    runner.prepare_data('paper', plans.plan('paper', ['affine'], [0], tmp_path), tmp_path)
    assert exports == [('affine', tmp_path / 'affine_mnist_full', {})]  # the paper's: the whole export
    exports.clear()
    runner.prepare_data('gpu', plans.plan('gpu', plans.STUDIES, [0], tmp_path), tmp_path)
    assert exports == [('parquet', tmp_path / 'fashion_mnist', 'fashion_mnist')]
    exports.clear()
    runner.prepare_data('paper', plans.plan('paper', ['table1'], [0], tmp_path), tmp_path)
    assert exports == []


def test_shared_accelerator_is_made_from_the_runs_arguments(tmp_path, monkeypatch):
    from timm_capsules import train

    made = []
    monkeypatch.setattr(train, 'make_accelerator', lambda config: made.append(config) or 'accelerator')
    run = small_run()
    assert runner.shared_accelerator(run, tmp_path / 'o') == 'accelerator'
    [config] = made
    assert config.output_dir == str(tmp_path / 'o') and config.seed == 0 and config.model == run.row['model']
    assert config.resume_from_checkpoint == 'latest'


def test_execute_hands_over_the_calls_accelerator_and_times_the_run(tmp_path, monkeypatch):
    clock = iter([100.0, 107.5])
    monkeypatch.setattr(runner, 'time', types.SimpleNamespace(time=lambda: next(clock)))
    run = small_run()
    train = Trainer(fake_results(run))
    main = types.SimpleNamespace(is_main_process=True)
    record = runner.execute(run, 'paper', tmp_path / 'records', tmp_path / 'out', 9, main, train)
    assert train.accelerators == [main]
    assert record['wall_time_s'] == 7.5 and record['scale'] == 'paper' and record['protocol'] == 'paper recipe'
    assert records.record_path(tmp_path / 'records', 'paper', run).is_file()


def test_prepare_data_says_what_it_writes_before_writing_it(tmp_path, monkeypatch):
    """Each message reaches the terminal (flushed) before its export starts, which takes minutes."""
    from timm_capsules.data import affine_mnist, mnist

    events = []
    out = types.SimpleNamespace(write=lambda text: events.append(text), flush=lambda: events.append('flush'))
    monkeypatch.setattr('sys.stdout', out)
    monkeypatch.setattr(mnist, 'export_parquet', lambda folder, name: events.append('parquet'))
    monkeypatch.setattr(affine_mnist, 'export', lambda folder, **sizes: events.append('affine'))
    runner.prepare_data('cpu', plans.plan('cpu', plans.STUDIES, [0], tmp_path), tmp_path)
    fashion, affine = (
        f'writing Fashion-MNIST to {tmp_path / "fashion_mnist"}',
        f'writing Affine MNIST to {tmp_path / "affine_mnist"}',
    )
    assert events == [fashion, '\n', 'flush', 'parquet', affine, '\n', 'flush', 'affine']
