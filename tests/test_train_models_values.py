"""Values of timm_capsules/train/models.py without training: the model a config creates (its create_model
arguments, the class count agreed with the data, the errors in one line, pretrained weights holding NaN
named), the kernel loaded on the main process first, and timm's optimizer and scheduler with exactly the
config's values (a real multistep and cosine schedule checked against their closed forms)."""

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

import timm_capsules  # noqa: F401
from timm_capsules.train import models
from timm_capsules.train.models import create_model, create_optimizer, create_scheduler, load_routing_kernel

ERROR = 'train_accelerate.py: error: '
TINY = dict(backbone_args={'out_chs': 8}, primary_caps=4, pose_dim=4, capsule_layers=[('conv', 4, 3, 1)])


def args(**kwargs):
    return SimpleNamespace(
        **dict(dict(model='capsnet_matrix_multimnist', model_kwargs=dict(TINY), pretrained=False), **kwargs)
    )


def test_create_model_with_the_config_and_the_data_s_classes():
    given = args()
    model, kwargs = create_model(given, 10)
    assert kwargs == dict(TINY, num_classes=10) and given.model_kwargs == TINY  # the config is left as it was
    assert model.num_classes == 10 and type(model).__name__ == 'CapsNet'
    model, kwargs = create_model(args(model_kwargs=dict(TINY, num_classes=7)), 7)
    assert kwargs['num_classes'] == 7 and model.num_classes == 7
    with pytest.raises(SystemExit) as stop:
        create_model(args(model_kwargs=dict(TINY, num_classes=7)), 10)
    assert str(stop.value.code) == f'{ERROR}num_classes=7 but the dataset has 10 classes'


def test_create_model_errors_in_one_line(monkeypatch):
    with pytest.raises(SystemExit) as stop:
        create_model(args(model_kwargs=dict(TINY, pose_dim=5)), 10)
    message = str(stop.value.code)
    kwargs = dict(TINY, pose_dim=5, num_classes=10)
    assert message.startswith(f'{ERROR}cannot create capsnet_matrix_multimnist with {kwargs}: ') and '\n' not in message
    for error in (TypeError, ValueError, RuntimeError, AssertionError, OSError):

        def create(*a, error=error, **k):
            raise error('boom')

        monkeypatch.setattr(models.timm, 'create_model', create)
        with pytest.raises(SystemExit) as stop:
            create_model(args(model_kwargs={}), 10)
        assert (
            str(stop.value.code) == f"{ERROR}cannot create capsnet_matrix_multimnist with {{'num_classes': 10}}: boom"
        )


def test_create_model_passes_pretrained_and_asks_the_hub_first(monkeypatch):
    calls, asked = [], []

    def create(name, pretrained, **kwargs):
        calls.append((name, pretrained, kwargs))
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(models.timm, 'create_model', create)
    monkeypatch.setattr(models, 'hub_reachable', lambda: asked.append(1))
    create_model(args(model='m', model_kwargs=dict(a=1)), 3)
    assert calls[-1] == ('m', False, dict(a=1, num_classes=3)) and asked == []
    create_model(args(model='m', pretrained=True, model_kwargs={}), 3)
    assert calls[-1] == ('m', True, dict(num_classes=3)) and asked == [1]
    create_model(args(model='local-dir:/x', pretrained=True, model_kwargs={}), 3)
    assert calls[-1][:2] == ('local-dir:/x', True) and asked == [1]  # a local folder needs no Hub


@pytest.mark.parametrize('bad', [1, 5, 6])
def test_pretrained_weights_with_nan_are_named(monkeypatch, bad):
    import warnings

    from timm_capsules.loading import NonFiniteWeightsWarning

    def create(name, pretrained, **kwargs):
        warnings.warn('planted', NonFiniteWeightsWarning)
        model = torch.nn.Module()
        for i in range(7):
            model.register_buffer(f't{i}', torch.full((2,), float('nan') if i < bad else 1.0))
        return model

    monkeypatch.setattr(models.timm, 'create_model', create)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the warning is silenced: the error below says it
        with pytest.raises(SystemExit) as stop:
            create_model(args(model='m', model_kwargs={}), 3)
    names = ', '.join(f't{i}' for i in range(min(bad, 5)))
    assert str(stop.value.code) == (
        f'{ERROR}the pretrained weights of m hold NaN or infinity in {bad} tensor(s): {names}'
        f'{" ..." if bad > 5 else ""}; training cannot start from them'
    )


