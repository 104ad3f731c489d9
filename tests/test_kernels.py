"""The fused kernels against the plain tensor ops they are tested against (the attention pass, over groups and
over grid windows, and the pose norm), the switches between them, ``preload``, and the build cache.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from timm_capsules import kernels, layers
from timm_capsules.routing import attention_routing, capsule_votes, fused_attention_routing

from ci import unavailable
from compiled import assert_compiled_matches_eager
from naive_routing import float64, naive_capsnet_logits, tiny_capsnet  # noqa: F401  (float64: an autouse fixture)


# ---- the fused CPU kernel against the plain tensor ops ------------------------------------------------


def routing_inputs(groups, children, parents, rows, cols, parent_cols, activations, dtype=torch.float32):
    torch.manual_seed(9)
    tensors = [
        torch.randn(groups, children, rows, cols, dtype=dtype),
        torch.randn(children, parents, cols, parent_cols, dtype=dtype) * 0.5,
        torch.randn(groups, parents, rows, parent_cols, dtype=dtype),
    ]
    if activations:
        tensors.append(torch.rand(groups, children, dtype=dtype))
    return [t.requires_grad_() for t in tensors]


ROUTING_SHAPES = [  # groups, children, parents, rows, cols, parent cols
    (6, 18, 5, 4, 4, 4),  # 4x4 matrix poses, a conv window
    (3, 11, 4, 1, 8, 5),  # vector poses changing dimension
    (2, 30, 10, 3, 3, 3),  # 3x3 matrix poses, more parents
    (3, 9, 32, 4, 4, 4),  # the paper's 32 parent types: 4 x 32 pose columns, the kernel's 16-lane paths
    (4, 13, 10, 4, 4, 4),  # a class layer's 10 parents: padded to the 16-parent path, the padding masked out
    (3, 7, 20, 4, 4, 4),  # 4x4 poses in the generic loops (more than 16 parents, not 32)
]


@pytest.mark.parametrize('activations', [False, True])
@pytest.mark.parametrize('shape', ROUTING_SHAPES)
def test_fused_routing_equals_tensor_ops_fp32(shape, activations, kernel):
    """Poses, coefficients, agreement and every input gradient, in float32, to 1e-5."""
    inputs = routing_inputs(*shape, activations)
    children, weight, parents, acts = inputs + [None] * (4 - len(inputs))
    expected = attention_routing(capsule_votes(children, weight), parents, acts)
    got = fused_attention_routing(children, weight, parents, acts)
    probes = [torch.randn_like(e) for e in expected]
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    loss = lambda outputs: sum((o * p).sum() for o, p in zip(outputs, probes))  # noqa: E731
    for g, e in zip(torch.autograd.grad(loss(got), inputs), torch.autograd.grad(loss(expected), inputs)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def grid_inputs(batch, height, width, types, kernel_size, stride, parents, activations, dtype=torch.float32):
    """A 4x4-pose child grid, weights for its windows, parents for every window, optional activations."""
    torch.manual_seed(3)
    out_h, out_w = (height - kernel_size) // stride + 1, (width - kernel_size) // stride + 1
    tensors = [
        torch.randn(batch, height, width, types, 4, 4, dtype=dtype),
        torch.randn(kernel_size * kernel_size * types, parents, 4, 4, dtype=dtype) * 0.5,
        torch.randn(batch * out_h * out_w, parents, 4, 4, dtype=dtype),
    ]
    if activations:
        tensors.append(torch.rand(batch, height, width, types, dtype=dtype))
    return [t.requires_grad_() for t in tensors]


def copied_windows(grid, kernel_size, stride):
    """Every window copied out one by one: (b, y, x) windows of (ky, kx, type) children, trailing axes kept."""
    B, H, W = grid.shape[:3]
    k, s = kernel_size, stride
    return torch.stack(
        [
            grid[b, y : y + k, x : x + k].reshape(-1, *grid.shape[4:])
            for b in range(B)
            for y in range(0, H - k + 1, s)
            for x in range(0, W - k + 1, s)
        ]
    )


@pytest.mark.parametrize('activations', [False, True])
@pytest.mark.parametrize('window, parents', [((3, 1), 5), ((3, 2), 32), ((2, 2), 16)])
def test_fused_routing_over_grid_windows_equals_copied_windows(window, parents, activations, kernel):
    """The kernel reads a conv layer's windows from the grid and adds their gradients back into it; the
    reference copies every window out first. Outputs and gradients, in float32, to 1e-5."""
    inputs = grid_inputs(2, 7, 6, 3, *window, parents=parents, activations=activations)
    grid, weight, parents, acts = inputs + [None] * (4 - len(inputs))
    expected = attention_routing(
        capsule_votes(copied_windows(grid, *window), weight),
        parents,
        None if acts is None else copied_windows(acts, *window),
    )
    got = fused_attention_routing(grid, weight, parents, acts, window=window)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    probes = [torch.randn_like(e) for e in expected]
    loss = lambda outputs: sum((o * p).sum() for o, p in zip(outputs, probes))  # noqa: E731
    for g, e in zip(torch.autograd.grad(loss(got), inputs), torch.autograd.grad(loss(expected), inputs)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_gradcheck_fused_routing_over_grid_windows(kernel):
    inputs = grid_inputs(2, 4, 3, 2, 2, 1, parents=3, activations=True, dtype=torch.float64)
    route = lambda *t: fused_attention_routing(*t, window=(2, 1))  # noqa: E731
    assert torch.autograd.gradcheck(route, inputs)


def test_fused_routing_over_grid_windows_keeps_only_the_grid(kernel):
    """The windows (here 9/4 of the grid) are neither copied for the kernel nor kept for its backward pass."""
    grid, weight, parents = grid_inputs(2, 9, 9, 4, 3, 2, parents=4, activations=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fused_attention_routing(grid, weight, parents, with_routing=False, window=(3, 2))
    assert max(saved) == grid.numel() < copied_windows(grid, 3, 2).numel()


def test_fused_routing_without_coefficients_gives_the_same_poses_and_gradients(kernel):
    inputs = routing_inputs(*ROUTING_SHAPES[0], activations=True)
    poses, coefficients, agreement = fused_attention_routing(*inputs, with_routing=False)
    assert coefficients is None and agreement is None
    expected = attention_routing(capsule_votes(*inputs[:2]), *inputs[2:])[0]
    torch.testing.assert_close(poses, expected, rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(expected)
    for g, e in zip(
        torch.autograd.grad((poses * probe).sum(), inputs), torch.autograd.grad((expected * probe).sum(), inputs)
    ):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('activations', [False, True])
@pytest.mark.parametrize('pose', [(2, 2, 3), (4, 4, 4)])  # any shape, and the 4x4 poses the kernel unrolls
def test_gradcheck_fused_routing(pose, activations, kernel):
    inputs = routing_inputs(3, 5, 3, *pose, activations, dtype=torch.float64)
    route = lambda *t: fused_attention_routing(*t[:3], t[3] if activations else None)  # noqa: E731
    assert torch.autograd.gradcheck(route, inputs)


def test_fused_routing_keeps_no_votes_for_the_backward_pass(kernel):
    """What autograd saves for one pass: the plain ops keep the votes, the fused kernel only its inputs."""
    groups, children, parents, rows, cols, parent_cols = 8, 36, 8, 4, 4, 4
    num_votes = groups * children * parents * rows * parent_cols

    def largest_saved(route):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            route(*routing_inputs(groups, children, parents, rows, cols, parent_cols, activations=False))
        return max(saved)

    assert largest_saved(lambda u, w, p: attention_routing(capsule_votes(u, w), p)) >= num_votes
    largest_input = groups * children * rows * cols  # the children, num_votes / parents here
    assert largest_saved(lambda u, w, p: fused_attention_routing(u, w, p, with_routing=False)) == largest_input


def test_fused_routing_runs_bf16_inputs_in_float32(kernel):
    inputs = routing_inputs(*ROUTING_SHAPES[0], activations=False)
    expected = fused_attention_routing(*[t.detach() for t in inputs])[0]
    got = fused_attention_routing(*[t.detach().bfloat16() for t in inputs])[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_without_a_compiler_fused_routing_warns_and_falls_back_to_tensor_ops(monkeypatch, tmp_path, kernel):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError('no C++ compiler here')

    cases = [
        (routing_inputs(*ROUTING_SHAPES[1], activations=True), None),
        (grid_inputs(2, 5, 5, 2, 3, 2, parents=3, activations=True), (3, 2)),
    ]
    with_kernel = [fused_attention_routing(*inputs, window=window) for inputs, window in cases]
    monkeypatch.setattr(kernels, '_kernel', None)
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))  # nothing built here yet
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', no_compiler)
    with pytest.warns(UserWarning, match='no C.. compiler here'):
        assert kernels.routing_kernel() is None
    for (inputs, window), expected in zip(cases, with_kernel):
        without = fused_attention_routing(*inputs, window=window)
        for a, b in zip(without, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        probes = [torch.randn_like(t) for t in expected]
        grads = [
            torch.autograd.grad(sum((o * p).sum() for o, p in zip(out, probes)), inputs) for out in (without, expected)
        ]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    'options',
    [
        dict(iterations=3),
        dict(iterations=4, activations=True),
        dict(iterations=3, routing='sequential', matrix_pose=False),
        dict(iterations=3, pose_dim=16),
    ],
)  # 4x4: the kernel's pose norm too
def test_fused_capsnet_equals_tensor_op_capsnet_fp32(options, kernel):
    """Whole models in float32: outputs to 1e-5, every parameter's gradient to 1e-5 of its largest entry
    (through LayerNorm and several passes, summation order alone moves fp32 gradients by a few 1e-6)."""
    fused = tiny_capsnet(**options).float().train()
    reference = tiny_capsnet(**options).float().train()
    reference.set_fused_routing(False)
    assert all(m.fused_routing for m in fused.modules() if hasattr(m, 'fused_routing'))
    x = torch.randn(3, 1, 10, 10, dtype=torch.float32)
    out, expected = fused(x), reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(
        torch.autograd.grad(out.square().sum(), list(fused.parameters())),
        torch.autograd.grad(expected.square().sum(), list(reference.parameters())),
    ):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


@pytest.mark.slow
def test_compiled_training_step_through_the_fused_kernel_matches_eager(kernel):
    model = tiny_capsnet(iterations=3, pose_dim=16).float().train()  # 4x4 poses: the kernel's pose norm too
    assert_compiled_matches_eager(model, torch.randn(2, 1, 10, 10, dtype=torch.float32), tol=1e-5)


def test_flop_counter_counts_the_fused_forward_like_the_tensor_ops(kernel):
    from torch.utils.flop_counter import FlopCounterMode

    inputs = [t.detach() for t in routing_inputs(*ROUTING_SHAPES[0], activations=False)]
    counts = []
    for route in (
        lambda u, w, p: attention_routing(capsule_votes(u, w), p),
        lambda u, w, p: fused_attention_routing(u, w, p),
    ):
        with FlopCounterMode(display=False) as counter:
            route(*inputs)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


POSE_NORM_SHAPES = [
    (2, 9, 9, 32, 16),  # 4x4 poses, more of them than one thread's share: the vector path
    (5, 3, 16),
    (4, 7, 9),  # 3x3 poses: plain loops
]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape', POSE_NORM_SHAPES)
def test_pose_norm_equals_layer_norm_computed_in_float64(shape, dtype, kernel):
    """The kernel's LayerNorm over each pose against F.layer_norm in float64: the output and the gradients of
    the input, the gain and the bias (each a sum over every pose), to 1e-5 in float32 and 1e-10 in float64."""
    torch.manual_seed(11)
    x = torch.randn(*shape) * 3 + 1
    weight, bias, probe = torch.randn(shape[-1]), torch.randn(shape[-1]), torch.randn(shape)

    def run(norm, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
        out = norm(*inputs)
        return [out, *torch.autograd.grad(out, inputs, probe.to(dtype))]

    expected = run(lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-5), torch.float64)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    for got, want in zip(run(lambda x, w, b: kernels.pose_norm(x, w, b, 1e-5), dtype), expected):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance * want.abs().max().item())


def test_gradcheck_pose_norm(kernel):
    inputs = [
        torch.randn(3, 5, 16, requires_grad=True),
        torch.randn(16, requires_grad=True),
        torch.randn(16, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(lambda x, w, b: kernels.pose_norm(x, w, b, 1e-5), inputs)


def test_pose_norm_runs_in_the_kernel_for_4x4_poses_on_the_cpu_unless_fused_routing_is_off(kernel):
    """PoseNorm takes the kernel for 16-entry poses while the model routes with it, torch's layer_norm
    otherwise (set_fused_routing(False) turns both off); the two agree."""
    torch.manual_seed(12)
    norm = layers.PoseNorm(16)
    x = torch.randn(2, 3, 16, requires_grad=True)
    fused = norm(x)
    assert 'pose_norm' in type(fused.grad_fn).__name__
    norm.fused_routing = False
    plain = norm(x)
    assert type(plain.grad_fn).__name__ == 'NativeLayerNormBackward0'
    torch.testing.assert_close(fused, plain)
    assert (
        type(layers.PoseNorm(9)(torch.randn(2, 9, requires_grad=True)).grad_fn).__name__ == 'NativeLayerNormBackward0'
    )
    norm = norm.float()  # bf16 poses are normalised in float32 by either path, and come back in bf16
    poses = torch.randn(4, 5, 16, dtype=torch.bfloat16)
    outputs = []
    for fused_routing in (True, False):
        norm.fused_routing = fused_routing
        outputs.append(norm(poses))
    assert outputs[0].dtype == torch.bfloat16
    torch.testing.assert_close(outputs[0], outputs[1])
    model = tiny_capsnet(pose_dim=16)
    norms = [m for m in model.modules() if isinstance(m, layers.PoseNorm)]
    assert len(norms) == 4 and all(m.fused_routing for m in norms)
    model.set_fused_routing(False)
    assert not any(m.fused_routing for m in norms)


def test_environment_switch_turns_fused_routing_off(monkeypatch, kernel):
    """TIMM_CAPSULES_FUSED_ROUTING=0: every layer routes with plain tensor ops, the kernel is never called."""

    def no_kernel(*args, **kwargs):
        raise AssertionError('the fused kernel ran')

    monkeypatch.setenv('TIMM_CAPSULES_FUSED_ROUTING', '0')
    model = tiny_capsnet(iterations=3)
    assert not any(getattr(m, 'fused_routing', False) for m in model.modules())
    monkeypatch.setattr(layers, 'fused_attention_routing', no_kernel)
    monkeypatch.setattr(layers, 'pose_norm', no_kernel)
    x = torch.randn(2, 1, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), naive_capsnet_logits(model, x), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv('TIMM_CAPSULES_FUSED_ROUTING', '1')
    with pytest.raises(AssertionError, match='the fused kernel ran'):
        tiny_capsnet(iterations=3)(x)


def test_the_kernel_is_built_where_ci_runs():
    """CI installs a compiler: there the kernel must build, or every fused test would compare the
    plain-op fallback with itself."""
    if kernels.routing_kernel() is None:
        unavailable('the fused routing kernel could not be built on this machine')
    assert torch.ops.timm_capsules.attention_routing.default is not None


@pytest.mark.slow
def test_compiled_training_without_the_kernel_uses_the_fallback_and_matches_eager(monkeypatch):
    """No compiler: the op's plain-op fallback must honour its fake kernel's (contiguous) strides, or
    torch.compile training stops with a stride error."""
    monkeypatch.setattr(kernels, '_kernel', False)  # as after a failed build
    assert kernels.routing_kernel() is None
    torch._dynamo.reset()
    model = tiny_capsnet(iterations=3, activations=True).float().train()
    assert_compiled_matches_eager(model, torch.randn(2, 1, 10, 10, dtype=torch.float32), tol=1e-5)
    torch._dynamo.reset()


# ---- the kernel's build cache ------------------------------------------------------------------------


def kernel_in_subprocess(extensions_dir, code='k = kernels.routing_kernel(); print(k is not None)', **env):
    import subprocess
    import sys

    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions_dir), **env)
    return subprocess.run(
        [sys.executable, '-c', f'import sys; from timm_capsules import kernels; {code}'],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def build_copy(tmp_path, kernel):
    """A copy of this machine's verified kernel build, in its own extensions folder."""
    import shutil

    folder, name = kernels._kernel_build_folder()
    copy = tmp_path / 'extensions'
    shutil.copytree(folder, copy / folder.relative_to(folder.parents[1]), copy_function=shutil.copy2)
    return copy, copy / folder.relative_to(folder.parents[1]), name


