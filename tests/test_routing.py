"""The routing core against a naive reference written here with explicit loops.

The reference follows the paper's Procedures 1 and 2 (Tsai et al., ICLR 2020, §3) literally: per output
position, per child (window offset and child type, or type-major grid index), per parent: vote,
agreement / sqrt(d), softmax over parents, sum, LayerNorm; uniform first pass; concurrent or sequential
schedule over the whole stack.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from timm_capsules.capsnet import CapsNet
from timm_capsules.layers import Capsules, ConvCapsules, FCCapsules, PrimaryCapsules
from timm_capsules import layers, routing
from timm_capsules.routing import attention_routing, capsule_votes, fused_attention_routing, uniform_routing

from ci import unavailable
from compiled import assert_compiled_matches_eager


@pytest.fixture
def kernel():
    """The compiled routing kernel. Without it the fused op runs its plain-op fallback, and a 'fused vs
    plain' comparison would compare the plain ops with themselves."""
    if routing.routing_kernel() is None:
        unavailable('the fused routing kernel could not be built on this machine')


@pytest.fixture(autouse=True)
def float64():
    """The reference comparisons run in double precision (gradcheck needs it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ---- the naive reference ---------------------------------------------------------------------------

def naive_children(layer, grid, b, y, x):
    """Child poses of output position (y, x) of image b, in the layer's documented order."""
    B, H, W, N, d = grid.shape
    if isinstance(layer, ConvCapsules):
        k, s = layer.kernel_size, layer.stride
        return [grid[b, y * s + ky, x * s + kx, n] for ky in range(k) for kx in range(k) for n in range(N)]
    return [grid[b, h, w, n] for n in range(N) for h in range(H) for w in range(W)]


def naive_vote(layer, pose, i, j):
    rows = layer.child_rows
    return (pose.reshape(rows, -1) @ layer.weight[i, j]).reshape(-1)


def naive_layer(layer, child_grid, parent_grid=None):
    """One routing pass of one layer; returns poses (B, Ho, Wo, J, d) and coefficients (B, Ho, Wo, I, J)."""
    B, H, W = child_grid.shape[:3]
    if isinstance(layer, ConvCapsules):
        Ho, Wo = layer.output_grid(H, W)
    else:
        Ho, Wo = 1, 1
    J, d = layer.out_caps, layer.out_dim
    poses = torch.zeros(B, Ho, Wo, J, d)
    coefficients = torch.zeros(B, Ho, Wo, layer.weight.shape[0], J)
    for b in range(B):
        for y in range(Ho):
            for x in range(Wo):
                children = naive_children(layer, child_grid, b, y, x)
                for i, pose in enumerate(children):
                    votes = [naive_vote(layer, pose, i, j) for j in range(J)]
                    if parent_grid is None:
                        r = [1.0 / J] * J
                    else:
                        agreement = torch.stack([parent_grid[b, y, x, j] @ votes[j] for j in range(J)]) / math.sqrt(d)
                        r = torch.softmax(agreement, dim=0)
                    for j in range(J):
                        poses[b, y, x, j] += r[j] * votes[j]
                        coefficients[b, y, x, i, j] = r[j]
    if isinstance(layer.norm, torch.nn.LayerNorm):
        poses = F.layer_norm(poses, (d,), layer.norm.weight, layer.norm.bias, layer.norm.eps)
    return poses, coefficients


def naive_capsnet_history(model, x):
    """The whole model with the paper's schedules, every layer routed at every iteration: the poses of every layer
    (primary first, class capsules last) after each iteration 1..t, laid out as ``RoutingTrace.poses``."""
    features = model.backbone(x)[-1]
    primary = model.primary(features).poses
    layers = list(model.capsule_layers) + [model.head.capsules]
    t = model.iterations
    history = [[primary] for _ in range(t)]
    if model.routing == 'concurrent':  # iteration k: every layer from the previous iteration's poses
        for layer in layers:
            history[0].append(naive_layer(layer, history[0][-1])[0])
        for k in range(1, t):
            history[k] += [naive_layer(layer, history[k - 1][l], history[k - 1][l + 1])[0]
                           for l, layer in enumerate(layers)]
    else:  # each layer finishes its t iterations before the next starts, which reads its last
        for layer in layers:
            children = history[-1][-1]
            parents = None
            for k in range(t):
                parents = naive_layer(layer, children, parents)[0]
                history[k].append(parents)
    return history


def naive_capsnet_logits(model, x):
    return model.head.fc(naive_capsnet_history(model, x)[-1][-1]).flatten(1)


def tiny_capsnet(matrix_pose=True, iterations=2, routing='concurrent', capsule_layers=None, **kwargs):
    torch.manual_seed(0)
    pose_dim = kwargs.pop('pose_dim', 4 if matrix_pose else 3)
    return CapsNet(
        num_classes=3, in_chans=1, img_size=10, backbone='simple', backbone_args=dict(out_chs=6),
        primary_caps=3, pose_dim=pose_dim, matrix_pose=matrix_pose, iterations=iterations, routing=routing,
        capsule_layers=capsule_layers or (('conv', 3, 3, 1), ('conv', 2, 2, 1)), **kwargs,
    ).eval()


