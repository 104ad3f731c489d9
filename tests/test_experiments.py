"""Tests of experiments.py: what each scale plans (the issue's studies, the paper's recipes), real runs through
train_accelerate.main that write records, skip finished work and resume a stopped run, the part-whole probe at
paper scale on a few steps, the hub configs filled from records, and the report's numbers computed from records.
"""
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV_OFFLINE = dict(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')


@pytest.fixture
def experiments(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # experiments.py imports train_accelerate.py from beside it
    for key, value in ENV_OFFLINE.items():
        monkeypatch.setenv(key, value)
    import experiments
    return experiments


@pytest.fixture
def train_config():
    from timm_capsules.train import TrainConfig
    return TrainConfig


def test_cpu_plan_has_every_study_kind_and_seed(experiments):
    runs = experiments.plan('cpu', experiments.STUDIES, range(2))
    assert len({run.run_id for run in runs}) == len(runs)
    by_study = {study: [run for run in runs if study in run.studies] for study in experiments.STUDIES}
    assert all(by_study.values())
    assert {run.seed for run in runs} == {0, 1}
    assert {run.row['kind'] for run in by_study['table1']} == {'IDA', 'DR', 'EM', 'CNN', 'ResNet-18'}
    for kind in ('IDA', 'DR', 'EM'):
        assert {run.row['iterations'] for run in by_study['iterations'] if run.row['kind'] == kind} == {1, 2, 3, 4}
    assert {run.row['variant'][0] for run in by_study['ablations']} == {'I', 'A', 'B', 'C'}
    # one configuration in several studies is one run: IDA at t = 2 serves table1, iterations and ablations
    shared = [run for run in runs if run.row.get('kind') == 'IDA' and run.row.get('iterations') == 2
              and run.row['variant'].startswith('IDA')]
    assert len(shared) == 2 and all(set(run.studies) == {'table1', 'iterations', 'ablations'} for run in shared)
    assert {run.dataset for run in runs} == {'fashion_mnist', 'diverse_multimnist', 'affine_mnist'}


def test_cpu_plan_arguments_parse_to_the_documented_protocol(experiments, train_config):
    import timm
    built = set()
    for run in experiments.plan('cpu', experiments.STUDIES, [0]):
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
    protocol = ' '.join(experiments.CPU_PROTOCOL.values())
    assert '12,800' in protocol and 'batch 64' in protocol and 'Adam 2e-3' in protocol


def test_paper_plan_is_the_papers_recipes(experiments, train_config):
    from timm_capsules.presets import PRESETS
    runs = experiments.plan('paper', experiments.STUDIES, [0])
    for run in runs:
        args = train_config.from_argv(run.train_args + ['--seed', '0'])
        if args.preset:
            preset = PRESETS[args.preset]
            assert (args.model, args.epochs, args.lr, args.opt) == (
                preset['model'], 350, preset['lr'], preset['opt'])
        assert args.model == run.row['model']
    iterations = {(run.row['kind'], run.row['iterations']) for run in runs if 'iterations' in run.studies}
    assert iterations == {(kind, t) for kind in ('IDA', 'DR', 'EM') for t in range(1, 6)}
    assert {run.dataset for run in runs if 'table1' in run.studies} == {'cifar10', 'cifar100'}


def fake_record(experiments, run, scale, value, extra=None, **fields):
    record = dict(run_id=run.run_id, studies=list(run.studies), scale=scale, row=run.row, model=run.row['model'],
                  model_kwargs={'num_classes': 10}, dataset=run.dataset, seed=run.seed, image_budget=100,
                  metric='exact_match' if run.dataset == 'diverse_multimnist' else 'top1',
                  metrics={'top1': value, 'exact_match': value, **(extra or {})}, num_parameters=1234,
                  wall_time_s=60.0, machine='test machine', **fields)
    return record


def write_records(experiments, folder, scale, values):
    """values: {(study, predicate) -> per-seed metric}; returns the records written."""
    written = []
    for run in experiments.plan(scale, experiments.STUDIES, range(2)):
        value = values(run)
        if value is None:
            continue
        record = fake_record(experiments, run, scale, value[0], value[1] if len(value) > 1 else None)
        path = experiments.record_path(folder, scale, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
        written.append(record)
    return written


def test_report_computes_tables_and_plots_from_records(experiments, tmp_path):
    def values(run):
        if run.row.get('kind') == 'IDA' and run.row.get('variant', '').startswith('IDA'):
            return (0.70 + 0.01 * run.row['iterations'] + 0.04 * run.seed,)
        if run.dataset == 'affine_mnist':
            return (0.5 + 0.1 * run.seed, {'test_translated/top1': 0.9})
        if run.row['kind'] == 'CNN' and run.dataset == 'fashion_mnist' and run.seed == 0:
            return (0.81,)
        return None
    write_records(experiments, tmp_path / 'records', 'cpu', values)
    stale = tmp_path / 'records' / 'cpu' / 'fashion_mnist-IDA-t2-00000000-seed0.json'  # an older protocol's
    stale.write_text(json.dumps(dict(run_id=stale.stem, metrics={'top1': 0.0})))
    text = experiments.render_report('cpu', tmp_path / 'records', tmp_path / 'plots')
    # IDA at t = 2: seeds 0.72 and 0.76 -> 74.0 ± 2.8 (2) in table1, iterations and the ablation baseline
    expected = f'74.0 ± {statistics.stdev([72.0, 76.0]):.1f} (2)'
    assert text.count(expected) == 3
    table1 = text.split('**table1**')[1].split('**iterations**')[0]
    assert '| `cnn_baseline_cifar10` | CNN | 1,234 | 81.0 (1) |' in table1
    assert '| `em_capsnet_simple_cifar10` | EM t = 3 | — | — |' in table1
    iterations = text.split('**iterations**')[1].split('**ablations**')[0]
    ida_row = next(line for line in iterations.splitlines() if line.startswith('| IDA |'))
    assert ida_row == '| IDA | ' + ' | '.join(f'{72 + t:.1f} ± 2.8 (2)' for t in range(1, 5)) + ' |'
    affine = text.split('**affine**')[1]
    assert f'| 90.0 ± 0.0 (2) | 55.0 ± {statistics.stdev([50.0, 60.0]):.1f} (2) | 35.0 ± 7.1 (2) |' in affine
    # the verdicts: differences of the same seed means, with 95% Welch intervals (2 + 2 seeds of equal variance:
    # 2 degrees of freedom, t = 4.303); the one-seed CNN has none
    assert 'IDA minus each other model (points, 95% Welch interval over seeds in brackets, * where it excludes 0): ' \
           'CNN n/a (fewer than 2 seeds).' in table1
    half = 4.302653 * (2 * statistics.variance([72.0, 76.0]) / 2) ** 0.5
    assert f'IDA t = 1 to 4 +3.0 [{3 - half:+.1f}, {3 + half:+.1f}]: not distinguishable from 0' in iterations
    half = 4.302653 * (2 * statistics.variance([40.0, 30.0]) / 2) ** 0.5
    assert f'CapsNet gap minus CNN gap +0.0 [{-half:+.1f}, {half:+.1f}]: not distinguishable from 0' in affine
    assert 'CapsNet minus CNN on the translated test +0.0 [+0.0, +0.0]: not distinguishable from 0' in affine
    for plot in ('iterations_cpu.png', 'affine_cpu.png'):
        assert (tmp_path / 'plots' / plot).stat().st_size > 5000
    assert 'from the 13 run records' in text  # 8 IDA (t = 1..4), 1 CNN, 4 affine; not the stale one
    readme = tmp_path / 'README.md'
    readme.write_text(f'intro\n{experiments.BEGIN}\nold\n{experiments.END}\noutro\n')
    assert experiments.main(['report', '--records', str(tmp_path / 'records'), '--plots', str(tmp_path / 'plots'),
                             '--write', str(readme)]) == 0
    written = readme.read_text()
    assert written.startswith(f'intro\n{experiments.BEGIN}\nGenerated by') and 'old' not in written
    assert readme.read_text().endswith(f'{experiments.END}\noutro\n')
    readme.write_text('no markers')
    with pytest.raises(SystemExit, match='no <!-- experiments:begin -->'):  # and no plot written first
        experiments.main(['report', '--records', str(tmp_path / 'records'), '--plots', str(tmp_path / 'no_plots'),
                          '--write', str(readme)])
    assert not (tmp_path / 'no_plots').exists()


def test_list_shows_the_default_seeds_and_where_the_data_comes_from(experiments, tmp_path, capsys):
    """--list trains and writes nothing; 3 seeds by default (the README's tables have 3), and it says that the
    data folder its commands read is written by the runner."""
    data = tmp_path / 'data'
    assert experiments.main(['table1', '--list', '--records', str(tmp_path / 'records'), '--data-dir', str(data)]) == 0
    out = capsys.readouterr().out
    seeds = {line.split(' ')[1].rsplit('-seed', 1)[1] for line in out.splitlines() if line.startswith('[todo]')}
    assert seeds == {'0', '1', '2'}
    assert (f"the commands below read {data / 'fashion_mnist'}: experiments.py without --list writes it there "
            "first") in out
    assert f'--dataset hf:{data / "fashion_mnist"} ' in out and not data.exists()


def test_t_quantiles_and_welch_intervals(experiments):
    # Student's t, 0.975 quantiles from a printed table
    for df, expected in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042), (1e6, 1.960)):
        assert experiments.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    # ablation B of the README: -0.5 points over 3 + 3 seeds, Welch's t about 1.8: the interval holds 0
    d = experiments.welch([0.8242, 0.8281, 0.8199], [0.8293, 0.8304, 0.8278])
    assert d.value == pytest.approx(-0.51, abs=0.01) and d.low < 0 < d.high and not d.excludes_zero
    assert str(d) == f'{d.value:+.1f} [{d.low:+.1f}, {d.high:+.1f}]'
    # unequal variances: Welch-Satterthwaite degrees of freedom, computed here by hand
    a, b = [0.10, 0.12, 0.14, 0.16], [0.20, 0.21, 0.22]
    va, vb = statistics.variance([100 * x for x in a]) / 4, statistics.variance([100 * x for x in b]) / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    d = experiments.welch(a, b)
    half = experiments.t_quantile(0.975, df) * (va + vb) ** 0.5
    assert va != vb and (d.value, d.low, d.high) == pytest.approx((-8.0, -8.0 - half, -8.0 + half))
    assert d.excludes_zero and str(d).endswith(']*')
    assert experiments.welch([0.5], [0.4, 0.6]) is None
    gap = experiments.welch([0.30, 0.40], [])  # one sample: a paired difference per seed
    assert gap.value == pytest.approx(35.0) and gap.high - gap.value == pytest.approx(12.706 * 5, rel=1e-3)


CLAUSE = re.compile(r'([+-]\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\](\*?)(?:: ([^;]*))?')


def unsupported_claims(experiments, text):
    """The clauses of the verdicts that call a difference one (a claim word) while their interval, as printed,
    includes zero or is not marked."""
    wrong = []
    for line in text.splitlines():
        for value, low, high, mark, words in CLAUSE.findall(line):
            claims = set(re.findall(r'[a-z]+', words)) & set(experiments.CLAIM_WORDS)
            excludes = float(low) > 0 or float(high) < 0 or (mark and float(low) * float(high) >= 0)
            if (claims and not mark) or (mark and not excludes):
                wrong.append(f'{value} [{low}, {high}]{mark}: {words}')
    return wrong


def test_the_claim_check_finds_a_planted_claim(experiments):
    planted = 'IDA minus each other model: DR -0.5 [-1.4, +0.4]: the ablation costs accuracy; CNN +2.3 [+2.0, +2.7]*'
    assert unsupported_claims(experiments, planted) == ['-0.5 [-1.4, +0.4]: the ablation costs accuracy']
    assert unsupported_claims(experiments, 'A -4.6 [-5.4, -3.8]*: the ablation costs accuracy') == []


def test_report_claims_a_difference_only_when_its_interval_excludes_zero(experiments, tmp_path):
    """IDA against DR: seed means 2 points apart with a spread that keeps 0 in the interval; against EM and the
    CNN: clearly apart. Only the latter are called a difference. The same check on the committed records."""
    def values(run):
        if run.dataset != 'fashion_mnist':
            return None
        base = {'IDA': 0.80, 'DR': 0.78, 'EM': 0.60, 'CNN': 0.70, 'ResNet-18': 0.8005}[run.row['kind']]
        spread = {'DR': 0.05, 'ResNet-18': 0.02}.get(run.row['kind'], 0.005)
        return (base + spread * (1 if run.seed else -1),)
    write_records(experiments, tmp_path / 'records', 'cpu', values)
    text = experiments.render_report('cpu', tmp_path / 'records', tmp_path / 'plots')
    table1 = text.split('**table1**')[1].split('**iterations**')[0]
    verdict = next(line for line in table1.splitlines() if line.startswith('IDA minus each other model'))
    clauses = dict(clause.split(' ', 1) for clause in verdict.split(': ', 1)[1].rstrip('.').split('; '))
    assert clauses['DR'].endswith(': not distinguishable from 0') and '*' not in clauses['DR']
    assert clauses['ResNet-18'].endswith(': not distinguishable from 0')
    assert clauses['EM'].endswith(']*: IDA beats EM') and clauses['CNN'].endswith(']*: IDA beats CNN')
    assert unsupported_claims(experiments, text) == []
    assert not set(re.findall(r'[a-z]+', clauses['DR'] + clauses['ResNet-18'])) & set(experiments.CLAIM_WORDS)
    committed = experiments.render_report('cpu', ROOT / 'results', tmp_path / 'committed_plots')
    assert CLAUSE.findall(committed) and unsupported_claims(experiments, committed) == []


def test_plots_show_the_tables_error_measure_and_name_the_setup(experiments, tmp_path, monkeypatch):
    """Both plots: mean ± sample std over seeds (as the tables), and a title naming data set, budget, seed count
    and the error measure; the affine plot's legend covers no bar."""
    figures = {}
    monkeypatch.setattr(experiments, '_save', lambda fig, path: figures.setdefault(path.name, fig) and path)

    def values(run):
        if 'iterations' in run.studies:
            return (0.70 + 0.01 * run.row['iterations'] + 0.04 * run.seed,)
        if run.dataset == 'affine_mnist':
            return (0.5 + 0.1 * run.seed, {'test_translated/top1': 0.9 + 0.02 * run.seed})
        return None
    write_records(experiments, tmp_path / 'records', 'cpu', values)
    experiments.render_report('cpu', tmp_path / 'records', tmp_path / 'plots')
    for name, dataset in (('iterations_cpu.png', 'fashion_mnist'), ('affine_cpu.png', 'affine_mnist')):
        title = figures[name].axes[0].get_title()
        assert f'{dataset}, 100 training images, 2 seeds' in title and '± sample std over seeds' in title, title
    ax = figures['iterations_cpu.png'].axes[0]
    for container in ax.containers:  # error bars: half-length = sample std of the two seeds (4 points)
        for segment in container.lines[2][0].get_segments():
            assert segment[1][1] - segment[0][1] == pytest.approx(2 * statistics.stdev([0.0, 4.0]))
    fig = figures['affine_cpu.png']
    ax = fig.axes[0]
    bars = [container for container in ax.containers if hasattr(container, 'errorbar') and container.errorbar]
    spreads = sorted(round(seg[1][1] - seg[0][1], 6) for c in bars for seg in c.errorbar.lines[2][0].get_segments())
    expected = [2 * statistics.stdev([90.0, 92.0])] * 2 + [2 * statistics.stdev([50.0, 60.0])] * 2
    assert spreads == pytest.approx(sorted(expected))
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert not any(legend.overlaps(patch.get_window_extent()) for c in bars for patch in c.patches)
    assert not any(legend.overlaps(text.get_window_extent()) for text in ax.texts)  # nor a bar's label


def small_affine_data(data_dir):
    from timm_capsules.data.affine_mnist import export
    export(data_dir / 'affine_mnist', train_size=48, test_size=24, source='sample')


@pytest.mark.slow
def test_runs_write_records_skip_finished_and_resume_stopped_runs(experiments, tmp_path, capsys):
    """A real run of the affine study's CNN (a few steps on a small export): its record, then a second call that
    trains nothing, then a run stopped after one epoch that a rerun continues from its checkpoint."""
    import timm
    small_affine_data(tmp_path / 'data')
    common = ['affine', '--only', 'CNN', '--seeds', '1', '--records', str(tmp_path / 'records'), '--outputs',
              str(tmp_path / 'out'), '--data-dir', str(tmp_path / 'data')]
    assert experiments.main(common + ['--', '--epochs', '1', '--batch-size', '16']) == 0
    [path] = (tmp_path / 'records' / 'cpu').glob('*.json')
    record = json.loads(path.read_text())
    assert record['studies'] == ['affine'] and record['seed'] == 0 and record['dataset'] == 'affine_mnist'
    assert record['image_budget'] == 48 and record['metric'] == 'top1' and record['metrics']['num_images'] == 24
    assert 0 <= record['metrics']['top1'] <= 1 and record['metrics']['test_translated/num_images'] == 24
    model = timm.create_model(record['model'], **record['model_kwargs'])
    assert record['num_parameters'] == sum(p.numel() for p in model.parameters())
    assert record['command'].startswith('python train_accelerate.py --dataset hf:') and '--seed 0' in record['command']
    assert record['protocol'] == experiments.CPU_PROTOCOL['affine_mnist'] and record['machine'] and record['commit']
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
def test_paper_scale_smoke_probe_and_hub_results(experiments, tmp_path, monkeypatch, capsys):
    """The paper's DiverseMultiMNIST recipe for the matrix CapsNet, two steps: a record with the part-whole
    probe, which then fills the model's hub config through hub.record_results."""
    configs = tmp_path / 'hub_configs'
    shutil.copytree(ROOT / 'hub_configs', configs)
    monkeypatch.setenv('TIMM_CAPSULES_HUB_CONFIGS', str(configs))
    records = tmp_path / 'records'
    few_steps = ['--', '--max-train-steps', '2', '--batch-size', '4', '--epoch-size', '8', '--test-size', '16',
                 '--mnist-source', 'sample']
    assert experiments.main(['multimnist', '--scale', 'paper', '--only', 'matrixCapsNet', '--seeds', '1', '--records',
                             str(records), '--outputs', str(tmp_path / 'out'), '--probe-images', '4'] + few_steps) == 0
    [record] = [json.loads(p.read_text()) for p in (records / 'paper').glob('*.json')]
    assert record['model'] == 'capsnet_matrix_multimnist' and record['num_parameters'] == 9_963_969
    assert record['protocol'] == 'paper recipe' and '--preset multimnist_matrix' in record['command']
    probe = record['part_whole_probe']
    assert probe['images'] == 4 and 0 <= probe['own_fraction'] <= 1 and probe['chance'] == 0.5
    capsys.readouterr()
    assert experiments.main(['report', '--scale', 'paper', '--records', str(records), '--plots',
                             str(tmp_path / 'plots'), '--record-hub'] + few_steps) == 0
    assert 'hub configs updated: capsnet_matrix_multimnist.diverse_multimnist' in capsys.readouterr().out
    cfg = json.loads((configs / 'capsnet_matrix_multimnist.diverse_multimnist.json').read_text())
    assert cfg['results']['per_seed'] == [pytest.approx(100 * record['metrics']['exact_match'])]
    untouched = json.loads((configs / 'capsnet_vector_multimnist.diverse_multimnist.json').read_text())
    assert untouched['results']['per_seed'] == []


def test_every_committed_record_reads_as_sound(experiments, tmp_path):
    """The committed records, DiverseMultiMNIST's with their per-class F1 lists among the metrics, are all sound:
    none is left out of the report. A list with a NaN is not."""
    paths = sorted((ROOT / 'results').glob('*/*.json'))
    assert len(paths) >= 69 and {path: experiments.read_record(path)[1] for path in paths} == dict.fromkeys(paths)
    [multimnist] = [p for p in paths if 'matrixCapsNet' in p.name and p.name.endswith('seed0.json')][:1]
    record = json.loads(multimnist.read_text())
    assert isinstance(record['metrics']['per_class_f1'], list)
    record['metrics']['per_class_f1'][3] = float('nan')
    damaged = tmp_path / multimnist.name
    damaged.write_text(json.dumps(record))
    assert 'per_class_f1' in experiments.read_record(damaged)[1]
