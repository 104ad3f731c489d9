"""``timm_capsules/experiments/plans.py`` checked by value: the cpu plan against the committed records of its runs
(written when they ran: each names its run id, studies, row, dataset, seed, image budget and arguments), the gpu
plan against its committed records and the study rules, the paper plan against a table written out here from the
presets' names, and the pieces (model arguments, run names, the studies of a routing run, run ids, the study
filter, extra arguments) by hand. Written for a mutmut run (tests/README.md); fast, nothing is trained."""

import hashlib
import json
from pathlib import Path

import pytest

from timm_capsules.experiments import plans
from timm_capsules.experiments.plans import Run, model_args, plan, routing_run, run_name
from timm_capsules.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
FULL = 'IDA (concurrent, LayerNorm)'
ABLATION_FLAGS = {
    'A: no LayerNorm': ['--no-layer-norm'],
    'B: sequential routing': ['--routing', 'sequential'],
    'C: EM-style activations': ['--activations'],
}


def committed(scale):
    return {path.stem: json.loads(path.read_text()) for path in (ROOT / 'results' / scale).glob('*.json')}


def digest(args):
    return hashlib.sha256(json.dumps(list(args)).encode()).hexdigest()[:8]


# ---- the pieces -----------------------------------------------------------------------------------------------


def test_model_args_by_hand():
    assert model_args('m') == ['--model', 'm']
    assert model_args('m', depth=2, name='x', stages=((1, 2), (3, False))) == [
        '--model',
        'm',
        '--model-arg',
        'depth=2',
        '--model-arg',
        "name='x'",
        '--model-arg',
        'stages=((1, 2), (3, False))',
    ]


@pytest.mark.parametrize(
    'kind, t, studies',
    [
        ('IDA', 1, ('iterations',)),
        ('IDA', 2, ('iterations', 'table1', 'ablations')),
        ('IDA', 3, ('iterations',)),
        ('DR', 2, ('iterations',)),
        ('DR', 3, ('iterations', 'table1')),
        ('EM', 3, ('iterations', 'table1')),
        ('EM', 5, ('iterations',)),
    ],
)
def test_routing_run_studies_by_hand(kind, t, studies):
    assert routing_run(kind, 'a_model', t) == (
        studies,
        {'kind': kind, 'model': 'a_model', 'iterations': t, 'variant': FULL},
    )


@pytest.mark.parametrize(
    'row, name',
    [
        ({'kind': 'IDA', 'iterations': 2, 'variant': FULL}, 'IDA-t2'),
        ({'kind': 'IDA', 'iterations': 2, 'variant': 'A: no LayerNorm'}, 'IDA-t2-A'),
        ({'kind': 'IDA', 'iterations': 12, 'variant': 'B: sequential routing'}, 'IDA-t12-B'),
        ({'kind': 'IDA', 'iterations': 2, 'variant': 'C: EM-style activations'}, 'IDA-t2-C'),
        ({'kind': 'IDA', 'iterations': 2, 'variant': 'D: other'}, 'IDA-t2'),
        ({'kind': 'DR', 'iterations': 3}, 'DR-t3'),
        ({'kind': 'ResNet-18'}, 'ResNet-18'),
        ({'kind': 'CNN, fully connected'}, 'CNNfullyconnected'),
        ({'kind': 'CapsNet, 9 epochs'}, 'CapsNet9epochs'),
        ({'kind': 'a_b (c)/d.e'}, 'a_bcde'),
        ({'kind': 'X', 'variant': 'A: ablation without iterations'}, 'X-A'),
    ],
)
def test_run_name_by_hand(row, name):
    assert run_name(row) == name


# ---- the cpu plan: the committed runs -----------------------------------------------------------------------------


def test_the_cpu_plan_is_the_committed_runs():
    records = committed('cpu')
    runs = plan('cpu', plans.STUDIES, range(3))
    assert len(runs) == 75 and sorted(run.run_id for run in runs) == sorted(records)
    for run in runs:
        record = records[run.run_id]
        assert list(run.studies) == record['studies'] and run.row == record['row'], run.run_id
        assert (run.dataset, run.seed, run.image_budget) == (record['dataset'], record['seed'], record['image_budget'])
        assert run.train_args == record['train_args'], run.run_id
        assert run.probe == ('part_whole_probe' in record), run.run_id
        assert run.run_id == f'{run.dataset}-{run_name(run.row)}-{digest(run.train_args)}-seed{run.seed}'


