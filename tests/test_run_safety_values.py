"""Values of timm_capsules/train/run_safety.py without training: the signal handler's states and messages, the
agreement of several processes on a stop, the launcher's death signal asked for exactly when the parent is
``accelerate launch`` (a real process with such a command line), the divergence check and the non-finite
weights refused, each with its exact message."""

import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from timm_capsules.train import run_safety as rs
from timm_capsules.train.run_safety import StopOnSignal, check_finite, refuse_non_finite, stop_with_the_launcher

ERROR = 'train_accelerate.py: error: '


@pytest.fixture
def handler():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = StopOnSignal()
    yield stop
    stop.restore()
    assert {s: signal.getsignal(s) for s in before} == before


def test_stop_on_signal_installs_itself_for_both_signals(handler):
    assert handler.signum is None
    assert signal.getsignal(signal.SIGTERM) == handler._handle and signal.getsignal(signal.SIGINT) == handler._handle
    assert set(handler.previous) == {signal.SIGTERM, signal.SIGINT}


def handle(handler, signum):
    """A signal that must not stop at once: a KeyboardInterrupt would end the whole test session."""
    try:
        handler._handle(signum, None)
    except KeyboardInterrupt:
        pytest.fail(f'{signal.Signals(signum).name} stopped at once')


@pytest.mark.parametrize('first', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_a_signal_asks_once_and_keeps_the_first(handler, capsys, first):
    handle(handler, first)
    assert handler.signum == first
    assert capsys.readouterr().err == (
        f'\n{signal.Signals(first).name}: stopping after this step, with a checkpoint (Ctrl-C again stops at once)\n'
    )
    handle(handler, signal.SIGTERM)  # a SIGTERM never stops at once, and says nothing again
    assert handler.signum == first and capsys.readouterr().err == ''
    if first == signal.SIGINT:
        with pytest.raises(KeyboardInterrupt):
            handler._handle(signal.SIGINT, None)
    else:
        handle(handler, signal.SIGINT)  # Ctrl-C after SIGTERM: still the first stop
        assert handler.signum == signal.SIGTERM and capsys.readouterr().err == ''


def test_a_real_signal_reaches_the_handler(handler, capsys):
    signal.raise_signal(signal.SIGTERM)
    assert handler.signum == signal.SIGTERM
    assert 'SIGTERM: stopping after this step' in capsys.readouterr().err


class Processes:
    def __init__(self, n, others_asked, device='cpu'):
        self.num_processes, self.device, self.reduced = n, torch.device(device), []
        self.others_asked = others_asked

    def reduce(self, tensor, how):
        self.reduced.append((tensor.clone(), how))
        if tensor.device.type == 'meta':
            return torch.tensor(self.others_asked)
        return tensor + self.others_asked


def test_requested_alone_and_agreed_by_several(handler):
    one = Processes(1, 0.0)
    assert handler.requested(one) is False and one.reduced == []
    for n in (2, 3):
        several = Processes(n, 0.0)
        assert handler.requested(several) is False
        assert several.reduced[0][1] == 'sum' and several.reduced[0][0].item() == 0.0
        assert several.reduced[0][0].dtype == torch.float32
    assert handler.requested(Processes(2, 1.0)) is True  # another process was asked
    handler.signum = signal.SIGTERM
    assert handler.requested(one) is True
    several = Processes(2, 0.0)
    assert handler.requested(several) is True and several.reduced[0][0].item() == 1.0
    on_device = Processes(2, 0.0, device='meta')  # the flag goes to the processes' device
    assert handler.requested(on_device) is False and on_device.reduced[0][0].device.type == 'meta'


@pytest.fixture
def parent(request):
    """A real process whose command line is the given words (it only sleeps)."""
    words = request.param
    process = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', *words])
    expected = b'\0'.join([sys.executable.encode(), b'-c', b'import time; time.sleep(30)', *map(str.encode, words)])
    cmdline = Path(f'/proc/{process.pid}/cmdline')
    deadline = time.monotonic() + 20
    while cmdline.read_bytes().rstrip(b'\0') != expected and time.monotonic() < deadline:  # until it has exec'd
        time.sleep(0.01)
    yield process.pid
    process.kill()
    process.wait()


def recording_prctl(monkeypatch):
    import ctypes

    calls = []
    monkeypatch.setattr(ctypes, 'CDLL', lambda name: SimpleNamespace(prctl=lambda *a: calls.append((name, a))))
    return calls


@pytest.mark.parametrize(
    'parent, asked',
    [
        (['/venv/bin/accelerate', 'launch', 'train.py'], True),
        (['-m', 'accelerate.commands.launch'], True),
        (['accelerate', 'env'], False),
        (['torchrun', 'launch'], False),
        ([], False),
    ],
    indirect=['parent'],
)
def test_death_signal_asked_only_under_accelerate_launch(parent, monkeypatch, asked):
    calls = recording_prctl(monkeypatch)
    killed = []
    monkeypatch.setattr(rs.os, 'getppid', lambda: parent)
    monkeypatch.setattr(rs.os, 'kill', lambda *a: killed.append(a))
    stop_with_the_launcher()
    assert calls == ([(None, (1, signal.SIGTERM))] if asked else [])
    assert killed == []


@pytest.mark.parametrize('parent', [['accelerate', 'launch']], indirect=True)
def test_launcher_that_died_before_the_request_stops_us(parent, monkeypatch):
    calls = recording_prctl(monkeypatch)
    parents = iter([parent, 1])
    killed = []
    monkeypatch.setattr(rs.os, 'getppid', lambda: next(parents))
    monkeypatch.setattr(rs.os, 'kill', lambda *a: killed.append(a))
    stop_with_the_launcher()
    assert calls == [(None, (1, signal.SIGTERM))] and killed == [(rs.os.getpid(), signal.SIGTERM)]


def test_no_parent_to_read_is_left_alone(monkeypatch):
    calls = recording_prctl(monkeypatch)
    monkeypatch.setattr(rs.os, 'getppid', lambda: 2**22 + 12345)  # above the largest PID Linux hands out
    stop_with_the_launcher()
    assert calls == []


class Gathering:
    def __init__(self, *others):
        self.others = others

    def gather(self, tensor):
        assert tensor.shape == (1,)
        return torch.cat([tensor, torch.tensor(self.others, dtype=tensor.dtype)])


def steps(tmp_path, *names):
    for name in names:
        (tmp_path / 'checkpoints' / name).mkdir(parents=True)


def test_check_finite_passes_while_every_process_is_finite(tmp_path):
    check_finite(SimpleNamespace(first_nonfinite=torch.tensor(0)), Gathering(0, 0), 0.1, tmp_path)


@pytest.mark.parametrize('mine, others, first', [(7, (0,), 7), (0, (5, 9), 5), (12, (3,), 3), (1, (), 1)])
def test_check_finite_names_the_first_non_finite_step(tmp_path, mine, others, first):
    state = SimpleNamespace(first_nonfinite=torch.tensor(mine))
    with pytest.raises(SystemExit) as stop:
        check_finite(state, Gathering(*others), 0.0123456, tmp_path)
    assert str(stop.value.code) == (
        f'{ERROR}the run diverged: the training loss or gradient became nan/inf at step {first} (lr 0.0123); '
        'nothing was saved. Try a lower --lr, --clip-grad 1.0, or --mixed-precision no (float32)'
    )
    steps(tmp_path, 'step_00000002', 'step_00000010', 'step_00000003', '.tmp_step_00000012')
    with pytest.raises(SystemExit) as stop:
        check_finite(state, Gathering(*others), 2.0, tmp_path)
    assert str(stop.value.code).endswith(
        f'(float32); the last checkpoint is {tmp_path / "checkpoints" / "step_00000010"}'
    )


def test_refuse_non_finite_names_up_to_five_tensors():
    model = torch.nn.Module()
    model.register_buffer('fine', torch.ones(3))
    model.register_buffer('count', torch.zeros(3, dtype=torch.long))  # integers are never non-finite
    refuse_non_finite(model)
    for i, value in enumerate([float('nan'), float('inf'), float('-inf')]):
        tensor = torch.ones(4)
        tensor[i] = value
        model.register_buffer(f'bad{i}', tensor)
    with pytest.raises(SystemExit) as stop:
        refuse_non_finite(model)
    assert str(stop.value.code) == (
        f'{ERROR}the final model has non-finite values (nan/inf) in bad0, bad1, bad2; not saved'
    )
    for i in range(3, 5):
        model.register_buffer(f'bad{i}', torch.full((2,), float('nan'), dtype=torch.float16))
    with pytest.raises(SystemExit) as stop:
        refuse_non_finite(model)
    assert str(stop.value.code).endswith('in bad0, bad1, bad2, bad3, bad4; not saved')
    model.register_buffer('bad5', torch.tensor(float('nan')))
    with pytest.raises(SystemExit) as stop:
        refuse_non_finite(model)
    assert str(stop.value.code).endswith('in bad0, bad1, bad2, bad3, bad4 ...; not saved')
