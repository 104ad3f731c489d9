"""The Triton routing kernels (the GPU's fused pass, ``routing_triton.py``) without a GPU: their arithmetic in
Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors) against the plain-op reference, outputs and every
gradient, alone and inside a CapsNet's training step (the op's CPU kernel swapped for them); their compilation
for Hopper; and when the layers ask for them. On a GPU, ``tests/test_cuda.py`` runs them inside a model.

The interpreter is chosen when Triton decorates a kernel, so the kernels run in a child process that starts with
it set (``python tests/test_routing_triton.py`` prints that process's findings as JSON).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_capsules.layers import ConvCapsules, FCCapsules
from timm_capsules.kernels import supports_triton

ROOT = Path(__file__).resolve().parents[1]

# name: (batch, grid size, child types, kernel size, stride, parent types, activations, with_routing, extra grads)
CASES = {
    'conv k3 s1': (1, 5, 2, 3, 1, 4, False, False, False),
    'conv k3 s2, 3 parents padded to 4, activations, routing returned and differentiated': (
        2,
        5,
        2,
        3,
        2,
        3,
        True,
        True,
        True,
    ),
    'one 3x3 window over a 3x3 grid, 10 parents padded to 16': (1, 3, 3, 3, 1, 10, False, True, True),
    'a fully connected layer as the layers pass it: a 1x1 window of every child, per image': (
        2,
        1,
        7,
        1,
        1,
        10,
        True,
        False,
        True,
    ),
}


def run_cases() -> dict:
    """In the interpreter's process: each case's largest error, relative to the reference's largest entry."""
    from timm_capsules.routing import (
        _attention_routing_backward_reference,
        attention_routing,
        capsule_votes,
        window_children,
    )
    from timm_capsules.routing_triton import routing_backward, routing_forward

    errors = {}
    for name, (B, H, N, k, s, J, with_activations, with_routing, extra_grads) in CASES.items():
        torch.manual_seed(0)
        Ho = (H - k) // s + 1
        G, I = B * Ho * Ho, k * k * N
        children, weight = torch.randn(B, H, H, N, 4, 4), torch.randn(I, J, 4, 4) * 0.5
        parents = torch.randn(G, J, 4, 4)
        activations = torch.rand(B, H, H, N) if with_activations else None
        got = routing_forward(children, weight, parents, activations, k, s, with_routing)
        window_activations = None if activations is None else window_children(activations, k, s)
        want = attention_routing(capsule_votes(window_children(children, k, s), weight), parents, window_activations)
        names = ['poses', 'coefficients', 'agreement'] if with_routing else ['poses']
        grads = (
            torch.randn_like(parents),
            torch.randn(G, I, J) if extra_grads else None,
            torch.randn(G, I, J) if extra_grads else None,
        )
        got += routing_backward(*grads, children, weight, parents, activations, k, s, windows_per_program=3)
        want += _attention_routing_backward_reference(*grads, children, weight, parents, activations, k, s)
        names += ['d_children', 'd_weight', 'd_parents'] + (['d_activations'] if with_activations else [])
        pairs = dict(
            zip(
                ['poses', 'coefficients', 'agreement', 'd_children', 'd_weight', 'd_parents', 'd_activations'],
                zip(got, want),
            )
        )
        errors[name] = {
            key: ((pairs[key][0] - pairs[key][1]).abs().max() / pairs[key][1].abs().max()).item() for key in names
        }
    errors['a CapsNet step'] = capsnet_step_errors(routing_forward, routing_backward)
    return errors


def capsnet_step_errors(routing_forward, routing_backward) -> dict:
    """A small CapsNet (4x4 poses; a stride-2 and a stride-1 conv capsule layer, then 10 class capsules; t = 4)
    whose capsule layers ask for the fused op, with the op's CPU kernel swapped for the Triton kernels, as the GPU
    runs them: the layers' layouts, the op's autograd and the padded class layer, end to end. Against the same
    model in plain tensor ops: the logits and every parameter's gradient."""
    import copy
    import timm
    from timm_capsules import routing
    from timm_capsules.layers import RoutedCapsules

    calls = {'forward': 0, 'backward': 0}

    def counted(kind, kernel):
        def run(*args):
            calls[kind] += 1
            return kernel(*args)

        return run

    routing._attention_routing_op.register_kernel('cpu')(counted('forward', routing_forward))
    routing._attention_routing_backward_op.register_kernel('cpu')(counted('backward', routing_backward))
    torch.manual_seed(0)
    plain = timm.create_model(
        'capsnet_simple_cifar10',
        img_size=16,
        backbone_args=dict(out_chs=8),
        primary_caps=4,
        capsule_layers=[('conv', 4, 3, 2), ('conv', 4, 3, 1)],
        iterations=4,
    ).eval()
    fused = copy.deepcopy(plain)
    for model, enable in ((plain, False), (fused, True)):
        for layer in model.modules():
            if isinstance(layer, RoutedCapsules):
                layer.fused_routing = enable  # the pose norms stay plain: only the routing is under test
    x = torch.randn(2, 3, 16, 16)
    errors = {}
    outputs = [model(x) for model in (plain, fused)]
    errors['logits'] = ((outputs[1] - outputs[0]).abs().max() / outputs[0].abs().max()).item()
    grads = [
        torch.autograd.grad(out.square().sum(), list(model.parameters())) for out, model in zip(outputs, (plain, fused))
    ]
    for (name, _), want, got in zip(plain.named_parameters(), *grads):
        errors[name] = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    return dict(errors=errors, calls=calls)


