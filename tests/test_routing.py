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
from timm_capsules.routing import attention_routing, capsule_votes, uniform_routing

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

@pytest.mark.parametrize('routing', ['concurrent', 'sequential'])
@pytest.mark.parametrize('iterations', [1, 2, 3])
@pytest.mark.parametrize('matrix_pose', [True, False])
def test_capsnet_matches_naive_schedule(routing, iterations, matrix_pose):
    model = tiny_capsnet(matrix_pose, iterations, routing)
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
    reference.set_max_votes(None)
    chunked = tiny_capsnet(iterations=3).train()
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