# ---- layers -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('matrix_pose', [True, False])
@pytest.mark.parametrize('kind', ['conv', 'fc'])
def test_layer_matches_naive_reference(kind, matrix_pose):
    torch.manual_seed(1)
    pose_dim = 4 if matrix_pose else 3
    if kind == 'conv':
        layer = ConvCapsules(2, 3, pose_dim, kernel_size=3, stride=2, matrix_pose=matrix_pose)
        child, parent = torch.randn(2, 7, 7, 2, pose_dim), torch.randn(2, 3, 3, 3, pose_dim)
    else:
        layer = FCCapsules(2 * 3 * 3, 4, pose_dim, matrix_pose=matrix_pose)
        child, parent = torch.randn(2, 3, 3, 2, pose_dim), torch.randn(2, 1, 1, 4, pose_dim)
    with torch.no_grad():
        layer.norm.weight.normal_()
        layer.norm.bias.normal_()
    for parents in (None, parent):
        expected, expected_coefficients = naive_layer(layer, child, parents)
        got, coefficients = layer(
            Capsules(child), None if parents is None else Capsules(parents), return_coefficients=True)
        torch.testing.assert_close(got.poses, expected, rtol=1e-5, atol=1e-5)
        if parents is not None:
            torch.testing.assert_close(coefficients.reshape(expected_coefficients.shape), expected_coefficients)


def test_vector_poses_may_change_dimension():
    torch.manual_seed(2)
    layer = FCCapsules(6, 2, 3, matrix_pose=False, out_dim=5)
    child, parent = torch.randn(2, 1, 1, 6, 3), torch.randn(2, 1, 1, 2, 5)
    expected, _ = naive_layer(layer, child, parent)
    torch.testing.assert_close(layer(Capsules(child), Capsules(parent))[0].poses, expected)


def test_conv_windows_equal_explicit_slicing():
    torch.manual_seed(3)
    layer = ConvCapsules(2, 2, 4, kernel_size=3, stride=2)
    grid = torch.randn(2, 9, 8, 2, 4)
    children, _, (B, Ho, Wo) = layer._children(Capsules(grid))
    assert (B, Ho, Wo) == (2, 4, 3)
    children = children.reshape(B, Ho, Wo, 3, 3, 2, 4)
    for y in range(Ho):
        for x in range(Wo):
            window = grid[:, 2 * y:2 * y + 3, 2 * x:2 * x + 3]  # (B, ky, kx, N, d)
            torch.testing.assert_close(children[:, y, x], window)


def test_uniform_routing_equals_mean_of_votes():
    torch.manual_seed(4)
    children, weight = torch.randn(5, 7, 2, 2), torch.randn(7, 3, 2, 2)
    expected = capsule_votes(children, weight).sum(1) / 3
    torch.testing.assert_close(uniform_routing(children, weight), expected)


def test_routing_coefficients_sum_to_one_over_parents():
    torch.manual_seed(5)
    votes, parents = torch.randn(4, 6, 3, 2, 2), torch.randn(4, 3, 2, 2)
    _, coefficients, _ = attention_routing(votes, parents)
    torch.testing.assert_close(coefficients.sum(-1), torch.ones(4, 6))


def test_gradcheck_attention_routing():
    torch.manual_seed(6)
    children = torch.randn(2, 4, 2, 2, requires_grad=True)
    weight = torch.randn(4, 3, 2, 2, requires_grad=True)
    parents = torch.randn(2, 3, 2, 2, requires_grad=True)

    def routed(children, weight, parents):
        return attention_routing(capsule_votes(children, weight), parents)[0]

    assert torch.autograd.gradcheck(routed, (children, weight, parents))
    assert torch.autograd.gradcheck(uniform_routing, (children, weight))


@pytest.mark.parametrize('kind', ['conv', 'fc'])
def test_gradcheck_capsule_layers(kind):
    torch.manual_seed(7)
    if kind == 'conv':
        layer = ConvCapsules(2, 2, 4, kernel_size=2, stride=1)
        child, parent = torch.randn(1, 3, 3, 2, 4), torch.randn(1, 2, 2, 2, 4)
    else:
        layer = FCCapsules(4, 2, 4, matrix_pose=False)
        child, parent = torch.randn(1, 2, 1, 2, 4), torch.randn(1, 1, 1, 2, 4)
    child.requires_grad_(True)
    parent.requires_grad_(True)

    def routed(child, parent, weight):
        return torch.func.functional_call(layer, {'weight': weight}, (Capsules(child), Capsules(parent)))[0].poses

    assert torch.autograd.gradcheck(routed, (child, parent, layer.weight.detach().clone().requires_grad_(True)))


# ---- whole models: schedules ------------------------------------------------------------------------

NAIVE = {}  # the naive reference per (schedule, stack, t), shared by the fused and the plain model


