"""train_accelerate.py's ``run`` and ``main`` by value, in-process: what a run returns, prints and saves (the
results record, its times, the weights, the model's config, the digest), what it hands to the parts it calls (the
free-space check, the results record, the saving), a run stopped by --stop-after-steps, a resumed run against an
uninterrupted one (inside an epoch, at an epoch's end, at the last step), an extra test split against the final
evaluation of the same split, the train records against the batches' losses and exact matches, the progress bar on a
terminal and the lines in a log file, a signal's checkpoint and exit status, gradient clipping and a non-finite
gradient norm, a shared Accelerator left usable, and ``main``'s --print-config and refusals. Tiny models: every run
takes about a second on one core."""

import json
import time

import pytest
import torch

import train_accelerate  # the script at the checkout's root (pytest's pythonpath)
from timm_capsules.losses import output_type_of
from timm_capsules.train import RunResult
from train_fixtures import (
    CIFAR_TINY,
    TINY,
    assert_same_weights,
    expected_losses,
    load_weights,
    make_image_dataset,
)


@pytest.fixture
def main():
    """train_accelerate.main(argv) with accelerate's process-wide state reset afterwards (as the run fixture)."""
    from accelerate.state import AcceleratorState, GradientState

    def _main(argv):
        try:
            return train_accelerate.main([str(a) for a in argv])
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()

    return _main


def spy(monkeypatch, name):
    """Replaces train_accelerate.NAME by a wrapper that records each call's arguments and result."""
    calls, real = [], getattr(train_accelerate, name)

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(dict(args=args, kwargs=kwargs, result=result))
        return result

    monkeypatch.setattr(train_accelerate, name, wrapper)
    return calls


