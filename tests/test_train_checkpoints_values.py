"""Values of timm_capsules/train/checkpoints.py without training: checkpoints written by ``save_checkpoint``
through a stand-in for accelerate's save_state (the same files: safetensors weights, torch.save'd optimizer
and RNG states), then verified, damaged and looked for; the schema of training_state.json case by case with
its exact messages; the progress it restores."""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from timm_capsules.train import checkpoints as cp
from timm_capsules.train.checkpoints import (
    CheckpointError,
    TrainState,
    checkpoint_dirs,
    find_checkpoint,
    save_checkpoint,
    training_state_problem,
    verify_checkpoint,
)

ERROR = 'train_accelerate.py: error: '


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def adam_after(model, steps):
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        optimizer.step()
    return optimizer


class Accelerator:
    """What save_checkpoint and find_checkpoint ask of accelerate, on one process: save_state writes the files
    accelerate's does (model.safetensors, optimizer.bin, random_states_0.pkl)."""

    def __init__(self, model, optimizer, is_main_process=True, others=(0.0, 0.0, 0.0)):
        self.model, self.optimizer, self.is_main_process = model, optimizer, is_main_process
        self.others, self.printed, self.waits = torch.tensor(others), [], 0

    def save_state(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True)
        save_file(self.model.state_dict(), str(folder / 'model.safetensors'), metadata={'format': 'pt'})
        torch.save(self.optimizer.state_dict(), folder / 'optimizer.bin')
        torch.save(dict(torch_manual_seed=torch.get_rng_state()), folder / 'random_states_0.pkl')

    def reduce(self, tensor, how):
        assert how == 'sum'
        return tensor + self.others

    def wait_for_everyone(self):
        self.waits += 1

    def print(self, *args, **kwargs):
        self.printed.append((' '.join(map(str, args)), kwargs))


def state_at(steps, running=(1.5, 2.0, 8.0)):
    state = TrainState('cpu')
    state.completed_steps = steps
    state.running = torch.tensor(running)
    state.history = dict(train=[dict(step=steps, loss=0.5)], eval=[])
    return state


@pytest.fixture
def saved(tmp_path):
    model = tiny_model()
    optimizer = adam_after(model, 3)
    accelerator = Accelerator(model, optimizer, others=(1.0, 1.0, 2.0))
    folder = save_checkpoint(accelerator, tmp_path, state_at(3), total_limit=3)
    return SimpleNamespace(folder=folder, model=model, optimizer=optimizer, accelerator=accelerator, out=tmp_path)


def test_train_state_starts_empty_and_loads_progress():
    state = TrainState('cpu')
    assert state.completed_steps == 0 and state.history == dict(train=[], eval=[])
    assert state.running.tolist() == [0.0, 0.0, 0.0] and state.running.dtype == torch.float32
    assert state.first_nonfinite.item() == 0 and state.first_nonfinite.dtype == torch.long
    assert state.first_nonfinite.shape == ()
    saved = dict(completed_steps=7, running=[1, 2, 3], history=dict(train=[dict(step=7)], eval=[]))
    state.load(saved, SimpleNamespace(is_main_process=True))
    assert (state.completed_steps, state.history) == (7, saved['history'])
    assert state.running.tolist() == [1.0, 2.0, 3.0] and state.running.dtype == torch.float32
    on_device = TrainState('meta')  # the progress stays on the run's device
    assert on_device.running.device.type == 'meta' and on_device.first_nonfinite.device.type == 'meta'
    on_device.load(saved, SimpleNamespace(is_main_process=True))
    assert on_device.running.device.type == 'meta'
    other = TrainState('cpu')
    other.load(saved, SimpleNamespace(is_main_process=False))  # summed over processes: kept by rank 0 only
    assert other.running.tolist() == [0.0, 0.0, 0.0] and other.running.dtype == torch.float32


def test_file_sha256_over_several_blocks(tmp_path):
    data = bytes(range(256)) * 5000 + b'tail'  # more than one 1 MiB block
    (tmp_path / 'f').write_bytes(data)
    assert cp.file_sha256(tmp_path / 'f') == hashlib.sha256(data).hexdigest()
    (tmp_path / 'e').write_bytes(b'')
    assert cp.file_sha256(tmp_path / 'e') == hashlib.sha256(b'').hexdigest()