def assert_schedule_matches_naive(model, x, key):
    """forward and forward_routing's logits, and forward_routing's poses of every layer at every iteration."""
    with torch.no_grad():
        if key not in NAIVE:
            NAIVE[key] = naive_capsnet_history(model, x)
        history = NAIVE[key]
        expected = model.head.fc(history[-1][-1]).flatten(1)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        trace = model.forward_routing(x)
    torch.testing.assert_close(trace.logits, expected, rtol=1e-5, atol=1e-5)
    assert len(trace.poses) == model.iterations
    for k, (step, naive_step) in enumerate(zip(trace.poses, history), 1):
        for name, poses, naive_poses in zip(trace.layer_names, step, naive_step):
            torch.testing.assert_close(poses, naive_poses, rtol=1e-5, atol=1e-5, msg=f'{name}, iteration {k}')


# The paper's Fig. 3 range, t = 1..5, on stacks of two hidden capsule layers: with concurrent routing, a layer's
# update reads the layer below's previous iteration, which differs from its current one (a layer and the one below
# routed in the same iteration and both reaching the logits) only from t = 4 on.
@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('routing', ['concurrent', 'sequential'])
@pytest.mark.parametrize('iterations', [1, 2, 3, 4, 5])
@pytest.mark.parametrize('matrix_pose', [True, False])
def test_capsnet_matches_naive_schedule(routing, iterations, matrix_pose, fused, request):
    if fused:
        request.getfixturevalue('kernel')
    model = tiny_capsnet(matrix_pose, iterations, routing)
    assert len(model.capsule_layers) == 2
    model.set_fused_routing(fused)
    torch.manual_seed(1)
    assert_schedule_matches_naive(model, torch.randn(1, 1, 10, 10), ('conv', routing, matrix_pose, iterations))


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('routing', ['concurrent', 'sequential'])
@pytest.mark.parametrize('iterations', [1, 2, 3, 4, 5])
def test_fc_hidden_layer_stack_matches_naive_schedule(routing, iterations, fused, request):
    if fused:
        request.getfixturevalue('kernel')
    model = tiny_capsnet(capsule_layers=(('conv', 3, 3, 2), ('fc', 4)), iterations=iterations, routing=routing)
    model.set_fused_routing(fused)
    torch.manual_seed(1)
    assert_schedule_matches_naive(model, torch.randn(1, 1, 10, 10), ('fc', routing, iterations))


def test_forward_routing_coefficients_match_forward_pass():
    model = tiny_capsnet(iterations=3)
    x = torch.randn(2, 1, 10, 10)
    with torch.no_grad():
        trace = model.forward_routing(x)
    assert len(trace.coefficients) == 3 and len(trace.poses) == 3
    assert trace.layer_names == ['primary', 'capsule_layers.0', 'capsule_layers.1', 'head.capsules']
    for step in trace.coefficients:
        for coefficients in step:
            torch.testing.assert_close(coefficients.sum(-1), torch.ones(coefficients.shape[:-1]))
    # recompute the class poses from the returned coefficients and the previous iteration's poses
    head = model.head.capsules
    children, _, _ = head._children(Capsules(trace.poses[1][-2]))
    votes = capsule_votes(children, head.weight)  # (B, I, J, r, t)
    weights = trace.coefficients[2][-1].reshape(votes.shape[:3])
    poses = torch.einsum('gij,gijrt->gjrt', weights, votes).reshape(2, 1, 1, 3, 4)
    logits = model.head.fc(head.norm(poses)).flatten(1)
    torch.testing.assert_close(logits, trace.logits)
    torch.testing.assert_close(logits, model(x))
    # documented shapes: (B, H, W, children, parents)
    assert trace.coefficients[0][0].shape == (2, 3, 3, 3 * 3 * 3, 3)  # 5x5 primary grid, k3 s1
    assert trace.coefficients[0][2].shape == (2, 1, 1, 2 * 2 * 2, 3)  # 2 types on a 2x2 grid


