"""The report of docs/results.md: per study its claim, protocol, table, verdict (every difference it is read by, with
its 95% Welch interval) and plot, computed from the run records; and the hub configs' measured results."""

import os
from pathlib import Path
from typing import Any, Dict, List, Sequence

from .budget import GPU_ASSUMPTIONS, gpu_estimate
from .plans import CLAIMS, DATA, STUDIES, Run, plan
from .plots import plot_affine, plot_iterations
from .protocols import PROTOCOLS
from .records import load_records, metric_values, rows_of
from .intervals import INTERVALS, claim, mean_std, welch

ROOT = Path(__file__).resolve().parents[2]  # the checkout: plot links are relative to it by default
BEGIN, END = '<!-- experiments:begin -->', '<!-- experiments:end -->'


def markers(scale: str):
    """The docs/results.md block a scale's report replaces: each scale has its own, so a GPU report never mixes with
    the CPU's."""
    return (
        (BEGIN, END) if scale == 'cpu' else (f'<!-- experiments-{scale}:begin -->', f'<!-- experiments-{scale}:end -->')
    )


def params(found: Sequence[Dict[str, Any]]) -> str:
    return f'{found[0]["num_parameters"]:,}' if found else '—'


def study_table(study: str, runs: Sequence[Run], records: Dict[str, Dict[str, Any]]) -> List[str]:
    rows = rows_of(study, runs, records)
    if study == 'table1':
        lines = ['| model | routing | parameters | top-1 (%), mean ± std (seeds) |', '|---|---|---:|---|']
        lines += [
            f'| `{row["model"]}` | {row["kind"]}{" t = %d" % row["iterations"] if "iterations" in row else ""} '
            f'| {params(found)} | {mean_std(metric_values(found))} |'
            for row, found in rows
        ]
    elif study == 'iterations':
        ts = sorted({row['iterations'] for row, _ in rows})
        lines = ['| routing | ' + ' | '.join(f't = {t}' for t in ts) + ' |', '|---|' + '---|' * len(ts)]
        for kind in dict.fromkeys(row['kind'] for row, _ in rows):
            cells = {row['iterations']: mean_std(metric_values(found)) for row, found in rows if row['kind'] == kind}
            lines.append(f'| {kind} | ' + ' | '.join(cells.get(t, '—') for t in ts) + ' |')
    elif study == 'ablations':
        lines = ['| variant (IDA, t = 2) | top-1 (%) |', '|---|---|']
        lines += [f'| {row["variant"]} | {mean_std(metric_values(found))} |' for row, found in rows]
    elif study == 'multimnist':
        lines = [
            '| model | parameters | exact match (%) | part-whole probe: own fraction (chance 0.5) |',
            '|---|---:|---|---|',
        ]
        for row, found in rows:
            probes = [r['part_whole_probe']['own_fraction'] for r in found if 'part_whole_probe' in r]
            probe_cell = ' / '.join(f'{v:.3f}' for v in probes) if probes else '—'
            lines.append(
                f'| {row["kind"]} (`{row["model"]}`) | {params(found)} | {mean_std(metric_values(found))} '
                f'| {probe_cell} |'
            )
    else:  # affine
        lines = [
            '| model | parameters | translated test (%) | affine test (%) | gap (points) |',
            '|---|---:|---|---|---|',
        ]
        for row, found in rows:
            translated, affine = metric_values(found, 'test_translated/top1'), metric_values(found)
            gap = [t - a for t, a in zip(translated, affine)]
            lines.append(
                f'| {row["kind"]} (`{row["model"]}`) | {params(found)} | {mean_std(translated)} '
                f'| {mean_std(affine)} | {mean_std(gap)} |'
            )
    return lines


