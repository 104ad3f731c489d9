"""Tests of timm_capsules/train/models.py and saving.py: each model family loads its own routing kernel up
front (timed apart from training), mixed precision on the CPU, a baseline trained with its preset, the push to
the Hub chosen by architecture, and non-finite weights never saved."""

import json
import math
import re
import time

import pytest
import torch

import timm
import timm_capsules  # noqa: F401
from timm_capsules import hub
from timm_capsules import kernels
from timm_capsules.train.models import load_routing_kernel
from timm_capsules.train.saving import push_to_hub, save_model

from train_fixtures import TINY, independent_metrics, assert_metrics, mean_std, multimnist_test_images, spy_on_model


def test_kernel_build_is_timed_apart_from_training(run, tmp_path, capsys, monkeypatch):
    """The one-off kernel build (here a stand-in that takes 1 s) is loaded up front and reported on its own."""
    calls = []
    real_preload = kernels.preload

    def slow_preload(model, device):  # the real one, then as long as a first build takes at least
        calls.append(1)
        seconds = real_preload(model, device)
        time.sleep(1.0)
        return seconds + 1.0

    monkeypatch.setattr(kernels, 'preload', slow_preload)
    results = run(TINY + ['--cpu', '--max-train-steps', 1, '--output-dir', tmp_path])
    assert len(calls) == 1
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert metrics['kernel_load_s'] == results['kernel_load_s'] >= 1.0
    assert metrics['wall_time_s'] >= metrics['training_time_s'] + metrics['kernel_load_s']
    assert (
        f'\n{metrics["training_time_s"]:.0f} s of training, routing kernel built/loaded in '
        f'{metrics["kernel_load_s"]:.0f} s; saved to {tmp_path}\n'
    ) in capsys.readouterr().out


@pytest.mark.parametrize(
    'model, kernel', [('em_capsnet_simple_cifar10', 'em_routing_kernel'), ('capsnet_simple_cifar10', 'routing_kernel')]
)
def test_each_family_loads_its_own_kernel_up_front(monkeypatch, model, kernel):
    from accelerate import Accelerator

    calls = {name: [] for name in ('routing_kernel', 'em_routing_kernel')}
    for name in calls:
        monkeypatch.setattr(kernels, name, lambda name=name: calls[name].append(1))
    load_routing_kernel(timm.create_model(model, img_size=28, in_chans=1), Accelerator(cpu=True))
    assert {name: len(c) for name, c in calls.items()} == {n: int(n == kernel) for n in calls}
    monkeypatch.setenv('TIMM_CAPSULES_FUSED_ROUTING', '0')  # plain tensor ops: nothing to build
    assert load_routing_kernel(timm.create_model(model, img_size=28, in_chans=1), Accelerator(cpu=True)) == 0.0
    assert sum(map(len, calls.values())) == 1


@pytest.mark.parametrize('precision, dtype', [('no', torch.float32), ('bf16', torch.bfloat16)])
def test_mixed_precision_on_the_cpu(run, tmp_path, monkeypatch, capsys, precision, dtype):
    """--mixed_precision bf16 runs every forward (training and evaluation) under CPU autocast; fp16 is refused
    on the CPU (see test_bad_arguments_stop_with_one_line)."""
    calls = spy_on_model(monkeypatch)
    results = run(TINY + ['--cpu', '--mixed_precision', precision, '--max-train-steps', 2, '--output-dir', tmp_path])
    assert [call['training'] for call in calls] == [True, True] + [False] * 3  # 2 steps, 37 test images by 16
    assert all(call['autocast'] == (precision == 'bf16') and call['dtype'] == dtype for call in calls)
    assert results['args']['mixed_precision'] == precision and f'mixed precision {precision}' in capsys.readouterr().out
    assert all(math.isfinite(r['loss']) for r in results['history']['train'] + results['history']['eval'])
    final = results['final']
    assert final['num_images'] == 37 and final['exact_match'] * 37 == pytest.approx(round(final['exact_match'] * 37))
    assert final['macro_f1'] == pytest.approx(sum(final['per_class_f1']) / 10)


@pytest.mark.slow
def test_dynamic_routing_baseline_trains_with_its_preset(run, tmp_path):
    out = tmp_path / 'dr'
    run(
        [
            '--preset',
            'multimnist_dynamic_vector',
            '--model-kwargs',
            "backbone_args={'out_chs': 16}",
            '--mnist-source',
            'sample',
            '--batch-size',
            '4',
            '--epoch-size',
            '8',
            '--test-size',
            '6',
            '--max-train-steps',
            '2',
            '--output-dir',
            out,
        ]
    )
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['args']['opt'] == 'adam' and metrics['args']['lr'] == 1e-3
    # capsule lengths: margin loss, and a class is present when its length is over 0.5
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert reloaded.output_type == 'lengths'
    images, targets = multimnist_test_images(6, *mean_std(reloaded))
    assert_metrics(metrics['final'], independent_metrics(reloaded, images, targets, True, returns='lengths'))


def test_push_to_hub_chooses_by_architecture_name(tmp_path, monkeypatch):
    """A paper architecture built as registered goes through timm_capsules.hub (its card describes exactly that
    model); the same architecture with other create_model arguments, or a model without a hub config, goes
    through timm's push_to_hf_hub."""
    calls = []
    monkeypatch.setattr(hub, 'push_checkpoint', lambda *a, **k: calls.append(('hub', a, k)))
    monkeypatch.setattr(timm.models, 'push_to_hf_hub', lambda *a, **k: calls.append(('timm', a, k)))
    paper = timm.create_model('capsnet_simple_cifar10', num_classes=10)
    push_to_hub(paper, {'num_classes': 10}, tmp_path, 'me/paper', False, None)
    shrunk = timm.create_model('capsnet_simple_cifar10', backbone_args={'out_chs': 8})
    push_to_hub(shrunk, {'backbone_args': {'out_chs': 8}}, tmp_path, 'me/shrunk', True, ['a'] * 10)
    baseline = timm.create_model('cnn_baseline_multimnist', device='meta')
    push_to_hub(baseline, {}, tmp_path, 'me/cnn', False, None)
    assert [c[0] for c in calls] == ['hub', 'timm', 'timm']
    assert calls[0][1][:2] == (tmp_path, 'me/paper')
    assert calls[1][2]['safe_serialization'] is True and calls[1][2]['private'] is True
    assert calls[1][2]['model_config'] == dict(label_names=['a'] * 10)


def test_save_model_refuses_non_finite_weights(tmp_path):
    model = timm.create_model('cnn_baseline_multimnist')
    with torch.no_grad():
        model.get_classifier().weight[0, 0] = float('nan')
    name = next(k for k, v in model.state_dict().items() if v.isnan().any())
    with pytest.raises(
        SystemExit,
        match=rf'the final model has non-finite values \(nan/inf\) in {re.escape(name)}; '
        r'not saved$',
    ):
        save_model(model, tmp_path, None, dict(mean=(0.0,), std=(1.0,)))
    assert not any(tmp_path.iterdir())