def test_ablations_change_the_model_and_still_match_where_defined():
    x = torch.randn(2, 1, 10, 10)
    no_norm = tiny_capsnet(layer_norm=False)
    assert not any('norm' in name for name, _ in no_norm.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(no_norm(x), naive_capsnet_logits(no_norm, x), rtol=1e-5, atol=1e-5)
        active = tiny_capsnet(activations=True, iterations=3)
        out = active(x)
        trace = active.forward_routing(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(trace.logits, out)
    hidden = trace.activations[-1][:-1]  # the class capsules carry no activations of their own
    assert trace.activations[-1][-1] is None
    assert all(a is not None and ((a > 0) & (a < 1)).all() for a in hidden)
    active.train()
    active(x).sum().backward()
    assert all(p.grad is not None for p in active.parameters())  # every beta reaches the loss


def test_grad_checkpointing_gives_same_outputs_and_gradients():
    model = tiny_capsnet(iterations=3).train()
    x = torch.randn(2, 1, 10, 10)
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    model.set_grad_checkpointing(True)
    out2 = model(x)
    grads2 = torch.autograd.grad(out2.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out2, out)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2, g)


def test_chunked_routing_equals_unchunked_forward_and_gradients():
    x = torch.randn(3, 1, 10, 10)
    reference = tiny_capsnet(iterations=3).train()
    reference.set_fused_routing(False)  # chunks belong to the plain tensor-op path
    reference.set_max_votes(None)
    chunked = tiny_capsnet(iterations=3).train()
    chunked.set_fused_routing(False)
    chunked.set_max_votes(100)  # a few groups per chunk
    assert all(m.max_votes == 100 for m in chunked.modules() if hasattr(m, 'max_votes'))
    out, out_chunked = reference(x), chunked(x)
    torch.testing.assert_close(out_chunked, out)
    grads = torch.autograd.grad(out.sum(), list(reference.parameters()))
    grads_chunked = torch.autograd.grad(out_chunked.sum(), list(chunked.parameters()))
    for g, g2 in zip(grads, grads_chunked):
        torch.testing.assert_close(g2, g)
    with torch.no_grad():
        torch.testing.assert_close(chunked.forward_routing(x).logits, reference(x))


@pytest.mark.parametrize('keep_copy', [False, True])
@pytest.mark.parametrize('activations', [False, True])
def test_conv_uniform_pass_as_convolution_equals_window_path_fp32(activations, keep_copy, monkeypatch):
    """The fast uniform pass (one strided conv) equals uniform routing over explicit windows, in fp32,
    for outputs and gradients: with the conv's input copy kept (plain ops) and made again in the backward
    pass (one image per chunk here, so the chunks are exercised)."""
    monkeypatch.setattr(routing, '_BACKWARD_CHUNK_ELEMENTS', 9 * 9 * 3 * 16)
    monkeypatch.setattr(layers, '_plain_ops_only', lambda: keep_copy)
    torch.manual_seed(8)
    layer = ConvCapsules(3, 4, 16, kernel_size=3, stride=2).float()
    poses = torch.randn(2, 9, 9, 3, 16, dtype=torch.float32, requires_grad=True)
    acts = torch.rand(2, 9, 9, 3, dtype=torch.float32, requires_grad=True) if activations else None
    fast, grid = layer._uniform(Capsules(poses, acts))
    children, child_acts, grid2 = layer._children(Capsules(poses, acts))
    slow = uniform_routing(children, layer.weight, child_acts)
    assert grid == grid2
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(slow)
    inputs = [poses, layer.weight] + ([acts] if activations else [])
    for g_fast, g_slow in zip(torch.autograd.grad((fast * probe).sum(), inputs),
                              torch.autograd.grad((slow * probe).sum(), inputs)):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-5)


def test_gradcheck_uniform_window_routing(monkeypatch):
    monkeypatch.setattr(routing, '_BACKWARD_CHUNK_ELEMENTS', 1)  # an image per chunk
    torch.manual_seed(2)
    grid = torch.randn(3, 5, 4, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2 * 2 * 2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, w: routing.uniform_window_routing(g, w, 2, 1), [grid, weight])


@pytest.mark.parametrize('dtype, cols', [(torch.float32, 4), (torch.float32, 2), (torch.float32, 3),
                                         (torch.bfloat16, 4), (torch.float64, 2)])
def test_copy_permuted_moves_pose_rows_as_wide_elements_and_equals_permute(dtype, cols):
    """Rows of 8 or 16 bytes move as one element of a wide dtype; others value by value; the same result, also
    for a slice at an odd offset, and into an out tensor."""
    x = torch.randn(3, 5, 6, 2, cols).to(dtype)
    for source in (x, x[1:], x.reshape(-1)[1:1 + 2 * 5 * 6 * 2 * cols].view(2, 5, 6, 2, cols)):
        expected = source.permute(0, 3, 1, 2, 4).contiguous()
        got = routing._copy_permuted(source, (0, 3, 1, 2, 4))
        assert got.is_contiguous() and torch.equal(got, expected)
        out = torch.empty_like(expected)
        assert routing._copy_permuted(source, (0, 3, 1, 2, 4), out=out) is out and torch.equal(out, expected)


def test_conv_uniform_pass_keeps_only_the_grid(monkeypatch):
    """The layer's uniform pass makes its rows-as-batch copy again in the backward pass: autograd keeps the
    child grid itself (here the primary poses), no copy of it; traced for export, the plain conv keeps its copy."""
    layer = ConvCapsules(8, 5, 16, kernel_size=3, stride=2)
    poses = torch.randn(4, 9, 9, 8, 16, requires_grad=True)
    for plain in (False, True):
        monkeypatch.setattr(layers, '_plain_ops_only', lambda: plain)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            layer._uniform(Capsules(poses))
        grid_sized = [t.untyped_storage().data_ptr() for t in saved if t.numel() == poses.numel()]
        assert len(grid_sized) == 1
        assert (grid_sized[0] == poses.untyped_storage().data_ptr()) != plain