def verdict(study: str, runs: Sequence[Run], records: Dict[str, Dict[str, Any]]) -> str:
    """What the table says about the claim, computed from the same records: every difference of seed means with its
    95% Welch interval; a clause claims a difference only when its interval excludes zero. '' while the runs it
    needs are missing."""
    rows = rows_of(study, runs, records)
    if study == 'table1':
        ida = next((found for row, found in rows if row['kind'] == 'IDA'), [])
        others = [
            f'{row["kind"]} '
            + claim(welch(metric_values(ida), metric_values(found)), 'IDA', 'beats', 'trails', row['kind'])
            for row, found in rows
            if row['kind'] != 'IDA' and found
        ]
        return f'IDA minus each other model ({INTERVALS}): {"; ".join(others)}.' if ida and others else ''
    if study == 'iterations':
        steps = []
        for kind in dict.fromkeys(row['kind'] for row, _ in rows):
            points = sorted(
                ((row['iterations'], found) for row, found in rows if row['kind'] == kind and found),
                key=lambda point: point[0],
            )
            for (t0, a), (t1, b) in zip(points, points[1:]):
                steps.append(
                    f'{kind} t = {t0} to {t1} '
                    + claim(welch(metric_values(b), metric_values(a)), kind, 'rises', 'falls')
                )
            if len(points) > 2:
                (t0, a), (t1, b) = points[0], points[-1]
                steps.append(
                    f'{kind} t = {t0} to {t1} '
                    + claim(welch(metric_values(b), metric_values(a)), kind, 'rises', 'falls')
                )
        return f'Change of top-1 with the routing iterations ({INTERVALS}): {"; ".join(steps)}.' if steps else ''
    if study == 'ablations':
        base = rows[0][1] if rows else []
        changes = [
            f'{row["variant"].split(":")[0]} '
            + claim(welch(metric_values(found), metric_values(base)), 'the ablation', 'adds', 'costs', 'accuracy')
            for row, found in rows[1:]
            if found
        ]
        return f'Each ablation minus the full routing ({INTERVALS}): {"; ".join(changes)}.' if base and changes else ''
    if study == 'multimnist':
        caps = [(row['kind'], found) for row, found in rows if 'CapsNet' in row['kind'] and found]
        cnns = [(row['kind'], found) for row, found in rows if 'CNN' in row['kind'] and found]
        pairs = [
            f'{c} minus {n} '
            + claim(welch(metric_values(a), metric_values(b)), f'the {c}', 'beats', 'trails', f'the {n}')
            for c, a in caps
            for n, b in cnns
        ]
        return f'Exact match, each CapsNet minus each CNN ({INTERVALS}): {"; ".join(pairs)}.' if pairs else ''
    found_rows = [(row['kind'], found) for row, found in rows_of('affine', runs, records) if found]
    if len(found_rows) < 2:
        return ''

    def gap(found):
        return [t - a for t, a in zip(metric_values(found, 'test_translated/top1'), metric_values(found))]

    def translated(found):
        return metric_values(found, 'test_translated/top1')

    parts = [
        f'{kind} gap (translated minus affine test, per seed) {welch(gap(found), [])}' for kind, found in found_rows
    ]
    # each CapsNet against each CNN: first on the translated test (a gap compares generalisation only where the
    # models are equally trained), then the gaps
    for caps, a in [(kind, found) for kind, found in found_rows if 'CapsNet' in kind]:
        for cnn, b in [(kind, found) for kind, found in found_rows if 'CNN' in kind]:
            on_translated = welch(translated(a), translated(b))
            matched = on_translated is not None and not on_translated.excludes_zero
            parts.append(
                f'{caps} minus {cnn}: translated test '
                + claim(on_translated, f'the {caps}', 'beats', 'trails', f'the {cnn}')
                + f', gap{" (at matched translated accuracy)" if matched else ""} '
                + claim(welch(gap(a), gap(b)), f"the {caps}'s gap is", 'wider', 'narrower', f"than the {cnn}'s")
            )
    return f'Affine generalisation ({INTERVALS}): {"; ".join(parts)}.'


