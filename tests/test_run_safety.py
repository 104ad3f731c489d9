"""A training run under careless or hostile conditions: its output folder checked before training and locked for
the run, write failures named with nothing lost, training_state.json validated by schema, metrics.json strict JSON,
non-finite weights named, seeds and sizes bounded. Each case gives one error line naming the input."""

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import timm

import timm_capsules  # noqa: F401
from timm_capsules import hub, loading

from hub_cache import offline_hub_cache
from timm_capsules.train.output_dir import write_json

# the tiny capsule net on the built-in MNIST sample (the fixture `run`, from conftest.py: a command line run
# in-process, with accelerate's state reset after it)
from train_fixtures import ENV, SCRIPT, TINY

ROOT = Path(__file__).resolve().parents[1]


# ---- the output folder: checked before training, locked for the run, write failures named ------------------


def _refused(run, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        run(argv)
    message = str(stop.value.code)
    assert message.startswith('train_accelerate.py: error: ') and '\n' not in message, message
    assert 'parameters) on' not in capsys.readouterr().out  # stopped before training
    return message


def test_output_dir_that_is_a_file_or_cannot_be_made_stops_before_training(run, tmp_path, capsys):
    file = tmp_path / 'results.txt'
    file.write_text('keep me')
    message = _refused(run, TINY + ['--output-dir', file], capsys)
    assert message.endswith(f'--output-dir {file}: is a file, not a folder')
    message = _refused(run, TINY + ['--output-dir', file / 'run'], capsys)
    assert message.endswith(f'--output-dir {file / "run"}: cannot create it (Not a directory: {file / "run"})')
    assert file.read_text() == 'keep me'


def test_symlinked_checkpoint_is_refused_before_training(run, tmp_path, capsys):
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (elsewhere / 'precious.txt').write_text('keep me')
    out = tmp_path / 'out'
    (out / 'checkpoints').mkdir(parents=True)
    (out / 'checkpoints' / 'step_00000002').symlink_to(elsewhere)
    message = _refused(run, TINY + ['--output-dir', out, '--checkpointing-steps', 2], capsys)
    assert f'{out / "checkpoints" / "step_00000002"} is a symbolic link (to {elsewhere})' in message
    assert (elsewhere / 'precious.txt').read_text() == 'keep me'


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (as root), else None."""
    mount = tmp_path / 'disk'
    mount.mkdir()
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(mount)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(['umount', '-l', str(mount)], check=True)


def _fill(disk: Path, leave: int):
    free = shutil.disk_usage(disk).free
    (disk / 'filler').write_bytes(b'\0' * max(0, free - leave))


def test_full_disk_is_named_and_loses_nothing(run, tmp_path, capsys, small_disk, monkeypatch):
    """A previous run's model, then a run whose second checkpoint does not fit: one line 'no space left on device'
    naming the folder, no temporary folder left, the last complete checkpoint resumable, the previous model intact.
    On a real 1 MiB tmpfs as root; else accelerate's writer raises ENOSPC from the second checkpoint on."""
    out = (small_disk or tmp_path) / 'out'
    run(TINY + ['--output-dir', out, '--max-train-steps', 2])
    previous = {name: (out / name).read_bytes() for name in ('model.safetensors', 'config.json', 'metrics.json')}
    if small_disk:
        _fill(small_disk, 200 << 10)  # one checkpoint (~150 KiB) fits, two do not
    else:
        import accelerate.checkpointing

        real_save = accelerate.checkpointing.save

        def save(obj, path, *args, **kwargs):
            if '.tmp_step_00000004' in str(path):
                raise OSError(errno.ENOSPC, 'No space left on device', str(path))
            return real_save(obj, path, *args, **kwargs)

        monkeypatch.setattr(accelerate.checkpointing, 'save', save)
    message = _refused_after_training(
        run,
        TINY
        + ['--output-dir', out, '--max-train-steps', 6, '--checkpointing-steps', 2, '--checkpoints-total-limit', 0],
    )
    tmp = out / 'checkpoints' / '.tmp_step_00000004'
    assert message == (
        f'train_accelerate.py: error: no space left on device: {tmp}; the last complete checkpoint '
        f'is {out / "checkpoints" / "step_00000002"}'
    )
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['step_00000002']
    assert {name: (out / name).read_bytes() for name in previous} == previous
    assert not (out / '.tmp_model').exists()
    if small_disk:
        (small_disk / 'filler').unlink()
    monkeypatch.undo()
    result = run(
        TINY
        + [
            '--output-dir',
            out,
            '--max-train-steps',
            6,
            '--checkpointing-steps',
            2,
            '--resume-from-checkpoint',
            'latest',
        ]
    )
    assert result['completed_steps'] == 6
    assert 'resuming from' in capsys.readouterr().out


def _refused_after_training(run, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        run(argv)
    message = str(stop.value.code)
    assert '\n' not in message
    return message


def test_too_little_free_space_is_found_before_training(run, tmp_path, capsys, small_disk, monkeypatch):
    if small_disk:
        out = small_disk / 'out'
        _fill(small_disk, 40 << 10)
    else:
        out = tmp_path / 'out'
        usage = shutil._ntuple_diskusage(1 << 30, 1 << 30, 40 << 10)
        monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage)
    message = _refused(run, TINY + ['--output-dir', out, '--checkpointing-steps', 2], capsys)
    assert re.search(
        rf'--output-dir {out}: 0\.0\d MiB free on its disk, a checkpoint of this model needs about '
        rf'0\.1\d MiB$',
        message,
    ), message


def _cli(*argv, **kwargs):
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, argv)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_two_runs_cannot_share_an_output_dir_and_a_killed_runs_lock_is_taken_over(tmp_path):
    import signal
    import time

    out = tmp_path / 'out'
    first = _cli(*TINY, '--output-dir', out, '--max-train-steps', 100000)
    try:
        owner = out / '.train.lock.owner'
        deadline = time.time() + 120
        while not owner.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert owner.exists(), first.communicate()[1][-2000:] if first.poll() is not None else 'no lock taken'
        second = _cli(*TINY, '--output-dir', out, '--max-train-steps', 2)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 1
        assert (
            err.strip()
            .splitlines()[-1]
            .startswith(f'train_accelerate.py: error: --output-dir {out} is in use by another run (PID {first.pid} on ')
        )
        assert 'Traceback' not in err and not (out / 'model.safetensors').exists()
    finally:
        first.send_signal(signal.SIGKILL)  # killed: it never releases anything itself
        first.communicate(timeout=60)
    assert owner.exists()
    third = _cli(*TINY, '--output-dir', out, '--max-train-steps', 2)
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err[-2000:]
    assert f'a run that ended without releasing it (PID {first.pid}, started' in err
    assert (out / 'model.safetensors').exists() and not owner.exists()


