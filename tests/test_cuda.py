"""The models on a CUDA GPU: the CPU's numbers, bf16 autocast, torch.compile, memory bounded by ``max_votes``, the
Triton routing kernels, and the training script. On a GPU the capsule layers route in plain tensor ops by default (the
Triton kernels are opt-in until measured), so these tests compare the GPU against the CPU's plain-op reference.

CI has no GPU: there, and on any machine without one, every test here skips. ``benchmarks/gpu_check.sh`` runs them
(without the suite's conftest, which builds the CPU kernels), with the GPU benchmarks, on a machine that has one.
"""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import timm
import timm_capsules  # noqa: F401

from compiled import assert_compiled_matches_eager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA GPU on this machine')

DEVICE = 'cuda'
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def plain_ops_on_the_cpu(monkeypatch):
    """The CPU reference routes in plain tensor ops, as the GPU does (and no kernel is built on the GPU machine)."""
    monkeypatch.setenv('TIMM_CAPSULES_FUSED_ROUTING', '0')


@pytest.fixture(autouse=True)
def full_float32():
    """TF32 rounds convolutions and matmuls to 10-bit mantissas: GPU and CPU are compared in full float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cpu_and_gpu(name, **kwargs):
    """The model on the CPU in plain tensor ops (the reference), and the same weights on the GPU. In eval mode:
    a training-mode BatchNorm over a few images makes the backbone's gradients ill-conditioned (float32 lands about
    1% of their largest entry from float64, on the CPU alone, eager or compiled)."""
    torch.manual_seed(0)
    cpu = timm.create_model(name, **kwargs).eval()
    return cpu, copy.deepcopy(cpu).to(DEVICE)


def assert_same_step(cpu, gpu, x):
    """Outputs to 1e-4, every parameter's gradient to 1e-3 of its largest entry: on the CPU alone, float32 lands up to
    6e-5 of it from float64 (EM routing's variances; 2e-6 to 4e-6 for the other models)."""
    out_cpu, out_gpu = cpu(x), gpu(x.to(DEVICE))
    assert out_gpu.device.type == DEVICE
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-4)
    grads_cpu = torch.autograd.grad(out_cpu.square().sum(), list(cpu.parameters()))
    grads_gpu = torch.autograd.grad(out_gpu.square().sum(), list(gpu.parameters()))
    for (name, _), g, e in zip(cpu.named_parameters(), grads_gpu, grads_cpu):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-3, atol=1e-3 * e.abs().max().item(), msg=name)


@pytest.mark.parametrize(
    'name, kwargs',
    [
        ('capsnet_resnet_cifar10', dict(iterations=2)),
        ('capsnet_resnet_cifar10', dict(iterations=5)),
        ('capsnet_matrix_multimnist', {}),
        ('em_capsnet_simple_cifar10', {}),
        ('dynamic_capsnet_simple_cifar10', {}),
    ],
)
def test_gpu_step_matches_the_cpu(name, kwargs):
    cpu, gpu = cpu_and_gpu(name, **kwargs)
    assert_same_step(cpu, gpu, torch.randn(4, *cpu.pretrained_cfg['input_size']))


def test_triton_routing_matches_the_cpu(monkeypatch):
    """TIMM_CAPSULES_TRITON_ROUTING=1: the capsule layers route through the Triton kernels (routing_triton.py),
    which never store votes, and the step still equals the CPU's plain-op reference."""
    from timm_capsules import routing_triton
    from timm_capsules.layers import RoutedCapsules

    monkeypatch.setenv('TIMM_CAPSULES_TRITON_ROUTING', '1')
    calls = {'forward': 0, 'backward': 0}
    for kind in calls:
        original = getattr(routing_triton, f'routing_{kind}')

        def counted(*args, kind=kind, original=original, **kwargs):
            calls[kind] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(routing_triton, f'routing_{kind}', counted)
    cpu, gpu = cpu_and_gpu('capsnet_resnet_cifar10', iterations=4)
    for layer in gpu.modules():
        if isinstance(layer, RoutedCapsules):
            layer.fused_routing = True  # the fixture routes the CPU reference in plain ops, and the copy with it
    assert_same_step(cpu, gpu, torch.randn(4, 3, 32, 32))
    # t = 4: the conv layers route 1 and 2 passes that reach the logits, the class layer 3
    assert calls['forward'] == calls['backward'] == 6, calls


def test_chunked_routing_bounds_gpu_memory():
    """Votes of more than ``max_votes`` elements are formed chunk by chunk and recomputed in the backward pass:
    the peak of a training step falls to a fraction, with the same gradients."""
    peaks, grads = [], []
    for max_votes in (None, 2**22):  # t = 4: the first layer's pass forms 115M votes at batch 16
        torch.manual_seed(0)
        model = timm.create_model('capsnet_resnet_cifar10', iterations=4, max_votes=max_votes).to(DEVICE).eval()
        x = torch.randn(16, 3, 32, 32, device=DEVICE)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        grads.append(torch.autograd.grad(model(x).square().sum(), list(model.parameters())))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - start)
    assert peaks[1] < peaks[0] / 2, peaks
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


def test_bf16_autocast_training_step():
    """Under bf16 autocast the logits stay near float32's and every gradient is finite."""
    _, gpu = cpu_and_gpu('capsnet_resnet_cifar10', iterations=3)
    x = torch.randn(8, 3, 32, 32, device=DEVICE)
    expected = gpu(x)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = gpu(x)
    torch.testing.assert_close(out.float(), expected, rtol=0.1, atol=0.1 * expected.abs().max().item())
    grads = torch.autograd.grad(out.float().square().sum(), list(gpu.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_compiled_training_step_matches_eager():
    _, gpu = cpu_and_gpu('capsnet_resnet_cifar10', iterations=3)
    assert_compiled_matches_eager(gpu, torch.randn(4, 3, 32, 32, device=DEVICE), tol=1e-4, grad_rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize('precision', ['no', 'bf16', 'fp16'])
def test_training_script_trains_on_the_gpu(tmp_path, precision):
    """train_accelerate.py without --cpu: accelerate puts the model on the GPU; fp16 (refused on the CPU) runs
    with its gradient scaler."""
    pytest.importorskip('datasets')  # a GPU machine may hold torch and timm but not the data side
    tiny = [
        '--model-kwargs',
        "backbone_args={'out_chs': 8}",
        'primary_caps=4',
        'pose_dim=4',
        "capsule_layers=[('conv', 4, 3, 1)]",
        '--mnist-source',
        'sample',
        '--batch-size',
        '8',
        '--epoch-size',
        '40',
        '--test-size',
        '37',
        '--log-every',
        '2',
        '--lr',
        '0.01',
    ]
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / 'train_accelerate.py'),
            *tiny,
            '--mixed_precision',
            precision,
            '--max-train-steps',
            '4',
            '--output-dir',
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'cuda' in done.stdout
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert metrics['args']['mixed_precision'] == precision
    assert all(math.isfinite(r['loss']) for r in metrics['history']['train'])