def assert_same_history(a, b):
    """Two runs' records: the same steps, epochs and counts, the same losses and metrics up to float rounding
    (oneDNN's CPU kernels may round differently from one allocation to the next, as the weights' check allows)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same_history(a[key], b[key])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_history(x, y)
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7)
    else:
        assert type(a) is type(b) and a == b


def test_a_run_returns_prints_and_saves_its_results(main, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'out'
    described, recorded = spy(monkeypatch, 'describe_run'), spy(monkeypatch, 'results_record')
    saved, space = spy(monkeypatch, 'save_results'), spy(monkeypatch, 'check_free_space')
    summaries = spy(monkeypatch, 'summary')
    before = time.time()
    result = main(TINY + ['--max-train-steps', 3, '--debug-digests', '--output-dir', out])
    elapsed = time.time() - before
    printed = capsys.readouterr().out
    assert isinstance(result, RunResult) and result.output_dir == out
    metrics = result.metrics
    assert metrics['stopped'] is False and metrics['completed_steps'] == 3
    # metrics.json is the record without the flag, and the record is what results_record made of the run
    on_disk = json.loads((out / 'metrics.json').read_text())
    assert on_disk == json.loads(json.dumps({k: v for k, v in metrics.items() if k != 'stopped'}))
    (record,) = recorded
    assert {k: metrics[k] for k in record['result']} == record['result'] and set(metrics) == {
        *record['result'],
        'stopped',
    }
    # the run's kwargs as the model was built with them, handed on to the record, the description and the saving
    kwargs = {'backbone_args': {'out_chs': 8}, 'primary_caps': 4, 'pose_dim': 4, 'capsule_layers': [('conv', 4, 3, 1)]}
    assert record['args'][4] == dict(kwargs, num_classes=10) == metrics['model_kwargs']
    assert described[0]['args'][3] == record['args'][4] and described[0]['result'] in printed
    assert described[0]['args'][5:] == (1, 5) and record['args'][6] == 1  # 1 epoch of 5 steps (40 images of 8)
    (save,) = saved
    assert save['args'][2] == record['args'][4] and save['args'][6] == 1 == metrics['num_processes']
    assert save['args'][1] is result.model and save['args'][5] == {k: v for k, v in metrics.items() if k != 'stopped'}
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['primary_caps'] == 4 and config['model_args']['backbone_args'] == {'out_chs': 8}
    # times: each span inside the next, all inside the call
    assert 0 <= metrics['kernel_load_s'] <= metrics['wall_time_s'] and 0 < metrics['training_time_s']
    assert metrics['training_time_s'] + metrics['kernel_load_s'] <= metrics['wall_time_s'] <= elapsed
    assert set(record['args'][8]) == {'training_time_s', 'kernel_load_s', 'wall_time_s'}
    # the weights saved are the model returned; the digest of rank 0 is written when asked
    assert_same_weights(load_weights(out), {k: v.detach() for k, v in result.model.state_dict().items()})
    assert (out / 'digest_rank0.txt').read_text().strip()
    # the free-space check: the output folder, the model built, no checkpoints asked for
    (check,) = space
    assert check['args'][0] == str(out) or check['args'][0] == out
    assert isinstance(check['args'][1], torch.nn.Module) and check['args'][2] is False
    assert 'final test' in printed and 'resuming' not in printed
    (said,) = summaries
    assert said['args'][3] == 1 and said['result'] in printed


def test_no_digest_unless_asked_and_checkpoints_counted_in_the_free_space(main, tmp_path, monkeypatch):
    space = spy(monkeypatch, 'check_free_space')
    argv = ['--max-train-steps', 3, '--checkpointing-steps', 1, '--checkpoints-total-limit', 2]
    main(TINY + argv + ['--output-dir', tmp_path])
    assert space[0]['args'][2] is True
    assert not list(tmp_path.glob('digest*'))
    # a checkpoint every step, the two newest kept
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['step_00000002', 'step_00000003']


def test_stop_after_steps_returns_the_steps_and_saves_no_results(main, tmp_path, capsys):
    result = main(TINY + ['--max-train-steps', 4, '--stop-after-steps', 2, '--debug-digests', '--output-dir', tmp_path])
    assert result.metrics == {'stopped': True, 'completed_steps': 2} and result.output_dir == tmp_path
    assert 'stopped after 2 steps (--stop_after_steps)' in capsys.readouterr().out
    assert not (tmp_path / 'metrics.json').exists() and (tmp_path / 'digest_rank0.txt').exists()
    assert isinstance(result.model, torch.nn.Module)


def test_a_resumed_run_ends_as_the_uninterrupted_one(main, tmp_path, capsys):
    argv = TINY + ['--max-train-steps', 4, '--checkpointing-steps', 2]
    whole = main(argv + ['--output-dir', tmp_path / 'whole'])
    main(argv + ['--stop-after-steps', 2, '--output-dir', tmp_path / 'resumed'])
    capsys.readouterr()
    resumed = main(argv + ['--resume-from-checkpoint', 'latest', '--output-dir', tmp_path / 'resumed'])
    assert f'resuming from {tmp_path / "resumed" / "checkpoints" / "step_00000002"}' in capsys.readouterr().out
    assert resumed.metrics['completed_steps'] == 4 and resumed.metrics['stopped'] is False
    assert_same_weights(load_weights(tmp_path / 'resumed'), load_weights(tmp_path / 'whole'))
    assert_same_history(resumed.metrics['history'], whole.metrics['history'])
    assert_same_history(resumed.metrics['final'], whole.metrics['final'])


def test_an_extra_test_split_equal_to_the_test_split_repeats_the_final_evaluation(main, tmp_path):
    data = make_image_dataset(tmp_path / 'data', size=32, mode='RGB', form='parquet')
    result = main(
        CIFAR_TINY
        + ['--data-dir', data, '--batch-size', 4, '--max-train-steps', 2, '--extra-test-split', 'test']
        + ['--extra-test-split', 'test[:3]', '--output-dir', tmp_path / 'out']
    )
    final = {k: v for k, v in result.metrics['final'].items() if k not in ('step', 'epoch')}
    extra = result.metrics['extra_tests']
    assert set(extra) == {'test', 'test[:3]'}
    assert extra['test'] == pytest.approx(final) and extra['test']['num_images'] == 7
    assert extra['test[:3]']['num_images'] == 3 and extra['test[:3]'] != extra['test']


@pytest.mark.parametrize('multi_label', [False, True])
def test_extra_test_splits_of_a_multi_label_set_or_of_fewer_classes(main, tmp_path, multi_label):
    """An imagefolder's classes are the folders that occur (fewer than 10 here): the model is built for them, and
    the extra split is evaluated as the test split is, multi-label or not."""
    form = 'parquet' if multi_label else 'imagefolder'
    data = make_image_dataset(tmp_path / 'data', size=32, mode='RGB', n=(12, 5), multi_label=multi_label, form=form)
    result = main(
        CIFAR_TINY
        + ['--data-dir', data, '--batch-size', 4, '--max-train-steps', 1, '--extra-test-split', 'test']
        + ['--output-dir', tmp_path / 'out']
        + ([] if multi_label else ['--image-column', 'image'])
    )
    classes = 10 if multi_label else len({p.name for split in ('train', 'test') for p in (data / split).iterdir()})
    assert classes < 10 or multi_label
    assert result.metrics['model_kwargs']['num_classes'] == classes
    assert result.model(torch.zeros(1, 3, 32, 32)).shape[-1] == classes
    final = {k: v for k, v in result.metrics['final'].items() if k not in ('step', 'epoch')}
    extra = dict(result.metrics['extra_tests']['test'])
    assert extra.pop('per_class_f1', None) == pytest.approx(final.pop('per_class_f1', None))
    assert extra == pytest.approx(final) and ('macro_f1' in final) == multi_label


def test_an_em_models_extra_split_is_scored_by_its_activations(main, tmp_path):
    """An EM model returns activations (the spread loss, not cross-entropy): the extra split reads them as the
    final evaluation does."""
    data = make_image_dataset(tmp_path / 'data', size=32, mode='RGB', n=(8, 5), form='parquet')
    em = ['--model', 'em_capsnet_simple_cifar10', '--dataset', 'cifar10', '--model-kwargs']
    em += ["backbone_args={'out_chs': 8}", 'primary_caps=2', "capsule_layers=[('conv', 2, 3, 2)]", 'iterations=2']
    result = main(
        em
        + ['--data-dir', data, '--batch-size', 4, '--max-train-steps', 1, '--extra-test-split', 'test']
        + ['--output-dir', tmp_path / 'out']
    )
    assert result.model.output_type == 'activations'
    final = {k: v for k, v in result.metrics['final'].items() if k not in ('step', 'epoch')}
    assert result.metrics['extra_tests']['test'] == pytest.approx(final, rel=1e-6)


def test_resuming_from_latest_without_a_checkpoint_says_so_and_starts_afresh(main, tmp_path, capsys):
    result = main(TINY + ['--max-train-steps', 1, '--resume-from-checkpoint', 'latest', '--output-dir', tmp_path])
    assert f'no checkpoint in {tmp_path}/checkpoints; starting from scratch' in capsys.readouterr().out
    assert result.metrics['completed_steps'] == 1


def test_tracking_starts_the_trackers_and_logs_every_record(main, tmp_path, monkeypatch):
    from accelerate import Accelerator

    from timm_capsules.train import TrainConfig

    started, logged = [], []
    monkeypatch.setattr(Accelerator, 'init_trackers', lambda self, *a, **k: started.append((a, k)))
    monkeypatch.setattr(Accelerator, 'log', lambda self, values, step=None, **k: logged.append((step, values)))
    argv = TINY + ['--max-train-steps', 7, '--log-every', 3, '--with-tracking', '--project-name', 'p9']
    result = main(argv + ['--output-dir', tmp_path])
    config = TrainConfig.from_argv([str(a) for a in argv + ['--output-dir', tmp_path]])
    config.max_train_steps = 7
    assert started == [(('p9', config.for_trackers()), {})]
    history = result.metrics['history']
    expected = [
        (r['step'], {'train/loss': r['loss'], 'train/accuracy': r['accuracy'], 'lr': r['lr']}) for r in history['train']
    ] + [
        (r['step'], {f'test/{k}': v for k, v in r.items() if k not in ('step', 'epoch', 'per_class_f1')})
        for r in history['eval']
    ]
    assert [r['step'] for r in history['train']] == [3, 6, 7] and [r['step'] for r in history['eval']] == [5, 7]
    assert sorted(logged, key=lambda x: (x[0], 'test/loss' in x[1])) == sorted(
        expected, key=lambda x: (x[0], 'test/loss' in x[1])
    )


def test_a_shared_accelerator_is_used_and_left_usable(tmp_path, accelerator, monkeypatch):
    from timm_capsules.train import TrainConfig

    prepared = []
    real = accelerator.prepare
    monkeypatch.setattr(accelerator, 'prepare', lambda *a, **k: prepared.append(a) or real(*a, **k))
    config = TrainConfig.from_argv([str(a) for a in TINY + ['--max-train-steps', 1, '--output-dir', tmp_path]])
    result = train_accelerate.run(config, accelerator)
    assert result.metrics['completed_steps'] == 1 and prepared
    assert any(result.model is accelerator.unwrap_model(a) for call in prepared for a in call)
    accelerator.wait_for_everyone()  # still usable
    assert accelerator.reduce(torch.ones(2), 'sum').tolist() == [1.0, 1.0]


def test_main_prints_and_returns_the_resolved_configuration(main, capsys):
    resolved = main(['--print-config', '--batch-size', 3, '--lr', '0.5'])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(resolved))
    main(['--print-config', '--batch-size', 3, '--lr', '0.5'])
    assert capsys.readouterr().out == json.dumps(resolved, indent=2) + '\n'  # two spaces an indent
    assert resolved['batch_size'] == 3 and resolved['lr'] == 0.5


def test_main_refuses_an_unknown_option_with_exit_code_2(main, capsys):
    with pytest.raises(SystemExit) as stop:
        main(['--no-such-option'])
    assert stop.value.code == 2 and '--no-such-option' in capsys.readouterr().err


def test_main_reads_sys_argv_when_given_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr('sys.argv', ['train_accelerate.py', '--print-config', '--batch-size', '5'])
    resolved = train_accelerate.main()
    assert resolved['batch_size'] == 5 and json.loads(capsys.readouterr().out) == json.loads(json.dumps(resolved))


def _eval_steps(result):
    return [(r['step'], r['epoch']) for r in result.metrics['history']['eval']]


@pytest.mark.parametrize(
    ('eval_every', 'steps', 'stop_at', 'evaluated'),
    [
        (1, 10, 5, [(5, 0), (10, 1)]),  # the epoch that ended at step 5 is evaluated on resuming
        (2, 15, 5, [(10, 1), (15, 2)]),  # ... not where --eval-every skips it
        (2, 15, 10, [(10, 1), (15, 2)]),  # ... and where it does not, once
    ],
)
def test_resuming_at_an_epochs_end_evaluates_that_epoch_as_the_uninterrupted_run(
    main, tmp_path, eval_every, steps, stop_at, evaluated
):
    """A step checkpoint at the last step of an epoch (5 steps here) is written before that epoch's evaluation,
    and --stop-after-steps stops the run there as a kill would: the resumed run evaluates the epoch first (where
    --eval-every asks for it) and ends with the uninterrupted run's history."""
    argv = TINY + ['--max-train-steps', steps, '--eval-every', eval_every, '--checkpointing-steps', 5]
    whole = main(argv + ['--output-dir', tmp_path / 'whole'])
    main(argv + ['--stop-after-steps', stop_at, '--output-dir', tmp_path / 'resumed'])
    resumed = main(argv + ['--resume-from-checkpoint', 'latest', '--output-dir', tmp_path / 'resumed'])
    assert _eval_steps(whole) == evaluated == _eval_steps(resumed)
    assert_same_history(resumed.metrics['history'], whole.metrics['history'])


