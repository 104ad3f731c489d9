"""Tests of timm_capsules/train/checkpoints.py: exact resume (DiverseMultiMNIST and CIFAR-style, across
worker counts and gradient accumulation), our state as JSON, planted pickles never run, damaged or foreign
checkpoints refused naming the file."""

import json
import re

import pytest
import torch

import timm_capsules  # noqa: F401

from train_fixtures import TINY, load_weights, assert_same_weights, cli, make_image_dataset, CIFAR_TINY


# ------------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize(
    'accumulation, every, stop, steps',
    [
        (1, 2, 3, 7),  # 40 images per epoch at batch 8: 5 steps, an evaluation at each epoch end
        (2, 2, 3, 4),  # 3 steps of 2 batches per epoch
        (1, 5, 6, 8),  # the checkpoint at the end of epoch 0 comes before that epoch's evaluation
    ],
)
def test_resume_continues_exactly(run, tmp_path, accumulation, every, stop, steps):
    common = TINY + [
        '--max-train-steps',
        steps,
        '--checkpointing-steps',
        every,
        '--gradient-accumulation-steps',
        accumulation,
        '--seed',
        3,
    ]
    full = run(common + ['--output-dir', tmp_path / 'full'])
    interrupted = tmp_path / 'interrupted'
    stopped = run(common + ['--output-dir', interrupted, '--stop-after-steps', stop])
    assert stopped['stopped'] and not (interrupted / 'model.safetensors').exists()
    assert [p.name for p in (interrupted / 'checkpoints').iterdir()] == [f'step_{every:08d}']
    resumed = run(common + ['--output-dir', interrupted, '--resume-from-checkpoint', 'latest'])
    assert_same_weights(load_weights(tmp_path / 'full'), load_weights(interrupted))
    assert resumed['completed_steps'] == full['completed_steps']
    assert [r['step'] for r in resumed['history']['eval']] == [r['step'] for r in full['history']['eval']]
    assert resumed['final']['loss'] == pytest.approx(full['final']['loss'], rel=1e-5)


@pytest.mark.slow
def test_resume_cifar_style_exactly(run, tmp_path):
    """Shuffling and augmentation draws survive an interruption and do not depend on the worker count: the
    uninterrupted run loads in the main process, the interrupted one with 2 workers, the resumed one with 1."""
    data = make_image_dataset(tmp_path / 'cifar10', size=32, mode='RGB', n=(20, 5))
    common = CIFAR_TINY + [
        '--data-dir',
        data,
        '--batch-size',
        4,
        '--max-train-steps',
        12,
        '--checkpointing-steps',
        3,
        '--seed',
        1,
        '--log-every',
        2,
    ]  # 5 steps an epoch: the workers restart twice
    full = run(common + ['--output-dir', tmp_path / 'full', '--num-workers', 0])
    run(common + ['--output-dir', tmp_path / 'int', '--stop-after-steps', 7, '--num-workers', 2])
    resumed = run(common + ['--output-dir', tmp_path / 'int', '--resume-from-checkpoint', 'latest', '--num-workers', 1])
    assert (full['args']['num_workers'], resumed['args']['num_workers']) == (0, 1)
    assert_same_weights(load_weights(tmp_path / 'full'), load_weights(tmp_path / 'int'))
    assert [r['loss'] for r in resumed['history']['train']] == pytest.approx(
        [r['loss'] for r in full['history']['train']]
    )
    assert resumed['final'] == pytest.approx(full['final'], rel=1e-5)


# ------------------------------------------------------------------- checkpoints are data, never code
class Payload:
    """Unpickled as code, it creates the file `marker` (pickle calls open(marker, 'w'))."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def plant(folder, name, marker):
    """Replaces (or adds) `name` in a checkpoint by a pickle payload and, like a crafted checkpoint would, updates
    the file list of training_state.json so that sizes and checksums match."""
    import hashlib

    torch.save({'state': Payload(marker), 'param_groups': []}, folder / name)
    state_file = folder / 'training_state.json'
    saved = json.loads(state_file.read_text())
    data = (folder / name).read_bytes()
    saved['files'][name] = dict(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    state_file.write_text(json.dumps(saved))


@pytest.fixture(scope='module')
def checkpointed(tmp_path_factory):
    """A 4-step tiny run with checkpoints at steps 2 and 4 (one subprocess, shared by the tests below)."""
    out = tmp_path_factory.mktemp('checkpointed')
    done = cli(*TINY, '--max-train-steps', 4, '--checkpointing-steps', 2, '--seed', 3, '--output-dir', out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def copy_run(checkpointed, tmp_path):
    import shutil

    shutil.copytree(checkpointed / 'checkpoints', tmp_path / 'checkpoints')
    return tmp_path


def test_checkpoint_holds_our_state_as_json(checkpointed):
    folder = checkpointed / 'checkpoints' / 'step_00000004'
    names = sorted(p.name for p in folder.iterdir())
    assert names == ['model.safetensors', 'optimizer.bin', 'random_states_0.pkl', 'training_state.json']
    saved = json.loads((folder / 'training_state.json').read_text())
    assert saved['completed_steps'] == 4 and [r['step'] for r in saved['history']['train']] == [2, 4]
    assert sorted(saved['files']) == names[:-1]
    import hashlib

    for name, entry in saved['files'].items():
        data = (folder / name).read_bytes()
        assert entry == dict(bytes=len(data), sha256=hashlib.sha256(data).hexdigest()), name


@pytest.mark.parametrize(
    'name, refusal',
    [
        # read by accelerate's load_state with weights_only=True (the RNG states' failure it would swallow silently)
        ('optimizer.bin', r'not plain tensor data, refused \(a checkpoint is data, never code\)'),
        ('random_states_0.pkl', r'not plain tensor data, refused \(a checkpoint is data, never code\)'),
        # accelerate would unpickle it with weights_only=False (where register_for_checkpointing put our state)
        ('custom_checkpoint_0.pkl', r'refused, accelerate would load it as code, not data'),
        ('sampler.bin', None),  # never read for our loaders: the run resumes
    ],
)
def test_planted_pickle_never_runs_on_resume(run, checkpointed, tmp_path, name, refusal):
    out = copy_run(checkpointed, tmp_path)
    folder = out / 'checkpoints' / 'step_00000004'
    marker = tmp_path / 'payload_ran'
    plant(folder, name, marker)
    argv = TINY + ['--max-train-steps', 5, '--seed', 3, '--output-dir', out, '--resume-from-checkpoint', folder]
    if refusal:  # refused before anything is loaded, naming the file
        with pytest.raises(SystemExit, match=rf'cannot resume: {re.escape(str(folder / name))}: {refusal}'):
            run(argv)
    else:
        assert run(argv)['completed_steps'] == 5
    assert not marker.exists()
    # the payload is real: its pickle calls open (io.open) on the marker (read statically, never unpickled)
    assert {'io.open', 'REDUCE', str(marker)} <= pickled_calls(folder / name)


def pickled_calls(path):
    """The globals a torch.save file's pickle would call, its string arguments, and "REDUCE" if it calls
    anything, read with pickletools: the file is inspected as data, never unpickled."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith('data.pkl')))
    found, strings = set(), []
    for opcode, arg, _ in pickletools.genops(data):
        if isinstance(arg, str):
            strings.append(arg)
        if opcode.name == 'REDUCE':
            found.add('REDUCE')
        elif opcode.name == 'STACK_GLOBAL':
            found.add('.'.join(strings[-2:]))
        elif opcode.name == 'GLOBAL':
            found.add(arg.replace(' ', '.'))
    return found | set(strings)


