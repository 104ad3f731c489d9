#!/usr/bin/env python
"""The paper's comparisons as one experiment runner, the command line of ``timm_capsules.experiments``: every run
is one call of the training script's ``run(config, accelerator)`` (train_accelerate.py, beside this file), all of
a call's runs on one Accelerator, so ``accelerate launch`` spreads every study over many GPUs; every finished run is
one JSON record. Finished runs are skipped, so a study goes on across sessions.

    python experiments.py table1 iterations --scale cpu     # run studies (all: every study)
    python experiments.py all --scale cpu --list             # the runs and their commands, nothing trained
    python experiments.py table1 iterations ablations --scale gpu --shard 0/4 --time-limit 300   # one GPU shard
    accelerate config                                        # once, on a machine with many GPUs; then
    accelerate launch experiments.py all --scale paper       # on all of them (docs/training.md: other launches)
    python experiments.py report --write docs/results.md     # tables and plots from the records

Studies: ``table1`` (routing kinds and CNN baselines: accuracy, parameters), ``iterations`` (accuracy vs
routing iterations per routing kind), ``ablations`` (A: no LayerNorm, B: sequential routing, C: EM-style
activations), ``multimnist`` (DiverseMultiMNIST exact match and the part-whole probe) and ``affine``
(train on translated digits, test on affinely transformed ones; Sabour et al. 2017).

Scales. ``paper``: the paper's recipes as they are (``timm_capsules.presets``: CIFAR-10/100 and the full
DiverseMultiMNIST, 350 epochs). ``cpu``: a reduced protocol for a 2-core machine with no network, its recipes
written once as data (``timm_capsules/experiments/protocols.py``: the runs' arguments and the protocol printed
beside every result come from them): real Fashion-MNIST (Debian's ``dataset-fashion-mnist``) in place of CIFAR
with a fixed image budget, DiverseMultiMNIST and Affine MNIST from the built-in MNIST sample, small capsule and CNN
models where the paper's would not fit; 3 seeds by default, as in docs/results.md. ``gpu``: ``table1``,
``iterations`` and ``ablations`` on the full Fashion-MNIST for one GPU (its recipe in the same file), sized by
``budget.gpu_estimate`` to about 6 minutes of an H200 over 4 shards (``benchmarks/gpu_check.sh full`` runs it); 2
seeds by default there and at paper scale.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from timm_capsules.experiments.budget import GPU_ASSUMPTIONS, gpu_estimate
from timm_capsules.experiments.plans import DATA, STUDIES, plan
from timm_capsules.experiments.records import damaged_records, load_records, read_record, record_path
from timm_capsules.experiments.report import BEGIN, END, markers, record_hub_results, render_report
from timm_capsules.experiments.runner import command, execute, prepare_data, shared_accelerator

ROOT = Path(__file__).resolve().parent
RECORDS = ROOT / 'results'
__all__ = ['main', 'report_main', 'render_report', 'markers', 'ROOT']


def list_runs(args, runs, todo) -> None:
    """--list: the runs, whether each is done, and the command that trains it; nothing is written."""
    names = ('fashion_mnist', 'affine_mnist', 'affine_mnist_full')
    datasets = sorted(
        {
            str(args.data_dir / name)
            for name in names
            if any(f'hf:{args.data_dir / name}' in run.train_args for run in runs)
        }
    )
    if datasets:
        print(
            f'the commands below read {", ".join(datasets)}: experiments.py without --list writes '
            f'{"it" if len(datasets) == 1 else "them"} there first'
        )
    for run in runs:
        done = 'done' if run not in todo else 'todo'
        estimate = f' [~{gpu_estimate(run):.0f} s]' if args.scale == 'gpu' else ''
        print(f'[{done}] {run.run_id} ({", ".join(run.studies)}){estimate}: {command(run)}')
    if args.scale == 'gpu':
        total, shards = sum(gpu_estimate(run) for run in todo), GPU_ASSUMPTIONS['shards']
        print(
            f'estimated GPU time of the {len(todo)} runs to do: {total / 60:.1f} min on one shard, '
            f'{total / shards / 60:.1f} min over {shards} shards (assumptions: {GPU_ASSUMPTIONS})'
        )


def run_studies(args) -> int:
    runs = plan(args.scale, args.studies, args.seeds, args.data_dir, args.train_args)
    if args.only:
        runs = [run for run in runs if any(word in run.run_id for word in args.only)]
    runs.sort(key=lambda run: run.seed)  # every configuration's first seed before any second: a cut-off call says most
    if args.shard:  # over all runs, not those left, so that shards started at slightly different times never overlap
        index, count = args.shard
        runs = runs[index::count]
    todo = [run for run in runs if read_record(record_path(args.records, args.scale, run))[0] is None]
    for path, problem in damaged_records(args.records, args.scale, runs).items():
        print(f'warning: {path}: damaged run record ({problem}): the run is run again', file=sys.stderr, flush=True)
    shard = ' (shard %d/%d)' % args.shard if args.shard else ''
    print(
        f'{len(runs)} runs in {", ".join(args.studies)} at scale {args.scale}{shard}: {len(runs) - len(todo)} '
        f'finished, {len(todo)} to run',
        flush=True,
    )
    if args.list:
        list_runs(args, runs, todo)
        return 0
    prepare_data(args.scale, todo, args.data_dir)
    if args.prepare:
        return 0
    failed = train_runs(args, todo)
    if failed:
        raise SystemExit(f'{len(failed)} of {len(todo)} runs failed: {", ".join(failed)}')
    return 0


def train_runs(args, todo) -> list:
    """Trains the runs in order, every one with the one Accelerator made when the first starts (accelerate's state
    is the process's), until the time limit; the ids of those that stopped with a one-line error (the others go
    on; a signal stops all)."""
    from train_accelerate import run as train  # torch and the training parts: only when something trains

    failed, started, accelerator = [], time.time(), None
    try:
        for index, run in enumerate(todo):
            needed = gpu_estimate(run) if args.scale == 'gpu' else 0.0
            if args.time_limit is not None and time.time() - started + needed > args.time_limit:
                left = len(todo) - index
                print(f'== time limit: {left} runs left for a next call (a finished run is never rerun)', flush=True)
                break
            print(f'== run {index + 1}/{len(todo)}: {run.run_id}', flush=True)
            try:
                accelerator = accelerator or shared_accelerator(run, args.outputs / args.scale / run.run_id)
                record = execute(
                    run,
                    args.scale,
                    args.records,
                    args.outputs,
                    args.probe_images,
                    accelerator,
                    train,
                    args.stop_after_steps,
                )
            except SystemExit as error:  # the training's one-line errors
                if not isinstance(error.code, str) or len(todo) == 1:
                    raise
                print(f'== {run.run_id} failed: {error}', flush=True)
                failed.append(run.run_id)
                continue
            if record:
                metric, seconds = record['metric'], record['training_time_s']
                print(f'== {run.run_id}: {metric} {record["metrics"][metric]:.4f}, {seconds:.0f} s', flush=True)
    finally:
        if accelerator is not None:  # the runs' trackers finished; a launched job's process group ends here
            accelerator.end_training()
    return failed


def report_main(argv: Sequence[str], train_args: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog='experiments.py report', description='tables and plots from the run records')
    parser.add_argument('--scale', choices=['cpu', 'gpu', 'paper'], default='cpu')
    parser.add_argument('--records', type=Path, default=RECORDS)
    parser.add_argument('--plots', type=Path, default=RECORDS / 'plots', help='where the PNG plots go')
    parser.add_argument(
        '--write',
        type=Path,
        metavar='docs/results.md',
        help=f'replace the text between {BEGIN} and {END} (gpu: experiments-gpu) in this file (else print it)',
    )
    parser.add_argument('--data-dir', type=Path, default=DATA, help="the runs' --data-dir (part of their ids)")
    parser.add_argument(
        '--record-hub',
        action='store_true',
        help="fill the hub configs' measured results from matching runs (paper scale)",
    )
    args = parser.parse_args(argv)
    begin, end = markers(args.scale)
    readme = None if args.write is None else args.write.read_text()
    if readme is not None and (begin not in readme or end not in readme):  # before any plot is written
        raise SystemExit(f'{args.write} has no {begin} ... {end} block to replace')
    if readme is not None:  # never replace results with an empty report
        folder = args.records / args.scale
        if not folder.is_dir():
            raise SystemExit(f'{folder}: no such records folder; {args.write} left as it is')
        runs = plan(args.scale, STUDIES, range(100), args.data_dir, train_args)
        if not load_records(args.records, args.scale, runs, warn=False):
            raise SystemExit(f'{folder}: no sound run record of this scale; {args.write} left as it is')
    target = args.write or ROOT / 'docs' / 'results.md'  # the plots are linked relative to its folder
    text = render_report(
        args.scale, args.records, args.plots, target.resolve().parent, data_dir=args.data_dir, train_args=train_args
    )
    if args.record_hub:
        tags = record_hub_results(args.records, args.scale, train_args)
        print(f'hub configs updated: {", ".join(tags) if tags else "none (no run trained a hub model as registered)"}')
    if readme is None:
        print(text)
        return 0
    head, rest = readme.split(begin, 1)
    args.write.write_text(head + begin + '\n' + text + end + rest.split(end, 1)[1])
    print(f'wrote the {args.scale} results into {args.write}')
    return 0


# -------------------------------------------------------------------------------------------------- main
def shard(text: str):
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split('/'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not I/N (e.g. 0/4)') from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f'shard {text}: I must be in 0..N-1')
    return index, count


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = []
    if '--' in argv:  # everything after -- goes to every train_accelerate.py call (and is part of the runs' ids)
        argv, train_args = argv[: argv.index('--')], argv[argv.index('--') + 1 :]
    if argv[:1] == ['report']:
        return report_main(argv[1:], train_args)
    parser = argparse.ArgumentParser(prog='experiments.py', description=__doc__.split('\n\n')[0])
    parser.add_argument(
        'studies',
        nargs='+',
        choices=STUDIES + ('all',),
        metavar='STUDY',
        help=f'{", ".join(STUDIES)} or all ("report" instead: tables and plots, see report --help)',
    )
    parser.add_argument(
        '--scale',
        choices=['cpu', 'gpu', 'paper'],
        default='cpu',
        help='reduced CPU protocol, the Fashion-MNIST studies for one GPU, or the paper',
    )
    parser.add_argument(
        '--seeds',
        type=int,
        help='seeds per configuration (0, 1, ...; default 3 at cpu scale, as the tables of docs/results.md, else 2)',
    )
    parser.add_argument('--only', nargs='+', metavar='WORD', help='only runs whose id contains one of these')
    parser.add_argument('--list', action='store_true', help='list the runs and their commands, run nothing')
    parser.add_argument('--records', type=Path, default=RECORDS, help='where run records go (one JSON per run)')
    parser.add_argument(
        '--outputs',
        type=Path,
        default=Path('outputs') / 'experiments',
        help='checkpoints and trained models of the runs',
    )
    parser.add_argument('--data-dir', type=Path, default=DATA, help='where the exported datasets go')
    parser.add_argument(
        '--stop-after-steps',
        type=int,
        metavar='N',
        help='debug: stop each run after N optimizer steps as if killed (a rerun continues it)',
    )
    parser.add_argument('--probe-images', type=int, default=500, help='two-digit images for the part-whole probe')
    parser.add_argument(
        '--shard',
        type=shard,
        metavar='I/N',
        help='only every N-th run to do, from the I-th (shards started side by side share one GPU)',
    )
    parser.add_argument(
        '--time-limit',
        type=float,
        metavar='SECONDS',
        help='start no run that would end past this many seconds (gpu scale: by gpu_estimate)',
    )
    parser.add_argument('--prepare', action='store_true', help='write the datasets the runs need, train nothing')
    args = parser.parse_args(argv)
    args.studies = list(STUDIES) if 'all' in args.studies else args.studies
    seeds = args.seeds if args.seeds is not None else (3 if args.scale == 'cpu' else 2)
    args.seeds, args.train_args = list(range(seeds)), train_args
    return run_studies(args)


if __name__ == '__main__':
    sys.exit(main())