def test_resuming_from_an_epoch_checkpoint_does_not_evaluate_the_epoch_again(main, tmp_path):
    """An epoch checkpoint is written after the epoch's evaluation, which it holds: nothing to repeat."""
    argv = TINY + ['--max-train-steps', 10, '--checkpointing-steps', 'epoch', '--output-dir', tmp_path]
    main(argv + ['--stop-after-steps', 7])
    resumed = main(argv + ['--resume-from-checkpoint', str(tmp_path / 'checkpoints' / 'step_00000005')])
    assert _eval_steps(resumed) == [(5, 0), (10, 1)]


def test_resuming_a_finished_run_evaluates_its_last_step_once(main, tmp_path):
    """The checkpoint of the last step comes before the final evaluation: resuming it only evaluates."""
    argv = TINY + ['--max-train-steps', 3, '--checkpointing-steps', 3, '--output-dir', tmp_path]
    main(argv + ['--stop-after-steps', 3])
    resumed = main(argv + ['--resume-from-checkpoint', 'latest'])
    assert resumed.metrics['completed_steps'] == 3 and _eval_steps(resumed) == [(3, 0)]


@pytest.mark.parametrize(('log_every', 'checkpointing_steps'), [(1, 100), (100, 1)])
def test_a_diverging_run_names_the_lr_and_the_last_checkpoint(main, tmp_path, log_every, checkpointing_steps):
    """The loss becomes non-finite with an lr of 1e6: found at a logging step or before a checkpoint, whichever
    comes first, the message gives the lr in effect and the newest checkpoint (none without checkpoints)."""
    argv = TINY + ['--opt', 'sgd', '--sched', 'none', '--lr', '1e6', '--max-train-steps', 8]
    argv += ['--log-every', log_every, '--checkpointing-steps', checkpointing_steps, '--output-dir', tmp_path]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value.code)
    assert '(lr 1e+06); nothing was saved.' in message
    found = sorted((tmp_path / 'checkpoints').glob('step_*'))
    if checkpointing_steps == 1:
        assert found and message.endswith(f'; the last checkpoint is {found[-1]}')
    else:
        assert not found and message.endswith('--mixed-precision no (float32)')


