"""One training run: ``run(config)`` goes from a ``TrainConfig`` to a trained, evaluated and saved model, read top to
bottom like accelerate's complete_cv_example.py (Accelerator -> data -> timm.create_model -> timm optimizer and
scheduler -> prepare -> resume -> the loop -> evaluation -> save / push); ``train()`` is the loop itself, the one
both ``train_accelerate.py`` and the experiment runner go through.

Nothing here knows a model family: what a model returns and the loss it trains with come from its
``output_type`` and ``timm_capsules.losses``."""

import contextlib
import math
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm

from timm_capsules.base import model_data_config
from timm_capsules.losses import classification_loss, output_type_of, spread_margin

from .checkpoints import TrainState, find_checkpoint, save_checkpoint
from .config import PROG, TrainConfig, fail
from .data_sources import load_data
from .models import create_model, create_optimizer, create_scheduler, load_routing_kernel
from .metrics import cnn_reference, correct, evaluate
from .output_dir import check_free_space, output_dir_for_the_run
from .run_safety import StopOnSignal, check_finite, refuse_non_finite, stop_with_the_launcher
from .saving import save_results, weights_digest

__all__ = ['run', 'RunResult', 'make_accelerator', 'train']


class RunResult(NamedTuple):
    """What ``run`` gives back: ``metrics`` (metrics.json's contents, plus ``stopped``), the trained ``model``
    (unwrapped, on the run's device) and the ``output_dir`` it was saved in."""

    metrics: dict
    model: nn.Module
    output_dir: Path


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
    """(accelerator, shared): the caller's Accelerator, set to this config's gradient accumulation (a precision or
    device the config asks for and it does not have stops the run), and left after the run as it was found: no
    trackers, no prepared objects, step 0, its process group alive. Without one, a new one (make_accelerator),
    which the run ends itself."""
    if accelerator is None:
        yield make_accelerator(config), False
        return
    if config.mixed_precision is not None and config.mixed_precision != accelerator.mixed_precision:
        fail(
            f'--mixed_precision {config.mixed_precision}, but the Accelerator passed to run() uses '
            f'{accelerator.mixed_precision}'
        )
    if config.cpu and accelerator.device.type != 'cpu':
        fail(f'--cpu, but the Accelerator passed to run() uses {accelerator.device}')
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    try:
        yield accelerator, True
    finally:  # also after a run that stopped with an error: the next run starts clean
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers = []
        accelerator.free_memory()


def run(config: TrainConfig, accelerator: Optional[Accelerator] = None) -> RunResult:
    """Trains, evaluates and saves one model as ``config`` says; stops with one line (SystemExit) on anything
    wrong, before training where it can be told. ``accelerator``: one to share between runs (several run()
    calls in one process); it is left usable, its process group alive. Without one, the run makes its own
    (``make_accelerator``) and ends it when done."""
    started = time.time()
    # the output folder is checked and locked before anything is loaded
    with output_dir_for_the_run(config), accelerator_for_the_run(config, accelerator) as (accelerator, shared):
        if accelerator.mixed_precision == 'fp16' and accelerator.device.type == 'cpu':  # accelerate: silently fp32
            fail('--mixed_precision fp16 needs a GPU (on the CPU accelerate trains in float32); use bf16 or no')
        set_seed(config.seed)

        # ---- data and model (everything that can be wrong is checked before training)
        data = load_data(config, accelerator)
        model, model_kwargs = create_model(config, data.num_classes)
        data_cfg = model_data_config(model)
        data.build(data_cfg)
        if accelerator.is_main_process:
            check_free_space(config.output_dir, model, config.checkpointing_steps is not None)
        kernel_load_s = load_routing_kernel(model, accelerator)
        training_started = time.time()

        # ---- optimizer and scheduler (timm factories; the scheduler is stepped by us, once per optimizer step)
        optimizer = create_optimizer(config, model)
        model, optimizer = accelerator.prepare(model, optimizer)
        data.prepare(accelerator)
        updates_per_epoch = math.ceil(data.batches_per_epoch / config.gradient_accumulation_steps)
        config.max_train_steps = config.max_train_steps or config.epochs * updates_per_epoch
        epochs = math.ceil(config.max_train_steps / updates_per_epoch)
        scheduler = create_scheduler(config, optimizer, epochs, updates_per_epoch)

        # ---- resume: weights, optimizer and RNG states (accelerate), our progress (JSON), all verified first
        state = TrainState(accelerator.device)
        resume, saved = find_checkpoint(config, accelerator.unwrap_model(model), optimizer, accelerator)
        if resume:
            accelerator.print(f'resuming from {resume}')
            accelerator.load_state(resume)
            state.load(saved, accelerator)

        # ---- the loop and its evaluations
        if config.with_tracking:
            accelerator.init_trackers(config.project_name, config.for_trackers())
        accelerator.print(
            f'{config.model} {model_kwargs} ({sum(p.numel() for p in model.parameters()):,} parameters) on '
            f'{config.dataset} ({data.source}): {epochs} epochs x {updates_per_epoch} steps, batch '
            f'{config.batch_size} x {accelerator.num_processes} processes x {config.gradient_accumulation_steps} '
            f'accumulation, {accelerator.device}, mixed precision {accelerator.mixed_precision}'
        )
        stopped = train(config, accelerator, model, optimizer, scheduler, data, state, updates_per_epoch, epochs)
        unwrapped = accelerator.unwrap_model(model)
        if config.debug_digests:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            digest_file = Path(config.output_dir) / f'digest_rank{accelerator.process_index}.txt'
            digest_file.write_text(weights_digest(unwrapped))
        if stopped:
            if not shared:
                accelerator.end_training()  # last: it ends the process group
            if stopped != '--stop_after_steps':
                raise SystemExit(128 + signal.Signals[stopped].value)
            accelerator.print(f'stopped after {state.completed_steps} steps (--stop_after_steps)')
            return RunResult(
                dict(stopped=True, completed_steps=state.completed_steps), unwrapped, Path(config.output_dir)
            )

        # ---- the final evaluations, then saving
        extra_tests = {
            split: evaluate(
                model,
                data.test_batches(split),
                accelerator,
                data.multi_label,
                data.num_classes,
                output_type_of(unwrapped),
            )
            for split in config.extra_test_splits
        }
        metric_name = 'exact_match' if data.multi_label else 'top1'
        for split, metrics in extra_tests.items():
            accelerator.print(f'{split}: {metric_name} {metrics[metric_name]:.4f} ({metrics["num_images"]} images)')
        finished = time.time()
        results = results_record(config, accelerator, data, unwrapped, model_kwargs, state, epochs, extra_tests)
        results.update(
            training_time_s=finished - training_started,
            kernel_load_s=kernel_load_s,
            wall_time_s=finished - started,
            weights_sha256=weights_digest(unwrapped),
            args=config.for_trackers(),
            history=state.history,
        )
        refuse_non_finite(unwrapped)  # on every process, so that none waits below for one that stopped
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_results(config, unwrapped, model_kwargs, data, data_cfg, results, accelerator.num_processes)
        accelerator.wait_for_everyone()
        if not shared:
            accelerator.end_training()  # last: it ends the process group
        accelerator.print(summary(config, data, results, accelerator.num_processes))
        return RunResult(dict(results, stopped=False), unwrapped, Path(config.output_dir))