def test_uniform_window_routing_under_bf16_autocast_matches_the_plain_conv():
    torch.manual_seed(4)
    grid = torch.randn(3, 7, 7, 4, 4, 4, requires_grad=True)
    weight = torch.randn(3 * 3 * 4, 6, 4, 4, requires_grad=True)
    results = []
    for keep_copy in (True, False):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = routing.uniform_window_routing(grid, weight, 3, 1, keep_copy=keep_copy)
        results.append((out, *torch.autograd.grad(out.float().square().sum(), [grid, weight])))
    for plain, ours in zip(*results):
        assert ours.dtype == plain.dtype
        torch.testing.assert_close(ours, plain)


# ---- the fused CPU kernel against the plain tensor ops ------------------------------------------------

def routing_inputs(groups, children, parents, rows, cols, parent_cols, activations, dtype=torch.float32):
    torch.manual_seed(9)
    tensors = [torch.randn(groups, children, rows, cols, dtype=dtype),
               torch.randn(children, parents, cols, parent_cols, dtype=dtype) * 0.5,
               torch.randn(groups, parents, rows, parent_cols, dtype=dtype)]
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
    tensors = [torch.randn(batch, height, width, types, 4, 4, dtype=dtype),
               torch.randn(kernel_size * kernel_size * types, parents, 4, 4, dtype=dtype) * 0.5,
               torch.randn(batch * out_h * out_w, parents, 4, 4, dtype=dtype)]
    if activations:
        tensors.append(torch.rand(batch, height, width, types, dtype=dtype))
    return [t.requires_grad_() for t in tensors]


def copied_windows(grid, kernel_size, stride):
    """Every window copied out one by one: (b, y, x) windows of (ky, kx, type) children, trailing axes kept."""
    B, H, W = grid.shape[:3]
    k, s = kernel_size, stride
    return torch.stack([grid[b, y:y + k, x:x + k].reshape(-1, *grid.shape[4:])
                        for b in range(B) for y in range(0, H - k + 1, s) for x in range(0, W - k + 1, s)])


@pytest.mark.parametrize('activations', [False, True])
@pytest.mark.parametrize('window, parents', [((3, 1), 5), ((3, 2), 32), ((2, 2), 16)])
def test_fused_routing_over_grid_windows_equals_copied_windows(window, parents, activations, kernel):
    """The kernel reads a conv layer's windows from the grid and adds their gradients back into it; the
    reference copies every window out first. Outputs and gradients, in float32, to 1e-5."""
    inputs = grid_inputs(2, 7, 6, 3, *window, parents=parents, activations=activations)
    grid, weight, parents, acts = inputs + [None] * (4 - len(inputs))
    expected = attention_routing(capsule_votes(copied_windows(grid, *window), weight), parents,
                                 None if acts is None else copied_windows(acts, *window))
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
    for g, e in zip(torch.autograd.grad((poses * probe).sum(), inputs),
                    torch.autograd.grad((expected * probe).sum(), inputs)):
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

    cases = [(routing_inputs(*ROUTING_SHAPES[1], activations=True), None),
             (grid_inputs(2, 5, 5, 2, 3, 2, parents=3, activations=True), (3, 2))]
    with_kernel = [fused_attention_routing(*inputs, window=window) for inputs, window in cases]
    monkeypatch.setattr(routing, '_kernel', None)
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))  # nothing built here yet
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', no_compiler)
    with pytest.warns(UserWarning, match='no C.. compiler here'):
        assert routing.routing_kernel() is None
    for (inputs, window), expected in zip(cases, with_kernel):
        without = fused_attention_routing(*inputs, window=window)
        for a, b in zip(without, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        probes = [torch.randn_like(t) for t in expected]
        grads = [torch.autograd.grad(sum((o * p).sum() for o, p in zip(out, probes)), inputs)
                 for out in (without, expected)]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('options', [dict(iterations=3), dict(iterations=4, activations=True),
                                     dict(iterations=3, routing='sequential', matrix_pose=False),
                                     dict(iterations=3, pose_dim=16)])  # 4x4: the kernel's pose norm too
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
    for g, e in zip(torch.autograd.grad(out.square().sum(), list(fused.parameters())),
                    torch.autograd.grad(expected.square().sum(), list(reference.parameters()))):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


@pytest.mark.slow
def test_compiled_training_step_through_the_fused_kernel_matches_eager(kernel):
    model = tiny_capsnet(iterations=3, pose_dim=16).float().train()  # 4x4 poses: the kernel's pose norm too
    assert_compiled_matches_eager(model, torch.randn(2, 1, 10, 10, dtype=torch.float32), tol=1e-5)


def test_flop_counter_counts_the_fused_forward_like_the_tensor_ops(kernel):
    from torch.utils.flop_counter import FlopCounterMode
    inputs = [t.detach() for t in routing_inputs(*ROUTING_SHAPES[0], activations=False)]
    counts = []
    for route in (lambda u, w, p: attention_routing(capsule_votes(u, w), p),
                  lambda u, w, p: fused_attention_routing(u, w, p)):
        with FlopCounterMode(display=False) as counter:
            route(*inputs)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0



# ---- behaviour observed directly: normalisation, activations, memory-bounded passes, precision -------

def test_primary_capsules_are_a_conv_then_a_layer_norm_per_pose():
    """Against an independent computation: an explicit sum over the conv window, channel c as entry c % d
    of capsule c // d, then (x - mean) / sqrt(var + eps) per pose with the shared gain and bias."""
    torch.manual_seed(10)
    caps, d, in_chs = 3, 4, 2
    layer = PrimaryCapsules(in_chs, caps, d, kernel_size=2, stride=1, activations=True)
    with torch.no_grad():
        layer.norm.weight.normal_()
        layer.norm.bias.normal_()
    x = torch.randn(2, in_chs, 4, 5)
    poses, activations = layer(x)
    kernel = layer.conv.weight  # (C_out, C_in, 2, 2)
    out = torch.zeros(2, 3, 4, kernel.shape[0])
    for y in range(3):
        for w in range(4):
            out[:, y, w] = torch.einsum('bcuv,ocuv->bo', x[:, :, y:y + 2, w:w + 2], kernel)
    raw = out[..., :caps * d].reshape(2, 3, 4, caps, d)
    mean = raw.mean(-1, keepdim=True)
    var = ((raw - mean) ** 2).mean(-1, keepdim=True)
    expected = (raw - mean) / torch.sqrt(var + layer.norm.eps) * layer.norm.weight + layer.norm.bias
    torch.testing.assert_close(poses, expected)
    torch.testing.assert_close(activations, torch.sigmoid(out[..., caps * d:]))
    with torch.no_grad():  # unit gain, zero bias: every pose has mean 0 and (biased) variance v / (v + eps)
        layer.norm.weight.fill_(1.)
        layer.norm.bias.zero_()
        poses = layer(x).poses
    torch.testing.assert_close(poses.mean(-1), torch.zeros(poses.shape[:-1]), rtol=0, atol=1e-12)
    var = var.squeeze(-1)
    torch.testing.assert_close(poses.var(-1, unbiased=False), var / (var + layer.norm.eps))


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
    for got, want in zip(run(lambda x, w, b: layers.pose_norm(x, w, b, 1e-5), dtype), expected):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance * want.abs().max().item())