def test_checkpoint_dirs_are_the_complete_ones_by_step(tmp_path):
    assert checkpoint_dirs(tmp_path) == []
    root = tmp_path / 'checkpoints'
    for name in ('step_10', 'step_9', 'step_00000100', '.tmp_step_200', 'step_x', 'step_3_old', 'other'):
        (root / name).mkdir(parents=True)
    (root / 'step_7').write_text('a file')
    assert checkpoint_dirs(str(tmp_path)) == [root / 'step_9', root / 'step_10', root / 'step_00000100']


def test_save_checkpoint_writes_the_progress_and_the_files(saved):
    folder = saved.folder
    assert folder == saved.out / 'checkpoints' / 'step_00000003' and folder.is_dir()
    names = sorted(p.name for p in folder.iterdir())
    assert names == ['model.safetensors', 'optimizer.bin', 'random_states_0.pkl', 'training_state.json']
    text = (folder / 'training_state.json').read_text()
    progress = json.loads(text)
    assert text == json.dumps(progress, indent=1)
    assert (
        progress
        == dict(
            completed_steps=3,
            running=[2.5, 3.0, 10.0],  # summed over the processes
            history=dict(train=[dict(step=3, loss=0.5)], eval=[]),
            files={
                name: dict(
                    bytes=(folder / name).stat().st_size,
                    sha256=hashlib.sha256((folder / name).read_bytes()).hexdigest(),
                )
                for name in names[:-1]
            },
        )
    )
    assert saved.accelerator.waits == 3
    assert not list((saved.out / 'checkpoints').glob('.tmp_*'))


