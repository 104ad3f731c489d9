"""Tests of timm_capsules.experiments' report: the tables, verdicts and plots computed from run records
(``report``, ``plots``), and the differences over seeds with their Welch intervals (``intervals``)."""

import json
import re
import statistics as stats
from pathlib import Path

import pytest

from timm_capsules.experiments import intervals, plans, plots, records, report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def experiments(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # experiments.py: the command line over the package
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    import experiments

    return experiments


def fake_record(run, scale, value, extra=None, **fields):
    record = dict(
        run_id=run.run_id,
        studies=list(run.studies),
        scale=scale,
        row=run.row,
        model=run.row['model'],
        model_kwargs={'num_classes': 10},
        dataset=run.dataset,
        seed=run.seed,
        image_budget=100,
        metric='exact_match' if run.dataset == 'diverse_multimnist' else 'top1',
        metrics={'top1': value, 'exact_match': value, **(extra or {})},
        num_parameters=1234,
        wall_time_s=60.0,
        machine='test machine',
        **fields,
    )
    return record


def write_records(folder, scale, values):
    """values: {(study, predicate) -> per-seed metric}; returns the records written."""
    written = []
    for run in plans.plan(scale, plans.STUDIES, range(2)):
        value = values(run)
        if value is None:
            continue
        record = fake_record(run, scale, value[0], value[1] if len(value) > 1 else None)
        path = records.record_path(folder, scale, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
        written.append(record)
    return written


def test_report_computes_tables_and_plots_from_records(experiments, tmp_path):
    def values(run):
        if run.row.get('kind') == 'IDA' and run.row.get('variant', '').startswith('IDA'):
            return (0.70 + 0.01 * run.row['iterations'] + 0.04 * run.seed,)
        if run.dataset == 'affine_mnist' and run.row['kind'] in ('CapsNet', 'CNN'):  # the verdict's first two rows
            return (0.5 + 0.1 * run.seed, {'test_translated/top1': 0.9})
        if run.row['kind'] == 'CNN' and run.dataset == 'fashion_mnist' and run.seed == 0:
            return (0.81,)
        return None

    write_records(tmp_path / 'records', 'cpu', values)
    stale = tmp_path / 'records' / 'cpu' / 'fashion_mnist-IDA-t2-00000000-seed0.json'  # an older protocol's
    stale.write_text(json.dumps(dict(run_id=stale.stem, metrics={'top1': 0.0})))
    text = report.render_report('cpu', tmp_path / 'records', tmp_path / 'plots')
    # IDA at t = 2: seeds 0.72 and 0.76 -> 74.0 ± 2.8 (2) in table1, iterations and the ablation baseline
    expected = f'74.0 ± {stats.stdev([72.0, 76.0]):.1f} (2)'
    assert text.count(expected) == 3
    table1 = text.split('**table1**')[1].split('**iterations**')[0]
    assert '| `cnn_baseline_cifar10` | CNN | 1,234 | 81.0 (1) |' in table1
    assert '| `em_capsnet_simple_cifar10` | EM t = 3 | — | — |' in table1
    iterations = text.split('**iterations**')[1].split('**ablations**')[0]
    ida_row = next(line for line in iterations.splitlines() if line.startswith('| IDA |'))
    assert ida_row == '| IDA | ' + ' | '.join(f'{72 + t:.1f} ± 2.8 (2)' for t in range(1, 5)) + ' |'
    affine = text.split('**affine**')[1]
    assert f'| 90.0 ± 0.0 (2) | 55.0 ± {stats.stdev([50.0, 60.0]):.1f} (2) | 35.0 ± 7.1 (2) |' in affine
    # the verdicts: differences of the same seed means, with 95% Welch intervals (2 + 2 seeds of equal variance:
    # 2 degrees of freedom, t = 4.303); the one-seed CNN has none
    assert (
        'IDA minus each other model (points, 95% Welch interval over seeds in brackets, * where it excludes 0): '
        'CNN n/a (fewer than 2 seeds).' in table1
    )
    half = 4.302653 * (2 * stats.variance([72.0, 76.0]) / 2) ** 0.5
    assert f'IDA t = 1 to 4 +3.0 [{3 - half:+.1f}, {3 + half:+.1f}]: not distinguishable from 0' in iterations
    half = 4.302653 * (2 * stats.variance([40.0, 30.0]) / 2) ** 0.5
    assert (
        'CapsNet minus CNN: translated test +0.0 [+0.0, +0.0]: not distinguishable from 0, '
        f'gap (at matched translated accuracy) +0.0 [{-half:+.1f}, {half:+.1f}]: not distinguishable from 0'
    ) in affine
    for plot in ('iterations_cpu.png', 'affine_cpu.png'):
        assert (tmp_path / 'plots' / plot).stat().st_size > 5000
    assert 'from the 13 run records' in text  # 8 IDA (t = 1..4), 1 CNN, 4 affine; not the stale one
    readme = tmp_path / 'README.md'
    readme.write_text(f'intro\n{report.BEGIN}\nold\n{report.END}\noutro\n')
    assert (
        experiments.main(
            [
                'report',
                '--records',
                str(tmp_path / 'records'),
                '--plots',
                str(tmp_path / 'plots'),
                '--write',
                str(readme),
            ]
        )
        == 0
    )
    written = readme.read_text()
    assert written.startswith(f'intro\n{report.BEGIN}\nGenerated by') and 'old' not in written
    assert readme.read_text().endswith(f'{report.END}\noutro\n')
    readme.write_text('no markers')
    with pytest.raises(SystemExit, match='no <!-- experiments:begin -->'):  # and no plot written first
        experiments.main(
            [
                'report',
                '--records',
                str(tmp_path / 'records'),
                '--plots',
                str(tmp_path / 'no_plots'),
                '--write',
                str(readme),
            ]
        )
    assert not (tmp_path / 'no_plots').exists()


def test_t_quantiles_and_welch_intervals():
    # Student's t, 0.975 quantiles from a printed table
    for df, expected in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042), (1e6, 1.960)):
        assert intervals.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    # ablation B of the README: -0.5 points over 3 + 3 seeds, Welch's t about 1.8: the interval holds 0
    d = intervals.welch([0.8242, 0.8281, 0.8199], [0.8293, 0.8304, 0.8278])
    assert d.value == pytest.approx(-0.51, abs=0.01) and d.low < 0 < d.high and not d.excludes_zero
    assert str(d) == f'{d.value:+.1f} [{d.low:+.1f}, {d.high:+.1f}]'
    # unequal variances: Welch-Satterthwaite degrees of freedom, computed here by hand
    a, b = [0.10, 0.12, 0.14, 0.16], [0.20, 0.21, 0.22]
    va, vb = stats.variance([100 * x for x in a]) / 4, stats.variance([100 * x for x in b]) / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    d = intervals.welch(a, b)
    half = intervals.t_quantile(0.975, df) * (va + vb) ** 0.5
    assert va != vb and (d.value, d.low, d.high) == pytest.approx((-8.0, -8.0 - half, -8.0 + half))
    assert d.excludes_zero and str(d).endswith(']*')
    assert intervals.welch([0.5], [0.4, 0.6]) is None
    gap = intervals.welch([0.30, 0.40], [])  # one sample: a paired difference per seed
    assert gap.value == pytest.approx(35.0) and gap.high - gap.value == pytest.approx(12.706 * 5, rel=1e-3)


