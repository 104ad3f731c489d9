"""The run's output folder: everything about ``--output-dir`` that can be checked before training (a writable
folder, no symbolic links where the run writes or deletes, room for a checkpoint), the lock that holds it for one
run, and writing JSON there so that a failed write loses nothing and names its cause."""

import contextlib
import errno
import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from .config import fail

__all__ = [
    'output_dir_for_the_run',
    'check_output_dir',
    'output_dir_lock',
    'check_free_space',
    'write_failure',
    'write_json',
]

# The run holds a lock on --output-dir (an flock, so the kernel releases it when the process dies, however it
# dies); OWNER names the run holding it.
LOCK_NAME, OWNER_NAME = '.train.lock', '.train.lock.owner'
OWNED_NAMES = ('model.safetensors', 'config.json', 'metrics.json', 'training_curves.png', '.tmp_model')


def is_main_launch_process():
    """Rank 0 of a launch (``accelerate launch`` sets RANK), before accelerate's state exists."""
    return int(os.environ.get('RANK', '0')) == 0


def check_output_dir(output_dir):
    """Everything about ``--output-dir`` that can be told before training: it is (or can be made) a writable
    folder, its ``checkpoints`` is a folder, and nothing the run writes or deletes there is a symbolic link."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        fail(f'--output-dir {out}: is a file, not a folder')
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f'--output-dir {out}: cannot create it ({error.strerror}: {error.filename})')
    if not os.access(out, os.W_OK | os.X_OK):
        fail(f'--output-dir {out}: not writable')
    checkpoints = out / 'checkpoints'
    if checkpoints.exists() and not checkpoints.is_dir():
        fail(f'--output-dir {out}: {checkpoints} is a file, not a folder')
    inside = (
        sorted(checkpoints.glob('step_*')) + sorted(checkpoints.glob('.tmp_step_*')) if checkpoints.is_dir() else []
    )
    for path in [checkpoints, *inside, *(out / name for name in OWNED_NAMES)]:
        if path.is_symlink():
            fail(
                f'--output-dir {out}: {path} is a symbolic link (to {os.readlink(path)}); a run replaces and '
                f'deletes only real files and folders: remove the link or choose another --output-dir'
            )
    return out


@contextlib.contextmanager
def output_dir_lock(output_dir):
    """Holds ``--output-dir`` for the run: a second run into it stops at once naming this one's PID; the lock
    of a run that was killed is free (the kernel released it) and is taken over with a warning. Temporary
    folders a killed run left behind are removed once the lock is held."""
    from filelock import FileLock, Timeout

    out = Path(output_dir)
    owner_file = out / OWNER_NAME
    lock = FileLock(str(out / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = json.loads(owner_file.read_text())
            who = f'PID {owner["pid"]} on {owner["host"]}, started {owner["started"]}'
        except (OSError, ValueError, KeyError, TypeError):
            who = 'PID unknown'
        fail(f'--output-dir {out} is in use by another run ({who}); wait for it to end or choose another --output-dir')
    except OSError as error:
        fail(f'--output-dir {out}: cannot lock it ({error.strerror}: {error.filename})')
    try:
        try:
            stale = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            stale = None
        if isinstance(stale, dict):
            print(
                f'warning: --output-dir {out}: a run that ended without releasing it (PID {stale.get("pid")}, '
                f'started {stale.get("started")}) left its lock; taken over',
                file=sys.stderr,
                flush=True,
            )
        owner_file.write_text(
            json.dumps(
                dict(
                    pid=os.getpid(),
                    host=socket.gethostname(),
                    started=time.strftime('%Y-%m-%d %H:%M:%S'),
                    argv=sys.argv,
                )
            )
        )
        for tmp in [out / '.tmp_model', *(out / 'checkpoints').glob('.tmp_step_*')]:
            shutil.rmtree(tmp, ignore_errors=True)  # half-written by a killed run: never complete
        yield out
    finally:
        owner_file.unlink(missing_ok=True)
        lock.release()


@contextlib.contextmanager
def output_dir_for_the_run(args):
    """The checks and the lock, on the main process (the others write into the folder it holds)."""
    if not is_main_launch_process():
        yield Path(args.output_dir)
        return
    created = not Path(args.output_dir).exists()
    check_output_dir(args.output_dir)
    try:
        with output_dir_lock(args.output_dir) as out:
            yield out
    finally:  # a run that stopped before writing anything leaves no folder behind
        if created and {p.name for p in Path(args.output_dir).iterdir()} <= {LOCK_NAME}:
            (Path(args.output_dir) / LOCK_NAME).unlink(missing_ok=True)
            Path(args.output_dir).rmdir()


def check_free_space(output_dir, model, checkpointing):
    """A checkpoint holds the weights, up to two optimizer states per weight and the RNG states (about 64 KiB);
    the final model the weights: refuse to start when the disk cannot hold the first of these that is written."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    need = weights * (3 if checkpointing else 1) + (64 << 10)
    free = shutil.disk_usage(output_dir).free
    if free < need:
        fail(
            f'--output-dir {output_dir}: {free / 2**20:.2f} MiB free on its disk, a '
            f'{"checkpoint" if checkpointing else "model"} of this model needs about {need / 2**20:.2f} MiB'
        )


def write_failure(path, error):
    """One line for a failed write: 'no space left on device: <path>' when that is the cause (torch's own
    writer reports it as 'unexpected pos' or 'file write failed', without the errno)."""
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC
    if not full:
        try:
            full = shutil.disk_usage(Path(path).parent).free < (1 << 20)
        except OSError:
            pass
    if full:
        return f'no space left on device: {path}'
    return f'cannot write {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}'


def finite_json(value, where='', found=None):
    """``value`` with every NaN or infinity replaced by None (JSON has neither), and the places replaced."""
    found = [] if found is None else found
    if isinstance(value, float) and not math.isfinite(value):
        found.append(where or '.')
        return None, found
    if isinstance(value, dict):
        return {k: finite_json(v, f'{where}.{k}' if where else str(k), found)[0] for k, v in value.items()}, found
    if isinstance(value, (list, tuple)):
        return [finite_json(v, f'{where}[{i}]', found)[0] for i, v in enumerate(value)], found
    return value, found


def write_json(path, value):
    """Writes ``value`` as strict JSON through a temporary file (the previous file stays whole if writing
    fails); NaN and infinity become null, their places listed under ``non_finite_values``."""
    path = Path(path)
    tmp = path.with_name(f'.tmp_{path.name}')
    value, non_finite = finite_json(value)
    if non_finite and isinstance(value, dict):
        value['non_finite_values'] = non_finite
    try:
        tmp.write_text(json.dumps(value, indent=2, allow_nan=False))
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        fail(write_failure(path, error))