def render_report(
    scale: str,
    records_dir: Path,
    plots_dir: Path,
    link_base: Path = ROOT,
    data_dir: Path = DATA,
    train_args: Sequence[str] = (),
) -> str:
    """The results of docs/results.md (Markdown) for one scale, with its plots written to ``plots_dir`` and linked
    relative to ``link_base`` (the folder of the file it goes into)."""
    runs = plan(scale, STUDIES, range(100), data_dir, train_args)
    records = load_records(records_dir, scale, runs)
    lines = [
        f'Generated by `python experiments.py report --scale {scale}` from the {len(records)} run records in '
        f'`{records_dir.name}/{scale}/` (one JSON per run: model, arguments, dataset, seed, image budget, '
        f'metrics, wall time, commit, machine, command). Mean ± sample std over seeds, seed count in '
        f'brackets; — : not run yet. Below each table, every difference it is read by, with its 95% Welch '
        f'confidence interval over seeds; only a difference whose interval excludes 0 (marked *) is called one '
        f'(beats, trails, costs, rises, falls ...). The plots show the same mean ± sample std as the tables.'
    ]
    if records:
        machines = sorted({r['machine'] for r in records.values()})
        lines.append(
            f'Machine: {"; ".join(machines)}. Wall time of all runs: '
            f'{sum(r["wall_time_s"] for r in records.values()) / 3600:.1f} h ('
            + ('on a machine shared with other work' if scale != 'gpu' else 'shards side by side on one GPU')
            + ': not a speed figure; see Performance).'
        )
        if scale == 'gpu':  # the budget's estimates beside what the runs took
            done = [run for run in runs if run.run_id in records]
            left = [run for run in runs if run.run_id not in records and run.seed < 2]
            lines.append(
                f'Run time of these runs: estimated {sum(r.get("estimated_s", 0) for r in records.values()) / 60:.1f} '
                f"min when they were started (each record's `estimated_s`), taken "
                f"{sum(r['wall_time_s'] for r in records.values()) / 60:.1f} min; today's `GPU_ASSUMPTIONS` "
                f'(measured on them) estimate {sum(map(gpu_estimate, done)) / 60:.1f} min for them and '
                f'{sum(map(gpu_estimate, left)) / 60:.1f} min for the {len(left)} runs of 2 seeds left '
                f'({sum(map(gpu_estimate, left)) / 60 / GPU_ASSUMPTIONS["shards"]:.1f} min over '
                f'{GPU_ASSUMPTIONS["shards"]} shards).'
            )
    for study in STUDIES:
        if not any(study in run.studies for run in runs):  # the gpu scale runs three of the studies
            continue
        datasets = sorted({run.dataset for run in runs if study in run.studies})
        protocol = (
            ' '.join(PROTOCOLS[scale][d] + '.' for d in datasets) if scale in PROTOCOLS else "the paper's recipe."
        )
        lines += ['', f'**{study}** — claim: {CLAIMS[study]}. Protocol: {protocol}', '']
        lines += study_table(study, runs, records)
        summary = verdict(study, runs, records)
        lines += ['', summary] if summary else []
        plot = {'iterations': plot_iterations, 'affine': plot_affine}.get(study)
        if plot and plot(runs, records, plots_dir / f'{study}_{scale}.png'):
            link = Path(os.path.relpath(plots_dir / f'{study}_{scale}.png', link_base)).as_posix()
            lines += ['', f'![{study}]({link})']
    return '\n'.join(lines) + '\n'


def record_hub_results(records_dir: Path, scale: str = 'paper', train_args: Sequence[str] = ()) -> List[str]:
    """Writes the per-seed accuracies of runs that trained a hub config's model as registered (only its
    preset's iterations, no other create_model argument) on that config's dataset into the config, through
    ``hub.record_results``. Returns the tags written."""
    from timm_capsules import hub

    runs = plan(scale, STUDIES, range(100), DATA, train_args)
    records = load_records(records_dir, scale, runs)
    written = []
    for cfg in hub.list_hub_configs():
        # the runs' dataset name: the config's eval_id, else its tag's suffix ('capsnet_resnet_cifar10.cifar10')
        dataset = cfg['dataset'].get('eval_id', cfg['tag'].partition('.')[2])
        matching = [
            r
            for r in records.values()
            if r['model'] == cfg['model']
            and r['dataset'] == dataset
            and set(r['model_kwargs']) <= {'num_classes', 'iterations'}
            and r['model_kwargs'].get('iterations', cfg['architecture']['routing_iterations'])
            == cfg['architecture']['routing_iterations']
        ]
        if matching:
            by_seed = sorted(matching, key=lambda r: r['seed'])
            hub.record_results(cfg['tag'], [100 * r['metrics'][r['metric']] for r in by_seed])
            written.append(cfg['tag'])
    return written
