"""Resumable checkpoints. "A checkpoint is data": a folder of accelerate's save_state files and our progress as
JSON (``TrainState``), with the size and SHA-256 of every file; before anything is loaded it is verified complete,
its pickle files load as plain tensor data (never as code) and its tensors fit this model and optimizer."""

import hashlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from accelerate.utils import load as load_plain_data  # torch.load(weights_only=True) with numpy's RNG types allowed
from safetensors import safe_open

from .config import fail
from .output_dir import write_failure

__all__ = [
    'TrainState',
    'CheckpointError',
    'save_checkpoint',
    'verify_checkpoint',
    'find_checkpoint',
    'checkpoint_dirs',
    'TRAINING_STATE',
]

# A checkpoint folder: accelerate's save_state files (model.safetensors; optimizer.bin and random_states_<rank>.pkl,
# read back by accelerate with torch.load(weights_only=True)) and our progress as JSON, with the size and
# SHA-256 of every other file. Nothing in it is ever unpickled as code: a checkpoint is data.
TRAINING_STATE = 'training_state.json'
# the pickle files that accelerate's load_state reads here (others, e.g. sampler.bin, it never reads)
PICKLED_STATE = r'optimizer(_\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt|dl_state_dict(_\d+)?\.bin'


class TrainState:
    """Progress that accelerate's save_state does not know about."""

    def __init__(self, device):
        self.completed_steps = 0
        self.running = torch.zeros(3, device=device)  # loss sum, correct, images since the last log line
        self.first_nonfinite = torch.zeros((), dtype=torch.long, device=device)  # step of the first nan/inf, 0: none
        self.history = dict(train=[], eval=[])

    def load(self, saved, accelerator):
        """``running`` was summed over the processes when saved: it goes back to rank 0, so that the next
        log line's sum over processes is the same whatever the number of processes."""
        self.completed_steps, self.history = saved['completed_steps'], saved['history']
        running = saved['running'] if accelerator.is_main_process else [0.0, 0.0, 0.0]
        self.running = torch.tensor(running, dtype=torch.float32, device=self.running.device)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_dirs(output_dir):
    """Checkpoints, oldest first (a half-written one is still a .tmp dir and never listed)."""
    root = Path(output_dir) / 'checkpoints'
    found = [p for p in root.glob('step_*') if p.is_dir() and re.fullmatch(r'step_\d+', p.name)]
    return sorted(found, key=lambda p: int(p.name.split('_')[1]))


def save_checkpoint(accelerator, output_dir, state, total_limit):
    """Writes into a temporary folder, then renames it: a kill mid-save never leaves a half checkpoint."""
    final = Path(output_dir) / 'checkpoints' / f'step_{state.completed_steps:08d}'
    tmp = final.with_name(f'.tmp_{final.name}')
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    if final.is_symlink():
        fail(f'{final} is a symbolic link; a checkpoint is never written through one')
    accelerator.wait_for_everyone()

    def failed(error):  # the last complete checkpoint and the model are left as they are
        found = checkpoint_dirs(output_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        fail(write_failure(tmp, error) + (f'; the last complete checkpoint is {found[-1]}' if found else ''))

    try:
        accelerator.save_state(str(tmp))
    except Exception as error:
        failed(error)
    running = accelerator.reduce(state.running.clone(), 'sum').tolist()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.name: dict(bytes=p.stat().st_size, sha256=file_sha256(p)) for p in sorted(tmp.iterdir())}
        progress = dict(completed_steps=state.completed_steps, running=running, history=state.history, files=files)
        try:
            (tmp / TRAINING_STATE).write_text(json.dumps(progress, indent=1, allow_nan=False))
        except (OSError, ValueError) as error:
            failed(error)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-total_limit] if total_limit else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def training_state_problem(saved, folder):
    """What is wrong with a ``training_state.json`` (types, ranges, agreement with the folder's step), or None.
    Its schema: completed_steps (int >= 0, the N of the folder's name step_N), running (3 finite numbers >= 0:
    loss sum, correct, images), history (train and eval lists of records: str keys, a step from 0 to
    completed_steps, finite numbers or lists of them), files ({name: {bytes: int >= 0, sha256: 64 hex}})."""
    if not isinstance(saved, dict):
        return 'not a JSON object'
    missing = [key for key in ('completed_steps', 'running', 'history', 'files') if key not in saved]
    if missing:
        return f'missing {missing}'
    steps, running, history, files = (saved[k] for k in ('completed_steps', 'running', 'history', 'files'))
    if not _count(steps):
        return f'completed_steps must be an int >= 0, got {steps!r}'
    named = re.fullmatch(r'step_(\d+)', Path(folder).name)
    if named and int(named.group(1)) != steps:
        return f'completed_steps is {steps}, but the checkpoint is {Path(folder).name}'
    if not (isinstance(running, list) and len(running) == 3 and all(_finite(v) and v >= 0 for v in running)):
        return f'running must be 3 finite numbers >= 0 (loss sum, correct, images), got {running!r}'
    if not (
        isinstance(history, dict) and isinstance(history.get('train'), list) and isinstance(history.get('eval'), list)
    ):
        return 'history must be {"train": [...], "eval": [...]}'
    for kind in ('train', 'eval'):
        for record in history[kind]:
            if not (isinstance(record, dict) and _count(record.get('step')) and record['step'] <= steps):
                return f'history.{kind}: each record needs a step from 0 to {steps}, got {record!r}'
            for key, value in record.items():
                if not (_finite(value) or (isinstance(value, list) and all(_finite(v) for v in value))):
                    return f'history.{kind}: {key} must be a finite number, got {value!r} (step {record["step"]})'
    if not (
        isinstance(files, dict)
        and all(
            isinstance(v, dict)
            and _count(v.get('bytes'))
            and isinstance(v.get('sha256'), str)
            and re.fullmatch(r'[0-9a-f]{64}', v['sha256'])
            for v in files.values()
        )
    ):
        return 'files must map each file name to its bytes and sha256'
    return None