def test_a_verified_build_loads_without_compiling_or_cpp_extension(build_copy):
    extensions, folder, name = build_copy
    done = kernel_in_subprocess(
        extensions, "k = kernels.routing_kernel(); print(k is not None, 'torch.utils.cpp_extension' in sys.modules)"
    )
    assert done.returncode == 0 and done.stdout.split() == ['True', 'False'], done.stderr
    assert 'compiling' not in done.stderr and 'No CUDA runtime' not in done.stderr


def test_building_the_cpu_kernel_prints_no_cuda_notice(tmp_path):
    """torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." at import on a machine
    without a GPU whose CUDA_HOME exists; the kernel's build imports it without that line."""
    if torch.cuda.is_available():
        pytest.skip('the notice only comes on a machine without a CUDA runtime')
    plain = kernel_in_subprocess(tmp_path, 'import torch.utils.cpp_extension', CUDA_HOME=str(tmp_path))
    assert plain.returncode == 0 and 'No CUDA runtime is found' in plain.stderr  # what torch does on its own
    ours = kernel_in_subprocess(
        tmp_path, 'print(kernels._import_cpp_extension().load.__name__)', CUDA_HOME=str(tmp_path)
    )
    assert ours.returncode == 0 and ours.stdout.split() == ['load'], ours.stderr
    assert 'No CUDA runtime' not in ours.stderr


