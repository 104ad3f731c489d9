"""Renders docs/performance.md's tables from the harness's JSON results (benchmarks/results/*.json).

python benchmarks/report.py                 # print the table
python benchmarks/report.py --write docs/performance.md   # replace the block between the perf-table markers
"""

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / 'results'
BEGIN, END = '<!-- perf-table -->', '<!-- /perf-table -->'


def render(paths):
    return '\n'.join(render_record(Path(path).name, json.loads(Path(path).read_text())) for path in paths).strip()


def _environment(settings):
    """The environment variables a run was measured with (harness.SETTINGS_VARIABLES), for its heading."""
    return ''.join(f', `{name}={value}`' for name, value in settings.get('environment', {}).items())


def _threads(count):
    return f'{count} thread{"" if count == 1 else "s"}'


def render_record(name, result):
    """The Markdown lines of one result file: bench_em.py, bench_routing.py or bench_models.py."""
    if 'em_over_ida' in result:  # bench_em.py: EM vs IDA CapsNet training throughput
        return '\n'.join(
            [
                f'**`{name}`** — {result["cpu"]}, torch {result["torch"]}, {_threads(result["threads"])}'
                f'{_environment(result)}: '
                f'`{result["em_model"]}` trains at {result["em_images_per_s"]:.1f} img/s, `{result["ida_model"]}` '
                f'at {result["ida_images_per_s"]:.1f} img/s: **{result["em_over_ida"]:.2f}×** (batch '
                f'{result["batch_size"]}, {result["in_chans"]}×{result["img_size"]}×{result["img_size"]}, '
                f'{result["steps"]} alternating steps each; `python benchmarks/bench_em.py`)',
                '',
            ]
        )
    machine = result['machine']
    if result['results'] and 'layer' in result['results'][0]:  # bench_routing.py: the kernel alone
        lines = [
            f'**`{name}`** — {machine["device_name"]}, {_threads(machine["threads"])}, torch {machine["torch"]}, '
            f'plain 2048² matmul {machine["matmul_gflops"]:.0f} GFLOP/s{_environment(machine)}; '
            f'`python {machine["command"]}`',
            '',
            '| capsule layer (one attention pass) | fused fwd ms | plain fwd ms | fused fwd+bwd ms '
            '| plain fwd+bwd ms | fused GFLOP/s fwd | fwd+bwd | of matmul |',
            '|---|---:|---:|---:|---:|---:|---:|---:|',
        ]
        lines += [
            f'| {r["layer"]}, batch {r["batch"]} | {r["fused_forward_ms"]:.1f} | {r["plain_forward_ms"]:.1f} '
            f'| {r["fused_step_ms"]:.1f} | {r["plain_step_ms"]:.1f} | {r["fused_forward_gflops"]:.1f} '
            f'| {r["fused_step_gflops"]:.1f} | {100 * r["step_of_matmul"]:.0f}% |'
            for r in result['results']
        ]
        return '\n'.join(lines + [''])
    layout = ', every model and input channels-last' if any(r.get('channels_last') for r in result['results']) else ''
    compiled = ', every model `torch.compile`d' if any(r.get('compiled') for r in result['results']) else ''
    lines = [
        f'**`{name}`** — {machine["device_name"]}, torch {machine["torch"]}, plain 2048² matmul '
        f'{machine["matmul_gflops"]:.0f} GFLOP/s{layout}{compiled}{_environment(machine)}; '
        f'`python {machine["command"]}`',
        '',
        '| model | batch | iterations | dtype | train step s, median (min–max) | × ref | inference img/s '
        '| train peak MB | × ref | inference peak MB | GFLOP / step | GFLOP/s |',
        '|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|',
    ]
    rows = sorted(result['results'], key=lambda r: (r['batch_size'], r['dtype'], r['model'], r.get('iterations') or 0))
    for r in rows:
        if 'error' in r:
            lines.append(
                f'| `{r["model"]}` | {r["batch_size"]} | {r.get("iterations") or "–"} | {r["dtype"]} '
                f'| error: {r["error"]} | | | | | | | |'
            )
            continue
        lines.append(
            f'| `{r["model"]}` | {r["batch_size"]} | {r.get("iterations") or "–"} | {r["dtype"]} '
            f'| {r["step_s"]:.3f} ({r["step_s_min"]:.3f}–{r["step_s_max"]:.3f}) '
            f'| {r.get("step_time_vs_reference", float("nan")):.2f} | {r["inference_images_per_s"]:.0f} '
            f'| {r["peak_memory_mb"]:.0f} | {r.get("peak_memory_vs_reference", float("nan")):.2f} '
            f'| {r.get("inference_peak_memory_mb", float("nan")):.0f} '
            f'| {r["train_gflop"]:.1f} | {r["achieved_gflops"]:.1f} |'
        )
    return '\n'.join(lines + [''])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--write', metavar='docs/performance.md', help='replace its perf-table block')
    parser.add_argument('results', nargs='*', type=Path, help='result files (default: benchmarks/results/*.json)')
    args = parser.parse_args(argv)
    table = render(args.results or sorted(RESULTS.glob('*.json')))
    if not args.write:
        print(table)
        return table
    readme = Path(args.write)
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + '\n' + table + '\n' + text[end:])
    return table


if __name__ == '__main__':
    main()