def test_the_cpu_plan_in_its_tables_order():
    names = [f'{run.dataset}-{run_name(run.row)}' for run in plan('cpu', plans.STUDIES, [0])]
    fashion = [f'{kind}-t{t}' for kind in ('IDA', 'DR', 'EM') for t in (1, 2, 3, 4)]
    fashion += ['CNN', 'ResNet-18', 'IDA-t2-A', 'IDA-t2-B', 'IDA-t2-C']
    multimnist = ['matrixCapsNet', 'vectorCapsNet', 'CNN', 'CNNfullyconnected']
    affine = ['CapsNet', 'CapsNet9epochs', 'CNN', 'CNNfullyconnected']
    assert names == (
        [f'fashion_mnist-{n}' for n in fashion]
        + [f'diverse_multimnist-{n}' for n in multimnist]
        + [f'affine_mnist-{n}' for n in affine]
    )


def test_the_cpu_plan_by_hand():
    runs = plan('cpu', plans.STUDIES, [0], Path('d'))
    by_name = {f'{run.dataset}-{run_name(run.row)}': run for run in runs}
    ida = by_name['fashion_mnist-IDA-t3']
    assert ida.train_args[:2] == ['--dataset', 'hf:d/fashion_mnist'] and ida.image_budget == 12800
    assert ida.train_args[-8:] == [
        '--model',
        'capsnet_simple_cifar10',
        '--model-arg',
        'iterations=3',
        '--model-arg',
        'in_chans=1',
        '--model-arg',
        'img_size=28',
    ]
    resnet = by_name['fashion_mnist-ResNet-18']
    assert resnet.train_args[-4:] == ['--model', 'resnet18_cifar10', '--model-arg', 'in_chans=1']
    assert resnet.row == {'kind': 'ResNet-18', 'model': 'resnet18_cifar10'} and resnet.studies == ('table1',)
    cnn = by_name['fashion_mnist-CNN']
    assert cnn.train_args[-6:] == [
        '--model',
        'cnn_baseline_cifar10',
        '--model-arg',
        'in_chans=1',
        '--model-arg',
        'img_size=28',
    ]
    ablation = by_name['fashion_mnist-IDA-t2-B']
    assert ablation.train_args[-2:] == ['--routing', 'sequential'] and ablation.studies == ('ablations',)
    assert ablation.row == {
        'kind': 'IDA',
        'model': 'capsnet_simple_cifar10',
        'variant': 'B: sequential routing',
        'iterations': 2,
    }
    assert [run.probe for run in runs if run.dataset == 'diverse_multimnist'] == [True, True, False, False]
    assert not any(run.probe for run in runs if run.dataset != 'diverse_multimnist')
    assert by_name['diverse_multimnist-CNN'].image_budget == 8 * 8192
    nine, three = by_name['affine_mnist-CapsNet9epochs'], by_name['affine_mnist-CapsNet']
    assert (nine.image_budget, three.image_budget) == (9 * 20000, 3 * 20000)
    assert nine.train_args[nine.train_args.index('--epochs') + 1] == '9'
    assert three.train_args[three.train_args.index('--epochs') + 1] == '3'
    fc = by_name['affine_mnist-CNNfullyconnected']
    stages = ((64, 3, 2, 1, False, False), (64, 3, 2, 0, False, True), (64, 3, 1, 0, False, True))
    assert fc.train_args[-6:] == [
        '--model-arg',
        f'stages={stages!r}',
        '--model-arg',
        'head_hidden_size=16',
        '--model-arg',
        'img_size=40',
    ]
    cnn = by_name['diverse_multimnist-CNN']
    cnn_stages = tuple((80,) + stage[1:] for stage in stages) + ((80, 1, 1, 0, False, False),)
    assert cnn.train_args[-2:] == ['--model-arg', f'stages={cnn_stages!r}']


# ---- the gpu plan -------------------------------------------------------------------------------------------------