def test_a_build_is_verified_against_its_source_and_the_shared_header(kernel):
    """A build stands for its .cpp and csrc/vector_math.h together: a changed header alone rebuilds it."""
    folder, name = kernels._kernel_build_folder()
    identity = (folder / f'{name}.sha256').read_text().split('\n')[0].split()
    header = kernels.KERNEL_SOURCE.parent / 'vector_math.h'
    assert identity[:2] == [kernels._sha256(kernels.KERNEL_SOURCE), kernels._sha256(header)]


@pytest.mark.slow
def test_a_truncated_build_is_rebuilt_not_loaded(build_copy):
    """A truncated library would crash the process (SIGBUS) when loaded: its checksum no longer matches,
    so it is linked again, with a notice, and then verified."""
    extensions, folder, name = build_copy
    library = folder / f'{name}.so'
    library.write_bytes(library.read_bytes()[:4096])
    # a CUDA_HOME that exists: on a machine without a GPU, torch's cpp_extension notices it has no CUDA runtime
    done = kernel_in_subprocess(extensions, CUDA_HOME=str(extensions))
    assert done.returncode == 0 and done.stdout.split() == ['True'], done.stderr
    assert 'compiling the fused CPU routing kernel' in done.stderr
    assert 'No CUDA runtime' not in done.stderr  # a CPU kernel needs none
    assert (folder / f'{name}.sha256').read_text().split()[-1] == kernels._sha256(library)
    again = kernel_in_subprocess(extensions)
    assert again.stdout.split() == ['True'] and 'compiling' not in again.stderr


