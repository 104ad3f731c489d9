"""Tests of train_accelerate.py's run() and its RunResult, two runs on one Accelerator, a tiny run's
outputs reloaded and its final metrics recomputed independently, a diverging run stopped, two real processes,
the default command, and a signal stopping training with a checkpoint."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import timm
import timm_capsules  # noqa: F401

from timm_capsules.train import RunResult, TrainConfig
from train_accelerate import run as run_training

from train_fixtures import (
    ROOT,
    assert_same_weights,
    SCRIPT,
    ENV,
    TINY,
    load_weights,
    free_port,
    independent_metrics,
    assert_metrics,
    mean_std,
    multimnist_test_images,
)


# ------------------------------------------------------------------------------ run() and its Accelerator
@pytest.fixture
def one_thread():
    """Bitwise-repeatable training in one process: with several threads the fused CPU routing kernel's gradients
    differ between two identical runs in the last bits (whether or not they share an Accelerator)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_runs_share_one_accelerator_and_return_run_results(accelerator, one_thread, tmp_path):
    """The experiment runner's way: one Accelerator, many run() calls. Each returns a RunResult (metrics.json's
    contents without the model object, the model, the folder); the Accelerator stays usable (not ended) and holds
    nothing of the run before: the same config and seed give the same weights twice, and the next run's gradient
    accumulation is its own config's."""

    def config(*extra):
        return TrainConfig.from_argv([str(a) for a in TINY + ['--max-train-steps', 3, '--seed', 3, *extra]])

    first = run_training(config('--output-dir', tmp_path / 'first'), accelerator)
    assert isinstance(first, RunResult) and first.output_dir == tmp_path / 'first'
    assert first.metrics['completed_steps'] == 3 and first.metrics['stopped'] is False
    assert 'model_object' not in first.metrics and isinstance(first.model, torch.nn.Module)
    saved = json.loads((tmp_path / 'first' / 'metrics.json').read_text())
    assert saved['final'] == first.metrics['final'] and saved['history'] == first.metrics['history']
    assert set(saved) | {'stopped'} == set(first.metrics)
    assert accelerator.step == 0  # nothing of the run left in it

    second = run_training(config('--output-dir', tmp_path / 'second'), accelerator)
    assert_same_weights(load_weights(tmp_path / 'first'), load_weights(tmp_path / 'second'))
    assert second.metrics['final'] == first.metrics['final']
    assert second.metrics['weights_sha256'] == first.metrics['weights_sha256']

    third = run_training(config('--gradient-accumulation-steps', 2, '--output-dir', tmp_path / 'third'), accelerator)
    assert accelerator.gradient_accumulation_steps == 2
    assert third.metrics['completed_steps'] == 3 and third.metrics['images_seen'] == 3 * 8 * 2
    stopped = run_training(config('--stop-after-steps', 2, '--output-dir', tmp_path / 'stopped'), accelerator)
    assert stopped.metrics == dict(stopped=True, completed_steps=2) and stopped.output_dir == tmp_path / 'stopped'


def test_a_shared_accelerator_of_another_precision_is_refused(accelerator, tmp_path):
    config = TrainConfig.from_argv([str(a) for a in TINY + ['--mixed-precision', 'bf16', '--output-dir', tmp_path]])
    with pytest.raises(SystemExit, match='--mixed_precision bf16, but the Accelerator passed to run'):
        run_training(config, accelerator)