@pytest.mark.parametrize('eval_every', [1, 2])
def test_resuming_a_run_finished_at_an_epochs_end_labels_its_evaluation_with_that_epoch(main, tmp_path, eval_every):
    """The last step ends epoch 0 (5 steps): its checkpoint, written before the final evaluation, resumed, gives
    the uninterrupted run's evaluation, epoch 0 included, whether or not --eval-every asks for that epoch."""
    argv = TINY + ['--max-train-steps', 5, '--eval-every', eval_every, '--checkpointing-steps', 5]
    whole = main(argv + ['--output-dir', tmp_path / 'whole'])
    main(argv + ['--stop-after-steps', 5, '--output-dir', tmp_path / 'resumed'])
    resumed = main(argv + ['--resume-from-checkpoint', 'latest', '--output-dir', tmp_path / 'resumed'])
    assert _eval_steps(whole) == [(5, 0)] == _eval_steps(resumed)
    assert_same_history(resumed.metrics['history'], whole.metrics['history'])


@pytest.mark.parametrize('stop_at', [3, 7])
def test_a_run_resumed_inside_an_epoch_skips_the_batches_done_in_that_epoch_only(main, tmp_path, stop_at):
    """Resumed at step 3 of the 5-step epoch 0 (or step 7, in epoch 1), the run skips the batches done in that
    epoch and none of the next: it ends at step 15 as the uninterrupted run."""
    argv = TINY + ['--max-train-steps', 15, '--checkpointing-steps', stop_at]
    whole = main(argv + ['--output-dir', tmp_path / 'whole'])
    main(argv + ['--stop-after-steps', stop_at, '--output-dir', tmp_path / 'resumed'])
    resumed = main(argv + ['--resume-from-checkpoint', 'latest', '--output-dir', tmp_path / 'resumed'])
    assert resumed.metrics['completed_steps'] == 15
    assert_same_history(resumed.metrics['history'], whole.metrics['history'])
    assert_same_weights(load_weights(tmp_path / 'resumed'), load_weights(tmp_path / 'whole'))


