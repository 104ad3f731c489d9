"""What keeps a run safe to stop and its results trustworthy: a signal (SIGTERM, Ctrl-C) ends it after the
current step with a checkpoint, a launcher's death takes its child along, a diverging loss stops it, and
non-finite weights are never written."""

import os
import signal
import sys
from pathlib import Path

import torch

from .checkpoints import checkpoint_dirs
from .config import fail

__all__ = ['StopOnSignal', 'stop_with_the_launcher', 'check_finite', 'refuse_non_finite']


class StopOnSignal:
    """SIGTERM or Ctrl-C: finish the current optimizer step, write a checkpoint and exit non-zero (a second
    Ctrl-C stops at once). With several processes they agree on the step, so that they save together."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            print(
                f'\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint '
                f'(Ctrl-C again stops at once)',
                file=sys.stderr,
                flush=True,
            )
        self.signum = self.signum or signum

    def requested(self, accelerator):
        asked = self.signum is not None
        if accelerator.num_processes > 1:  # every process must stop at the same step to save together
            asked = accelerator.reduce(torch.tensor(float(asked), device=accelerator.device), 'sum').item() > 0
        return asked

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def stop_with_the_launcher():
    """`accelerate launch` (one process) does not pass SIGTERM on to its child, which would go on training
    alone: when our parent is the launcher, ask Linux to send us SIGTERM when it dies."""
    parent = os.getppid()
    try:
        words = Path(f'/proc/{parent}/cmdline').read_bytes().split(b'\0')
    except OSError:
        return
    if not (any(b'accelerate' in word for word in words) and any(b'launch' in word for word in words)):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def check_finite(state, accelerator, lr, output_dir):
    """Stops the run when a loss (or clipped gradient norm) became nan/inf: cheap, since it reads one number
    that the steps kept on the device, at the logging interval and before each checkpoint."""
    first = accelerator.gather(state.first_nonfinite[None])
    first = first[first > 0]
    if len(first):
        found = checkpoint_dirs(output_dir)
        fail(
            f'the run diverged: the training loss or gradient became nan/inf at step {first.min().item()} '
            f'(lr {lr:.3g}); nothing was saved. Try a lower --lr, --clip-grad 1.0, or --mixed-precision no '
            f'(float32){f"; the last checkpoint is {found[-1]}" if found else ""}'
        )


def refuse_non_finite(model):
    """Stops before a model with nan/inf weights is written or pushed, naming the tensors."""
    bad = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        fail(
            f'the final model has non-finite values (nan/inf) in {", ".join(bad[:5])}'
            f'{" ..." if len(bad) > 5 else ""}; not saved'
        )