def test_the_gpu_plan_holds_the_committed_gpu_runs():
    records = committed('gpu')
    runs = {run.run_id: run for run in plan('gpu', plans.STUDIES, range(3))}
    assert records and set(records) <= set(runs)
    for run_id, record in records.items():
        run = runs[run_id]
        assert (list(run.studies), run.row, run.dataset, run.seed) == (
            record['studies'],
            record['row'],
            record['dataset'],
            record['seed'],
        )
        assert run.train_args == record['train_args'] and not run.probe
        # two epochs of 60,000 images; the record counts what the run saw, whole batches of 128
        assert run.image_budget == 120000 and 0 <= record['image_budget'] - run.image_budget < 128


def test_the_gpu_plan_by_hand():
    runs = plan('gpu', plans.STUDIES, [0, 1])
    assert len(runs) == 2 * (3 * 5 + 2 + 3)
    assert [run.seed for run in runs[:4]] == [0, 1, 0, 1]
    names = [run_name(run.row) for run in runs[::2]]
    assert names == [f'{kind}-t{t}' for kind in ('IDA', 'DR', 'EM') for t in (1, 2, 3, 4, 5)] + [
        'CNN',
        'ResNet-18',
        'IDA-t2-A',
        'IDA-t2-B',
        'IDA-t2-C',
    ]
    assert {run.dataset for run in runs} == {'fashion_mnist'} and {run.image_budget for run in runs} == {120000}
    for run in runs:
        lr = run.train_args[run.train_args.index('--lr') + 1]
        assert lr == ('0.001' if run.row['kind'] == 'DR' else '0.002')


# ---- the paper plan -----------------------------------------------------------------------------------------------


def paper_table(data_dir):
    """(dataset, studies, row, image budget, arguments, probe) of each paper configuration, in order."""
    table = []
    for data in ('cifar10', 'cifar100'):
        for backbone in ('simple', 'resnet'):
            sweep = data == 'cifar10' and backbone == 'resnet'
            for kind, preset, default in (
                ('IDA', f'{data}_{backbone}', 2),
                ('DR', f'{data}_dynamic_{backbone}', 3),
                ('EM', f'{data}_em_{backbone}', 3),
            ):
                for t in range(1, 6) if sweep else [default]:
                    studies = ['iterations'] if sweep else []
                    studies += ['table1'] if t == default else []
                    studies += ['ablations'] if sweep and kind == 'IDA' and t == 2 else []
                    row = {'kind': kind, 'model': PRESETS[preset]['model'], 'iterations': t, 'variant': FULL}
                    table.append((data, tuple(studies), row, 0, ['--preset', preset, '--iterations', str(t)], False))
        table.append(
            (data, ('table1',), {'kind': 'CNN', 'model': f'cnn_baseline_{data}'}, 0, ['--preset', f'{data}_cnn'], False)
        )
        table.append(
            (
                data,
                ('table1',),
                {'kind': 'ResNet-18', 'model': f'resnet18_{data}'},
                0,
                ['--preset', f'{data}_resnet18'],
                False,
            )
        )
    for variant, flags in ABLATION_FLAGS.items():
        row = {'kind': 'IDA', 'model': PRESETS['cifar10_resnet']['model'], 'variant': variant, 'iterations': 2}
        table.append(('cifar10', ('ablations',), row, 0, ['--preset', 'cifar10_resnet'] + flags, False))
    for kind, preset, probe in (
        ('matrix CapsNet', 'multimnist_matrix', True),
        ('vector CapsNet', 'multimnist_vector', True),
        ('CNN', 'multimnist_cnn', False),
        ('CNN, fully connected', 'multimnist_cnn_fc', False),
        ('DR vector CapsNet', 'multimnist_dynamic_vector', False),
    ):
        row = {'kind': kind, 'model': PRESETS[preset]['model']}
        table.append(('diverse_multimnist', ('multimnist',), row, 0, ['--preset', preset], probe))
    for kind, model in (('CapsNet', 'capsnet_matrix_multimnist'), ('CNN', 'cnn_baseline_multimnist')):
        args = ['--dataset', f'hf:{data_dir / "affine_mnist_full"}', '--train-split', 'train_translated']
        args += ['--test-split', 'test_affine', '--extra-test-split', 'test_translated', '--epochs', '50']
        args += ['--batch-size', '128', '--opt', 'adam', '--lr', '1e-3', '--weight-decay', '0', '--sched', 'cosine']
        args += ['--augment', 'none', '--model', model, '--model-arg', 'img_size=40']
        table.append(('affine_mnist', ('affine',), {'kind': kind, 'model': model}, 50 * 60000, args, False))
    return table