# ------------------------------------------------------------------------------- damaged checkpoints
def damage(file, how):
    data = file.read_bytes()
    if how == 'truncated':
        file.write_bytes(data[: len(data) // 2])
        return f'{len(data) // 2} bytes, {len(data)} when it was written \\(truncated or damaged\\)'
    file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit, same size
    return 'its contents changed since it was written \\(damaged\\)'


@pytest.mark.parametrize(
    'name, how',
    [('model.safetensors', 'truncated'), ('optimizer.bin', 'flipped'), ('random_states_0.pkl', 'truncated')],
)
def test_latest_skips_a_damaged_checkpoint(run, checkpointed, tmp_path, capsys, name, how):
    out = copy_run(checkpointed, tmp_path)
    newest = out / 'checkpoints' / 'step_00000004'
    problem = damage(newest / name, how)
    resumed = run(
        TINY
        + [
            '--max-train-steps',
            4,
            '--checkpointing-steps',
            2,
            '--seed',
            3,
            '--output-dir',
            out,
            '--resume-from-checkpoint',
            'latest',
        ]
    )
    printed = capsys.readouterr()
    assert re.search(
        rf'warning: checkpoint step_00000004 is damaged or unusable: {re.escape(str(newest / name))}: '
        rf'{problem}; trying the one before it',
        printed.err,
    )
    assert f'resuming from {out / "checkpoints" / "step_00000002"}' in printed.out
    # resumed exactly from step 2: the weights of the uninterrupted run
    assert resumed['completed_steps'] == 4
    assert_same_weights(load_weights(checkpointed), load_weights(out))


@pytest.mark.parametrize('name, how', [('model.safetensors', 'flipped'), ('optimizer.bin', 'truncated')])
def test_explicit_damaged_checkpoint_stops_naming_the_file(run, checkpointed, tmp_path, name, how):
    out = copy_run(checkpointed, tmp_path)
    folder = out / 'checkpoints' / 'step_00000004'
    problem = damage(folder / name, how)
    with pytest.raises(
        SystemExit,
        match=rf'^train_accelerate.py: error: cannot resume: '
        rf'{re.escape(str(folder / name))}: {problem}$',
    ):
        run(TINY + ['--max-train-steps', 5, '--output-dir', out, '--resume-from-checkpoint', folder])
    assert not (out / 'model.safetensors').exists()


def test_checkpoint_of_another_model_or_incomplete_is_refused(run, checkpointed, tmp_path):
    out = copy_run(checkpointed, tmp_path)
    folder = out / 'checkpoints' / 'step_00000004'
    with pytest.raises(
        SystemExit,
        match=rf'cannot resume: {re.escape(str(folder / "model.safetensors"))}: holds '
        r"another model \(first difference: 'capsule_layers.0.weight'; other --model",
    ):
        run(
            TINY
            + [
                '--model-arg',
                "capsule_layers=[('conv', 6, 3, 1)]",
                '--output-dir',
                out,
                '--resume-from-checkpoint',
                folder,
            ]
        )
    (folder / 'training_state.json').unlink()
    with pytest.raises(
        SystemExit,
        match=rf'cannot resume: {re.escape(str(folder / "training_state.json"))}: '
        r'missing \(not a complete checkpoint of this script\)$',
    ):
        run(TINY + ['--output-dir', out, '--resume-from-checkpoint', folder])
    # with latest, none usable: one line naming each
    damage(out / 'checkpoints' / 'step_00000002' / 'optimizer.bin', 'truncated')
    with pytest.raises(
        SystemExit,
        match=r'no usable checkpoint in .*checkpoints: .*step_00000004/training_state.json: '
        r'missing .*; .*step_00000002/optimizer.bin: \d+ bytes',
    ):
        run(TINY + ['--output-dir', out, '--resume-from-checkpoint', 'latest'])