def test_gradcheck_pose_norm(kernel):
    inputs = [torch.randn(3, 5, 16, requires_grad=True), torch.randn(16, requires_grad=True),
              torch.randn(16, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda x, w, b: layers.pose_norm(x, w, b, 1e-5), inputs)


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
    assert type(layers.PoseNorm(9)(torch.randn(2, 9, requires_grad=True)).grad_fn).__name__ == 'NativeLayerNormBackward0'
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


@pytest.mark.parametrize('fused', [False, True])
def test_ablation_c_activation_is_the_sigmoid_of_the_mass_weighted_agreement(fused, request):
    """a_j = sigmoid(beta_a + beta_u * sum_i m_ij a_ij / sum_i m_ij) with m_ij = r_ij * child activation,
    computed here from the naive layer's votes; a parent's activation rises with the agreement."""
    if fused:
        request.getfixturevalue('kernel')
    torch.manual_seed(11)
    layer = FCCapsules(6, 3, 4, activations=True)
    layer.fused_routing = fused
    with torch.no_grad():
        layer.beta_a.normal_()
        layer.beta_u.uniform_(0.5, 2.)
    child, parent = torch.randn(2, 1, 1, 6, 4), torch.randn(2, 1, 1, 3, 4)
    child_acts = torch.rand(2, 1, 1, 6)
    got = layer(Capsules(child, child_acts), Capsules(parent))[0].activations.reshape(2, 3)
    for b in range(2):
        for j in range(3):
            children = naive_children(layer, child, b, 0, 0)
            agreement = torch.stack([torch.stack([parent[b, 0, 0, k] @ naive_vote(layer, p, i, k) for k in range(3)])
                                     for i, p in enumerate(children)]) / 2.  # (i, k) / sqrt(d)
            r = agreement.softmax(-1)
            mass = r[:, j] * child_acts[b, 0, 0]
            expected = torch.sigmoid(layer.beta_a[j] + layer.beta_u[j] * (mass * agreement[:, j]).sum() / mass.sum())
            torch.testing.assert_close(got[b, j], expected)
    # the same children and parent j scaled up: agreement with j (here positive) grows, so does j's activation
    aligned = parent.clone()
    aligned[:, :, :, 0] = naive_vote(layer, child[0, 0, 0, 0], 0, 0).reshape(-1)
    low = layer(Capsules(child, child_acts), Capsules(aligned))[0].activations[0, 0, 0, 0]
    high = layer(Capsules(child, child_acts), Capsules(aligned * torch.tensor([3., 1., 1.])[:, None]))[0]
    assert high.activations[0, 0, 0, 0] > low


def _largest_votes_formed(monkeypatch):
    """Patches capsule_votes where the layers and the chunked pass call it; returns the sizes it made."""
    sizes = []

    def recording(children, weight):
        votes = capsule_votes(children, weight)
        sizes.append(votes.numel())
        return votes
    monkeypatch.setattr(routing, 'capsule_votes', recording)
    monkeypatch.setattr(layers, 'capsule_votes', recording)
    return sizes


def test_max_votes_bounds_the_votes_formed_and_kept(monkeypatch):
    """Chunking observed: with max_votes, no vote tensor larger than the bound is formed (forward and
    recomputation), and autograd keeps none of them; without it the whole vote tensor is formed and kept."""
    x = torch.randn(4, 1, 10, 10)
    model = tiny_capsnet(iterations=3).train()
    model.set_fused_routing(False)
    per_group = max(m.weight[:, :, 0].numel() * m.child_rows * m.parent_cols
                    for m in model.modules() if isinstance(m, (ConvCapsules, FCCapsules)))
    for max_votes, bounded in ((None, False), (2 * per_group, True)):
        model.set_max_votes(max_votes)
        sizes = _largest_votes_formed(monkeypatch)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = model(x)
        formed_forward = max(sizes)
        out.sum().backward()
        if bounded:
            assert max(sizes) <= max_votes and len(sizes) > 3  # every pass chunked, recomputed in backward
            assert max(saved) < max_votes
        else:
            assert formed_forward > 2 * per_group and max(saved) >= formed_forward


def test_grad_checkpointing_recomputes_routing_and_keeps_no_votes(monkeypatch):
    """Checkpointing observed: votes are formed again in the backward pass, and the largest tensor
    autograd keeps is no longer a vote tensor."""
    x = torch.randn(2, 1, 10, 10)
    model = tiny_capsnet(iterations=3).train()
    model.set_fused_routing(False)
    model.set_max_votes(None)
    sizes = _largest_votes_formed(monkeypatch)
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        sizes.clear()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = model(x)
        formed_forward = len(sizes)
        out.sum().backward()
        if enable:
            assert len(sizes) > formed_forward  # routing passes recomputed
            assert max(saved) < max(sizes)
        else:
            assert len(sizes) == formed_forward and max(saved) >= max(sizes)


class CountOps:
    """Counts aten calls by name (a TorchDispatchMode sees the recomputation of checkpointed code)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        counts = self.counts = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))
        self.mode = Mode()


def test_grad_checkpointing_reaches_the_resnet_backbone():
    """The backbone's convolutions run again in the backward pass (beyond the primary capsule conv,
    which is never checkpointed)."""
    model = CapsNet(num_classes=3, in_chans=1, img_size=16, backbone='resnet', primary_caps=2, pose_dim=4,
                    backbone_args=dict(widths=(4, 4), depths=(1, 1)), capsule_layers=(('conv', 2, 3, 1),)).train()
    x = torch.randn(2, 1, 16, 16)
    counted = {}
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        out = model(x)
        counter = CountOps()
        with counter.mode:
            out.sum().backward()
        counted[enable] = counter.counts.get('convolution', 0)
    assert counted[False] == 0 and counted[True] > 0


def test_routing_softmax_and_layer_norm_run_in_float32_under_autocast():
    """Under bf16 autocast every softmax and LayerNorm of routing gets float32 inputs (the plain-op path;
    the fused kernel computes in float32 by construction), while the convolutions run in bf16."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Dtypes(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if args and isinstance(args[0], torch.Tensor):
                self.seen.append((func.overloadpacket.__name__, args[0].dtype))
            return func(*args, **(kwargs or {}))

    model = tiny_capsnet(iterations=3, activations=True).float()
    model.set_fused_routing(False)
    x = torch.randn(2, 1, 10, 10, dtype=torch.float32)
    with torch.autocast('cpu', dtype=torch.bfloat16), Dtypes() as mode:
        out = model(x)
    assert torch.isfinite(out).all()
    ops = {}
    for name, dtype in mode.seen:
        ops.setdefault(name, set()).add(dtype)
    assert ops['_softmax'] == {torch.float32} and ops['native_layer_norm'] == {torch.float32}
    assert torch.bfloat16 in ops['convolution']


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
    if routing.routing_kernel() is None:
        unavailable('the fused routing kernel could not be built on this machine')
    assert torch.ops.timm_capsules.attention_routing.default is not None