def test_a_build_without_its_checksum_or_of_another_source_is_not_trusted(build_copy, monkeypatch):
    extensions, folder, name = build_copy
    stamp = folder / f'{name}.sha256'
    intact = stamp.read_text()
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(extensions))
    monkeypatch.setattr(kernels, '_build_kernel', lambda *args: 'rebuilt')
    for damage in (
        lambda: stamp.unlink(),  # a build that never finished
        lambda: stamp.write_text(intact.replace(kernels._sha256(kernels.KERNEL_SOURCE), '0' * 64)),
    ):
        stamp.write_text(intact)
        damage()
        monkeypatch.setattr(kernels, '_kernel', None)
        assert kernels.routing_kernel() == 'rebuilt'
    stamp.write_text(intact)
    monkeypatch.setattr(kernels, '_kernel', None)
    assert kernels.routing_kernel() not in (None, 'rebuilt')  # intact again: loaded, not built


def test_each_environment_gets_its_own_build_folder(monkeypatch):
    here = kernels._kernel_build_folder()
    monkeypatch.setattr(torch, '__file__', '/another/venv/lib/python3.11/site-packages/torch/__init__.py')
    elsewhere = kernels._kernel_build_folder()
    assert here[1] != elsewhere[1] and here[0].parent == elsewhere[0].parent


