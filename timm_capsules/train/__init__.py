"""The training side as a package: ``TrainConfig.from_argv(argv)`` resolves a run's settings (options over a
preset), ``run(config, accelerator=None) -> RunResult`` trains, evaluates and saves one model. The script
``train_accelerate.py`` and the experiment runner both go through ``run``.

Modules: ``config`` (options, presets), ``data_sources`` (one object per kind of data), ``models`` (creation,
routing kernel), ``metrics`` (evaluation, chance level, CNN reference, curves), ``checkpoints`` (write, verify,
find), ``output_dir`` (checks, lock, JSON), ``run_safety`` (signals, finite checks), ``saving`` (model, Hub),
``loop`` (``run`` and the training loop)."""

from .config import TrainConfig
from .loop import RunResult, make_accelerator, run

__all__ = ['TrainConfig', 'RunResult', 'run', 'make_accelerator']