def test_the_paper_plan_is_the_table_of_the_presets():
    data_dir = Path('some') / 'data'
    expected = []
    for dataset, studies, row, budget, args, probe in paper_table(data_dir):
        prefix = f'{dataset}-{run_name(row)}-{digest(args)}'
        expected += [Run(f'{prefix}-seed{seed}', studies, row, dataset, seed, budget, args, probe) for seed in (4, 7)]
    runs = plan('paper', plans.STUDIES, [4, 7], data_dir)
    assert len(runs) == 2 * (3 * 3 + 15 + 2 * 2 + 3 + 5 + 2)
    assert runs == expected


def test_the_paper_models_are_the_presets_models():
    # the presets name their models after the dataset and the routing (a second source for the table above)
    rows = {(run.dataset, run_name(run.row)): run.row['model'] for run in plan('paper', plans.STUDIES, [0])}
    assert rows[('cifar10', 'IDA-t2')].startswith('capsnet_') and rows[('cifar10', 'IDA-t5')].startswith('capsnet_')
    assert rows[('cifar100', 'DR-t3')].startswith('dynamic_capsnet_') and rows[('cifar100', 'EM-t3')].startswith('em_')
    assert rows[('diverse_multimnist', 'matrixCapsNet')] == 'capsnet_matrix_multimnist'
    assert rows[('affine_mnist', 'CapsNet')] == 'capsnet_matrix_multimnist'


# ---- plan's selection, seeds and extra arguments -------------------------------------------------------------------


def test_plan_keeps_the_configurations_of_the_asked_studies_only():
    everything = plan('cpu', plans.STUDIES, [0])
    for study in plans.STUDIES:
        assert plan('cpu', [study], [0]) == [run for run in everything if study in run.studies]
    assert plan('cpu', [], [0]) == [] and plan('cpu', plans.STUDIES, []) == []
    both = plan('cpu', ['affine', 'multimnist'], [0])
    assert [run.dataset for run in both] == ['diverse_multimnist'] * 4 + ['affine_mnist'] * 4
    shared = [run for run in plan('cpu', ['table1', 'ablations'], [0]) if run_name(run.row) == 'IDA-t2']
    assert len(shared) == 1 and shared[0].studies == ('iterations', 'table1', 'ablations')


def test_plan_runs_each_configuration_once_per_seed_in_the_seeds_order():
    runs = plan('cpu', ['multimnist'], [5, 2, 9])
    assert [(run_name(run.row), run.seed) for run in runs[:4]] == [
        ('matrixCapsNet', 5),
        ('matrixCapsNet', 2),
        ('matrixCapsNet', 9),
        ('vectorCapsNet', 5),
    ]
    assert runs[0].run_id.rsplit('-', 1)[0] == runs[1].run_id.rsplit('-', 1)[0] and runs[1].run_id.endswith('-seed2')


def test_extra_arguments_follow_the_recipes_and_make_other_runs():
    plain = plan('cpu', ['affine'], [0], Path('d'))
    extra = plan('cpu', ['affine'], [0], Path('d'), ('--threads', '1'))
    for a, b in zip(plain, extra):
        assert b.train_args == a.train_args + ['--threads', '1']
        assert b.run_id == f'{b.dataset}-{run_name(b.row)}-{digest(b.train_args)}-seed0' and b.run_id != a.run_id
    assert plain[0].train_args[:2] == ['--dataset', 'hf:d/affine_mnist']


def test_the_default_data_folder_and_an_unknown_scale():
    [run] = [run for run in plan('cpu', ['affine'], [0]) if run_name(run.row) == 'CNN']
    assert run.train_args[:2] == ['--dataset', 'hf:outputs/experiments/data/affine_mnist']
    with pytest.raises(KeyError):
        plan('tpu', plans.STUDIES, [0])
