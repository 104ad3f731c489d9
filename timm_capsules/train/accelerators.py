"""The Accelerator a run trains with: its own (``make_accelerator``), or one that several runs share, which each
run leaves as it found it."""

import contextlib

from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

from .config import TrainConfig, fail

__all__ = ['make_accelerator', 'accelerator_for_the_run']


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The Accelerator a run of ``config`` makes for itself (one that several runs can share: ``run(config,
    accelerator)``). Its seedable sampler makes a resumed run see the images of an uninterrupted one."""
    return Accelerator(
        cpu=config.cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=config.report_to if config.with_tracking else None,
        project_dir=config.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


@contextlib.contextmanager
def accelerator_for_the_run(config, accelerator=None):
    """The caller's Accelerator, set to this config's gradient accumulation (a precision or
    device the config asks for and it does not have stops the run), and left after the run as it was found: no
    trackers, no prepared objects, step 0, its process group alive. Without one, a new one (make_accelerator),
    ended after a run that finished or was stopped (``accelerator.end_training``, which ends the process group)."""
    shared = accelerator is not None
    if not shared:
        accelerator = make_accelerator(config)
    else:
        if config.mixed_precision is not None and config.mixed_precision != accelerator.mixed_precision:
            fail(
                f'--mixed_precision {config.mixed_precision}, but the Accelerator passed to run() uses '
                f'{accelerator.mixed_precision}'
            )
        if config.cpu and accelerator.device.type != 'cpu':
            fail(f'--cpu, but the Accelerator passed to run() uses {accelerator.device}')
        accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    if accelerator.mixed_precision == 'fp16' and accelerator.device.type == 'cpu':  # accelerate: silently fp32
        fail('--mixed_precision fp16 needs a GPU (on the CPU accelerate trains in float32); use bf16 or no')
    if not shared:
        with ended_on_a_signal(accelerator):
            yield accelerator
        accelerator.end_training()
        return
    try:
        yield accelerator
    finally:  # also after a run that stopped with an error: the next run starts clean
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers = []
        accelerator.free_memory()


@contextlib.contextmanager
def ended_on_a_signal(accelerator):
    """A run stopped by a signal exits with 128 + its number (SystemExit, after its checkpoint): its trackers are
    finished and its process group ended first. After any other error the process ends as it is."""
    try:
        yield
    except SystemExit as stop:
        if isinstance(stop.code, int) and stop.code > 128:
            accelerator.end_training()
        raise
