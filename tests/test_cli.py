"""``python -m timm_capsules``: lists every registered model with the parameter count timm reports."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import timm_capsules  # noqa: F401  (registers the models)
from timm_capsules import __main__ as cli

MODULES = timm_capsules.MODEL_MODULES


def _described(name: str):
    """(parameter count, input size) of a registered model, built on the meta device (no memory, no time)."""
    model = timm.create_model(name, device='meta')
    return sum(p.numel() for p in model.parameters()), list(model.pretrained_cfg['input_size'])


def test_table_rows_give_each_models_parameter_count(monkeypatch, capsys):
    def two_models(module):
        assert module == MODULES  # both families are listed
        return ['capsnet_simple_cifar10', 'em_capsnet_simple_cifar10']

    monkeypatch.setattr(cli.timm, 'list_models', two_models)
    cli.main(['--batch-size', '1', '--repeats', '2'])
    header, *rows, footer = capsys.readouterr().out.splitlines()
    assert header.split() == ['model', 'params', 'input', 'forward', 'ms']
    assert footer.startswith('forward ms: median of 2 passes after a warm-up, batch 1,')
    rows = [row.split() for row in rows]
    # the README's counts, and what timm builds
    assert [row[:3] for row in rows] == [
        ['capsnet_simple_cifar10', '561,297', '3x32x32'],
        ['em_capsnet_simple_cifar10', '452,500', '3x32x32'],
    ]
    for name, params, _, _ in rows:
        assert int(params.replace(',', '')) == _described(name)[0]


@pytest.mark.slow  # builds and runs every registered model (about 25 s on 2 cores)
def test_module_lists_every_registered_model_with_its_parameter_count():
    result = subprocess.run(
        [sys.executable, '-m', 'timm_capsules', '--json', '--batch-size', '1'],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE='1'),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    names = timm.list_models(module=MODULES)
    assert len(names) >= 21  # at least the README's 6 CapsNets and 15 baselines
    assert [row['model'] for row in rows] == names
    for row in rows:
        assert (row['params'], row['input_size']) == _described(row['model']), row
        assert row['batch_size'] == 1 and isinstance(row['forward_ms'], float)


def test_forward_time_is_the_median_of_warm_passes(monkeypatch):
    """One warm-up pass, then the median of the timed ones: a slow first call does not count."""
    calls = []

    class Model(torch.nn.Module):
        def forward(self, x):
            calls.append(len(calls))
            return x

    ticks = iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.009])  # timed passes of 5, 1 and 9 ms
    monkeypatch.setattr(cli.time, 'perf_counter', lambda: next(ticks))
    assert cli.forward_ms(Model(), torch.zeros(1), repeats=3) == pytest.approx(5.0)
    assert len(calls) == 4  # the warm-up and three timed passes
