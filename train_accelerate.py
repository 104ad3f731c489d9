#!/usr/bin/env python
"""Train and evaluate the capsule networks of *Capsules with Inverted Dot-Product Attention Routing*
(Tsai et al., ICLR 2020) with Hugging Face Accelerate, from one CPU to many GPUs.

    python train_accelerate.py                                       # quick DiverseMultiMNIST run, CPU-sized
    python train_accelerate.py --preset cifar10_resnet               # a paper recipe (timm_capsules/presets.py)
    accelerate config                                                # once, on a machine with many GPUs; then
    accelerate launch train_accelerate.py --preset multimnist_matrix  # on all of them (docs/training.md)

Explicit arguments override a preset. Every option is spelled with dashes or underscores
(``--batch-size`` == ``--batch_size``). ``run(config)`` is one run (the experiment runner calls it too), ``train``
its loop; the parts they use (options, data sources, checkpoints, metrics, run safety, saving) are
``timm_capsules.train``. Nothing here knows a model family: what a model returns and the loss it trains with come
from its ``output_type`` and ``timm_capsules.losses``.
"""

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from timm_capsules.base import model_data_config
from timm_capsules.losses import classification_loss, output_type_of, spread_margin
from timm_capsules.train.accelerators import accelerator_for_the_run
from timm_capsules.train.checkpoints import TrainState, find_checkpoint, save_checkpoint
from timm_capsules.train.config import PROG, TrainConfig
from timm_capsules.train.data_sources import load_data
from timm_capsules.train.metrics import correct, evaluate
from timm_capsules.train.models import create_model, create_optimizer, create_scheduler, load_routing_kernel
from timm_capsules.train.output_dir import check_free_space, output_dir_for_the_run
from timm_capsules.train.results import RunResult, describe_run, results_record, summary
from timm_capsules.train.run_safety import StopOnSignal, check_finite, refuse_non_finite, stop_with_the_launcher
from timm_capsules.train.saving import save_results, write_digest


def run(config: TrainConfig, accelerator: Optional[Accelerator] = None) -> RunResult:
    """Trains, evaluates and saves one model as ``config`` says; stops with one line (SystemExit) on anything wrong,
    before training where it can be told. ``accelerator``: one that several run() calls share, left usable;
    without one the run makes its own and ends it."""
    started = time.time()
    # the output folder is checked and locked before anything is loaded
    with output_dir_for_the_run(config), accelerator_for_the_run(config, accelerator) as accelerator:
        set_seed(config.seed)
        data = load_data(config, accelerator)
        model, model_kwargs = create_model(config, data.num_classes)  # timm.create_model, weights checked
        data_cfg = model_data_config(model)
        data.build(data_cfg)
        if accelerator.is_main_process:
            check_free_space(config.output_dir, model, config.checkpointing_steps is not None)
        kernel_load_s = load_routing_kernel(model, accelerator)
        training_started = time.time()

        # timm's optimizer and scheduler; the scheduler is stepped by the loop, once per optimizer step
        optimizer = create_optimizer(config, model)
        model, optimizer = accelerator.prepare(model, optimizer)
        data.prepare(accelerator)
        updates_per_epoch = math.ceil(data.batches_per_epoch / config.gradient_accumulation_steps)
        config.max_train_steps = config.max_train_steps or config.epochs * updates_per_epoch
        epochs = math.ceil(config.max_train_steps / updates_per_epoch)
        scheduler = create_scheduler(config, optimizer, epochs, updates_per_epoch)

        # resume: weights, optimizer and RNG states (accelerate), our progress (JSON), all verified first
        state = TrainState(accelerator.device)
        resume, saved = find_checkpoint(config, accelerator.unwrap_model(model), optimizer, accelerator)
        if resume:
            accelerator.print(f'resuming from {resume}')
            accelerator.load_state(resume)
            state.load(saved, accelerator)

        if config.with_tracking:
            accelerator.init_trackers(config.project_name, config.for_trackers())
        accelerator.print(describe_run(config, accelerator, model, model_kwargs, data, epochs, updates_per_epoch))
        stopped = train(config, accelerator, model, optimizer, scheduler, data, state, updates_per_epoch, epochs)
        unwrapped = accelerator.unwrap_model(model)
        output_type = output_type_of(unwrapped)
        if config.debug_digests:
            write_digest(config.output_dir, unwrapped, accelerator.process_index)
        if stopped:  # --stop-after-steps: as if killed there (a signal ends the process in train())
            accelerator.print(f'stopped after {state.completed_steps} steps (--stop_after_steps)')
            return RunResult(
                dict(stopped=True, completed_steps=state.completed_steps), unwrapped, Path(config.output_dir)
            )

        extra_tests = {  # --extra-test-split: the same model on other test sets
            split: evaluate(
                model, data.test_batches(split), accelerator, data.multi_label, data.num_classes, output_type
            )
            for split in config.extra_test_splits
        }
        finished = time.time()
        times = dict(
            training_time_s=finished - training_started, kernel_load_s=kernel_load_s, wall_time_s=finished - started
        )
        results = results_record(config, accelerator, data, unwrapped, model_kwargs, state, epochs, extra_tests, times)
        refuse_non_finite(unwrapped)  # on every process, so that none waits below for one that stopped
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_results(config, unwrapped, model_kwargs, data, data_cfg, results, accelerator.num_processes)
        accelerator.wait_for_everyone()
        accelerator.print(summary(config, data, results, accelerator.num_processes))
        return RunResult(dict(results, stopped=False), unwrapped, Path(config.output_dir))


