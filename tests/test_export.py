"""Deployment export: torch.export with a dynamic batch, ONNX through onnxruntime, and exported programs
that run where neither timm_capsules nor timm is installed.

Every paper CapsNet and one model of each baseline family is exported. Export records routing as plain
tensor ops (the fused CPU kernel is this package's own custom op, and chunking would depend on the batch
size), and the eager reference keeps the default settings, so the fused kernel's logits are compared with
the exported plain ops'.
"""

import fnmatch
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch
from torch.export import Dim

import timm_capsules  # noqa: F401  (registers the models)

OUR_MODELS = sorted(
    name for name in timm.list_models() if timm.models.model_entrypoint(name).__module__.startswith('timm_capsules.')
)
PAPER_MODELS = fnmatch.filter(OUR_MODELS, 'capsnet_*')
# one model of each baseline family, by the name pattern of the family
BASELINE_FAMILIES = {
    'dynamic_capsnet_*': 'dynamic_capsnet_simple_cifar10',
    'em_capsnet_*': 'em_capsnet_simple_cifar10',
    'cnn_*': 'cnn_baseline_cifar10',
    'resnet18_*': 'resnet18_cifar10',
}
EXPORTED = PAPER_MODELS + list(BASELINE_FAMILIES.values())
SLOW_TORCH_EXPORT = {'em_capsnet_simple_cifar10'}
SLOW_ONNX = {
    'capsnet_resnet_cifar10',
    'capsnet_resnet_cifar100',
    'capsnet_vector_multimnist',
    'em_capsnet_simple_cifar10',
}
EXAMPLE_BATCH, CHECKED_BATCHES = 2, (1, 3)  # the batch sizes run differ from the one exported with

# run an exported program (argv[1]) on saved inputs (argv[2:]) in a fresh interpreter
RUN_ONNX = textwrap.dedent("""
    import numpy as np
    import onnxruntime
    session = onnxruntime.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])
    for path in sys.argv[2:]:
        logits, = session.run(None, {session.get_inputs()[0].name: np.load(path)})
        np.save(path + '.out.npy', logits)
""")
RUN_PT2 = textwrap.dedent("""
    import numpy as np
    import torch
    module = torch.export.load(sys.argv[1]).module()
    for path in sys.argv[2:]:
        with torch.no_grad():
            np.save(path + '.out.npy', module(torch.from_numpy(np.load(path))).numpy())
""")


def _params(names, slow):
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in names]


def _model_and_inputs(model_name: str, fused_routing: bool = True):
    torch.manual_seed(0)
    model = timm.create_model(model_name).eval()
    if not fused_routing:
        model.set_fused_routing(False)
    input_size = model.pretrained_cfg['input_size']
    inputs = {batch: torch.randn(batch, *input_size) for batch in (EXAMPLE_BATCH,) + CHECKED_BATCHES}
    return model, inputs


def _assert_logits_equal(actual, expected):
    """Equal to 1e-4 relative to the largest logit (the fused kernel and plain ops sum in another order)."""
    actual = torch.as_tensor(actual)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def _dynamic_batch():
    return ({0: Dim('batch', min=1, max=4096)},)


def _run_isolated(script: str, program, batch_inputs, tmp_path, blocked):
    """Runs ``script`` on ``program`` in a fresh interpreter that cannot import ``blocked``; returns its
    logits for each batch of ``batch_inputs``."""
    paths = []
    for batch, x in batch_inputs.items():
        paths.append(tmp_path / f'input_{batch}.npy')
        np.save(paths[-1], x.numpy())
    block = f'import sys\nfor name in {list(blocked)!r}:\n    sys.modules[name] = None  # import fails\n'
    result = subprocess.run(
        [sys.executable, '-c', block + script, str(program), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {batch: np.load(f'{path}.out.npy') for batch, path in zip(batch_inputs, paths)}


def test_every_registered_model_is_in_an_exported_family():
    assert len(PAPER_MODELS) == 6
    for pattern, name in BASELINE_FAMILIES.items():
        assert name in OUR_MODELS and fnmatch.fnmatch(name, pattern)
    families = ['capsnet_*', *BASELINE_FAMILIES]
    assert [name for name in OUR_MODELS if not any(fnmatch.fnmatch(name, f) for f in families)] == []


@pytest.mark.parametrize('model_name', _params(EXPORTED, SLOW_TORCH_EXPORT))
def test_torch_export_dynamic_batch(model_name):
    model, inputs = _model_and_inputs(model_name)
    program = torch.export.export(model, (inputs[EXAMPLE_BATCH],), dynamic_shapes=_dynamic_batch())
    namespaces = {
        node.target.namespace
        for node in program.graph.nodes
        if node.op == 'call_function' and isinstance(node.target, torch._ops.OpOverload)
    }
    assert namespaces == {'aten'}, 'the exported program needs ops from outside PyTorch'
    with torch.no_grad():
        for batch in CHECKED_BATCHES:
            _assert_logits_equal(program.module()(inputs[batch]), model(inputs[batch]))


@pytest.mark.parametrize('model_name', ['capsnet_simple_cifar10', 'capsnet_resnet_cifar100'])
def test_torch_export_dynamic_batch_plain_routing(model_name):
    """With the fused kernel off, eager mode routes a pass in chunks once its vote tensor would exceed
    ``max_votes``; export must not turn that size test into a guard on the batch size (which failed)."""
    model, inputs = _model_and_inputs(model_name, fused_routing=False)
    program = torch.export.export(model, (inputs[EXAMPLE_BATCH],), dynamic_shapes=_dynamic_batch())
    with torch.no_grad():
        for batch in CHECKED_BATCHES:
            _assert_logits_equal(program.module()(inputs[batch]), model(inputs[batch]))


@pytest.mark.parametrize('model_name', _params(EXPORTED, SLOW_ONNX))
def test_onnx_export_runs_in_onnxruntime_alone(model_name, tmp_path):
    """The ONNX file, exported with the default settings, runs in onnxruntime with the logits of eager
    PyTorch at two batch sizes, in a process that can import neither torch, timm nor timm_capsules."""
    model, inputs = _model_and_inputs(model_name)
    path = tmp_path / f'{model_name}.onnx'
    torch.onnx.export(model, (inputs[EXAMPLE_BATCH],), path, dynamo=True, dynamic_shapes=_dynamic_batch())
    checked = {batch: inputs[batch] for batch in CHECKED_BATCHES}
    logits = _run_isolated(RUN_ONNX, path, checked, tmp_path, ['torch', 'timm', 'timm_capsules'])
    with torch.no_grad():
        for batch, x in checked.items():
            _assert_logits_equal(logits[batch], model(x))


@pytest.mark.slow
def test_saved_torch_export_runs_without_the_package(tmp_path):
    """A ``.pt2`` of a paper CapsNet (fused routing on) loads and runs with torch alone."""
    model, inputs = _model_and_inputs('capsnet_simple_cifar10')
    assert model.fused_routing
    program = torch.export.export(model, (inputs[EXAMPLE_BATCH],), dynamic_shapes=_dynamic_batch())
    path = tmp_path / 'capsnet_simple_cifar10.pt2'
    torch.export.save(program, path)
    checked = {batch: inputs[batch] for batch in CHECKED_BATCHES}
    logits = _run_isolated(RUN_PT2, path, checked, tmp_path, ['timm', 'timm_capsules'])
    with torch.no_grad():
        for batch, x in checked.items():
            _assert_logits_equal(logits[batch], model(x))