def verify_checkpoint(folder, model, optimizer):
    """Our progress from ``folder`` after checking, before anything is loaded, that the checkpoint is complete
    (every file listed in training_state.json, with its size and SHA-256), that its pickle files load as plain
    data (torch.load(weights_only=True): a planted object is refused, never run) and that its tensors have the
    shapes of this model and optimizer. Raises CheckpointError naming the file."""
    folder = Path(folder)
    path = folder / TRAINING_STATE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f'{path}: missing (not a complete checkpoint of this script)')
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(f'{path}: not a valid training state ({error})')
    problem = training_state_problem(saved, folder)
    if problem:
        raise CheckpointError(f'{path}: not a valid training state: {problem}')
    files, steps = saved['files'], saved['completed_steps']
    for name, expected in files.items():
        file = folder / name
        if Path(name).name != name or not file.is_file():
            raise CheckpointError(f'{file}: missing')
        if file.stat().st_size != expected['bytes']:
            raise CheckpointError(
                f'{file}: {file.stat().st_size} bytes, {expected["bytes"]} when it was written (truncated or damaged)'
            )
        if file_sha256(file) != expected['sha256']:
            raise CheckpointError(f'{file}: its contents changed since it was written (damaged)')
    for name in ('model.safetensors', 'optimizer.bin'):
        if name not in files:
            raise CheckpointError(f'{folder / name}: missing')
    for file in folder.glob('custom_checkpoint_*.pkl'):  # accelerate would unpickle it with weights_only=False
        raise CheckpointError(
            f'{file}: refused, accelerate would load it as code, not data (a checkpoint is data, '
            f'never code; written by an older version of this script?)'
        )
    weights = folder / 'model.safetensors'
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(weights), framework='pt') as handle:
            found = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as error:
        raise CheckpointError(f'{weights}: unreadable ({error})')
    if found != expected:
        differing = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
        raise CheckpointError(
            f'{weights}: holds another model (first difference: {differing[0]!r}; other --model or --model-arg?)'
        )
    plain = {}
    for name in sorted(files):
        if re.fullmatch(PICKLED_STATE, name):
            try:
                plain[name] = load_plain_data(str(folder / name), map_location='cpu')
            except Exception as error:
                raise CheckpointError(
                    f'{folder / name}: not plain tensor data, refused (a checkpoint is data, never '
                    f'code): {str(error).splitlines()[0]}'
                )
    params = [p for group in optimizer.param_groups for p in group['params']]
    state = plain['optimizer.bin'].get('state') if isinstance(plain['optimizer.bin'], dict) else None
    if not isinstance(state, dict) or any(
        not isinstance(i, int)
        or i >= len(params)
        or any(torch.is_tensor(v) and v.ndim and v.shape != params[i].shape for v in values.values())
        for i, values in state.items()
    ):
        raise CheckpointError(f"{folder / 'optimizer.bin'}: does not fit this model's optimizer")
    # the optimizer's own step count (Adam and the like; fp16 may skip steps, never add them)
    counted = {
        int(values['step'])
        for values in state.values()
        if isinstance(values, dict) and torch.is_tensor(values.get('step', None)) and values['step'].numel() == 1
    }
    if counted and max(counted) > steps:
        raise CheckpointError(
            f'{folder / TRAINING_STATE}: completed_steps is {steps}, but the optimizer state '
            f'was saved after {max(counted)} steps'
        )
    return saved


def find_checkpoint(args, model, optimizer, accelerator):
    """(folder, saved progress) to resume from, or (None, None). ``latest``: the newest checkpoint that verifies,
    warning about each newer damaged one; an explicit path that does not verify stops the run."""
    if args.resume_from_checkpoint is None:
        return None, None
    if args.resume_from_checkpoint != 'latest':
        try:
            return args.resume_from_checkpoint, verify_checkpoint(args.resume_from_checkpoint, model, optimizer)
        except CheckpointError as error:
            fail(f'cannot resume: {error}')
    found = checkpoint_dirs(args.output_dir)
    if not found:
        accelerator.print(f'no checkpoint in {args.output_dir}/checkpoints; starting from scratch')
        return None, None
    problems = []
    for folder in reversed(found):
        try:
            return str(folder), verify_checkpoint(folder, model, optimizer)
        except CheckpointError as error:
            problems.append(str(error))
            accelerator.print(
                f'warning: checkpoint {folder.name} is damaged or unusable: {error}; trying the one before it',
                file=sys.stderr,
            )
    fail(f'no usable checkpoint in {args.output_dir}/checkpoints: {"; ".join(problems)}')