# ---- training_state.json by schema, metrics.json strict, non-finite weights named at load ------------------


@pytest.fixture(scope='module')
def checkpointed(tmp_path_factory):
    """A 4-step tiny run (Adam) with checkpoints at steps 2 and 4, and its final model."""
    out = tmp_path_factory.mktemp('checkpointed')
    argv = [*TINY, '--max-train-steps', 4, '--opt', 'adam', '--checkpointing-steps', 2, '--output-dir', out]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


BAD_STATES = {  # case: (how to change training_state.json of step 4, what the error says)
    'completed_steps 10**15': (
        lambda s: s.update(completed_steps=10**15),
        'completed_steps is 1000000000000000, but the checkpoint is step_00000004',
    ),
    'completed_steps true': (lambda s: s.update(completed_steps=True), 'completed_steps must be an int >= 0, got True'),
    'running strings': (
        lambda s: s.update(running=['a', 'b', 'c']),
        r"running must be 3 finite numbers >= 0 \(loss sum, correct, images\), got \['a', 'b', 'c'\]",
    ),
    'running NaN': (
        lambda s: s.update(running=[float('nan'), 0, float('inf')]),
        r'running must be 3 finite numbers >= 0 .*, got \[nan, 0, inf\]',
    ),
    'history entry not a number': (
        lambda s: s['history']['train'][0].update(loss='low'),
        "history.train: loss must be a finite number, got 'low' \\(step 2\\)",
    ),
    'history from the future': (
        lambda s: s['history']['train'][0].update(step=99),
        'history.train: each record needs a step from 0 to 4',
    ),
    # step 4's weights and optimizer under step 2's progress, in a folder not named by its step: Adam says 4
    'progress of another step': (None, 'completed_steps is 2, but the optimizer state was saved after 4 steps'),
}