def train(args, accelerator, model, optimizer, scheduler, data, state, updates_per_epoch, epochs):
    """Optimizer steps from ``state.completed_steps`` to ``args.max_train_steps``, evaluating after every
    ``--eval_every`` epochs and at the end, checkpointing as asked. Returns whether ``--stop_after_steps`` stopped
    it; a signal (SIGTERM, Ctrl-C) ends it after the current step with a checkpoint and SystemExit(128 + signal)."""
    output_type = output_type_of(accelerator.unwrap_model(model))  # what the loss and the metrics read
    metric_name = 'exact_match' if data.multi_label else 'top1'
    max_steps, completed_steps = args.max_train_steps, state.completed_steps
    starting_epoch, resume_updates = divmod(completed_steps, updates_per_epoch)
    if scheduler is not None:
        scheduler.step_update(num_updates=completed_steps)

    def run_evaluation(epoch):
        metrics = evaluate(model, data.test_batches(), accelerator, data.multi_label, data.num_classes, output_type)
        state.history['eval'].append(dict(step=completed_steps, epoch=epoch, **metrics))
        if accelerator.is_main_process:  # through tqdm, so that the progress bar stays intact
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

    evaluated = {record['step'] for record in state.history['eval']}
    if completed_steps and not resume_updates and completed_steps not in evaluated:
        if completed_steps >= max_steps or starting_epoch % args.eval_every == 0:
            run_evaluation(starting_epoch - 1)  # a step checkpoint at the end of an epoch came before its evaluation
    # a progress bar on a terminal; in a log file (stdout not a terminal) one line per --log-every steps instead
    show_bar = accelerator.is_main_process and sys.stdout.isatty()
    progress = tqdm(range(max_steps), initial=completed_steps, disable=not show_bar)
    stop, stopped, epoch = StopOnSignal(), None, starting_epoch
    stop_with_the_launcher()
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
                hits = correct(outputs.detach(), targets, data.multi_label, output_type).sum().float()
                count = torch.tensor(float(len(targets)), device=accelerator.device)
                state.running += torch.stack([loss.detach().float() * len(targets), hits, count])
                if not accelerator.sync_gradients:
                    continue
                completed_steps = state.completed_steps = completed_steps + 1
                if scheduler is not None:
                    scheduler.step_update(num_updates=completed_steps)
                progress.update(1)
                if completed_steps % args.log_every == 0 or completed_steps == max_steps:
                    check_finite(state, accelerator, optimizer.param_groups[0]['lr'], args.output_dir)
                    loss_sum, hit_sum, image_sum = accelerator.reduce(state.running.clone(), 'sum').tolist()
                    lr = optimizer.param_groups[0]['lr']
                    record = dict(
                        step=completed_steps,
                        epoch=epoch,
                        loss=loss_sum / image_sum,
                        accuracy=hit_sum / image_sum,
                        lr=lr,
                    )
                    state.history['train'].append(record)
                    state.running.zero_()
                    progress.set_postfix(loss=f'{record["loss"]:.4f}', acc=f'{record["accuracy"]:.3f}')
                    if not show_bar:
                        accelerator.print(
                            f'step {completed_steps}/{max_steps}: train loss {record["loss"]:.4f}, '
                            f'accuracy {record["accuracy"]:.3f} (batches), lr {lr:.3g}'
                        )
                    if args.with_tracking:
                        accelerator.log(
                            {'train/loss': record['loss'], 'train/accuracy': record['accuracy'], 'lr': lr},
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
        raise SystemExit(128 + signal.Signals[stopped].value)
    if not stopped and completed_steps not in {record['step'] for record in state.history['eval']}:
        run_evaluation(epoch)  # e.g. resumed from a checkpoint written just before the final evaluation
    return bool(stopped)


def main(argv=None):
    """One run of the command line ``argv`` (a ``RunResult``), or the resolved configuration with
    ``--print-config``."""
    config = TrainConfig.from_argv(argv)
    if config.print_config:
        print(json.dumps(config.resolved(), indent=2))
        return config.resolved()
    return run(config)


if __name__ == '__main__':
    main()
