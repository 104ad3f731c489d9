"""The report's plots: accuracy vs routing iterations (Fig. 3's shape) and the affine generalisation gap, both with
the tables' mean ± sample std over seeds."""

import statistics
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .plans import Run
from .records import metric_values, rows_of


def setup_title(runs: Sequence[Run], records: Dict[str, Dict[str, Any]], study: str) -> str:
    """'<dataset>, <budget> training images, <n> seeds' of a study's records, for plot titles."""
    found = [records[run.run_id] for run in runs if study in run.studies and run.run_id in records]
    datasets = sorted({r['dataset'] for r in found})
    budgets = sorted({r['image_budget'] for r in found})
    seeds = sorted(
        {
            len([r for r in found if r['run_id'].rsplit('-seed', 1)[0] == key])
            for key in {r['run_id'].rsplit('-seed', 1)[0] for r in found}
        }
    )
    return (
        f'{", ".join(datasets)}, {" / ".join(f"{b:,}" for b in budgets)} training images, '
        f'{"-".join(map(str, sorted({seeds[0], seeds[-1]})))} seeds'
    )


ERROR_BARS = 'error bars: ± sample std over seeds, as in the table'


def plot_iterations(runs: Sequence[Run], records: Dict[str, Dict[str, Any]], path: Path) -> Optional[Path]:
    """Accuracy vs routing iterations, one line per routing kind (mean ± sample std over seeds, as the table):
    Fig. 3's shape."""
    rows = rows_of('iterations', runs, records)
    if not any(found for _, found in rows):
        return None
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for kind in dict.fromkeys(row['kind'] for row, _ in rows):
        points = [
            (row['iterations'], [100 * v for v in metric_values(found)])
            for row, found in rows
            if row['kind'] == kind and found
        ]
        if points:
            ts, values = zip(*points)
            means = [statistics.mean(v) for v in values]
            spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(ts, means, yerr=spread, marker='o', capsize=3, label=kind)
    ax.set(xlabel='routing iterations t', ylabel='test top-1 (%)', xticks=sorted({r['iterations'] for r, _ in rows}))
    ax.set_title(
        f'accuracy vs routing iterations\n{setup_title(runs, records, "iterations")}\n{ERROR_BARS}', fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_affine(runs: Sequence[Run], records: Dict[str, Dict[str, Any]], path: Path) -> Optional[Path]:
    """Translated vs affine test accuracy per model (mean ± sample std over seeds, as the table): the
    generalisation gap. The legend sits above the bars."""
    rows = [(row, found) for row, found in rows_of('affine', runs, records) if found]
    if not rows:
        return None
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(rows), 4.2))
    width = 0.38
    for offset, (name, metric) in zip(
        (-width / 2, width / 2), (('translated', 'test_translated/top1'), ('affine', None))
    ):
        values = [[100 * v for v in metric_values(found, metric)] for _, found in rows]
        means = [statistics.mean(v) for v in values]
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        bars = ax.bar(
            [i + offset for i in range(len(rows))], means, width, yerr=spread, capsize=3, label=f'{name} test'
        )
        ax.bar_label(bars, fmt='%.1f', fontsize=8, padding=3)
    ax.set(
        xticks=range(len(rows)),
        xticklabels=[row['kind'].replace(', ', '\n') for row, _ in rows],
        ylabel='test top-1 (%)',
        ylim=(0, 130),
        yticks=range(0, 101, 20),
    )
    ax.set_title(f'trained on translated digits\n{setup_title(runs, records, "affine")}\n{ERROR_BARS}', fontsize=9)
    ax.legend(loc='upper center', ncol=2)  # above the bars: they end below 105 of 130
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
