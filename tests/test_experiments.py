"""Tests of experiments.py and timm_capsules.experiments' plans, protocols, records and runner: what each scale plans
(the issue's studies, the paper's recipes), the recipes written once (the runs' arguments and the protocol's words
both generated from them), real runs that write records, skip finished work and resume a stopped run, the part-whole
probe at paper scale on a few steps and the hub configs filled from records. The report: test_experiment_report.py.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from timm_capsules.experiments import plans, protocols, records

ROOT = Path(__file__).resolve().parents[1]
ENV_OFFLINE = dict(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')


@pytest.fixture
def experiments(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # experiments.py, the command line, is at the checkout's root
    for key, value in ENV_OFFLINE.items():
        monkeypatch.setenv(key, value)
    import experiments

    return experiments


@pytest.fixture
def train_config():
    from timm_capsules.train import TrainConfig

    return TrainConfig


def test_cpu_plan_has_every_study_kind_and_seed(experiments):
    runs = plans.plan('cpu', plans.STUDIES, range(2))
    assert len({run.run_id for run in runs}) == len(runs)
    by_study = {study: [run for run in runs if study in run.studies] for study in plans.STUDIES}
    assert all(by_study.values())
    assert {run.seed for run in runs} == {0, 1}
    assert {run.row['kind'] for run in by_study['table1']} == {'IDA', 'DR', 'EM', 'CNN', 'ResNet-18'}
    for kind in ('IDA', 'DR', 'EM'):
        assert {run.row['iterations'] for run in by_study['iterations'] if run.row['kind'] == kind} == {1, 2, 3, 4}
    assert {run.row['variant'][0] for run in by_study['ablations']} == {'I', 'A', 'B', 'C'}
    # one configuration in several studies is one run: IDA at t = 2 serves table1, iterations and ablations
    shared = [
        run
        for run in runs
        if run.row.get('kind') == 'IDA' and run.row.get('iterations') == 2 and run.row['variant'].startswith('IDA')
    ]
    assert len(shared) == 2 and all(set(run.studies) == {'table1', 'iterations', 'ablations'} for run in shared)
    assert {run.dataset for run in runs} == {'fashion_mnist', 'diverse_multimnist', 'affine_mnist'}


def test_cpu_plan_arguments_parse_to_the_documented_protocol(experiments, train_config):
    import timm

    built = set()
    for run in plans.plan('cpu', plans.STUDIES, [0]):
        args = train_config.from_argv(run.train_args + ['--seed', '0'])
        kwargs = dict(args.model_kwargs, num_classes=10)
        if repr((args.model, kwargs)) not in built:  # every model builds with its arguments (on meta: no memory)
            timm.create_model(args.model, device='meta', **kwargs)
            built.add(repr((args.model, kwargs)))
        assert args.model == run.row['model'] and args.opt == 'adam' and args.lr == 2e-3 and args.sched == 'cosine'
        if run.dataset == 'fashion_mnist':
            assert (args.train_split, args.epochs, args.batch_size, args.augment) == ('train[:12800]', 1, 64, 'none')
            assert args.model_kwargs['in_chans'] == 1 and args.model_kwargs.get('img_size', 28) == 28
            assert run.image_budget == 12800
        if 'iterations' in run.row:
            assert args.model_kwargs.get('iterations', 2) == run.row['iterations']  # 2: IDA's default
    protocol = ' '.join(protocols.CPU_PROTOCOL.values())
    assert '12,800' in protocol and 'batch 64' in protocol and 'Adam 2e-3' in protocol


def test_paper_plan_is_the_papers_recipes(experiments, train_config):
    from timm_capsules.presets import PRESETS

    runs = plans.plan('paper', plans.STUDIES, [0])
    for run in runs:
        args = train_config.from_argv(run.train_args + ['--seed', '0'])
        if args.preset:
            preset = PRESETS[args.preset]
            assert (args.model, args.epochs, args.lr, args.opt) == (preset['model'], 350, preset['lr'], preset['opt'])
        assert args.model == run.row['model']
    iterations = {(run.row['kind'], run.row['iterations']) for run in runs if 'iterations' in run.studies}
    assert iterations == {(kind, t) for kind in ('IDA', 'DR', 'EM') for t in range(1, 6)}
    assert {run.dataset for run in runs if 'table1' in run.studies} == {'cifar10', 'cifar100'}


def test_a_recipe_makes_both_the_runs_arguments_and_the_protocols_words(train_config):
    """Each cpu and gpu recipe: its arguments parse to its values, its prose names the same numbers, and a changed
    fact changes the arguments, the prose and the image budget together (nothing is written twice)."""
    for recipe in [*protocols.CPU_RECIPES.values(), *protocols.GPU_RECIPES.values()]:
        args = train_config.from_argv(recipe.argv(Path('data'), 'DR') + ['--model', 'capsnet_simple_cifar10'])
        prose, values = recipe.protocol(), recipe.arguments
        assert (args.epochs, args.batch_size, args.opt, args.sched) == (
            values['epochs'],
            values['batch_size'],
            values['opt'],
            values['sched'],
        )
        assert f'batch {args.batch_size}' in prose and f'{recipe.facts["epoch_images"]:,}' in prose
        assert args.dataset in (recipe.dataset, f'hf:{Path("data") / recipe.facts.get("folder", "")}')
        assert f'{args.lr:g}' in prose.replace('2e-3', '0.002')  # the CPU's rate is written as on the command line
    assert (
        train_config.from_argv(protocols.GPU_RECIPES['fashion_mnist'].argv(Path('d'), 'DR')).lr
        == protocols.GPU_LR['DR']
    )
    fashion = protocols.CPU_RECIPES['fashion_mnist']
    halved = dataclasses.replace(fashion, facts=dict(fashion.facts, epoch_images=6400))
    assert 'train[:6400]' in halved.argv(Path('data')) and 'the first 6,400 training images' in halved.protocol()
    assert (halved.image_budget(), fashion.image_budget()) == (6400, 12800)
    multimnist = protocols.CPU_RECIPES['diverse_multimnist']
    args = train_config.from_argv(multimnist.argv(Path('data')))
    assert (args.epoch_size, args.test_size) == (8192, 2000) and multimnist.image_budget() == 8 * 8192
    affine = protocols.CPU_RECIPES['affine_mnist']
    nine = affine.argv(Path('data'), epochs=9)
    assert nine[nine.index('--epochs') + 1] == '9' and affine.image_budget(9) == 9 * 20000


def test_the_committed_records_carry_the_generated_protocols():
    """The prose generated from the recipes is the one the committed records of its scale and dataset carry (the
    report and docs/results.md print it): the recipes as data changed no word."""
    for scale, recipes in (('cpu', protocols.CPU_RECIPES), ('gpu', protocols.GPU_RECIPES)):
        for dataset in recipes:
            carried = {json.loads(p.read_text())['protocol'] for p in (ROOT / 'results' / scale).glob(f'{dataset}-*')}
            assert protocols.protocol_of(scale, dataset) in carried, (scale, dataset)
    assert protocols.protocol_of('paper', 'cifar10') == 'paper recipe'


def test_the_small_capsnet_is_the_quick_runs():
    """The cpu scale's small CapsNet is the quick run's model (presets.QUICK), not a copy of it."""
    from timm_capsules.presets import QUICK

    assert plans.SMALL_MATRIX is QUICK['model_kwargs']
    [run] = [run for run in plans.plan('cpu', ['multimnist'], [0]) if run.row['kind'] == 'matrix CapsNet']
    assert all(
        f'--model-arg {key}={value!r}' in ' '.join(run.train_args) for key, value in QUICK['model_kwargs'].items()
    )


def test_list_shows_the_default_seeds_and_where_the_data_comes_from(experiments, tmp_path, capsys):
    """--list trains and writes nothing; 3 seeds by default (the README's tables have 3), and it says that the
    data folder its commands read is written by the runner."""
    data = tmp_path / 'data'
    assert experiments.main(['table1', '--list', '--records', str(tmp_path / 'records'), '--data-dir', str(data)]) == 0
    out = capsys.readouterr().out
    seeds = {line.split(' ')[1].rsplit('-seed', 1)[1] for line in out.splitlines() if line.startswith('[todo]')}
    assert seeds == {'0', '1', '2'}
    assert (
        f'the commands below read {data / "fashion_mnist"}: experiments.py without --list writes it there first'
    ) in out
    assert f'--dataset hf:{data / "fashion_mnist"} ' in out and not data.exists()


def small_affine_data(data_dir):
    from timm_capsules.data.affine_mnist import export

    export(data_dir / 'affine_mnist', train_size=48, test_size=24, source='sample')


@pytest.mark.slow
def test_runs_write_records_skip_finished_and_resume_stopped_runs(experiments, tmp_path, capsys):
    """A real run of the affine study's CNN (a few steps on a small export): its record, then a second call that
    trains nothing, then a run stopped after one epoch that a rerun continues from its checkpoint."""
    import timm

    small_affine_data(tmp_path / 'data')
    common = [
        'affine',
        '--only',
        'affine_mnist-CNN-',  # the pooling CNN, not the fully connected one
        '--seeds',
        '1',
        '--records',
        str(tmp_path / 'records'),
        '--outputs',
        str(tmp_path / 'out'),
        '--data-dir',
        str(tmp_path / 'data'),
    ]
    assert experiments.main(common + ['--', '--epochs', '1', '--batch-size', '16']) == 0
    [path] = (tmp_path / 'records' / 'cpu').glob('*.json')
    record = json.loads(path.read_text())
    assert record['studies'] == ['affine'] and record['seed'] == 0 and record['dataset'] == 'affine_mnist'
    assert record['image_budget'] == 48 and record['metric'] == 'top1' and record['metrics']['num_images'] == 24
    assert 0 <= record['metrics']['top1'] <= 1 and record['metrics']['test_translated/num_images'] == 24
    model = timm.create_model(record['model'], **record['model_kwargs'])
    assert record['num_parameters'] == sum(p.numel() for p in model.parameters())
    assert record['command'].startswith('python train_accelerate.py --dataset hf:') and '--seed 0' in record['command']
    assert record['protocol'] == protocols.CPU_PROTOCOL['affine_mnist'] and record['machine'] and record['commit']
    stamp = path.stat().st_mtime_ns
    capsys.readouterr()
    assert experiments.main(common + ['--', '--epochs', '1', '--batch-size', '16']) == 0
    assert '1 finished, 0 to run' in capsys.readouterr().out and path.stat().st_mtime_ns == stamp

    # a run stopped after its first epoch (3 steps) continues from that epoch's checkpoint
    two_epochs = ['--', '--epochs', '2', '--batch-size', '16']
    with pytest.raises(SystemExit) as stopped:
        experiments.main(common + ['--stop-after-steps', '4'] + two_epochs)
    assert stopped.value.code == 3
    assert len(list((tmp_path / 'records' / 'cpu').glob('*.json'))) == 1
    capsys.readouterr()
    assert experiments.main(common + two_epochs) == 0
    assert 'resuming from' in capsys.readouterr().out
    resumed = [json.loads(p.read_text()) for p in (tmp_path / 'records' / 'cpu').glob('*.json') if p != path]
    assert len(resumed) == 1 and resumed[0]['image_budget'] == 96


@pytest.mark.slow
def test_one_accelerator_trains_every_run_of_a_call(experiments, tmp_path, monkeypatch):
    """Two runs in one call train on the one Accelerator the runner made (no private accelerate state is reset
    between them), and the second learns exactly what it learns alone in a fresh call: nothing of the first leaks."""
    from accelerate import Accelerator

    made, real_init = [], Accelerator.__init__

    def counted_init(self, *args, **kwargs):  # the real constructor, counted
        made.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, '__init__', counted_init)
    small_affine_data(tmp_path / 'data')
    tiny = ['--', '--epochs', '1', '--batch-size', '16']
    second = next(
        run.run_id
        for run in plans.plan('cpu', ['affine'], [1], tmp_path / 'data', tiny[1:])
        if run.row['kind'] == 'CNN'
    )
    common = ['affine', '--seeds', '2', '--data-dir', str(tmp_path / 'data')]
    together, alone = tmp_path / 'together', tmp_path / 'alone'
    assert (
        experiments.main(
            common
            + ['--only', second.replace('seed1', ''), '--records', str(together), '--outputs', str(together / 'out')]
            + tiny
        )
        == 0
    )
    assert len(made) == 1
    records = {p.name: json.loads(p.read_text()) for p in (together / 'cpu').glob('*.json')}
    assert sorted(r['seed'] for r in records.values()) == [0, 1]
    assert (
        experiments.main(common + ['--only', second, '--records', str(alone), '--outputs', str(alone / 'out')] + tiny)
        == 0
    )
    assert len(made) == 2
    [fresh] = [json.loads(p.read_text()) for p in (alone / 'cpu').glob('*.json')]
    shared = records[f'{second}.json']
    assert fresh['metrics'] == shared['metrics'] and fresh['eval_history'] == shared['eval_history']
    assert records[f'{second.replace("seed1", "seed0")}.json']['metrics'] != shared['metrics']


@pytest.mark.slow
def test_paper_scale_smoke_probe_and_hub_results(experiments, tmp_path, monkeypatch, capsys):
    """The paper's DiverseMultiMNIST recipe for the matrix CapsNet, two steps: a record with the part-whole
    probe, which then fills the model's hub config through hub.record_results."""
    configs = tmp_path / 'hub_configs'
    shutil.copytree(ROOT / 'hub_configs', configs)
    monkeypatch.setenv('TIMM_CAPSULES_HUB_CONFIGS', str(configs))
    records = tmp_path / 'records'
    few_steps = [
        '--',
        '--max-train-steps',
        '2',
        '--batch-size',
        '4',
        '--epoch-size',
        '8',
        '--test-size',
        '16',
        '--mnist-source',
        'sample',
    ]
    assert (
        experiments.main(
            [
                'multimnist',
                '--scale',
                'paper',
                '--only',
                'matrixCapsNet',
                '--seeds',
                '1',
                '--records',
                str(records),
                '--outputs',
                str(tmp_path / 'out'),
                '--probe-images',
                '4',
            ]
            + few_steps
        )
        == 0
    )
    [record] = [json.loads(p.read_text()) for p in (records / 'paper').glob('*.json')]
    assert record['model'] == 'capsnet_matrix_multimnist' and record['num_parameters'] == 9_963_969
    assert record['protocol'] == 'paper recipe' and '--preset multimnist_matrix' in record['command']
    probe = record['part_whole_probe']
    assert probe['images'] == 4 and 0 <= probe['own_fraction'] <= 1 and probe['chance'] == 0.5
    capsys.readouterr()
    assert (
        experiments.main(
            [
                'report',
                '--scale',
                'paper',
                '--records',
                str(records),
                '--plots',
                str(tmp_path / 'plots'),
                '--record-hub',
            ]
            + few_steps
        )
        == 0
    )
    assert 'hub configs updated: capsnet_matrix_multimnist.diverse_multimnist' in capsys.readouterr().out
    cfg = json.loads((configs / 'capsnet_matrix_multimnist.diverse_multimnist.json').read_text())
    assert cfg['results']['per_seed'] == [pytest.approx(100 * record['metrics']['exact_match'])]
    untouched = json.loads((configs / 'capsnet_vector_multimnist.diverse_multimnist.json').read_text())
    assert untouched['results']['per_seed'] == []


def test_every_committed_record_reads_as_sound(experiments, tmp_path):
    """The committed records, DiverseMultiMNIST's with their per-class F1 lists among the metrics, are all sound:
    none is left out of the report. A list with a NaN is not."""
    paths = sorted((ROOT / 'results').glob('*/*.json'))
    assert len(paths) >= 69 and {path: records.read_record(path)[1] for path in paths} == dict.fromkeys(paths)
    [multimnist] = [p for p in paths if 'matrixCapsNet' in p.name and p.name.endswith('seed0.json')][:1]
    record = json.loads(multimnist.read_text())
    assert isinstance(record['metrics']['per_class_f1'], list)
    record['metrics']['per_class_f1'][3] = float('nan')
    damaged = tmp_path / multimnist.name
    damaged.write_text(json.dumps(record))
    assert 'per_class_f1' in records.read_record(damaged)[1]