# ------------------------------------------------------------------------------ outputs and reloading
def test_tiny_run_writes_outputs_and_reloads(run, tmp_path, capsys):
    out = tmp_path / 'out'
    results = run(
        TINY
        + [
            '--max-train-steps',
            6,
            '--output-dir',
            out,
            '--with-tracking',
            '--checkpointing-steps',
            2,
            '--checkpoints-total-limit',
            2,
        ]
    )
    for name in ('config.json', 'model.safetensors', 'metrics.json', 'training_curves.png'):
        assert (out / name).is_file(), name
    assert [p.name for p in sorted((out / 'checkpoints').iterdir())] == ['step_00000004', 'step_00000006']
    assert list((out / 'timm_capsules').glob('**/events.out.tfevents.*')), 'no tensorboard log'
    metrics = json.loads((out / 'metrics.json').read_text())
    final = metrics['final']
    assert metrics['completed_steps'] == 6 and final == metrics['history']['eval'][-1]
    assert [(r['step'], r['epoch']) for r in metrics['history']['eval']] == [(5, 0), (6, 1)]  # 5 steps an epoch
    assert [r['step'] for r in metrics['history']['train']] == [2, 4, 6]  # --log-every 2

    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    model = results['model_object'].eval()
    assert reloaded.pretrained_cfg['label_names'] == [str(d) for d in range(10)]
    x = torch.rand(5, 1, 36, 36)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))
    assert sum(p.numel() for p in reloaded.parameters()) == metrics['num_parameters']
    # the final metrics, recomputed from the saved model on the same 37 test images
    images, targets = multimnist_test_images(37, *mean_std(reloaded))
    assert_metrics(final, independent_metrics(reloaded, images, targets, multi_label=True))
    # and the printed lines carry those numbers
    captured = capsys.readouterr()
    printed = captured.out
    for r in metrics['history']['eval']:
        assert (
            f'epoch {r["epoch"]}: step {r["step"]}, test loss {r["loss"]:.4f}, '
            f'exact_match {r["exact_match"]:.4f} (37 images)'
        ) in printed
    assert f'\nfinal test exact_match: {final["exact_match"]:.4f} on 37 images after 6 steps\n' in printed
    # not on a terminal: no progress bar, one line per --log-every steps
    for r in metrics['history']['train']:
        assert f'\nstep {r["step"]}/6: train loss {r["loss"]:.4f}, accuracy {r["accuracy"]:.3f} (batches)' in printed
    assert 'it/s' not in printed + captured.err
    # the accuracy to beat: always answering the test set's most frequent label set, counted here
    _, targets = multimnist_test_images(37, 0.0, 1.0)
    sets = [tuple(row.nonzero().flatten().tolist()) for row in targets]
    chance = max(sets.count(s) for s in sets) / 37
    assert metrics['chance_level'] == pytest.approx(chance) and chance > 1 / 37
    assert f'\nchance level: {chance:.4f} (always the most frequent label set)\n' in printed
    assert 'a CNN of similar size' not in printed  # the reference's recipe is the quick run's, not this one
    assert f's of training; saved to {out}\n' in printed
    from PIL import Image

    with Image.open(out / 'training_curves.png') as png:
        assert png.text['Title'] == 'capsnet_matrix_multimnist on diverse_multimnist (sample)'


# ----------------------------------------------------------------------------- a diverging run stops
def test_diverging_run_stops_and_saves_nothing_non_finite(run, tmp_path):
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as stop:
        run(
            TINY
            + [
                '--opt',
                'sgd',
                '--lr',
                '1e6',
                '--max-train-steps',
                8,
                '--log-every',
                1,
                '--checkpointing-steps',
                1,
                '--checkpoints-total-limit',
                0,
                '--output-dir',
                out,
            ]
        )
    message = str(stop.value.code)
    step = int(re.search(r'became nan/inf at step (\d+) ', message).group(1))
    assert message.startswith('train_accelerate.py: error: the run diverged') and '\n' not in message
    assert 'Try a lower --lr, --clip-grad 1.0, or --mixed-precision no (float32)' in message
    assert 1 < step <= 8
    # every step before it was finite (its checkpoint holds the logged losses), none from it on was saved
    names = [p.name for p in sorted((out / 'checkpoints').iterdir())]
    assert names == [f'step_{k:08d}' for k in range(1, step)]
    assert message.endswith(f'the last checkpoint is {out / "checkpoints" / names[-1]}')
    saved = json.loads((out / 'checkpoints' / names[-1] / 'training_state.json').read_text())
    assert [r['step'] for r in saved['history']['train']] == list(range(1, step))
    assert all(math.isfinite(r['loss']) for r in saved['history']['train'])
    assert all(torch.isfinite(t).all() for t in load_weights(out / 'checkpoints' / names[-1]).values())
    assert not (out / 'model.safetensors').exists() and not (out / 'metrics.json').exists()


