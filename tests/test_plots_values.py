"""``timm_capsules/experiments/plots.py`` checked by value on hand-made runs and records: the titles' setup line, and
what each plot draws (every point, mean and error bar against ``statistics`` over the seeds, the labels, ticks,
limits and sizes), read back from the matplotlib figure; the saved PNG's pixel size. Written for a mutmut run
(tests/README.md); fast, nothing is trained."""

import statistics

import matplotlib
import pytest
from PIL import Image

from timm_capsules.experiments import plots
from timm_capsules.experiments.plans import Run
from timm_capsules.experiments.plots import ERROR_BARS, plot_affine, plot_iterations, setup_title

matplotlib.use('Agg')


def run(name, studies, row, seed, dataset='fashion_mnist'):
    return Run(f'{dataset}-{name}-seed{seed}', tuple(studies), row, dataset, seed, 0, [])


def record(r, budget, **metrics):
    return dict(run_id=r.run_id, dataset=r.dataset, image_budget=budget, metric='top1', metrics=metrics)


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots would save, by file name (the figure is kept, nothing is written)."""
    kept = {}
    monkeypatch.setattr(plots, 'save_figure', lambda fig, path: kept.setdefault(path.name, fig) and path)
    yield kept
    import matplotlib.pyplot as plt

    plt.close('all')


# ---- setup_title -----------------------------------------------------------------------------------------------


def test_setup_title_by_hand():
    a = [run('A', ['s'], {'k': 'a'}, seed) for seed in range(3)]
    b = [run('B', ['s', 't'], {'k': 'b'}, seed, 'affine_mnist') for seed in range(2)]
    other = run('C', ['t'], {'k': 'c'}, 0, 'zzz')
    missing = run('D', ['s'], {'k': 'd'}, 0, 'yyy')
    records = {r.run_id: record(r, 12800) for r in a}
    records.update({r.run_id: record(r, 1000) for r in b})
    records[other.run_id] = record(other, 5)
    runs = a + b + [other, missing]
    assert setup_title(runs, records, 's') == 'affine_mnist, fashion_mnist, 1,000 / 12,800 training images, 2-3 seeds'
    assert setup_title(runs, records, 't') == 'affine_mnist, zzz, 5 / 1,000 training images, 1-2 seeds'
    assert setup_title(a, records, 's') == 'fashion_mnist, 12,800 training images, 3 seeds'
    # seeds are counted per configuration: the run id up to its last '-seed'
    odd = [Run(f'x-seedy-{i}-seed{s}', ('s',), {}, 'd', s, 0, []) for i in range(2) for s in range(i + 1)]
    odd_records = {r.run_id: record(r, 1) for r in odd}
    assert setup_title(odd, odd_records, 's') == 'd, 1 training images, 1-2 seeds'


# ---- plot_iterations -------------------------------------------------------------------------------------------


def iteration_runs():
    """IDA at t = 1, 2, 4 over 3, 2 and 1 seeds; DR at t = 2 over 2 seeds and t = 3 without records."""
    runs, records = [], {}
    values = {('IDA', 1): [0.5, 0.6, 0.8], ('IDA', 2): [0.7, 0.75], ('IDA', 4): [0.9], ('DR', 2): [0.4, 0.45]}
    for kind, t in [('IDA', 1), ('IDA', 2), ('IDA', 4), ('DR', 2), ('DR', 3)]:
        for seed, value in enumerate(values.get((kind, t), [None, None])):
            r = run(f'{kind}-t{t}', ['iterations'], {'kind': kind, 'iterations': t}, seed)
            runs.append(r)
            if value is not None:
                records[r.run_id] = record(r, 100, top1=value)
    runs.append(run('CNN', ['table1'], {'kind': 'CNN'}, 0))
    records[runs[-1].run_id] = record(runs[-1], 100, top1=0.1)
    return runs, records, values


def test_plot_iterations_draws_mean_and_sample_std_per_kind(figures, tmp_path):
    runs, records, values = iteration_runs()
    assert plot_iterations(runs, records, tmp_path / 'it.png') == tmp_path / 'it.png'
    fig = figures['it.png']
    assert tuple(fig.get_size_inches()) == pytest.approx((5.6, 4.2))
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ('routing iterations t', 'test top-1 (%)')
    assert list(ax.get_xticks()) == [1, 2, 3, 4]  # every planned t, with a record or not
    title = ax.get_title()
    assert title == (
        'accuracy vs routing iterations\nfashion_mnist, 100 training images, 1-3 seeds\n'
        'error bars: ± sample std over seeds, as in the table'
    )
    assert ax.title.get_fontsize() == 9
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ['IDA', 'DR']
    assert len(ax.containers) == 2
    for container, kind in zip(ax.containers, ('IDA', 'DR')):
        line, caps, (bars,) = container.lines
        ts = [t for (k, t) in values if k == kind]
        means = [statistics.mean(100 * v for v in values[kind, t]) for t in ts]
        spread = [statistics.stdev([100 * v for v in values[kind, t]]) if len(values[kind, t]) > 1 else 0 for t in ts]
        assert list(line.get_xdata()) == ts and list(line.get_ydata()) == pytest.approx(means)
        assert line.get_marker() == 'o' and container.get_label() == kind
        segments = bars.get_segments()
        assert [s[0][0] for s in segments] == ts
        assert [s[1][1] - s[0][1] for s in segments] == pytest.approx([2 * s for s in spread])
        assert [(s[0][1] + s[1][1]) / 2 for s in segments] == pytest.approx(means)
        assert caps[0].get_markersize() == 2 * 3  # capsize 3 (matplotlib draws caps of twice the size)
    gridlines = ax.xaxis.get_gridlines() + ax.yaxis.get_gridlines()
    assert all(g.get_visible() and g.get_alpha() == 0.3 for g in gridlines)


def test_plot_iterations_without_records_is_none(figures, tmp_path):
    runs, records, _ = iteration_runs()
    only_table1 = {k: v for k, v in records.items() if '-CNN-' in k}
    assert plot_iterations(runs, only_table1, tmp_path / 'it.png') is None
    assert plot_iterations(runs, {}, tmp_path / 'it.png') is None and figures == {}


# ---- plot_affine ---------------------------------------------------------------------------------------------


def affine_runs():
    """Three models, over 2, 1 and 0 seeds, each with its translated and affine top-1; and a model of another
    study."""
    runs, records = [], {}
    values = {'CapsNet, 9 epochs': [(0.9, 0.5), (0.94, 0.6)], 'CNN': [(0.8, 0.3)], 'gone': []}
    for kind, pairs in values.items():
        for seed in range(max(len(pairs), 1)):
            r = run(kind, ['affine'], {'kind': kind}, seed, 'affine_mnist')
            runs.append(r)
            if seed < len(pairs):
                records[r.run_id] = record(r, 60000, top1=pairs[seed][1], **{'test_translated/top1': pairs[seed][0]})
    other = run('x', ['table1'], {'kind': 'x'}, 0)
    runs.append(other)
    records[other.run_id] = record(other, 60000, top1=0.1)
    return runs, records, values


def test_plot_affine_draws_both_tests_per_model(figures, tmp_path):
    runs, records, values = affine_runs()
    assert plot_affine(runs, records, tmp_path / 'a.png') == tmp_path / 'a.png'
    fig = figures['a.png']
    assert tuple(fig.get_size_inches()) == pytest.approx((1.6 + 1.5 * 2, 4.2))  # two models have records
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ['CapsNet\n9 epochs', 'CNN']
    assert list(ax.get_xticks()) == [0, 1]
    assert ax.get_ylabel() == 'test top-1 (%)' and ax.get_ylim() == (0, 130)
    assert list(ax.get_yticks()) == [0, 20, 40, 60, 80, 100]
    assert ax.get_title() == (
        'trained on translated digits\naffine_mnist, 60,000 training images, 1-2 seeds\n' + ERROR_BARS
    )
    assert ax.title.get_fontsize() == 9
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ['translated test', 'affine test']
    assert legend._loc == 9 and legend._ncols == 2  # 'upper center', two columns
    bars = [c for c in ax.containers if hasattr(c, 'patches')]
    assert len(bars) == 2
    pairs = [values['CapsNet, 9 epochs'], values['CNN']]
    for container, which, offset in zip(bars, (0, 1), (-0.19, 0.19)):
        per_model = [[100 * p[which] for p in model] for model in pairs]
        means = [statistics.mean(v) for v in per_model]
        spread = [statistics.stdev(v) if len(v) > 1 else 0 for v in per_model]
        assert [p.get_height() for p in container.patches] == pytest.approx(means)
        assert [p.get_width() for p in container.patches] == pytest.approx([0.38, 0.38])
        assert [p.get_x() + p.get_width() / 2 for p in container.patches] == pytest.approx([offset, 1 + offset])
        segments = container.errorbar.lines[2][0].get_segments()
        assert [s[1][1] - s[0][1] for s in segments] == pytest.approx([2 * s for s in spread])
        assert container.errorbar.lines[1][0].get_markersize() == 6
    labels = [t.get_text() for t in ax.texts]
    expected = [f'{statistics.mean(100 * p[w] for p in model):.1f}' for w in (0, 1) for model in pairs]
    assert labels == expected and all(t.get_fontsize() == 8 for t in ax.texts)
    # each label 3 points above the top of its bar's error bar (matplotlib's default padding is 0)
    tops = []
    for which, offset in zip((0, 1), (-0.19, 0.19)):
        for i, model in enumerate(pairs):
            v = [100 * p[which] for p in model]
            tops.append((i + offset, statistics.mean(v) + (statistics.stdev(v) if len(v) > 1 else 0)))
    assert [tuple(t.xy) for t in ax.texts] == [pytest.approx(top) for top in tops]
    assert [(t.xyann, t.anncoords) for t in ax.texts] == [((0, 3), 'offset points')] * 4


def test_plot_affine_without_records_is_none(figures, tmp_path):
    runs, records, _ = affine_runs()
    assert plot_affine(runs, {k: v for k, v in records.items() if '-x-' in k}, tmp_path / 'a.png') is None
    assert figures == {}


# ---- save_figure ---------------------------------------------------------------------------------------------


def test_saved_figures_are_pngs_of_their_size_at_100_dpi(tmp_path):
    runs, records, _ = iteration_runs()
    path = plot_iterations(runs, records, tmp_path / 'new' / 'folder' / 'it.png')
    assert path == tmp_path / 'new' / 'folder' / 'it.png'
    with Image.open(path) as image:
        assert image.format == 'PNG' and image.size == (560, 420)
    runs, records, _ = affine_runs()
    with Image.open(plot_affine(runs, records, tmp_path / 'a.png')) as image:
        assert image.size == (460, 420)
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # each figure is closed once saved


def test_save_figure_at_100_dpi_whatever_the_settings_and_closes_that_figure(tmp_path):
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({'figure.dpi': 50, 'savefig.dpi': 50}):
        saved = plt.figure(figsize=(2, 1))
        other = plt.figure()  # the current figure now
        assert plots.save_figure(saved, tmp_path / 's.png') == tmp_path / 's.png'
    with Image.open(tmp_path / 's.png') as image:
        assert image.size == (200, 100)
    assert plt.get_fignums() == [other.number]  # the saved one closed, not the current one
    plt.close(other)