@pytest.mark.slow
def test_compiled_training_without_the_kernel_uses_the_fallback_and_matches_eager(monkeypatch):
    """No compiler: the op's plain-op fallback must honour its fake kernel's (contiguous) strides, or
    torch.compile training stops with a stride error."""
    monkeypatch.setattr(routing, '_kernel', False)  # as after a failed build
    assert routing.routing_kernel() is None
    torch._dynamo.reset()
    model = tiny_capsnet(iterations=3, activations=True).float().train()
    assert_compiled_matches_eager(model, torch.randn(2, 1, 10, 10, dtype=torch.float32), tol=1e-5)
    torch._dynamo.reset()


# ---- the kernel's build cache ------------------------------------------------------------------------

def kernel_in_subprocess(extensions_dir, code='k = routing.routing_kernel(); print(k is not None)', **env):
    import subprocess
    import sys
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions_dir), **env)
    return subprocess.run([sys.executable, '-c', f'import sys; from timm_capsules import routing; {code}'],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def build_copy(tmp_path, kernel):
    """A copy of this machine's verified kernel build, in its own extensions folder."""
    import shutil
    folder, name = routing._kernel_build_folder()
    copy = tmp_path / 'extensions'
    shutil.copytree(folder, copy / folder.relative_to(folder.parents[1]), copy_function=shutil.copy2)
    return copy, copy / folder.relative_to(folder.parents[1]), name


def test_a_verified_build_loads_without_compiling_or_cpp_extension(build_copy):
    extensions, folder, name = build_copy
    done = kernel_in_subprocess(extensions, 'k = routing.routing_kernel(); print(k is not None, '
                                            "'torch.utils.cpp_extension' in sys.modules)")
    assert done.returncode == 0 and done.stdout.split() == ['True', 'False'], done.stderr
    assert 'compiling' not in done.stderr and 'No CUDA runtime' not in done.stderr


def test_building_the_cpu_kernel_prints_no_cuda_notice(tmp_path):
    """torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." at import on a machine
    without a GPU whose CUDA_HOME exists; the kernel's build imports it without that line."""
    if torch.cuda.is_available():
        pytest.skip('the notice only comes on a machine without a CUDA runtime')
    plain = kernel_in_subprocess(tmp_path, 'import torch.utils.cpp_extension', CUDA_HOME=str(tmp_path))
    assert plain.returncode == 0 and 'No CUDA runtime is found' in plain.stderr  # what torch does on its own
    ours = kernel_in_subprocess(tmp_path, 'print(routing._import_cpp_extension().load.__name__)',
                                CUDA_HOME=str(tmp_path))
    assert ours.returncode == 0 and ours.stdout.split() == ['load'], ours.stderr
    assert 'No CUDA runtime' not in ours.stderr


def test_a_build_is_verified_against_its_source_and_the_shared_header(kernel):
    """A build stands for its .cpp and csrc/vector_math.h together: a changed header alone rebuilds it."""
    folder, name = routing._kernel_build_folder()
    identity = (folder / f'{name}.sha256').read_text().split('\n')[0].split()
    header = routing.KERNEL_SOURCE.parent / 'vector_math.h'
    assert identity[:2] == [routing._sha256(routing.KERNEL_SOURCE), routing._sha256(header)]


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
    assert (folder / f'{name}.sha256').read_text().split()[-1] == routing._sha256(library)
    again = kernel_in_subprocess(extensions)
    assert again.stdout.split() == ['True'] and 'compiling' not in again.stderr


def test_a_build_without_its_checksum_or_of_another_source_is_not_trusted(build_copy, monkeypatch):
    extensions, folder, name = build_copy
    stamp = folder / f'{name}.sha256'
    intact = stamp.read_text()
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(extensions))
    monkeypatch.setattr(routing, '_build_kernel', lambda *args: 'rebuilt')
    for damage in (lambda: stamp.unlink(),  # a build that never finished
                   lambda: stamp.write_text(intact.replace(routing._sha256(routing.KERNEL_SOURCE), '0' * 64))):
        stamp.write_text(intact)
        damage()
        monkeypatch.setattr(routing, '_kernel', None)
        assert routing.routing_kernel() == 'rebuilt'
    stamp.write_text(intact)
    monkeypatch.setattr(routing, '_kernel', None)
    assert routing.routing_kernel() not in (None, 'rebuilt')  # intact again: loaded, not built