# ---- preload: what a model routes with, built before training -----------------------------------------------


@pytest.mark.parametrize(
    'name, used',
    [
        ('capsnet_simple_cifar10', ['routing']),
        ('em_capsnet_simple_cifar10', ['em_routing']),
        ('dynamic_capsnet_simple_cifar10', []),
    ],
)
def test_preload_builds_only_the_extensions_the_model_routes_with(name, used, monkeypatch):
    """Each family loads its own extension up front (none for dynamic routing, which routes in tensor ops), only
    on the CPU, and none with TIMM_CAPSULES_FUSED_ROUTING=0 or, for a CapsNet, after set_fused_routing(False)."""
    import timm

    calls = []
    monkeypatch.setattr(kernels, 'routing_kernel', lambda: calls.append('routing'))
    monkeypatch.setattr(kernels, 'em_routing_kernel', lambda: calls.append('em_routing'))
    model = timm.create_model(name, img_size=28, in_chans=1, device='meta')
    assert kernels.kernels_used(model) == used
    assert kernels.preload(model, 'cpu') >= 0.0 and calls == used
    assert kernels.preload(model, torch.device('cuda')) == 0.0 and calls == used  # the GPU builds nothing here
    if hasattr(model, 'set_fused_routing'):
        model.set_fused_routing(False)
        assert kernels.kernels_used(model) == [] and kernels.preload(model) == 0.0
        model.set_fused_routing(True)
        assert kernels.kernels_used(model) == used
    monkeypatch.setenv('TIMM_CAPSULES_FUSED_ROUTING', '0')
    plain = timm.create_model(name, img_size=28, in_chans=1, device='meta')
    assert kernels.kernels_used(plain) == [] and kernels.preload(plain, 'cpu') == 0.0 and calls == used


def test_preload_reports_the_seconds_the_build_took(monkeypatch):
    """A build that takes 0.3 s (a stand-in) is reported as at least that: a one-off build is timed apart."""
    import time

    monkeypatch.setattr(kernels, 'routing_kernel', lambda: time.sleep(0.3))
    assert kernels.preload(tiny_capsnet(), 'cpu') >= 0.3