CLAUSE = re.compile(r'([+-]\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\](\*?)(?:: ([^;]*))?')


def unsupported_claims(text):
    """The clauses of the verdicts that call a difference one (a claim word) while their interval, as printed,
    includes zero or is not marked."""
    wrong = []
    for line in text.splitlines():
        for value, low, high, mark, words in CLAUSE.findall(line):
            claims = set(re.findall(r'[a-z]+', words)) & set(intervals.CLAIM_WORDS)
            excludes = float(low) > 0 or float(high) < 0 or (mark and float(low) * float(high) >= 0)
            if (claims and not mark) or (mark and not excludes):
                wrong.append(f'{value} [{low}, {high}]{mark}: {words}')
    return wrong


def test_the_claim_check_finds_a_planted_claim():
    planted = 'IDA minus each other model: DR -0.5 [-1.4, +0.4]: the ablation costs accuracy; CNN +2.3 [+2.0, +2.7]*'
    assert unsupported_claims(planted) == ['-0.5 [-1.4, +0.4]: the ablation costs accuracy']
    assert unsupported_claims('A -4.6 [-5.4, -3.8]*: the ablation costs accuracy') == []


def test_report_claims_a_difference_only_when_its_interval_excludes_zero(tmp_path):
    """IDA against DR: seed means 2 points apart with a spread that keeps 0 in the interval; against EM and the
    CNN: clearly apart. Only the latter are called a difference. The same check on the committed records."""

    def values(run):
        if run.dataset != 'fashion_mnist':
            return None
        base = {'IDA': 0.80, 'DR': 0.78, 'EM': 0.60, 'CNN': 0.70, 'ResNet-18': 0.8005}[run.row['kind']]
        spread = {'DR': 0.05, 'ResNet-18': 0.02}.get(run.row['kind'], 0.005)
        return (base + spread * (1 if run.seed else -1),)

    write_records(tmp_path / 'records', 'cpu', values)
    text = report.render_report('cpu', tmp_path / 'records', tmp_path / 'plots')
    table1 = text.split('**table1**')[1].split('**iterations**')[0]
    verdict = next(line for line in table1.splitlines() if line.startswith('IDA minus each other model'))
    clauses = dict(clause.split(' ', 1) for clause in verdict.split(': ', 1)[1].rstrip('.').split('; '))
    assert clauses['DR'].endswith(': not distinguishable from 0') and '*' not in clauses['DR']
    assert clauses['ResNet-18'].endswith(': not distinguishable from 0')
    assert clauses['EM'].endswith(']*: IDA beats EM') and clauses['CNN'].endswith(']*: IDA beats CNN')
    assert unsupported_claims(text) == []
    assert not set(re.findall(r'[a-z]+', clauses['DR'] + clauses['ResNet-18'])) & set(intervals.CLAIM_WORDS)
    committed = report.render_report('cpu', ROOT / 'results', tmp_path / 'committed_plots')
    assert CLAUSE.findall(committed) and unsupported_claims(committed) == []