def test_eval_every_three_evaluates_every_third_epoch_and_the_last(main, tmp_path):
    result = main(TINY + ['--max-train-steps', 20, '--eval-every', 3, '--output-dir', tmp_path])
    assert _eval_steps(result) == [(15, 2), (20, 3)]


def test_the_last_epoch_checkpoint_holds_the_final_evaluation(main, tmp_path):
    """--eval-every 2 over 3 epochs: the last epoch is evaluated because it is the last, before its checkpoint."""
    argv = TINY + ['--max-train-steps', 15, '--eval-every', 2, '--checkpointing-steps', 'epoch']
    result = main(argv + ['--output-dir', tmp_path])
    saved = json.loads((tmp_path / 'checkpoints' / 'step_00000015' / 'training_state.json').read_text())
    assert _eval_steps(result) == [(10, 1), (15, 2)]
    assert saved['history'] == result.metrics['history']


def _exact_matches(outputs, targets, output_type):
    """Multi-label exact match, written out: every class predicted present (a logit over 0, a length or an
    activation over 0.5) exactly where the target has it."""
    present = outputs > (0.0 if output_type == 'logits' else 0.5)
    return sum(all(bool(p) == bool(t) for p, t in zip(row, target)) for row, target in zip(present, targets))


@pytest.mark.parametrize('multi_label', [True, False])
def test_a_train_record_is_the_image_weighted_loss_and_accuracy_since_the_last_one(
    main, tmp_path, monkeypatch, capsys, multi_label
):
    """Every batch's loss (by its definition, weighted by the batch's images) and hits (exact match of a
    multi-label set, scored by the model's output type, or top-1), summed from one record to the next, are the
    record; without a terminal each record is one printed line and no progress bar is drawn."""
    losses, scored = spy(monkeypatch, 'classification_loss'), spy(monkeypatch, 'correct')
    if multi_label:  # DiverseMultiMNIST: 8 images a batch
        argv, batches = TINY + ['--max-train-steps', 5], [slice(0, 2), slice(2, 4), slice(4, 5)]
    else:  # 12 images of 10 classes, 5 a batch: the last batch has 2
        data = make_image_dataset(tmp_path / 'data', size=32, mode='RGB', form='parquet')
        argv = CIFAR_TINY + ['--data-dir', data, '--batch-size', 5, '--epochs', 2, '--log-every', 2, '--lr', 0.05]
        batches = [slice(0, 2), slice(2, 4), slice(4, 6)]
    result = main(argv + ['--output-dir', tmp_path / 'out'])
    printed = capsys.readouterr()
    records, steps = result.metrics['history']['train'], result.metrics['completed_steps']
    assert [r['step'] for r in records] == [2, 4, 5 if multi_label else 6] and len(losses) == steps
    output_type = output_type_of(result.model)
    assert [call['args'][2:] for call in scored[:steps]] == [(multi_label, output_type)] * steps
    assert any(r['accuracy'] > 0 for r in records) or multi_label  # a hit to count
    for record, calls in zip(records, [losses[s] for s in batches]):
        images = sum(len(call['args'][1]) for call in calls)
        loss, hits = 0.0, 0
        for call in calls:
            outputs, targets = call['args'][0].detach().float(), call['args'][1]
            hot = targets.float() if multi_label else torch.nn.functional.one_hot(targets, 10).float()
            loss += expected_losses(outputs, hot, output_type, multi_label).sum().item()
            hits += (
                _exact_matches(outputs, targets, output_type) if multi_label else (outputs.argmax(1) == targets).sum()
            )
        assert record['loss'] == pytest.approx(loss / images, rel=1e-5)
        assert record['accuracy'] == pytest.approx(float(hits) / images)
        line = (
            f'step {record["step"]}/{steps}: train loss {record["loss"]:.4f}, accuracy {record["accuracy"]:.3f} '
            f'(batches), lr {record["lr"]:.3g}\n'
        )
        assert printed.out.count(line) == 1
    assert f'{steps}/{steps}' not in printed.err and 'it/s' not in printed.err