@pytest.mark.parametrize('case', sorted(BAD_STATES))
def test_training_state_is_validated_by_schema(run, checkpointed, tmp_path, case):
    out = tmp_path / 'out'
    shutil.copytree(checkpointed / 'checkpoints', out / 'checkpoints')
    folder = out / 'checkpoints' / 'step_00000004'
    path = folder / 'training_state.json'
    change, message = BAD_STATES[case]
    saved = json.loads(path.read_text())
    if change is None:
        saved['completed_steps'] = 2
        saved['history'] = {kind: [r for r in records if r['step'] <= 2] for kind, records in saved['history'].items()}
        folder = folder.rename(out / 'checkpoints' / 'elsewhere')
        path = folder / 'training_state.json'
    else:
        change(saved)
    path.write_text(json.dumps(saved))
    with pytest.raises(SystemExit) as stop:
        run(TINY + ['--opt', 'adam', '--max-train-steps', 6, '--output-dir', out, '--resume-from-checkpoint', folder])
    text = str(stop.value.code)
    assert '\n' not in text and re.search(f'cannot resume: {path}: .*{message}', text), text
    assert not (out / 'model.safetensors').exists()


def test_metrics_json_is_strict_json_with_non_finite_values_flagged(checkpointed, tmp_path):
    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f'{name} in metrics.json'))

    assert 'non_finite_values' not in strict((checkpointed / 'metrics.json').read_text())
    path = tmp_path / 'metrics.json'
    write_json(path, dict(final=dict(loss=float('nan'), top1=0.5), history=[1.0, float('inf')]))
    assert strict(path.read_text()) == dict(
        final=dict(loss=None, top1=0.5), history=[1.0, None], non_finite_values=['final.loss', 'history[1]']
    )


def _nan_weights(folder: Path) -> Path:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / 'model.safetensors')
    weights['primary.norm.bias'][0] = float('nan')
    weights['head.fc.bias'][0] = float('inf')
    save_file(weights, folder / 'model.safetensors', metadata={'format': 'pt'})
    return folder


def test_non_finite_weights_are_named_at_load(run, checkpointed, tmp_path):
    folder = tmp_path / 'diverged'
    shutil.copytree(checkpointed, folder, ignore=shutil.ignore_patterns('checkpoints', '.train.lock*'))
    _nan_weights(folder)
    names = r'2 tensor\(s\) hold NaN or infinity \(a diverged run\?\): head.fc.bias, primary.norm.bias'
    with pytest.warns(loading.NonFiniteWeightsWarning, match=f'{folder}: {names}'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    hub.install_in_cache(folder, 'someone/diverged', tmp_path / 'cache')
    with offline_hub_cache(tmp_path / 'cache'):
        with pytest.warns(loading.NonFiniteWeightsWarning, match=f'someone/diverged: {names}'):
            timm.create_model('hf-hub:someone/diverged', pretrained=True)
    with pytest.raises(SystemExit) as stop:
        run(
            TINY
            + [
                '--model',
                f'local-dir:{folder}',
                '--pretrained',
                '--max-train-steps',
                2,
                '--output-dir',
                tmp_path / 'out',
            ]
        )
    assert str(stop.value.code) == (
        f'train_accelerate.py: error: the pretrained weights of local-dir:{folder} hold NaN or infinity in 2 '
        f'tensor(s): primary.norm.bias, head.fc.bias; training cannot start from them'
    )


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--seed', str(2**64)], f'argument --seed: must be <= 4294967295, got {2**64}'),
        (['--data-seed', '-1'], 'argument --data-seed/--data_seed: must be >= 0, got -1'),
        (['--test-size', str(10**8)], 'argument --test-size/--test_size: must be <= 1000000, got 100000000'),
    ],
)
def test_training_seeds_and_sizes_are_bounded_before_anything_runs(run, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        run(TINY + argv + ['--output-dir', tmp_path / 'out'])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f'train_accelerate.py: error: {message} (see --help)\n'
    assert not (tmp_path / 'out').exists()