# -------------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_processes_identical_weights_and_exact_eval(tmp_path):
    """Launched as the README says (its launcher arguments), which leaves accelerate nothing to guess and warn about."""
    from test_readme import readme_cpu_launch

    out = tmp_path / 'ddp'
    command = [
        sys.executable,
        '-m',
        'accelerate.commands.launch',
        *readme_cpu_launch(),
        '--main_process_port',
        str(free_port()),
        str(SCRIPT),
        *TINY,
        '--max-train-steps',
        '4',
        '--debug-digests',
        '--output-dir',
        str(out),
    ]
    env = {k: v for k, v in ENV.items() if k != 'OMP_NUM_THREADS'}  # as in a user's shell
    done = subprocess.run(
        command, cwd=ROOT, env=dict(env, ACCELERATE_USE_CPU='1'), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'were not passed' not in done.stderr, done.stderr[:2000]
    digests = {p.name: p.read_text() for p in out.glob('digest_rank*.txt')}
    assert len(digests) == 2 and len(set(digests.values())) == 1, digests
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['num_processes'] == 2
    assert metrics['final']['num_images'] == 37  # odd: every test image exactly once
    assert metrics['weights_sha256'] == next(iter(digests.values()))
    # the gathered metrics are those of the saved model on the 37 images in one process
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    images, targets = multimnist_test_images(37, *mean_std(reloaded))
    assert_metrics(metrics['final'], independent_metrics(reloaded, images, targets, multi_label=True))


# ---------------------------------------------------------------------------- the default command
@pytest.mark.slow
def test_default_command_prints_accuracy(tmp_path):
    """The README's main command (`python train_accelerate.py`: one process needs no launcher), shortened."""
    command = [
        sys.executable,
        str(SCRIPT),
        '--max_train_steps',
        '15',
        '--test-size',
        '100',
        '--output_dir',
        str(tmp_path / 'out'),
    ]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / 'out'
    final = json.loads((out / 'metrics.json').read_text())['final']
    assert f'final test exact_match: {final["exact_match"]:.4f} on 100 images after 15 steps' in done.stdout
    assert 'mixed precision no' in done.stdout
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    images, targets = multimnist_test_images(100, *mean_std(reloaded))
    assert_metrics(final, independent_metrics(reloaded, images, targets, multi_label=True))


# ------------------------------------------------------------------------------------------ stopping
def processes_writing_to(folder):
    """Pids of the live processes whose command line names `folder`."""
    found = []
    for entry in Path('/proc').iterdir():
        try:
            if entry.name.isdigit() and str(folder).encode() in (entry / 'cmdline').read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def stop_while_training(command, out, signum, **env):
    """Starts `command`, sends `signum` once its second checkpoint exists (the loop runs), and waits."""
    import signal

    process = subprocess.Popen(
        command, cwd=ROOT, env=dict(ENV, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240  # a guard against a hang, not a measurement
    while not (out / 'checkpoints' / 'step_00000002').exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signum)
    try:
        stdout, stderr = process.communicate(timeout=120)  # the pipes close when every process holding them is gone
    except subprocess.TimeoutExpired:  # it did not stop: leave nothing running behind the failure
        for pid in processes_writing_to(out):
            os.kill(pid, signal.SIGKILL)
        raise
    return process.returncode, stdout, stderr


@pytest.mark.slow
@pytest.mark.parametrize('signame, processes', [('SIGTERM', 0), ('SIGINT', 0), ('SIGTERM', 1), ('SIGTERM', 2)])
def test_a_signal_stops_training_with_a_checkpoint(run, tmp_path, signame, processes):
    """kill -TERM / Ctrl-C of the script, or kill -TERM of `accelerate launch` (with one process, launchers before
    accelerate 1.16 do not pass the signal on: the child asks Linux for SIGTERM when the launcher dies; 1.16's
    terminates its child itself; with two, torch's elastic agent passes it on and the ranks agree on the step), ends
    the current step, writes a checkpoint and exits non-zero; no process is left, and the run resumes from that
    checkpoint."""
    import signal

    out = tmp_path / 'out'
    argv = [
        *TINY,
        '--epoch-size',
        10**6,
        '--max-train-steps',
        10**6,
        '--checkpointing-steps',
        1,
        '--checkpoints-total-limit',
        0,
        '--output-dir',
        out,
    ]
    command = [sys.executable, str(SCRIPT), *map(str, argv)]
    if processes:
        command[1:1] = [
            '-m',
            'accelerate.commands.launch',
            '--num_processes',
            str(processes),
            '--mixed_precision',
            'no',
            '--dynamo_backend',
            'no',
        ]
    if processes == 2:
        command[3:3] = ['--multi_gpu', '--num_machines', '1', '--main_process_port', str(free_port())]
    code, _, stderr = stop_while_training(command, out, getattr(signal, signame), ACCELERATE_USE_CPU='1')
    assert not processes_writing_to(out), 'a training process outlived the stop'
    match = re.search(
        rf'stopped by {signame} after (\d+) steps; checkpoint (\S+); continue with '
        r'--resume-from-checkpoint latest',
        stderr,
    )
    assert match, stderr[-3000:]
    steps = int(match.group(1))
    # a non-zero status that says the run was stopped by the signal: the script's own 128 + signal; under
    # `accelerate launch`, the launcher's, which changed with accelerate 1.16: before it, killed by the signal
    # (one process) or failed (two); since, 128 + the signal itself for both
    stopped = 128 + getattr(signal, signame)
    assert code in {0: {stopped}, 1: {-signal.SIGTERM, stopped}, 2: {1, stopped}}[processes], code
    assert stderr.count('stopping after this step, with a checkpoint') == max(processes, 1)
    newest = sorted((out / 'checkpoints').iterdir())[-1]
    assert match.group(2) == str(newest) and newest.name == f'step_{steps:08d}'
    assert json.loads((newest / 'training_state.json').read_text())['completed_steps'] == steps
    assert not (out / 'model.safetensors').exists()
    resumed = run(
        argv[: argv.index('--max-train-steps')]
        + ['--max-train-steps', steps + 1, '--output-dir', out, '--resume-from-checkpoint', 'latest']
    )
    assert resumed['completed_steps'] == steps + 1 and (out / 'model.safetensors').exists()