def test_on_a_terminal_a_resumed_run_draws_one_bar_of_all_steps_and_prints_no_step_lines(
    main, tmp_path, monkeypatch, capsys
):
    """stdout a terminal: the bar (tqdm, on stderr) counts every optimizer step from the resumed one to the last
    and shows the last record's loss and accuracy; the per-step lines of a log file are left out."""
    import sys

    argv = TINY + ['--max-train-steps', 4, '--checkpointing-steps', 2, '--output-dir', tmp_path]
    main(argv + ['--stop-after-steps', 2])
    capsys.readouterr()
    monkeypatch.setattr(sys.stdout, 'isatty', lambda: True)
    result = main(argv + ['--resume-from-checkpoint', 'latest'])
    printed = capsys.readouterr()
    last = result.metrics['history']['train'][-1]
    bars = [part for part in printed.err.split('\r') if '%|' in part]  # tqdm redraws a line after a \r
    bar = bars[-1]
    assert ' 4/4 [' in bar and bar.startswith('100%')
    assert f'acc={last["accuracy"]:.3f}, loss={last["loss"]:.4f}]' in bar  # tqdm sorts the names
    assert bars[0].startswith(' 50%|') and ' 2/4 [' in bars[0]  # drawn first at the resumed step
    assert 'train loss' not in printed.out and 'epoch 0: step 4' in printed.out