def test_plots_show_the_tables_error_measure_and_name_the_setup(tmp_path, monkeypatch):
    """Both plots: mean ± sample std over seeds (as the tables), and a title naming data set, budget, seed count
    and the error measure; the affine plot's legend covers no bar."""
    figures = {}
    monkeypatch.setattr(plots, 'save_figure', lambda fig, path: figures.setdefault(path.name, fig) and path)

    def values(run):
        if 'iterations' in run.studies:
            return (0.70 + 0.01 * run.row['iterations'] + 0.04 * run.seed,)
        if run.dataset == 'affine_mnist' and run.row['kind'] in ('CapsNet', 'CNN'):  # two bar pairs
            return (0.5 + 0.1 * run.seed, {'test_translated/top1': 0.9 + 0.02 * run.seed})
        return None

    write_records(tmp_path / 'records', 'cpu', values)
    report.render_report('cpu', tmp_path / 'records', tmp_path / 'plots')
    for name, dataset in (('iterations_cpu.png', 'fashion_mnist'), ('affine_cpu.png', 'affine_mnist')):
        title = figures[name].axes[0].get_title()
        assert f'{dataset}, 100 training images, 2 seeds' in title and '± sample std over seeds' in title, title
    ax = figures['iterations_cpu.png'].axes[0]
    for container in ax.containers:  # error bars: half-length = sample std of the two seeds (4 points)
        for segment in container.lines[2][0].get_segments():
            assert segment[1][1] - segment[0][1] == pytest.approx(2 * stats.stdev([0.0, 4.0]))
    fig = figures['affine_cpu.png']
    ax = fig.axes[0]
    bars = [container for container in ax.containers if hasattr(container, 'errorbar') and container.errorbar]
    spreads = sorted(round(seg[1][1] - seg[0][1], 6) for c in bars for seg in c.errorbar.lines[2][0].get_segments())
    expected = [2 * stats.stdev([90.0, 92.0])] * 2 + [2 * stats.stdev([50.0, 60.0])] * 2
    assert spreads == pytest.approx(sorted(expected))
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert not any(legend.overlaps(patch.get_window_extent()) for c in bars for patch in c.patches)
    assert not any(legend.overlaps(text.get_window_extent()) for text in ax.texts)  # nor a bar's label
