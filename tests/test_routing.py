"""The routing core against a naive reference written here with explicit loops.

The reference follows DESIGN.md §2 literally: per output position, per child (window offset and child
type, or type-major grid index), per parent: vote, agreement / sqrt(d), softmax over parents, sum,
LayerNorm; uniform first pass; concurrent or sequential schedule over the whole stack.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_capsules.capsnet import CapsNet
from timm_capsules.layers import Capsules, ConvCapsules, FCCapsules
from timm_capsules import routing
from timm_capsules.routing import attention_routing, capsule_votes, fused_attention_routing, uniform_routing

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')


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


def naive_capsnet_logits(model, x):
    """The whole model with the paper's schedules, every layer routed at every iteration."""
    features = model.backbone(x)[-1]
    primary = model.primary(features).poses
    layers = list(model.capsule_layers) + [model.head.capsules]
    t = model.iterations
    if model.routing == 'concurrent':
        poses = [primary]
        for layer in layers:
            poses.append(naive_layer(layer, poses[-1])[0])
        for _ in range(t - 1):
            poses = [primary] + [naive_layer(layer, poses[l], poses[l + 1])[0] for l, layer in enumerate(layers)]
        top = poses[-1]
    else:
        top = primary
        for layer in layers:
            parents = naive_layer(layer, top)[0]
            for _ in range(t - 1):
                parents = naive_layer(layer, top, parents)[0]
            top = parents
    return model.head.fc(top).flatten(1)


def tiny_capsnet(matrix_pose=True, iterations=2, routing='concurrent', capsule_layers=None, **kwargs):
    torch.manual_seed(0)
    pose_dim = 4 if matrix_pose else 3
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

@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('routing', ['concurrent', 'sequential'])
@pytest.mark.parametrize('iterations', [1, 2, 3])
@pytest.mark.parametrize('matrix_pose', [True, False])
def test_capsnet_matches_naive_schedule(routing, iterations, matrix_pose, fused):
    model = tiny_capsnet(matrix_pose, iterations, routing)
    model.set_fused_routing(fused)
    x = torch.randn(2, 1, 10, 10)
    with torch.no_grad():
        expected = naive_capsnet_logits(model, x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_routing(x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('iterations', [2, 3])
def test_fc_hidden_layer_stack_matches_naive_schedule(iterations):
    model = tiny_capsnet(capsule_layers=(('conv', 3, 3, 2), ('fc', 4)), iterations=iterations)
    x = torch.randn(2, 1, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), naive_capsnet_logits(model, x), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize('activations', [False, True])
def test_conv_uniform_pass_as_convolution_equals_window_path_fp32(activations):
    """The fast uniform pass (one strided conv) equals uniform routing over explicit windows, in fp32,
    for outputs and gradients."""
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
]


@pytest.mark.parametrize('activations', [False, True])
@pytest.mark.parametrize('shape', ROUTING_SHAPES)
def test_fused_routing_equals_tensor_ops_fp32(shape, activations):
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


def test_fused_routing_without_coefficients_gives_the_same_poses_and_gradients():
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
def test_gradcheck_fused_routing(pose, activations):
    inputs = routing_inputs(3, 5, 3, *pose, activations, dtype=torch.float64)
    route = lambda *t: fused_attention_routing(*t[:3], t[3] if activations else None)  # noqa: E731
    assert torch.autograd.gradcheck(route, inputs)


def test_fused_routing_keeps_no_votes_for_the_backward_pass():
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


def test_fused_routing_runs_bf16_inputs_in_float32():
    inputs = routing_inputs(*ROUTING_SHAPES[0], activations=False)
    expected = fused_attention_routing(*[t.detach() for t in inputs])[0]
    got = fused_attention_routing(*[t.detach().bfloat16() for t in inputs])[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_without_a_compiler_fused_routing_warns_and_falls_back_to_tensor_ops(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError('no C++ compiler here')

    inputs = routing_inputs(*ROUTING_SHAPES[1], activations=True)
    with_kernel = fused_attention_routing(*inputs)
    monkeypatch.setattr(routing, '_kernel', None)
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', no_compiler)
    with pytest.warns(UserWarning, match='no C.. compiler here'):
        assert routing.routing_kernel() is None
    without = fused_attention_routing(*inputs)
    for a, b in zip(without, with_kernel):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    probes = [torch.randn_like(t) for t in with_kernel]
    grads = [torch.autograd.grad(sum((o * p).sum() for o, p in zip(out, probes)), inputs)
             for out in (without, with_kernel)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('options', [dict(iterations=3), dict(iterations=4, activations=True),
                                     dict(iterations=3, routing='sequential', matrix_pose=False)])
def test_fused_capsnet_equals_tensor_op_capsnet_fp32(options):
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
def test_compiled_training_step_through_the_fused_kernel_matches_eager():
    model = tiny_capsnet(iterations=3).float().train()
    x = torch.randn(2, 1, 10, 10, dtype=torch.float32)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(torch.autograd.grad(out.square().sum(), list(model.parameters())), expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_flop_counter_counts_the_fused_forward_like_the_tensor_ops():
    from torch.utils.flop_counter import FlopCounterMode
    inputs = [t.detach() for t in routing_inputs(*ROUTING_SHAPES[0], activations=False)]
    counts = []
    for route in (lambda u, w, p: attention_routing(capsule_votes(u, w), p),
                  lambda u, w, p: fused_attention_routing(u, w, p)):
        with FlopCounterMode(display=False) as counter:
            route(*inputs)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0

