"""The run's model: created from the config with timm (pretrained weights checked for NaN/infinity), its fused CPU
routing kernel built or loaded before training (so that the one-off build is timed apart), and timm's optimizer and
scheduler for it."""

import warnings

import timm
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm_capsules.loading import NonFiniteWeightsWarning, non_finite_tensors
from timm_capsules import kernels

from .config import fail
from .data_sources import hub_reachable

__all__ = ['create_model', 'load_routing_kernel', 'create_optimizer', 'create_scheduler']


def create_model(args, num_classes):
    kwargs = dict(args.model_kwargs)
    if kwargs.setdefault('num_classes', num_classes) != num_classes:
        fail(f'num_classes={kwargs["num_classes"]} but the dataset has {num_classes} classes')
    if args.pretrained and not args.model.startswith('local-dir:'):
        hub_reachable()  # offline: the cache at once, not a minute of retries
    try:
        with warnings.catch_warnings():  # said below, as the error it is for training
            warnings.simplefilter('ignore', NonFiniteWeightsWarning)
            model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError, OSError) as error:
        fail(f'cannot create {args.model} with {kwargs}: {error}')
    bad = non_finite_tensors(model.state_dict())
    if bad:
        fail(
            f'the pretrained weights of {args.model} hold NaN or infinity in {len(bad)} tensor(s): '
            f'{", ".join(bad[:5])}{" ..." if len(bad) > 5 else ""}; training cannot start from them'
        )
    return model, kwargs


def load_routing_kernel(model, accelerator):
    """Builds (first use on a machine, about a minute) or loads the fused CPU kernels the model routes with
    (``kernels.preload``) before training starts, so that a one-off build is timed apart from training.
    Returns the seconds it took."""
    with accelerator.main_process_first():  # one process builds, the others load the cached build
        return kernels.preload(model, accelerator.device)


def create_optimizer(config, model):
    """timm's optimizer of --opt for the model's parameters (timm's weight-decay groups)."""
    try:
        return create_optimizer_v2(
            model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum
        )
    except ValueError as error:
        fail(f'--opt {config.opt}: {error}')


def create_scheduler(config, optimizer, epochs, updates_per_epoch):
    """timm's scheduler of --sched over the run's epochs, stepped once per optimizer step; None for none."""
    if not config.sched or config.sched == 'none':
        return None
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=config.sched,
            num_epochs=epochs,
            decay_milestones=config.decay_milestones or [],
            decay_rate=config.decay_rate,
            warmup_epochs=config.warmup_epochs or 0,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
        )
    except ValueError as error:
        fail(f'--sched {config.sched}: {error}')
    return scheduler