def test_save_checkpoint_keeps_the_last_k(tmp_path):
    model = tiny_model()
    accelerator = Accelerator(model, adam_after(model, 1))
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(accelerator, tmp_path, state_at(step), total_limit=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ['step_00000004', 'step_00000005']
    for step in (6, 7):
        save_checkpoint(accelerator, tmp_path, state_at(step), total_limit=0)  # 0: all
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ['step_00000004', 'step_00000005'] + [
        'step_00000006',
        'step_00000007',
    ]
    save_checkpoint(accelerator, tmp_path, state_at(7, running=(9.0, 9.0, 9.0)), total_limit=1)  # replaced
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ['step_00000007']
    saved = json.loads((tmp_path / 'checkpoints' / 'step_00000007' / 'training_state.json').read_text())
    assert saved['running'] == [9.0, 9.0, 9.0]


def test_save_checkpoint_clears_a_half_written_one(tmp_path):
    model = tiny_model()
    accelerator = Accelerator(model, adam_after(model, 1))
    half = tmp_path / 'checkpoints' / '.tmp_step_00000001'
    half.mkdir(parents=True)
    (half / 'junk').write_text('x')
    folder = save_checkpoint(accelerator, tmp_path, state_at(1), total_limit=3)
    assert 'junk' not in {p.name for p in folder.iterdir()} and not half.exists()


def test_other_processes_write_no_progress(tmp_path):
    model = tiny_model()
    accelerator = Accelerator(model, adam_after(model, 1), is_main_process=False)
    half = tmp_path / 'checkpoints' / '.tmp_step_00000001'
    half.mkdir(parents=True)
    (half / 'junk').write_text('x')
    with pytest.raises(SystemExit, match='File exists'):  # the main process clears it; this one's save_state meets it
        save_checkpoint(accelerator, tmp_path, state_at(1), total_limit=3)
    accelerator = Accelerator(model, adam_after(model, 1), is_main_process=False)
    out = tmp_path / 'other'
    folder = save_checkpoint(accelerator, out, state_at(2), total_limit=3)
    assert not folder.exists() and not (out / 'checkpoints' / '.tmp_step_00000002' / 'training_state.json').exists()


def test_save_checkpoint_refuses_a_link_and_names_failures(tmp_path):
    model = tiny_model()
    accelerator = Accelerator(model, adam_after(model, 1))
    (tmp_path / 'checkpoints').mkdir()
    (tmp_path / 'checkpoints' / 'step_00000001').symlink_to(tmp_path)
    with pytest.raises(SystemExit) as stop:
        save_checkpoint(accelerator, tmp_path, state_at(1), total_limit=3)
    assert str(stop.value.code) == (
        f'{ERROR}{tmp_path / "checkpoints" / "step_00000001"} is a symbolic link; a checkpoint is never written '
        'through one'
    )
    (tmp_path / 'checkpoints' / 'step_00000001').unlink()
    save_checkpoint(accelerator, tmp_path, state_at(2), total_limit=3)

    def broken(folder):
        Path(folder).mkdir()
        raise RuntimeError('file write failed\nmore')

    accelerator.save_state = broken
    with pytest.raises(SystemExit) as stop:
        save_checkpoint(accelerator, tmp_path, state_at(3), total_limit=3)
    tmp = tmp_path / 'checkpoints' / '.tmp_step_00000003'
    assert str(stop.value.code) in (
        f'{ERROR}cannot write {tmp}: file write failed; the last complete checkpoint is '
        f'{tmp_path / "checkpoints" / "step_00000002"}',
        f'{ERROR}no space left on device: {tmp}; the last complete checkpoint is '
        f'{tmp_path / "checkpoints" / "step_00000002"}',
    )
    assert not tmp.exists()
    accelerator = Accelerator(model, adam_after(model, 1))
    state = state_at(4)
    state.history['train'][0]['loss'] = float('nan')  # not JSON: the progress cannot be written
    with pytest.raises(SystemExit) as stop:
        save_checkpoint(accelerator, tmp_path / 'fresh', state, total_limit=3)
    try:
        json.dumps(dict(loss=[float('nan')]), indent=1, allow_nan=False)
    except ValueError as error:
        why = str(error)
    assert (
        str(stop.value.code)
        == f'{ERROR}cannot write {tmp_path / "fresh" / "checkpoints" / ".tmp_step_00000004"}: {why}'
    )
    assert not (tmp_path / 'fresh' / 'checkpoints' / '.tmp_step_00000004').exists()

    def refused_at_once(folder):  # fails before making the folder: nothing to remove
        raise PermissionError(13, 'Permission denied', folder)

    accelerator.save_state = refused_at_once
    with pytest.raises(SystemExit) as stop:
        save_checkpoint(accelerator, tmp_path / 'none', state_at(1), total_limit=3)
    tmp = tmp_path / 'none' / 'checkpoints' / '.tmp_step_00000001'
    assert str(stop.value.code) == f'{ERROR}cannot write {tmp}: [Errno 13] Permission denied: {str(tmp)!r}'


GOOD = dict(
    completed_steps=4,
    running=[1.0, 2, 0],
    history=dict(train=[dict(step=2, loss=0.5, top=[1, 2.5])], eval=[dict(step=4, top1=1)]),
    files={'a.bin': dict(bytes=0, sha256='0' * 64)},
)


def changed(**kwargs):
    return json.loads(json.dumps(dict(GOOD, **kwargs)))


@pytest.mark.parametrize(
    'saved, problem',
    [
        ([], 'not a JSON object'),
        ({'completed_steps': 1, 'files': {}}, "missing ['running', 'history']"),
        (changed(completed_steps=-1), 'completed_steps must be an int >= 0, got -1'),
        (changed(completed_steps=4.0), 'completed_steps must be an int >= 0, got 4.0'),
        (changed(completed_steps=False), 'completed_steps must be an int >= 0, got False'),
        (changed(completed_steps=5), 'completed_steps is 5, but the checkpoint is step_00000004'),
        (changed(running=[1, 2]), 'running must be 3 finite numbers >= 0 (loss sum, correct, images), got [1, 2]'),
        (
            changed(running=[1, 2, -1]),
            'running must be 3 finite numbers >= 0 (loss sum, correct, images), got [1, 2, -1]',
        ),
        (
            changed(running=[1, True, 1]),
            'running must be 3 finite numbers >= 0 (loss sum, correct, images), got [1, True, 1]',
        ),
        (changed(running=(1, 2, 3)), None),  # JSON has lists only: a tuple arrives as one
        (changed(history=[]), 'history must be {"train": [...], "eval": [...]}'),
        (changed(history=dict(train=[])), 'history must be {"train": [...], "eval": [...]}'),
        (changed(history=dict(train={}, eval=[])), 'history must be {"train": [...], "eval": [...]}'),
        (
            changed(history=dict(train=[], eval=[dict(step=5)])),
            "history.eval: each record needs a step from 0 to 4, got {'step': 5}",
        ),
        (
            changed(history=dict(train=[dict(step=-1)], eval=[])),
            "history.train: each record needs a step from 0 to 4, got {'step': -1}",
        ),
        (changed(history=dict(train=[3], eval=[])), 'history.train: each record needs a step from 0 to 4, got 3'),
        (
            changed(history=dict(train=[dict(loss=1)], eval=[])),
            "history.train: each record needs a step from 0 to 4, got {'loss': 1}",
        ),
        (changed(history=dict(train=[dict(step=0), dict(step=4)], eval=[])), None),
        (
            changed(history=dict(train=[dict(step=1, loss='x')], eval=[])),
            "history.train: loss must be a finite number, got 'x' (step 1)",
        ),
        (
            changed(history=dict(train=[], eval=[dict(step=1, f1=[1, None])])),
            'history.eval: f1 must be a finite number, got [1, None] (step 1)',
        ),
        (
            changed(history=dict(train=[], eval=[dict(step=1, ok=True)])),
            'history.eval: ok must be a finite number, got True (step 1)',
        ),
        (changed(files=[]), 'files must map each file name to its bytes and sha256'),
        (changed(files={'a': 1}), 'files must map each file name to its bytes and sha256'),
        (
            changed(files={'a': dict(bytes=-1, sha256='0' * 64)}),
            'files must map each file name to its bytes and sha256',
        ),
        (changed(files={'a': dict(bytes=1, sha256='A' * 64)}), 'files must map each file name to its bytes and sha256'),
        (changed(files={'a': dict(bytes=1, sha256='0' * 63)}), 'files must map each file name to its bytes and sha256'),
        (changed(files={'a': dict(bytes=1, sha256=0)}), 'files must map each file name to its bytes and sha256'),
        (changed(files={'a': dict(sha256='0' * 64)}), 'files must map each file name to its bytes and sha256'),
        (changed(files={}), None),
        (GOOD, None),
    ],
)
def test_training_state_problem(saved, problem):
    assert training_state_problem(saved, '/x/checkpoints/step_00000004') == problem


def test_training_state_of_a_folder_not_named_by_its_step():
    assert training_state_problem(changed(completed_steps=9), '/x/elsewhere') is None
    assert training_state_problem(changed(completed_steps=9), '/x/step_9') is None
    assert training_state_problem(changed(completed_steps=9), '/x/step_9b') is None
    assert training_state_problem(changed(completed_steps=4, running=[0.5, 1e300, 0]), '/x/step_4') is None
    nan = changed()
    nan['running'] = [float('nan'), 0, 0]
    assert training_state_problem(nan, '/x/step_4').startswith('running must be 3 finite numbers')
    inf = changed()
    inf['history']['eval'][0]['top1'] = float('inf')
    assert training_state_problem(inf, '/x/step_4') == 'history.eval: top1 must be a finite number, got inf (step 4)'


def test_verify_checkpoint_returns_the_progress(saved):
    progress = verify_checkpoint(saved.folder, saved.model, saved.optimizer)
    assert progress == json.loads((saved.folder / 'training_state.json').read_text())
    assert verify_checkpoint(str(saved.folder), saved.model, saved.optimizer) == progress
    # another Adam with fewer steps of its own still fits: only more steps than completed_steps are refused
    assert verify_checkpoint(saved.folder, saved.model, adam_after(tiny_model(), 0)) == progress


def refused(saved, model=None, optimizer=None, folder=None):
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(folder or saved.folder, model or saved.model, optimizer or saved.optimizer)
    return str(error.value)


def rewrite(saved, change):
    path = saved.folder / 'training_state.json'
    progress = json.loads(path.read_text())
    change(progress)
    path.write_text(json.dumps(progress))
    return path


def listed(saved, name):
    data = (saved.folder / name).read_bytes()
    rewrite(saved, lambda p: p['files'].update({name: dict(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())}))


def test_verify_refuses_a_missing_or_broken_training_state(saved):
    path = saved.folder / 'training_state.json'
    text = path.read_text()
    path.unlink()
    assert refused(saved) == f'{path}: missing (not a complete checkpoint of this script)'
    path.write_text('{')
    assert refused(saved).startswith(f'{path}: not a valid training state (Expecting property name')
    path.write_text('[' * 100000 + ']' * 100000)
    assert refused(saved).startswith(f'{path}: not a valid training state (maximum recursion depth')
    path.write_bytes(b'\xff')
    assert refused(saved).startswith(f'{path}: not a valid training state (')
    path.write_text(text)
    rewrite(saved, lambda p: p.update(running=[-1, 0, 0]))
    assert refused(saved) == f'{path}: not a valid training state: ' + training_state_problem(
        json.loads(path.read_text()), saved.folder
    )


def test_verify_checks_every_listed_file(saved):
    folder = saved.folder
    data = (folder / 'optimizer.bin').read_bytes()
    (folder / 'optimizer.bin').write_bytes(data[:-5])
    assert refused(saved) == (
        f'{folder / "optimizer.bin"}: {len(data) - 5} bytes, {len(data)} when it was written (truncated or damaged)'
    )
    (folder / 'optimizer.bin').write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert refused(saved) == f'{folder / "optimizer.bin"}: its contents changed since it was written (damaged)'
    (folder / 'optimizer.bin').write_bytes(data)
    (folder / 'random_states_0.pkl').unlink()
    assert refused(saved) == f'{folder / "random_states_0.pkl"}: missing'
    rewrite(saved, lambda p: p['files'].pop('random_states_0.pkl'))
    assert verify_checkpoint(folder, saved.model, saved.optimizer)['completed_steps'] == 3
    (folder / 'sub').mkdir()
    rewrite(saved, lambda p: p['files'].update(sub=dict(bytes=0, sha256='0' * 64)))
    assert refused(saved) == f'{folder / "sub"}: missing'  # a folder is not a file
    rewrite(saved, lambda p: p['files'].pop('sub'))
    (saved.out / 'outside').write_bytes(b'')
    rewrite(saved, lambda p: p['files'].update({'../outside': dict(bytes=0, sha256=hashlib.sha256(b'').hexdigest())}))
    assert refused(saved) == f'{folder / "../outside"}: missing'  # only names inside the folder


@pytest.mark.parametrize('name', ['model.safetensors', 'optimizer.bin'])
def test_verify_needs_the_weights_and_the_optimizer_listed(saved, name):
    rewrite(saved, lambda p: p['files'].pop(name))
    assert refused(saved) == f'{saved.folder / name}: missing'


def test_verify_refuses_accelerates_custom_pickles(saved):
    torch.save(dict(a=1), saved.folder / 'custom_checkpoint_0.pkl')  # even listed and plain
    listed(saved, 'custom_checkpoint_0.pkl')
    assert refused(saved) == (
        f'{saved.folder / "custom_checkpoint_0.pkl"}: refused, accelerate would load it as code, not data (a '
        'checkpoint is data, never code; written by an older version of this script?)'
    )


def test_verify_refuses_another_model(saved):
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    assert refused(saved, model=other) == (
        f"{saved.folder / 'model.safetensors'}: holds another model (first difference: '0.weight'; other --model "
        'or --model-arg?)'
    )
    more = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    assert "(first difference: '2.bias';" in refused(saved, model=more)
    (saved.folder / 'model.safetensors').write_bytes(b'not safetensors')
    listed(saved, 'model.safetensors')
    assert refused(saved).startswith(f'{saved.folder / "model.safetensors"}: unreadable (')


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


@pytest.mark.parametrize('name', ['optimizer.bin', 'random_states_0.pkl', 'scaler.pt', 'dl_state_dict_1.bin'])
def test_verify_loads_pickles_as_data_only(saved, tmp_path, name):
    marker = tmp_path / 'ran'
    torch.save(dict(state=Payload(marker), param_groups=[]), saved.folder / name)
    listed(saved, name)
    message = refused(saved)
    assert message.startswith(
        f'{saved.folder / name}: not plain tensor data, refused (a checkpoint is data, never code): Weights only load '
        'failed. This file can still be loaded'
    )
    assert '\n' not in message and not marker.exists()


@pytest.mark.parametrize('name', ['sampler.bin', 'optimizer_x.bin', 'random_states.pkl'])
def test_verify_leaves_files_accelerate_never_loads(saved, tmp_path, name):
    marker = tmp_path / 'ran'
    torch.save(dict(state=Payload(marker)), saved.folder / name)
    listed(saved, name)
    assert verify_checkpoint(saved.folder, saved.model, saved.optimizer)['completed_steps'] == 3
    assert not marker.exists()


def test_pickled_state_names():
    import re

    for name in ('optimizer.bin', 'optimizer_1.bin', 'random_states_12.pkl', 'scaler.pt', 'dl_state_dict.bin'):
        assert re.fullmatch(cp.PICKLED_STATE, name), name
    for name in ('optimizer_.bin', 'random_states_.pkl', 'sampler.bin', 'model.safetensors', 'xoptimizer.bin'):
        assert not re.fullmatch(cp.PICKLED_STATE, name), name


def test_verify_refuses_an_optimizer_of_another_model(saved):
    bigger = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    optimizer = adam_after(bigger, 1)
    message = f"{saved.folder / 'optimizer.bin'}: does not fit this model's optimizer"
    for state in (
        optimizer.state_dict(),  # six parameters' states for four parameters
        dict(param_groups=[]),
        [1, 2],
        dict(state=[]),
        dict(state={'0': {}}),
        dict(state={0: dict(exp_avg=torch.zeros(2, 2))}),
    ):
        torch.save(state, saved.folder / 'optimizer.bin')
        listed(saved, 'optimizer.bin')
        assert refused(saved) == message, state
    for state in (  # shapes of the parameters, scalars and plain values fit
        dict(state={0: dict(exp_avg=torch.zeros(4, 3), step=torch.tensor(2.0)), 3: dict(x=torch.tensor(1.0), y=3)}),
        dict(state={}),
    ):
        torch.save(state, saved.folder / 'optimizer.bin')
        listed(saved, 'optimizer.bin')
        assert verify_checkpoint(saved.folder, saved.model, saved.optimizer)['completed_steps'] == 3


def test_verify_refuses_progress_behind_the_optimizer(saved, tmp_path):
    optimizer = adam_after(saved.model, 5)
    torch.save(optimizer.state_dict(), saved.folder / 'optimizer.bin')
    listed(saved, 'optimizer.bin')
    assert refused(saved) == (
        f'{saved.folder / "training_state.json"}: completed_steps is 3, but the optimizer state was saved after 5 steps'
    )
    state = dict(state={0: dict(step=4), 1: dict(step=torch.full((4,), 4.0))})  # no one-number tensor: not counted
    torch.save(state, saved.folder / 'optimizer.bin')
    listed(saved, 'optimizer.bin')
    assert verify_checkpoint(saved.folder, saved.model, saved.optimizer)['completed_steps'] == 3
    torch.save(
        dict(state={0: dict(step=torch.tensor(3.0)), 1: dict(step=torch.tensor(4.0))}), saved.folder / 'optimizer.bin'
    )
    listed(saved, 'optimizer.bin')
    assert refused(saved).endswith('completed_steps is 3, but the optimizer state was saved after 4 steps')


def test_find_checkpoint(saved, tmp_path):
    args = SimpleNamespace(resume_from_checkpoint=None, output_dir=str(saved.out))
    assert find_checkpoint(args, saved.model, saved.optimizer, saved.accelerator) == (None, None)
    args.resume_from_checkpoint = str(saved.folder)
    folder, progress = find_checkpoint(args, saved.model, saved.optimizer, saved.accelerator)
    assert folder == str(saved.folder) and progress['completed_steps'] == 3
    args.resume_from_checkpoint = 'latest'
    folder, progress = find_checkpoint(args, saved.model, saved.optimizer, saved.accelerator)
    assert folder == str(saved.folder) and progress['completed_steps'] == 3 and saved.accelerator.printed == []
    # a newer damaged one is skipped with a warning
    newer = save_checkpoint(saved.accelerator, saved.out, state_at(5), total_limit=3)
    (newer / 'optimizer.bin').write_bytes(b'')
    folder, progress = find_checkpoint(args, saved.model, saved.optimizer, saved.accelerator)
    assert folder == str(saved.folder) and progress['completed_steps'] == 3
    problem = refused(saved, folder=newer)
    assert saved.accelerator.printed == [
        (
            f'warning: checkpoint step_00000005 is damaged or unusable: {problem}; trying the one before it',
            dict(file=__import__('sys').stderr),
        )
    ]
    args.resume_from_checkpoint = str(newer)
    with pytest.raises(SystemExit) as stop:
        find_checkpoint(args, saved.model, saved.optimizer, saved.accelerator)
    assert str(stop.value.code) == f'{ERROR}cannot resume: {problem}'
    args.resume_from_checkpoint = 'latest'
    (saved.folder / 'training_state.json').unlink()
    first = refused(saved)
    with pytest.raises(SystemExit) as stop:
        find_checkpoint(args, saved.model, saved.optimizer, saved.accelerator)
    assert str(stop.value.code) == (f'{ERROR}no usable checkpoint in {saved.out}/checkpoints: {problem}; {first}')
    empty = SimpleNamespace(resume_from_checkpoint='latest', output_dir=str(tmp_path / 'none'))
    accelerator = Accelerator(saved.model, saved.optimizer)
    assert find_checkpoint(empty, saved.model, saved.optimizer, accelerator) == (None, None)
    assert accelerator.printed == [(f'no checkpoint in {tmp_path / "none"}/checkpoints; starting from scratch', {})]
