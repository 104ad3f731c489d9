"""What a run reports: the line that opens it, metrics.json's record, the lines that close it, and ``RunResult``,
what ``run()`` gives back."""

from pathlib import Path
from typing import NamedTuple

from torch import nn

from .metrics import cnn_reference
from .saving import weights_digest

__all__ = ['RunResult', 'describe_run', 'results_record', 'summary']


class RunResult(NamedTuple):
    """What ``run`` gives back: ``metrics`` (metrics.json's contents, plus ``stopped``), the trained ``model``
    (unwrapped, on the run's device) and the ``output_dir`` it was saved in."""

    metrics: dict
    model: nn.Module
    output_dir: Path


def describe_run(config, accelerator, model, model_kwargs, data, epochs, updates_per_epoch):
    """The opening line: model, size, data, steps, batch and where it trains."""
    return (
        f'{config.model} {model_kwargs} ({sum(p.numel() for p in model.parameters()):,} parameters) on '
        f'{config.dataset} ({data.source}): {epochs} epochs x {updates_per_epoch} steps, batch '
        f'{config.batch_size} x {accelerator.num_processes} processes x {config.gradient_accumulation_steps} '
        f'accumulation, {accelerator.device}, mixed precision {accelerator.mixed_precision}'
    )


def results_record(config, accelerator, data, model, model_kwargs, state, epochs, extra_tests, times):
    """metrics.json's contents: the run's model, data, final and extra evaluations, size, ``times`` (training,
    kernel load, wall), a digest of the weights, the options and the history."""
    steps = state.completed_steps
    return dict(
        model=config.model,
        model_kwargs=model_kwargs,
        preset=config.preset,
        dataset=config.dataset,
        data_source=data.source,
        task='multi-label' if data.multi_label else 'single-label',
        metric='exact_match' if data.multi_label else 'top1',
        final=state.history['eval'][-1] if state.history['eval'] else {},
        extra_tests=extra_tests,
        chance_level=data.chance,
        completed_steps=steps,
        epochs=epochs,
        images_seen=steps * config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes,
        num_processes=accelerator.num_processes,
        num_parameters=sum(p.numel() for p in model.parameters()),
        **times,
        weights_sha256=weights_digest(model),
        args=config.for_trackers(),
        history=state.history,
    )


def summary(config, data, results, num_processes):
    """The closing lines: the final metric (and that of each extra test split), the chance level, the CNN
    reference of exactly this recipe (if it is one), the training time and where everything went."""
    metric, final, load_s = results['metric'], results['final'], results['kernel_load_s']
    kernel_note = f', routing kernel built/loaded in {load_s:.0f} s' if load_s >= 1 else ''
    reference = cnn_reference(config, metric, data.source, num_processes)
    label = 'label set' if data.multi_label else 'label'
    return '\n'.join(
        [
            f'final test {metric}: {final.get(metric, float("nan")):.4f} on {final.get("num_images", 0)} images '
            f'after {results["completed_steps"]} steps',
            *(
                f'{split}: {metric} {tested[metric]:.4f} ({tested["num_images"]} images)'
                for split, tested in results['extra_tests'].items()
            ),
            f'chance level: {data.chance:.4f} (always the most frequent {label})',
            *([reference] if reference else []),
            f'{results["training_time_s"]:.0f} s of training{kernel_note}; saved to {config.output_dir}',
        ]
    )
