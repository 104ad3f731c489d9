"""The GPU side without a GPU: experiments.py's ``--scale gpu`` (its plan, its budget, shards and the time limit) and
``benchmarks/gpu_check.sh full --dry-run``, the one device script's plumbing run on the CPU, so that a GPU's scarce
minutes are never spent on a typo. The GPU's own numbers come from ``tests/test_cuda.py``, which that script runs.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ci import unavailable
from timm_capsules.experiments import budget, plans, protocols, records, report

ROOT = Path(__file__).resolve().parents[1]
GPU_STUDIES = ['table1', 'iterations', 'ablations']


@pytest.fixture
def experiments(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    import experiments

    return experiments


@pytest.fixture(scope='module')
def fashion_parquet(tmp_path_factory):
    """Fashion-MNIST as the studies read it (Debian's IDX files exported to parquet)."""
    from timm_capsules.data import mnist

    try:
        mnist.load_mnist('test', 'fashion_mnist')
    except (FileNotFoundError, OSError, ValueError) as error:
        unavailable(f'Fashion-MNIST (Debian package dataset-fashion-mnist) not found: {error}')
    data_dir = tmp_path_factory.mktemp('data')
    mnist.export_parquet(data_dir / 'fashion_mnist', 'fashion_mnist')
    return data_dir


def test_gpu_plan_is_the_documented_protocol(experiments):
    from timm_capsules.train import TrainConfig

    runs = plans.plan('gpu', plans.STUDIES, range(2))
    assert len({run.run_id for run in runs}) == len(runs) == 40  # 20 configurations, 2 seeds
    assert {run.dataset for run in runs} == {'fashion_mnist'}
    assert set().union(*(run.studies for run in runs)) == set(GPU_STUDIES)
    for kind in ('IDA', 'DR', 'EM'):
        assert {run.row['iterations'] for run in runs if 'iterations' in run.studies and run.row['kind'] == kind} == {
            1,
            2,
            3,
            4,
            5,
        }
    assert {run.row['kind'] for run in runs if 'table1' in run.studies} == {'IDA', 'DR', 'EM', 'CNN', 'ResNet-18'}
    protocol = protocols.GPU_PROTOCOL['fashion_mnist']
    for run in runs:
        args = TrainConfig.from_argv(run.train_args + ['--seed', str(run.seed)])
        assert args.model == run.row['model'] and args.train_split == 'train' and args.test_split == 'test'
        assert (args.epochs, args.batch_size, args.mixed_precision, args.augment) == (2, 128, 'bf16', 'crop-flip')
        assert (args.opt, args.sched, args.warmup_epochs) == ('adam', 'cosine', 0)
        assert args.lr == protocols.GPU_LR[run.row['kind']] and f'{args.lr:g}' in protocol
        assert args.model_kwargs['in_chans'] == 1 and args.model_kwargs.get('img_size', 28) == 28
        assert args.model_kwargs.get('iterations', 2) == run.row.get('iterations', 2)
        assert run.image_budget == args.epochs * 60000
    assert f'{protocols.GPU_EPOCHS} epochs' in protocol and 'batch 128' in protocol and 'bf16' in protocol
    # the CPU's records are never the GPU's: each scale has its own folder and its own README block
    assert records.record_path(Path('r'), 'gpu', runs[0]).parent == Path('r/gpu')
    assert report.markers('gpu') != report.markers('cpu') == (report.BEGIN, report.END)


def test_gflop_count_on_meta_equals_a_real_step(experiments, monkeypatch):
    """The budget's FLOPs are counted on the meta device; a real float32 step of the same model (plain-op routing,
    as on a GPU) counts the same."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    run = next(
        run
        for run in plans.plan('gpu', ['iterations'], [0])
        if run.row
        == dict(kind='EM', model='em_capsnet_simple_cifar10', iterations=3, variant='IDA (concurrent, LayerNorm)')
    )
    monkeypatch.setenv('TIMM_CAPSULES_FUSED_ROUTING', '0')
    model = timm.create_model('em_capsnet_simple_cifar10', iterations=3, in_chans=1, img_size=28, num_classes=10)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 1, 28, 28)).float().sum().backward()
    assert budget.train_gflop_per_image(run.train_args) == pytest.approx(counter.get_total_flops() / 2 / 1e9)


def test_gpu_estimate_is_its_formula_and_agrees_with_the_measured_runs(experiments):
    """Each run's estimate is the slower of its data and its GPU work (routing FLOPs beyond t = 1 at the routing rate,
    the rest at the dense rate), plus the fixed cost; and the estimates agree, within a third, with the wall time of
    every run the H200 has measured (results/gpu/: the assumptions are those measurements)."""
    a = budget.GPU_ASSUMPTIONS
    runs = {run.run_id: run for run in plans.plan('gpu', plans.STUDIES, range(2))}
    ida5 = next(run for run in runs.values() if run.row['kind'] == 'IDA' and run.row['iterations'] == 5)
    images = ida5.image_budget + 2 * 10000 / 3
    total = budget.train_gflop_per_image(ida5.train_args)
    dense = budget.train_gflop_per_image(ida5.train_args, iterations=1)
    assert 0 < dense < total
    gpu_s = images * 1e9 * a['shards'] * (dense / a['dense_tflops'] + (total - dense) / a['routing_tflops']) / 1e12
    data_s = (ida5.image_budget + 2 * 10000) / (a['images_per_s_per_worker'] * a['workers'])
    assert budget.gpu_estimate(ida5) == pytest.approx(max(gpu_s, data_s) + a['overhead_s'])
    measured = [json.loads(path.read_text()) for path in (ROOT / 'results' / 'gpu').glob('*.json')]
    assert measured, 'no GPU records committed'
    for record in measured:
        estimate = budget.gpu_estimate(runs[record['run_id']])
        assert abs(estimate - record['wall_time_s']) < record['wall_time_s'] / 3, (record['run_id'], estimate)


def test_shards_split_the_runs_and_the_first_seeds_come_first(experiments, tmp_path, capsys):
    listed = []
    for shard in range(4):
        capsys.readouterr()
        assert (
            experiments.main(
                GPU_STUDIES + ['--scale', 'gpu', '--list', '--shard', f'{shard}/4', '--records', str(tmp_path)]
            )
            == 0
        )
        ids = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith('[todo]')]
        seeds = [int(run_id.rsplit('seed', 1)[1]) for run_id in ids]
        assert seeds == sorted(seeds), ids  # a shard cut off early has run every configuration's seed 0 it could
        listed.append(ids)
    every = [run.run_id for run in plans.plan('gpu', GPU_STUDIES, range(2))]
    assert sorted(sum(listed, [])) == sorted(every) and all(9 <= len(ids) <= 11 for ids in listed)
    for bad in ('4/4', '1', 'a/b'):
        with pytest.raises(SystemExit):
            experiments.main(GPU_STUDIES + ['--scale', 'gpu', '--list', '--shard', bad])


def test_time_limit_starts_no_run_that_would_end_past_it(experiments, fashion_parquet, tmp_path, capsys):
    assert (
        experiments.main(
            [
                'table1',
                '--scale',
                'gpu',
                '--seeds',
                '1',
                '--time-limit',
                '20',
                '--records',
                str(tmp_path / 'records'),
                '--data-dir',
                str(fashion_parquet),
                '--outputs',
                str(tmp_path / 'out'),
            ]
        )
        == 0
    )
    assert '== time limit: 5 runs left for a next call' in capsys.readouterr().out
    assert not (tmp_path / 'records').exists() and not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(experiments, fashion_parquet, tmp_path):
    """`gpu_check.sh full SECONDS --dry-run`: the one device script end to end on the CPU (tests, both speed runs, a
    few steps of a run of each study in 4 shards, the packing), then the report's GPU block from what it packed."""
    out = tmp_path / 'out'
    env = dict(
        os.environ,
        OUT=str(out),
        DATA_DIR=str(fashion_parquet),
        TIMM_CAPSULES_CI='0',
        PATH=f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}',
    )
    done = subprocess.run(
        ['bash', 'benchmarks/gpu_check.sh', 'full', '500', '--dry-run'],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (out / 'summary.txt').read_text().splitlines()
    assert [line.split(':')[0] for line in lines[:5]] == [
        '== machine',
        '== tests',
        '== speed (plain)',
        '== speed (triton)',
        '== studies',
    ]
    assert len(lines) == 6 and lines[5].startswith('== done in ') and lines[5].endswith(' s of 500')
    assert 'skipped' in lines[1] and 'no GPU' in lines[0]
    for routing, line in zip(('', '_triton'), lines[2:4]):
        [row] = json.loads((out / f'cuda_b128_eager{routing}.json').read_text())['results']
        assert 'error' not in row and f'{row["step_s"] * 1000:.0f} ms/step' in line
    assert '4 new records' in lines[4]
    with tarfile.open(out / 'results.tgz') as packed:
        packed.extractall(tmp_path / 'results', filter='data')
    records = [json.loads(path.read_text()) for path in (tmp_path / 'results' / 'gpu').glob('*.json')]
    assert sorted(r['row']['kind'] + str(r['row']['iterations']) + r['row']['variant'][0] for r in records) == [
        'DR3I',
        'EM2I',
        'IDA2C',
        'IDA5I',
    ]
    assert all(r['scale'] == 'gpu' and r['protocol'] == protocols.GPU_PROTOCOL['fashion_mnist'] for r in records)
    assert all(r['estimated_s'] > 0 and r['metrics']['num_images'] == 256 for r in records)
    with tarfile.open(out / 'logs.tgz') as logs:
        assert {'logs/test_cuda.log', 'logs/studies_0.log', 'logs/speed_triton.log'} <= set(logs.getnames())

    # the report renders the GPU block, beside (never inside) the CPU one
    readme = tmp_path / 'README.md'
    cpu_begin, cpu_end = report.markers('cpu')
    gpu_begin, gpu_end = report.markers('gpu')
    readme.write_text(f'{cpu_begin}\nCPU TABLES\n{cpu_end}\n{gpu_begin}\n{gpu_end}\n')
    assert (
        experiments.main(
            [
                'report',
                '--scale',
                'gpu',
                '--records',
                str(tmp_path / 'results'),
                '--plots',
                str(tmp_path / 'plots'),
                '--data-dir',
                str(fashion_parquet),
                '--write',
                str(readme),
                '--',
                '--cpu',
                '--max-train-steps',
                '2',
                '--train-split',
                'train[:256]',
                '--test-split',
                'test[:256]',
                '--num-workers',
                '0',
            ]
        )
        == 0
    )
    text = readme.read_text()
    assert 'CPU TABLES' in text and text.index(gpu_begin) > text.index(cpu_end)
    gpu_block = text.split(gpu_begin)[1]
    assert 'from the 4 run records in `results/gpu/`' in gpu_block and '**multimnist**' not in gpu_block
    ida5 = next(r for r in records if r['row']['iterations'] == 5 and r['row']['kind'] == 'IDA')
    assert f'{100 * ida5["metrics"]["top1"]:.1f} (1)' in gpu_block and 'estimated' in gpu_block.split('**table1**')[0]