def test_load_routing_kernel_on_the_main_process_first(monkeypatch):
    events = []

    @contextlib.contextmanager
    def first():
        events.append('enter')
        yield
        events.append('exit')

    def preload(model, device):
        events.append(('preload', model, device))
        return 1.5

    monkeypatch.setattr(models.kernels, 'preload', preload)
    accelerator = SimpleNamespace(main_process_first=first, device=torch.device('cpu'))
    assert load_routing_kernel('model', accelerator) == 1.5
    assert events == ['enter', ('preload', 'model', torch.device('cpu')), 'exit']


def optimizer_config(**kwargs):
    return SimpleNamespace(**dict(dict(opt='sgd', lr=0.5, weight_decay=0.0, momentum=0.7), **kwargs))  # not timm's 0.9


def test_create_optimizer_with_the_config_s_values():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    optimizer = create_optimizer(optimizer_config(weight_decay=0.01), model)
    assert type(optimizer).__name__ == 'SGD'
    assert [g['lr'] for g in optimizer.param_groups] == [0.5, 0.5]
    assert [g['momentum'] for g in optimizer.param_groups] == [0.7, 0.7]
    assert sorted(g['weight_decay'] for g in optimizer.param_groups) == [0.0, 0.01]  # timm's no-decay group
    optimizer = create_optimizer(optimizer_config(opt='adam', lr=0.002, momentum=None), model)
    assert type(optimizer).__name__ == 'Adam' and optimizer.param_groups[0]['lr'] == 0.002
    with pytest.raises(SystemExit) as stop:
        create_optimizer(optimizer_config(opt='sgdd'), model)
    assert str(stop.value.code).startswith(f'{ERROR}--opt sgdd: Optimizer sgdd not found in registry')


def scheduler_config(**kwargs):
    return SimpleNamespace(
        **dict(dict(sched='multistep', decay_milestones=[2, 3], decay_rate=0.1, warmup_epochs=None), **kwargs)
    )


def test_no_scheduler():
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    for sched in (None, '', 'none'):
        assert create_scheduler(scheduler_config(sched=sched), optimizer, 5, 10) is None


def test_create_scheduler_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr(models, 'create_scheduler_v2', lambda optimizer, **k: calls.append((optimizer, k)) or ('s', 5))
    assert create_scheduler(scheduler_config(), 'opt', 4, 7) == 's'
    assert calls[-1] == (
        'opt',
        dict(
            sched='multistep',
            num_epochs=4,
            decay_milestones=[2, 3],
            decay_rate=0.1,
            warmup_epochs=0,
            step_on_epochs=False,
            updates_per_epoch=7,
        ),
    )
    create_scheduler(scheduler_config(sched='cosine', decay_milestones=None, warmup_epochs=2), 'opt', 4, 7)
    assert calls[-1][1]['decay_milestones'] == [] and calls[-1][1]['warmup_epochs'] == 2


def lr_after(scheduler, optimizer, updates):
    scheduler.step_update(num_updates=updates)
    return optimizer.param_groups[0]['lr']


def test_real_schedules_against_their_closed_forms():
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    scheduler = create_scheduler(scheduler_config(), optimizer, 4, 10)
    for updates in (0, 18, 19, 20, 28, 29, 39):  # after u updates, the lr of update u + 1 (timm's t + 1)
        decays = sum(updates + 1 >= m * 10 for m in (2, 3))
        assert lr_after(scheduler, optimizer, updates) == pytest.approx(0.1**decays)
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    scheduler = create_scheduler(scheduler_config(sched='cosine', decay_milestones=None), optimizer, 4, 10)
    for updates in (0, 10, 20, 35):  # timm's cosine decays to its lr_min (0) over the 40 updates
        assert lr_after(scheduler, optimizer, updates) == pytest.approx(0.5 * (1 + math.cos(math.pi * updates / 40)))


def test_unknown_scheduler_in_one_line():
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    with pytest.raises(SystemExit) as stop:
        create_scheduler(scheduler_config(sched='cosin'), optimizer, 4, 10)
    assert str(stop.value.code).startswith(f"{ERROR}--sched cosin: Unknown scheduler 'cosin'")


def test_only_the_non_finite_weights_warning_is_silenced(monkeypatch):
    import warnings

    def create(name, pretrained, **kwargs):
        warnings.warn('another warning', UserWarning)
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(models.timm, 'create_model', create)
    with pytest.warns(UserWarning, match='another warning'):
        create_model(args(model='m', model_kwargs={}), 3)
