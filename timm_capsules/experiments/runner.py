"""Running the studies' runs: the datasets they read, and one run from its arguments to its record (and the
part-whole probe of a trained model)."""

import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from .budget import gpu_estimate
from .plans import Run
from .protocols import RECIPES, protocol_of
from .records import commit, machine, record_path, write_record


def prepare_data(scale: str, runs: Sequence[Run], data_dir: Path) -> None:
    """Writes the image datasets the runs read (once): Fashion-MNIST and Affine MNIST as parquet folders."""
    needed = {run.dataset for run in runs}
    if 'fashion_mnist' in needed and not (data_dir / 'fashion_mnist' / 'data').is_dir():
        from timm_capsules.data.mnist import export_parquet

        print(f'writing Fashion-MNIST to {data_dir / "fashion_mnist"}', flush=True)
        export_parquet(data_dir / 'fashion_mnist', 'fashion_mnist')
    affine = RECIPES[scale].get('affine_mnist')
    folder = data_dir / affine.facts['folder'] if affine else None
    if 'affine_mnist' in needed and not (folder / 'README.md').is_file():
        from timm_capsules.data.affine_mnist import export

        print(f'writing Affine MNIST to {folder}', flush=True)
        facts = affine.facts  # the recipe's sizes; the paper's (no sizes, no source): the whole export
        sizes = {}
        if 'source' in facts:
            sizes = dict(train_size=facts['epoch_images'], test_size=facts['test_images'], source=facts['source'])
        export(folder, **sizes)


def probe(model, samples: int = 500) -> Dict[str, Any]:
    """The part-whole probe (``timm_capsules.parse_tree``) on two-digit DiverseMultiMNIST test images."""
    from timm_capsules.parse_tree import part_whole_probe
    from timm_capsules.parse_tree.inputs import diverse_multimnist_samples, prepare_arrays

    images, masks, labels, _, source = diverse_multimnist_samples(samples, source='sample', two_digit_only=True)
    x, masks = prepare_arrays(model, images, masks)
    result = part_whole_probe(model.eval(), x, masks, labels)
    return dict({k: v for k, v in result.items() if k != 'per_image'}, chance=0.5, source=source)


def quote(arg: str) -> str:
    """``arg`` as a shell reads it back."""
    return arg if all(c.isalnum() or c in '-_=.:/[]' for c in arg) else "'" + arg.replace("'", "'\\''") + "'"


def command(run: Run) -> str:
    """The script's command line that trains ``run`` as the runner does (the record's ``command``)."""
    return 'python train_accelerate.py ' + ' '.join(quote(a) for a in run.train_args + ['--seed', str(run.seed)])


def run_argv(run: Run, output_dir: Path, stop_after_steps: Optional[int] = None) -> list:
    """The run's arguments as the runner trains it: its seed and folder, a checkpoint every epoch, resumed from the
    latest (a study goes on across sessions)."""
    argv = run.train_args + ['--seed', str(run.seed), '--output-dir', str(output_dir)]
    argv += ['--checkpointing-steps', 'epoch', '--resume-from-checkpoint', 'latest']
    return argv + (['--stop-after-steps', str(stop_after_steps)] if stop_after_steps else [])


def make_record(run: Run, scale: str, results: Dict[str, Any], resumed: bool, wall_time_s: float) -> Dict[str, Any]:
    """A finished run's record from the training's results (metrics.json's contents)."""
    import torch

    extra_tests = {f'{split}/{k}': v for split, metrics in results['extra_tests'].items() for k, v in metrics.items()}
    record = dict(
        run_id=run.run_id,
        studies=list(run.studies),
        scale=scale,
        row=run.row,
        model=results['model'],
        model_kwargs=results['model_kwargs'],
        dataset=run.dataset,
        data_source=results['data_source'],
        seed=run.seed,
        image_budget=results['images_seen'],
        metric=results['metric'],
        metrics=dict(results['final'], **extra_tests),
        chance_level=results['chance_level'],
        num_parameters=results['num_parameters'],
        training_time_s=results['training_time_s'],
        wall_time_s=wall_time_s,
        threads=torch.get_num_threads(),
        resumed_from_checkpoint=resumed,  # then the times cover the resumed part only
        eval_history=results['history']['eval'],
        protocol=protocol_of(scale, run.dataset),
        commit=commit(),
        machine=machine(),
        command=command(run),
        train_args=run.train_args,
    )
    if scale == 'gpu':
        record['estimated_s'] = round(gpu_estimate(run), 1)  # what the budget was sized with, beside what it took
    return record


def shared_accelerator(run: Run, output_dir: Path):
    """The one Accelerator every run of a call trains with, made from the first run's settings (device, precision):
    accelerate holds its state per process, so a second Accelerator in the same process would only be the first
    again. A later run that asks for another precision or device stops with one line (``timm_capsules.train``)."""
    from timm_capsules.train import TrainConfig, make_accelerator

    return make_accelerator(TrainConfig.from_argv(run_argv(run, output_dir)))


def execute(
    run: Run,
    scale: str,
    records: Path,
    outputs: Path,
    probe_samples: int,
    accelerator,
    train: Callable,
    stop_after_steps: Optional[int] = None,
) -> Dict[str, Any]:
    """Trains ``run`` with ``train`` (train_accelerate.py's ``run(config, accelerator) -> RunResult``) on the call's
    ``accelerator`` (continuing its last checkpoint) and writes its record; {} on a process that is not the main
    one. A run stopped by ``stop_after_steps`` ends the call (SystemExit 3) and has no record."""
    from timm_capsules.train import TrainConfig

    output_dir = outputs / scale / run.run_id
    resumed = (output_dir / 'checkpoints').is_dir() and any((output_dir / 'checkpoints').iterdir())
    started = time.time()
    result = train(TrainConfig.from_argv(run_argv(run, output_dir, stop_after_steps)), accelerator)
    if result.metrics.get('stopped'):  # --stop-after-steps (a signal already ended the process in train)
        raise SystemExit(3)
    if not accelerator.is_main_process:
        return {}
    record = make_record(run, scale, result.metrics, resumed, time.time() - started)
    if run.probe:
        record['part_whole_probe'] = probe(result.model, probe_samples)
    write_record(record_path(records, scale, run), record)
    return record
