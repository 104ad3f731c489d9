"""The parts of a training run, which ``train_accelerate.py`` (``run(config)`` and its loop, read top to bottom)
puts together; the experiment runner calls that ``run``.

Modules: ``config`` (options, presets: ``TrainConfig.from_argv``), ``accelerators`` (a run's own Accelerator or a
shared one), ``data_sources`` (one object per kind of data), ``models`` (creation, routing kernel, timm's optimizer
and scheduler), ``metrics`` (evaluation, chance level, CNN reference, curves), ``checkpoints`` (write, verify, find),
``output_dir`` (checks, lock, JSON), ``run_safety`` (signals, finite checks), ``results`` (what a run reports,
``RunResult``), ``saving`` (model, Hub)."""

from .accelerators import make_accelerator
from .config import TrainConfig
from .results import RunResult

__all__ = ['TrainConfig', 'RunResult', 'make_accelerator']