@pytest.fixture(scope='module')
def interpreted():
    pytest.importorskip('triton')
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('case', CASES)
def test_triton_kernels_match_the_plain_ops(interpreted, case):
    errors = interpreted[case]
    assert 'poses' in errors and 'd_weight' in errors and 'd_children' in errors
    assert max(errors.values()) < 1e-5, errors


def test_a_capsnet_step_through_the_triton_kernels_matches_the_plain_ops(interpreted):
    step = interpreted['a CapsNet step']
    # t = 4: the conv capsule layers route 1 and 2 passes that reach the logits, the class capsules 3
    assert step['calls'] == {'forward': 6, 'backward': 6}
    errors = step['errors']
    routed = [
        name
        for name in errors
        if name in ('capsule_layers.0.weight', 'capsule_layers.1.weight', 'head.capsules.weight')
    ]
    assert len(routed) == 3 and 'logits' in errors  # every routed layer's weight has a gradient to compare
    assert max(errors.values()) < 1e-4, errors


# every variant the host functions launch for the paper's 4x4 poses: 32 parents (conv layers), 16 (class layer)
VARIANTS = {
    '_forward_kernel': [dict(HAS_ACT=False, WITH_ROUTING=False), dict(HAS_ACT=True, WITH_ROUTING=True)],
    '_backward_window_kernel': [
        dict(HAS_ACT=False, HAS_GC=False, HAS_GA=False),
        dict(HAS_ACT=True, HAS_GC=True, HAS_GA=True),
    ],
    '_backward_weight_kernel': [
        dict(WINDOWS=64, HAS_ACT=False, HAS_GC=False, HAS_GA=False),
        dict(WINDOWS=64, HAS_ACT=True, HAS_GC=True, HAS_GA=True),
    ],
}


@pytest.mark.parametrize('parents', [32, 16])
@pytest.mark.parametrize('kernel', VARIANTS)
def test_triton_kernels_compile_for_hopper_without_spills(kernel, parents, tmp_path):
    """No GPU needed to compile: each kernel lowers to PTX for sm_90 (H100/H200), and ptxas places it in registers
    with nothing spilled to local memory (a spill would put every child's votes through memory)."""
    triton = pytest.importorskip('triton')
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from timm_capsules import routing_triton

    ptxas = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'ptxas'
    if not ptxas.exists():
        pytest.skip(f'no ptxas in this Triton install ({ptxas})')
    fn = getattr(routing_triton, kernel)
    for flags in VARIANTS[kernel]:
        constexprs = dict(flags, BLOCK_J=parents, R=4, C=4, T=4)
        absent = {
            'activations': flags['HAS_ACT'],
            'd_activations': flags['HAS_ACT'],
            'grad_coef': flags.get('HAS_GC', True),
            'grad_agree': flags.get('HAS_GA', True),
        }
        constexprs.update({name: None for name, present in absent.items() if not present and name in fn.arg_names})
        integers = {'H', 'W', 'N', 'Ho', 'Wo', 'G', 'I', 'J', 'KS', 'stride'}
        signature = {
            name: 'constexpr'
            if name in constexprs
            else 'i32'
            if name in integers
            else 'fp32'
            if name == 'scale'
            else '*fp32'
            for name in fn.arg_names
        }
        source = ASTSource(
            fn=fn,
            signature=signature,
            constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()},
        )
        compiled = triton.compile(source, target=GPUTarget('cuda', 90, 32))
        ptx = tmp_path / f'{kernel}.ptx'
        ptx.write_text(compiled.asm['ptx'])
        report = subprocess.run(
            [str(ptxas), '-v', '--gpu-name', 'sm_90a', str(ptx), '-o', os.devnull],
            capture_output=True,
            text=True,
            check=True,
        )
        assert '0 bytes spill stores' in report.stderr + report.stdout, (flags, report.stderr)


def test_the_op_runs_the_triton_kernels_on_cuda():
    for op in ('attention_routing', 'attention_routing_backward'):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f'timm_capsules::{op}', 'CUDA'), op


def test_triton_kernels_take_the_paper_shapes_only():
    assert supports_triton(4, (288, 32, 4, 4)) and supports_triton(4, (800, 10, 4, 4))  # conv layers, class layer
    assert not supports_triton(1, (1152, 10, 64, 64))  # 64-d vector poses: 16 x 64 x 64 products per child
    assert not supports_triton(3, (27, 8, 3, 3))  # 3x3 poses: not a power of 2


class _OnCuda:
    """What a layer's dispatch reads of a pose tensor, as a CUDA one (no GPU needed)."""

    device = torch.device('cuda')


@pytest.mark.parametrize('layer', [ConvCapsules(8, 8, 16, 3, 1), FCCapsules(8, 10, 16)], ids=['conv', 'fc'])
def test_layers_ask_for_the_triton_kernels_only_when_enabled(monkeypatch, layer):
    layer.fused_routing = True
    monkeypatch.delenv('TIMM_CAPSULES_TRITON_ROUTING', raising=False)
    assert not layer._fused(_OnCuda())  # off by default: not yet measured on a GPU
    monkeypatch.setenv('TIMM_CAPSULES_TRITON_ROUTING', '1')
    triton_installed = __import__('importlib').util.find_spec('triton') is not None
    assert layer._fused(_OnCuda()) == triton_installed
    layer.fused_routing = False  # set_fused_routing(False) / TIMM_CAPSULES_FUSED_ROUTING=0: plain ops everywhere
    assert not layer._fused(_OnCuda())


if __name__ == '__main__':
    print(json.dumps(run_cases()))