def results_record(config, accelerator, data, model, model_kwargs, state, epochs, extra_tests):
    """metrics.json's contents up to the times: the run's model, data, final and extra evaluations and size."""
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
    )


def summary(config, data, results, num_processes):
    """The closing lines: the final metric, the chance level, the CNN reference of exactly this recipe (if it is
    one), the training time and where everything went."""
    metric, final, load_s = results['metric'], results['final'], results['kernel_load_s']
    kernel_note = f', routing kernel built/loaded in {load_s:.0f} s' if load_s >= 1 else ''
    reference = cnn_reference(config, metric, data.source, num_processes)
    label = 'label set' if data.multi_label else 'label'
    return '\n'.join(
        [
            f'final test {metric}: {final.get(metric, float("nan")):.4f} on {final.get("num_images", 0)} images '
            f'after {results["completed_steps"]} steps',
            f'chance level: {data.chance:.4f} (always the most frequent {label})',
            *([reference] if reference else []),
            f'{results["training_time_s"]:.0f} s of training{kernel_note}; saved to {config.output_dir}',
        ]
    )


def train(args, accelerator, model, optimizer, scheduler, data, state, updates_per_epoch, epochs):
    """Optimizer steps from ``state.completed_steps`` to ``args.max_train_steps``, evaluating after every
    ``--eval_every`` epochs and at the end, checkpointing as asked. Returns None when done, or why it stopped
    early: '--stop_after_steps' or the name of the signal received."""
    output_type = output_type_of(accelerator.unwrap_model(model))  # what the loss and metrics read
    metric_name = 'exact_match' if data.multi_label else 'top1'
    max_steps, completed_steps = args.max_train_steps, state.completed_steps
    starting_epoch, resume_updates = divmod(completed_steps, updates_per_epoch)
    if scheduler is not None:
        scheduler.step_update(num_updates=completed_steps)

    def run_evaluation(epoch):
        metrics = evaluate(model, data.test_batches(), accelerator, data.multi_label, data.num_classes, output_type)
        state.history['eval'].append(dict(step=completed_steps, epoch=epoch, **metrics))
        if accelerator.is_main_process:  # through tqdm, so the progress bar stays intact
            tqdm.write(
                f'epoch {epoch}: step {completed_steps}, test loss {metrics["loss"]:.4f}, '
                f'{metric_name} {metrics[metric_name]:.4f} ({metrics["num_images"]} images)'
            )
        if args.with_tracking:
            accelerator.log(
                {f'test/{k}': v for k, v in metrics.items() if isinstance(v, (int, float))}, step=completed_steps
            )

    def checkpoint():
        check_finite(state, accelerator, optimizer.param_groups[0]['lr'], args.output_dir)
        return save_checkpoint(accelerator, args.output_dir, state, args.checkpoints_total_limit)

    evaluated_steps = {record['step'] for record in state.history['eval']}
    if (
        completed_steps
        and not resume_updates
        and starting_epoch % args.eval_every == 0
        and completed_steps not in evaluated_steps
        and completed_steps < max_steps
    ):
        run_evaluation(starting_epoch - 1)  # a step checkpoint at the end of an epoch came before its evaluation
    # a progress bar on a terminal; in a log file (stdout not a terminal) one line per --log-every steps instead
    show_bar = accelerator.is_main_process and sys.stdout.isatty()
    progress = tqdm(range(max_steps), initial=completed_steps, disable=not show_bar)
    stop = StopOnSignal()
    stop_with_the_launcher()
    stopped = None
    epoch = starting_epoch
    try:
        for epoch in range(starting_epoch, epochs if completed_steps < max_steps else starting_epoch):
            model.train()
            skip = resume_updates * args.gradient_accumulation_steps if epoch == starting_epoch else 0
            for images, targets in data.train_batches(epoch, skip):
                with accelerator.accumulate(model):
                    outputs = model(images)
                    margin = spread_margin(completed_steps, max_steps)  # read by the spread loss only
                    loss = classification_loss(outputs, targets, output_type, data.multi_label, margin)
                    accelerator.backward(loss)
                    finite = torch.isfinite(loss.detach())
                    if args.clip_grad and accelerator.sync_gradients:
                        norm = accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                        if accelerator.scaler is None:  # fp16's scaler skips inf steps by design
                            finite = finite & torch.isfinite(norm)
                    optimizer.step()
                    optimizer.zero_grad()
                state.first_nonfinite = torch.where(
                    finite | (state.first_nonfinite > 0), state.first_nonfinite, completed_steps + 1
                )  # on the device: no sync per step
                state.running += torch.stack(
                    [
                        loss.detach().float() * len(targets),
                        correct(outputs.detach(), targets, data.multi_label, output_type).sum().float(),
                        torch.tensor(float(len(targets)), device=accelerator.device),
                    ]
                )
                if not accelerator.sync_gradients:
                    continue
                completed_steps = state.completed_steps = completed_steps + 1
                if scheduler is not None:
                    scheduler.step_update(num_updates=completed_steps)
                progress.update(1)
                if completed_steps % args.log_every == 0 or completed_steps == max_steps:
                    check_finite(state, accelerator, optimizer.param_groups[0]['lr'], args.output_dir)
                    loss_sum, hits, count = accelerator.reduce(state.running.clone(), 'sum').tolist()
                    record = dict(
                        step=completed_steps,
                        epoch=epoch,
                        loss=loss_sum / count,
                        accuracy=hits / count,
                        lr=optimizer.param_groups[0]['lr'],
                    )
                    state.history['train'].append(record)
                    state.running.zero_()
                    progress.set_postfix(loss=f'{record["loss"]:.4f}', acc=f'{record["accuracy"]:.3f}')
                    if not show_bar:
                        accelerator.print(
                            f'step {completed_steps}/{max_steps}: train loss {record["loss"]:.4f}, '
                            f'accuracy {record["accuracy"]:.3f} (batches), lr {record["lr"]:.3g}'
                        )
                    if args.with_tracking:
                        accelerator.log(
                            {'train/loss': record['loss'], 'train/accuracy': record['accuracy'], 'lr': record['lr']},
                            step=completed_steps,
                        )
                if args.checkpointing_steps not in (None, 'epoch') and completed_steps % args.checkpointing_steps == 0:
                    checkpoint()
                if completed_steps == args.stop_after_steps:
                    stopped = '--stop_after_steps'
                elif stop.requested(accelerator):
                    stopped = signal.Signals(stop.signum or signal.SIGTERM).name
                if completed_steps >= max_steps or stopped:
                    break
            if stopped:
                break
            last = completed_steps >= max_steps
            if last or (epoch + 1) % args.eval_every == 0:
                run_evaluation(epoch)
            if args.checkpointing_steps == 'epoch':
                checkpoint()
            if last:
                break
            if stop.requested(accelerator):
                stopped = signal.Signals(stop.signum or signal.SIGTERM).name
                break
    finally:
        stop.restore()
        progress.close()

    if stopped and stopped != '--stop_after_steps':  # a checkpoint to resume from (--stop_after_steps: as if killed)
        folder = checkpoint()
        accelerator.print(
            f'{PROG}: stopped by {stopped} after {completed_steps} steps; checkpoint {folder}; '
            f'continue with --resume-from-checkpoint latest',
            file=sys.stderr,
        )
    elif not stopped and completed_steps not in {record['step'] for record in state.history['eval']}:
        run_evaluation(epoch)  # e.g. resumed from a checkpoint written just before the final evaluation
    return stopped