@pytest.mark.parametrize(
    ('signum', 'during', 'steps'),
    [('SIGINT', 'classification_loss', 2), ('SIGTERM', 'evaluate', 5)],
)
def test_a_signal_ends_the_run_with_a_checkpoint_to_resume_from(
    main, tmp_path, monkeypatch, capsys, signum, during, steps
):
    """A signal in the middle of a step (Ctrl-C at step 2) or of an epoch's evaluation (SIGTERM at the end of the
    5-step epoch 0) ends the run after it: a checkpoint of that step, one line saying how to go on, and the exit
    status 128 + the signal's number. Resumed, the run ends as the uninterrupted one."""
    import os
    import signal

    from timm_capsules.train.config import PROG

    argv = TINY + ['--max-train-steps', 8, '--output-dir']
    whole = main(argv + [tmp_path / 'whole'])
    real, calls = getattr(train_accelerate, during), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == (2 if during == 'classification_loss' else 1):
            os.kill(os.getpid(), signal.Signals[signum])
        return real(*args, **kwargs)

    monkeypatch.setattr(train_accelerate, during, interrupted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv + [tmp_path / 'stopped'])
    assert stop.value.code == 128 + signal.Signals[signum].value
    folder = tmp_path / 'stopped' / 'checkpoints' / f'step_{steps:08d}'
    assert sorted((tmp_path / 'stopped' / 'checkpoints').iterdir()) == [folder]
    assert capsys.readouterr().err.endswith(
        f'{PROG}: stopped by {signum} after {steps} steps; checkpoint {folder}; '
        'continue with --resume-from-checkpoint latest\n'
    )
    assert not (tmp_path / 'stopped' / 'metrics.json').exists()
    monkeypatch.setattr(train_accelerate, during, real)
    resumed = main(argv + [tmp_path / 'stopped', '--resume-from-checkpoint', 'latest'])
    assert_same_history(resumed.metrics['history'], whole.metrics['history'])
    assert_same_weights(load_weights(tmp_path / 'stopped'), load_weights(tmp_path / 'whole'))


def test_clipping_bounds_the_first_sgd_step_by_lr_times_the_clip(main, tmp_path, monkeypatch):
    """Plain momentum SGD's first step is -lr x the clipped gradient: with --clip-grad 1e-3 and lr 0.1 the
    parameters move by exactly 1e-4 in all (the gradient's norm is far above 1e-3)."""
    created = []
    create = train_accelerate.create_model

    def create_model(args, num_classes):
        model, kwargs = create(args, num_classes)
        created.append({name: p.detach().clone() for name, p in model.named_parameters()})
        return model, kwargs

    monkeypatch.setattr(train_accelerate, 'create_model', create_model)
    argv = TINY + ['--opt', 'momentum', '--momentum', 0.9, '--weight-decay', 0, '--sched', 'none', '--lr', 0.1]
    result = main(argv + ['--clip-grad', 1e-3, '--max-train-steps', 1, '--output-dir', tmp_path])
    after = dict(result.model.named_parameters())
    moved = torch.sqrt(sum(((after[name].detach() - before) ** 2).sum() for name, before in created[0].items()))
    assert moved.item() == pytest.approx(1e-4, rel=1e-3)


def test_a_non_finite_gradient_norm_stops_the_run_naming_its_first_step(main, tmp_path, monkeypatch):
    """The clipped gradient's norm is checked too (with no fp16 scaler to skip such steps): made inf at steps 1
    and 2 while the loss stays finite, the run stops at the first record (step 2), naming step 1."""
    from accelerate import Accelerator

    real, norms = Accelerator.clip_grad_norm_, []

    def clip_grad_norm_(self, parameters, max_norm, *args, **kwargs):
        norms.append(real(self, parameters, max_norm, *args, **kwargs))
        return torch.tensor(float('inf')) if len(norms) <= 2 else norms[-1]

    monkeypatch.setattr(Accelerator, 'clip_grad_norm_', clip_grad_norm_)
    with pytest.raises(SystemExit) as stop:
        main(TINY + ['--clip-grad', 1.0, '--max-train-steps', 6, '--output-dir', tmp_path])
    assert 'became nan/inf at step 1 (lr ' in str(stop.value.code) and len(norms) == 2
