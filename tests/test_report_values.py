"""``timm_capsules/experiments/report.py`` checked by value on hand-made records: the hub configs' results (which
records a config takes, by seed, under extra training arguments, for a config named by its eval_id or its tag),
and the pieces of the report no committed record reaches. The report of the committed records is checked word
for word against docs/results.md by tests/test_docs.py. Written for a mutmut run (tests/README.md); fast, nothing
is trained."""

import json

import pytest

from timm_capsules import hub
from timm_capsules.experiments import intervals, plans, protocols, records, report


def write(folder, scale, run, value, **fields):
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
        metric='top1',
        metrics={'top1': value},
        num_parameters=1234,
        wall_time_s=60.0,
        machine='test machine',
    )
    record.update(fields)
    path = records.record_path(folder, scale, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record


def config(tag, model, t, **dataset):
    return dict(tag=tag, model=model, dataset=dataset, architecture=dict(routing_iterations=t))


@pytest.fixture
def hub_results(monkeypatch):
    """The configs record_hub_results sees (set by the test) and what it writes into them."""
    written, configs = {}, []
    monkeypatch.setattr(hub, 'list_hub_configs', lambda: configs)
    monkeypatch.setattr(hub, 'record_results', lambda tag, values: written.setdefault(tag, values))
    return configs, written


def cifar10_ida_t2(seeds, train_args=()):
    runs = plans.plan('paper', plans.STUDIES, seeds, plans.DATA, train_args)
    return [
        run
        for run in runs
        if run.dataset == 'cifar10'
        and run.row['model'] == 'capsnet_resnet_cifar10'
        and run.row.get('iterations') == 2
        and run.row['variant'].startswith('IDA')
    ]


def test_hub_results_by_seed_under_the_calls_training_arguments(tmp_path, hub_results):
    configs, written = hub_results
    configs.append(config('capsnet_resnet_cifar10.cifar10', 'capsnet_resnet_cifar10', 2))
    extra = ['--log-interval', '7']
    runs = cifar10_ida_t2([2, 0, 1], extra)
    assert len(runs) == 3
    for run in runs:
        write(tmp_path, 'paper', run, 0.5 + 0.1 * run.seed, model_kwargs={'num_classes': 10, 'iterations': 2})
    assert report.record_hub_results(tmp_path, train_args=extra) == ['capsnet_resnet_cifar10.cifar10']  # paper
    assert written['capsnet_resnet_cifar10.cifar10'] == pytest.approx([50.0, 60.0, 70.0])  # seed 0, 1, 2
    # the same records are another configuration's without the extra arguments: none is taken
    written.clear()
    assert report.record_hub_results(tmp_path, 'paper') == [] and written == {}


def test_hub_results_take_the_seeds_below_100(tmp_path, hub_results):
    configs, written = hub_results
    configs.append(config('capsnet_resnet_cifar10.cifar10', 'capsnet_resnet_cifar10', 2))
    for run in cifar10_ida_t2([99, 100]):
        write(tmp_path, 'paper', run, 0.001 * run.seed)
    report.record_hub_results(tmp_path, 'paper')
    assert written == {'capsnet_resnet_cifar10.cifar10': [pytest.approx(9.9)]}


@pytest.mark.parametrize(
    'cfg, taken',
    [
        (config('capsnet_resnet_cifar10.cifar10', 'capsnet_resnet_cifar10', 2), True),
        (config('capsnet_resnet_cifar10.cifar10.v2', 'capsnet_resnet_cifar10', 2), False),  # dataset 'cifar10.v2'
        (config('capsnet_resnet_cifar10.x.cifar10', 'capsnet_resnet_cifar10', 2), False),  # dataset 'x.cifar10'
        (config('capsnet_resnet_cifar10.x.y', 'capsnet_resnet_cifar10', 2, eval_id='cifar10'), True),
        (config('capsnet_resnet_cifar10.cifar10', 'capsnet_resnet_cifar10', 2, eval_id='cifar100'), False),
        (config('capsnet_resnet_cifar10.cifar10', 'capsnet_resnet_cifar10', 3), False),  # the runs' t is 2
        (config('capsnet_resnet_cifar10.cifar10', 'capsnet_simple_cifar10', 2), False),
    ],
)
def test_hub_results_dataset_from_the_eval_id_or_the_tag(tmp_path, hub_results, cfg, taken):
    configs, written = hub_results
    configs.append(cfg)
    for run in cifar10_ida_t2([0]):
        write(tmp_path, 'paper', run, 0.25, model_kwargs={'num_classes': 10, 'iterations': 2})
    assert report.record_hub_results(tmp_path, 'paper') == ([cfg['tag']] if taken else [])
    assert written == ({cfg['tag']: [25.0]} if taken else {})


@pytest.mark.parametrize(
    'kwargs, taken',
    [
        ({}, True),  # the model's default iterations: the config's
        ({'num_classes': 10}, True),
        ({'num_classes': 10, 'iterations': 2}, True),
        ({'num_classes': 10, 'iterations': 3}, False),
        ({'num_classes': 10, 'layer_norm': False}, False),  # an ablation: not the model as registered
    ],
)
def test_hub_results_take_the_model_as_registered(tmp_path, hub_results, kwargs, taken):
    configs, written = hub_results
    configs.append(config('capsnet_resnet_cifar10.cifar10', 'capsnet_resnet_cifar10', 2))
    for run in cifar10_ida_t2([0]):
        write(tmp_path, 'paper', run, 0.25, model_kwargs=kwargs)
    report.record_hub_results(tmp_path, 'paper')
    assert written == ({'capsnet_resnet_cifar10.cifar10': [25.0]} if taken else {})


# ---- tables and verdicts on hand-made runs ---------------------------------------------------------------------

FULL = 'IDA (concurrent, LayerNorm)'


def hand_runs(study, rows, seeds=2):
    """Runs of one study, a configuration per row and ``seeds`` seeds each."""
    return [
        plans.Run(f'd-{i}-seed{s}', (study,), row, 'd', s, 100, []) for i, row in enumerate(rows) for s in range(seeds)
    ]


def hand_records(runs, values, translated=None):
    """values: {row index: per-seed top-1}, translated: the same of test_translated/top1; the runs of other rows
    have no record."""
    found = {}
    for run in runs:
        index = int(run.run_id.split('-')[1])
        if index in values and run.seed < len(values[index]):
            extra = {'test_translated/top1': translated[index][run.seed]} if translated else {}
            found[run.run_id] = dict(
                run_id=run.run_id,
                metric='top1',
                metrics={'top1': values[index][run.seed], **extra},
                num_parameters=10,
                dataset='d',
                image_budget=100,
            )
    return found


def iteration_rows(kinds_ts):
    return [{'kind': k, 'model': f'{k}_m', 'iterations': t, 'variant': FULL} for k, t in kinds_ts]


def test_iterations_table_marks_a_missing_cell_with_a_dash():
    runs = hand_runs('iterations', iteration_rows([('IDA', 1), ('IDA', 2), ('DR', 1)]))
    found = hand_records(runs, {0: [0.5, 0.6], 1: [0.7, 0.8], 2: [0.4]})  # DR t = 2 is not planned
    assert report.study_table('iterations', runs, found) == [
        '| routing | t = 1 | t = 2 |',
        '|---|---|---|',
        '| IDA | 55.0 ± 7.1 (2) | 75.0 ± 7.1 (2) |',
        '| DR | 40.0 (1) | — |',
    ]


def test_iterations_verdict_steps_and_first_to_last():
    """Each step of t per kind and, with three points or more, the first to the last; a clear rise says 'rises'."""
    rows = iteration_rows([('IDA', 3), ('IDA', 1), ('IDA', 2), ('DR', 1), ('DR', 2), ('EM', 1)])
    runs = hand_runs('iterations', rows)
    ida = {1: [0.50, 0.51], 2: [0.80, 0.81], 3: [0.60, 0.62]}
    found = hand_records(runs, {0: ida[3], 1: ida[1], 2: ida[2], 3: [0.5, 0.6], 4: [0.5, 0.6], 5: [0.5, 0.5]})
    expected = [
        'IDA t = 1 to 2 ' + intervals.claim(intervals.welch(ida[2], ida[1]), 'IDA', 'rises', 'falls'),
        'IDA t = 2 to 3 ' + intervals.claim(intervals.welch(ida[3], ida[2]), 'IDA', 'rises', 'falls'),
        'IDA t = 1 to 3 ' + intervals.claim(intervals.welch(ida[3], ida[1]), 'IDA', 'rises', 'falls'),
        'DR t = 1 to 2 ' + intervals.claim(intervals.welch([0.5, 0.6], [0.5, 0.6]), 'DR', 'rises', 'falls'),
    ]  # DR: two points, one step; EM: one point, none
    assert report.verdict('iterations', runs, found) == (
        f'Change of top-1 with the routing iterations ({intervals.INTERVALS}): {"; ".join(expected)}.'
    )
    assert ': IDA rises' in expected[0] and ': IDA falls' in expected[1]
    assert report.verdict('iterations', runs, {}) == ''
    assert report.verdict('iterations', [], {}) == ''


def test_table1_verdict_needs_the_ida_row():
    rows = [{'kind': 'DR', 'model': 'a'}, {'kind': 'CNN', 'model': 'b'}]
    runs = hand_runs('table1', rows)
    assert report.verdict('table1', runs, hand_records(runs, {0: [0.5, 0.6], 1: [0.4, 0.5]})) == ''
    runs = hand_runs('table1', [{'kind': 'IDA', 'model': 'i'}] + rows)
    assert report.verdict('table1', runs, hand_records(runs, {1: [0.5, 0.6]})) == ''  # IDA not run yet
    found = hand_records(runs, {0: [0.9, 0.91], 1: [0.5, 0.51]})
    d = intervals.welch([0.9, 0.91], [0.5, 0.51])
    assert report.verdict('table1', runs, found) == (
        f'IDA minus each other model ({intervals.INTERVALS}): DR {d}: IDA beats DR.'
    )


def test_ablations_verdict_by_hand():
    variants = [FULL, 'A: no LayerNorm', 'B: sequential routing', 'C: EM-style activations']
    runs = hand_runs('ablations', [{'kind': 'IDA', 'model': 'i', 'iterations': 2, 'variant': v} for v in variants])
    base, a, c = [0.5, 0.51], [0.9, 0.91], [0.2, 0.21]
    found = hand_records(runs, {0: base, 1: a, 3: c})
    assert report.verdict('ablations', runs, found) == (
        f'Each ablation minus the full routing ({intervals.INTERVALS}): '
        f'A {intervals.welch(a, base)}: the ablation adds accuracy; '
        f'C {intervals.welch(c, base)}: the ablation costs accuracy.'
    )
    assert report.verdict('ablations', [], {}) == ''
    assert report.verdict('ablations', runs, hand_records(runs, {0: base})) == ''
    assert report.verdict('ablations', runs, hand_records(runs, {1: a})) == ''  # no full routing yet


# ---- the report's opening paragraph -----------------------------------------------------------------------------


def write_plan_records(folder, scale, chosen, fields):
    """Records of the planned runs ``chosen`` picks (a run -> its top-1 or None)."""
    written = []
    for run in plans.plan(scale, plans.STUDIES, range(2)):
        value = chosen(run)
        if value is not None:
            written.append(write(folder, scale, run, value, **fields(run)))
    return written


def test_report_opening_at_one_device_scale_sets_the_estimates_beside_the_times(tmp_path, monkeypatch):
    """The gpu report's run time line: the records' own estimates (none in an older record) and wall times, and
    today's estimate (replaced here by 100 s a run) of the runs done and of the runs of two seeds left, over the
    shards."""
    monkeypatch.setattr(report, 'gpu_estimate', lambda run: 100.0)
    estimated = {('CNN', 0): {'estimated_s': 31.0}, ('CNN', 1): {'estimated_s': 31.9}, ('ResNet-18', 0): {}}

    def chosen(run):
        return 0.8 if (run.row['kind'], run.seed) in estimated else None

    def fields(run):
        return dict(estimated[run.row['kind'], run.seed], wall_time_s=60.0, machine=f'box {run.seed}')

    written = write_plan_records(tmp_path / 'records', 'gpu', chosen, fields)
    assert len(written) == 3
    text = report.render_report('gpu', tmp_path / 'records', tmp_path / 'plots', tmp_path)
    lines = text.split('\n')
    assert lines[0].startswith('Generated by `python experiments.py report --scale gpu` from the 3 run records in ')
    assert '`records/gpu/`' in lines[0]
    assert lines[1] == (  # 180 s: 0.05 h
        'Machine: box 0; box 1. Wall time of all runs: 0.1 h (shards side by side on one GPU: not a speed '
        'figure; see Performance).'
    )
    assert lines[2] == (  # 62.9 s estimated, 180 s taken; 3 x 100 s done, 37 x 100 s left
        "Run time of these runs: estimated 1.0 min when they were started (each record's `estimated_s`), taken "
        "3.0 min; today's `GPU_ASSUMPTIONS` (measured on them) estimate 5.0 min for them and "
        '61.7 min for the 37 runs of 2 seeds left (15.4 min over 4 shards).'
    )
    assert lines[3] == '' and lines[4].startswith('**table1** — claim: ')
    assert 'Protocol: ' + protocols.GPU_PROTOCOL['fashion_mnist'] + '.' in lines[4]
    assert '**multimnist**' not in text and '**affine**' not in text  # studies the gpu scale does not run
    assert [line.split('**')[1] for line in lines if line.startswith('**')] == ['table1', 'iterations', 'ablations']


def test_report_opening_gives_the_estimated_and_taken_minutes_of_the_records(tmp_path, monkeypatch):
    """The same line on sums where seconds over 60 and over 61 differ in the first decimal."""
    monkeypatch.setattr(report, 'gpu_estimate', lambda run: 100.0)
    estimated = {('CNN', 0): {'estimated_s': 310.0}, ('CNN', 1): {'estimated_s': 319.0}, ('ResNet-18', 0): {}}

    def chosen(run):
        return 0.8 if (run.row['kind'], run.seed) in estimated else None

    def fields(run):
        return dict(estimated[run.row['kind'], run.seed], wall_time_s=62.0, machine='box')

    assert len(write_plan_records(tmp_path / 'records', 'gpu', chosen, fields)) == 3
    lines = report.render_report('gpu', tmp_path / 'records', tmp_path / 'plots', tmp_path).split('\n')
    assert lines[2].startswith(  # 629 s estimated: 10.48 min; 3 x 62 s taken: 3.1 min
        "Run time of these runs: estimated 10.5 min when they were started (each record's `estimated_s`), taken "
        "3.1 min; today's"
    )


def test_markers_by_hand():
    assert report.markers('cpu') == ('<!-- experiments:begin -->', '<!-- experiments:end -->')
    assert report.markers('gpu') == ('<!-- experiments-gpu:begin -->', '<!-- experiments-gpu:end -->')
    assert report.markers('paper') == ('<!-- experiments-paper:begin -->', '<!-- experiments-paper:end -->')


def test_report_skips_a_study_without_runs_and_joins_the_protocols_of_its_datasets(tmp_path, monkeypatch):
    """A plan without runs of the iterations study (a study in the middle), and one table1 run on DiverseMultiMNIST:
    the report goes on past the missing study, and table1's protocol is both datasets' sentences."""

    def doctored(*args):
        runs = []
        for run in plans.plan(*args):
            studies = tuple(s for s in run.studies if s != 'iterations')
            if studies:
                dataset = 'diverse_multimnist' if run.row['kind'] == 'CNN' and 'table1' in studies else run.dataset
                runs.append(run._replace(studies=studies, dataset=dataset))
        return runs

    monkeypatch.setattr(report, 'plan', doctored)
    text = report.render_report('cpu', tmp_path / 'none', tmp_path / 'plots', tmp_path)
    heads = [line.split('**')[1] for line in text.split('\n') if line.startswith('**')]
    assert heads == ['table1', 'ablations', 'multimnist', 'affine']
    cpu = protocols.CPU_PROTOCOL
    assert f'Protocol: {cpu["diverse_multimnist"]}. {cpu["fashion_mnist"]}.\n' in text


def test_report_of_runs_under_extra_arguments_and_seeds_below_100(tmp_path):
    """The report plans with the call's extra training arguments (part of the run ids) and seeds 0 to 99."""
    extra = ['--log-interval', '7']
    runs = [
        run
        for run in plans.plan('cpu', plans.STUDIES, [0, 99, 100], plans.DATA, extra)
        if run.row['kind'] == 'ResNet-18'
    ]
    for run in runs:
        write(tmp_path / 'records', 'cpu', run, 0.5, machine=f'box {run.seed}')
    text = report.render_report('cpu', tmp_path / 'records', tmp_path / 'plots', tmp_path, train_args=extra)
    assert 'from the 2 run records' in text and 'Machine: box 0; box 99.' in text
    text = report.render_report('cpu', tmp_path / 'records', tmp_path / 'plots', tmp_path)
    assert 'from the 0 run records' in text


def test_cpu_report_opening_and_a_report_without_records(tmp_path):
    def fields(run):
        return dict(wall_time_s=90.0, machine='box')

    write_plan_records(
        tmp_path / 'records', 'cpu', lambda run: 0.5 if run.row['kind'] == 'ResNet-18' else None, fields=fields
    )
    lines = report.render_report('cpu', tmp_path / 'records', tmp_path / 'plots', tmp_path).split('\n')
    assert lines[1] == (
        'Machine: box. Wall time of all runs: 0.1 h (on a machine shared with other work: not a speed figure; see '
        'Performance).'
    )
    assert lines[2] == ''
    text = report.render_report('paper', tmp_path / 'none', tmp_path / 'plots', tmp_path)
    assert 'from the 0 run records in `none/paper/`' in text and 'Machine:' not in text
    assert "Protocol: the paper's recipe." in text and '![' not in text
    assert text.endswith('\n') and not text.endswith('\n\n')
    assert sorted(text.split('**')[1::2]) == sorted(plans.STUDIES)


def test_multimnist_verdict_each_capsnet_minus_each_cnn():
    rows = [{'kind': k, 'model': 'm'} for k in ('matrix CapsNet', 'vector CapsNet', 'CNN', 'CNN, fully connected')]
    runs = hand_runs('multimnist', rows)
    matrix, vector, cnn = [0.9, 0.91], [0.5, 0.6], [0.3, 0.31]
    found = hand_records(runs, {0: matrix, 1: vector, 2: cnn})  # the fully connected CNN not run yet
    w = intervals.welch
    assert report.verdict('multimnist', runs, found) == (
        f'Exact match, each CapsNet minus each CNN ({intervals.INTERVALS}): '
        f'matrix CapsNet minus CNN {w(matrix, cnn)}: the matrix CapsNet beats the CNN; '
        f'vector CapsNet minus CNN {w(vector, cnn)}: not distinguishable from 0.'
    )
    assert report.verdict('multimnist', runs, hand_records(runs, {0: matrix, 1: vector})) == ''
    assert report.verdict('multimnist', runs, {}) == ''


def test_affine_verdict_translated_test_then_gaps():
    rows = [{'kind': k, 'model': 'm'} for k in ('CapsNet', 'CNN', 'CNN, fully connected')]
    runs = hand_runs('affine', rows)
    translated = {0: [0.95, 0.96], 1: [0.97, 0.98], 2: [0.5, 0.51]}
    affine = {0: [0.80, 0.82], 1: [0.60, 0.61], 2: [0.45, 0.47]}
    found = hand_records(runs, affine, translated)
    w, claim = intervals.welch, intervals.claim
    gap = {i: [t - a for t, a in zip(translated[i], affine[i])] for i in affine}
    on_cnn, on_fc = w(translated[0], translated[1]), w(translated[0], translated[2])
    assert not on_cnn.excludes_zero and on_fc.excludes_zero
    parts = [
        f'CapsNet gap (translated minus affine test, per seed) {w(gap[0], [])}',
        f'CNN gap (translated minus affine test, per seed) {w(gap[1], [])}',
        f'CNN, fully connected gap (translated minus affine test, per seed) {w(gap[2], [])}',
        'CapsNet minus CNN: translated test '
        + claim(on_cnn, 'the CapsNet', 'beats', 'trails', 'the CNN')
        + ', gap (at matched translated accuracy) '
        + claim(w(gap[0], gap[1]), "the CapsNet's gap is", 'wider', 'narrower', "than the CNN's"),
        'CapsNet minus CNN, fully connected: translated test '
        + claim(on_fc, 'the CapsNet', 'beats', 'trails', 'the CNN, fully connected')
        + ', gap '
        + claim(w(gap[0], gap[2]), "the CapsNet's gap is", 'wider', 'narrower', "than the CNN, fully connected's"),
    ]
    text = report.verdict('affine', runs, found)
    assert text == f'Affine generalisation ({intervals.INTERVALS}): {"; ".join(parts)}.'
    assert "the CapsNet's gap is narrower than the CNN's" in text and 'the CapsNet beats the CNN, fully' in text
    assert report.verdict('affine', runs, hand_records(runs, {0: affine[0]}, translated)) == ''
    assert report.verdict('affine', runs, {}) == ''