def test_each_environment_gets_its_own_build_folder(monkeypatch):
    here = routing._kernel_build_folder()
    monkeypatch.setattr(torch, '__file__', '/another/venv/lib/python3.11/site-packages/torch/__init__.py')
    elsewhere = routing._kernel_build_folder()
    assert here[1] != elsewhere[1] and here[0].parent == elsewhere[0].parent


@pytest.mark.parametrize('routing_kind, used', [('concurrent', [0, 1, 2]), ('sequential', [2, 2, 2])])
def test_trace_carries_each_layers_geometry_and_the_iteration_the_logits_read(routing_kind, used):
    """tiny_capsnet: 5x5 primary grid of 3 types -> conv k3 s1 (3 types) -> conv k2 s1 (2 types) -> 3 classes.
    With t = 3 and concurrent routing, the class capsules' last update reads the second layer's update of
    iteration 2, which read the first layer's update of iteration 1 (indices 0-based)."""
    model = tiny_capsnet(iterations=3, routing=routing_kind)
    with torch.no_grad():
        trace = model.forward_routing(torch.randn(1, 1, 10, 10))
    assert trace.geometry == [('conv', 3, 1, (5, 5, 3), (3, 3, 3)), ('conv', 2, 1, (3, 3, 3), (2, 2, 2)),
                              ('fc', None, None, (2, 2, 2), (1, 1, 3))]
    assert trace.used_iterations == used
