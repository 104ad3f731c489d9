"""Values of timm_capsules/train/accelerators.py: the Accelerator a config asks for (its arguments, read off a
recording stand-in, and one real CPU Accelerator), a shared one checked against the config and left as it was
found, and the process group ended exactly after a run that finished or was stopped by a signal."""

from types import SimpleNamespace

import pytest
import torch

from timm_capsules.train import accelerators as acc
from timm_capsules.train.accelerators import accelerator_for_the_run, ended_on_a_signal, make_accelerator

ERROR = 'train_accelerate.py: error: '


def config(**kwargs):
    values = dict(
        cpu=True,
        mixed_precision=None,
        gradient_accumulation_steps=2,
        report_to='tensorboard',
        with_tracking=False,
        output_dir='out',
    )
    return SimpleNamespace(**dict(values, **kwargs))


class Recorded:
    """Stands in for accelerate.Accelerator: keeps its arguments, counts end_training."""

    made = []

    def __init__(self, **kwargs):
        self.kwargs, self.ended = kwargs, 0
        self.mixed_precision = kwargs['mixed_precision'] or 'no'
        self.device = torch.device('cpu')
        Recorded.made.append(self)

    def end_training(self):
        self.ended += 1


@pytest.fixture
def recorded(monkeypatch):
    Recorded.made = []
    monkeypatch.setattr(acc, 'Accelerator', Recorded)
    return Recorded.made


def test_make_accelerator_arguments(recorded):
    made = make_accelerator(config())
    assert set(made.kwargs) == {
        'cpu',
        'mixed_precision',
        'gradient_accumulation_steps',
        'log_with',
        'project_dir',
        'dataloader_config',
    }
    assert (made.kwargs['cpu'], made.kwargs['mixed_precision'], made.kwargs['gradient_accumulation_steps']) == (
        True,
        None,
        2,
    )
    assert made.kwargs['log_with'] is None and made.kwargs['project_dir'] == 'out'
    assert made.kwargs['dataloader_config'].use_seedable_sampler is True
    made = make_accelerator(config(cpu=False, mixed_precision='bf16', with_tracking=True, report_to='all'))
    assert (made.kwargs['cpu'], made.kwargs['mixed_precision'], made.kwargs['log_with']) == (False, 'bf16', 'all')


def test_a_real_accelerator_from_a_config(tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    try:
        made = make_accelerator(config(output_dir=str(tmp_path), gradient_accumulation_steps=3))
        assert made.device.type == 'cpu' and made.mixed_precision == 'no'
        assert made.gradient_accumulation_steps == 3 and made.project_dir == str(tmp_path)
        assert made.dataloader_config.use_seedable_sampler is True and made.log_with == []
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_own_accelerator_is_ended_after_the_run(recorded):
    with accelerator_for_the_run(config()) as made:
        assert made is recorded[0] and made.ended == 0
    assert made.ended == 1


def test_own_accelerator_after_an_error_or_a_stop(recorded):
    with pytest.raises(ValueError):
        with accelerator_for_the_run(config()):
            raise ValueError
    assert recorded[-1].ended == 0  # the process ends as it is
    for code, ended in ((1, 0), (128, 0), (129, 1), (143, 1), ('message', 0), (None, 0)):
        with pytest.raises(SystemExit):
            with accelerator_for_the_run(config()):
                raise SystemExit(code)
        assert recorded[-1].ended == ended, code


def test_ended_on_a_signal_alone():
    made = SimpleNamespace(ended=0)
    made.end_training = lambda: setattr(made, 'ended', made.ended + 1)
    with ended_on_a_signal(made):
        pass
    assert made.ended == 0
    with pytest.raises(SystemExit):
        with ended_on_a_signal(made):
            raise SystemExit(130)
    assert made.ended == 1


def test_fp16_on_the_cpu_is_refused(recorded):
    with pytest.raises(SystemExit) as stop:
        with accelerator_for_the_run(config(mixed_precision='fp16')):
            pass
    assert str(stop.value.code) == (
        f'{ERROR}--mixed_precision fp16 needs a GPU (on the CPU accelerate trains in float32); use bf16 or no'
    )
    with accelerator_for_the_run(config(mixed_precision='bf16')) as made:
        assert made.mixed_precision == 'bf16'


class Shared:
    def __init__(self, precision='no', device='cpu'):
        self.mixed_precision, self.device = precision, torch.device(device)
        self.gradient_accumulation_steps, self.freed, self.finished = 1, 0, []
        self.trackers = [SimpleNamespace(finish=lambda i=i: self.finished.append(i)) for i in range(2)]

    def free_memory(self):
        self.freed += 1

    def end_training(self):
        raise AssertionError('a shared Accelerator is never ended')


def test_shared_accelerator_is_left_as_it_was_found(recorded):
    shared = Shared()
    with accelerator_for_the_run(config(gradient_accumulation_steps=4), shared) as made:
        assert made is shared and shared.gradient_accumulation_steps == 4 and shared.freed == 0
    assert recorded == [] and shared.trackers == [] and shared.finished == [0, 1] and shared.freed == 1
    shared = Shared()
    with pytest.raises(SystemExit):
        with accelerator_for_the_run(config(), shared):
            raise SystemExit(143)
    assert shared.trackers == [] and shared.finished == [0, 1] and shared.freed == 1
    with accelerator_for_the_run(config(mixed_precision='bf16'), Shared('bf16')):
        pass


def test_shared_accelerator_that_does_not_fit_the_config(recorded):
    with pytest.raises(SystemExit) as stop:
        with accelerator_for_the_run(config(mixed_precision='bf16'), Shared('no')):
            pass
    assert str(stop.value.code) == (f'{ERROR}--mixed_precision bf16, but the Accelerator passed to run() uses no')
    with pytest.raises(SystemExit) as stop:
        with accelerator_for_the_run(config(cpu=True), Shared(device='meta')):
            pass
    assert str(stop.value.code) == f'{ERROR}--cpu, but the Accelerator passed to run() uses meta'
    with accelerator_for_the_run(config(cpu=False), Shared(device='meta')):
        pass
    with pytest.raises(SystemExit) as stop:
        with accelerator_for_the_run(config(), Shared('fp16')):
            pass
    assert 'fp16 needs a GPU' in str(stop.value.code)
    shared = Shared('fp16', device='meta')
    with accelerator_for_the_run(config(cpu=False), shared):
        pass
    assert shared.freed == 1
