"""The routing core against a naive reference written with explicit loops (``naive_routing.py``): layers, whole
models' schedules, and behaviour observed directly (normalisation, activations, memory-bounded passes, precision).
The fused kernels against the plain tensor ops are in ``test_kernels.py``.
"""

import pytest
import torch

from timm_capsules.capsnet import CapsNet
from timm_capsules.layers import Capsules, ConvCapsules, FCCapsules, PrimaryCapsules
from timm_capsules import layers, routing
from timm_capsules.routing import attention_routing, capsule_votes, uniform_routing

from naive_routing import (  # noqa: F401  (float64: an autouse fixture)
    float64,
    naive_capsnet_history,
    naive_capsnet_logits,
    naive_children,
    naive_layer,
    naive_vote,
    tiny_capsnet,
)


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
            Capsules(child), None if parents is None else Capsules(parents), return_coefficients=True
        )
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
            window = grid[:, 2 * y : 2 * y + 3, 2 * x : 2 * x + 3]  # (B, ky, kx, N, d)
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
    monkeypatch.setattr(layers, 'plain_ops_only', lambda: keep_copy)
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
    for g_fast, g_slow in zip(
        torch.autograd.grad((fast * probe).sum(), inputs), torch.autograd.grad((slow * probe).sum(), inputs)
    ):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-5)


def test_gradcheck_uniform_window_routing(monkeypatch):
    monkeypatch.setattr(routing, '_BACKWARD_CHUNK_ELEMENTS', 1)  # an image per chunk
    torch.manual_seed(2)
    grid = torch.randn(3, 5, 4, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2 * 2 * 2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, w: routing.uniform_window_routing(g, w, 2, 1), [grid, weight])


@pytest.mark.parametrize(
    'dtype, cols', [(torch.float32, 4), (torch.float32, 2), (torch.float32, 3), (torch.bfloat16, 4), (torch.float64, 2)]
)
def test_copy_permuted_moves_pose_rows_as_wide_elements_and_equals_permute(dtype, cols):
    """Rows of 8 or 16 bytes move as one element of a wide dtype; others value by value; the same result, also
    for a slice at an odd offset, and into an out tensor."""
    x = torch.randn(3, 5, 6, 2, cols).to(dtype)
    for source in (x, x[1:], x.reshape(-1)[1 : 1 + 2 * 5 * 6 * 2 * cols].view(2, 5, 6, 2, cols)):
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
        monkeypatch.setattr(layers, 'plain_ops_only', lambda: plain)
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
            out[:, y, w] = torch.einsum('bcuv,ocuv->bo', x[:, :, y : y + 2, w : w + 2], kernel)
    raw = out[..., : caps * d].reshape(2, 3, 4, caps, d)
    mean = raw.mean(-1, keepdim=True)
    var = ((raw - mean) ** 2).mean(-1, keepdim=True)
    expected = (raw - mean) / torch.sqrt(var + layer.norm.eps) * layer.norm.weight + layer.norm.bias
    torch.testing.assert_close(poses, expected)
    torch.testing.assert_close(activations, torch.sigmoid(out[..., caps * d :]))
    with torch.no_grad():  # unit gain, zero bias: every pose has mean 0 and (biased) variance v / (v + eps)
        layer.norm.weight.fill_(1.0)
        layer.norm.bias.zero_()
        poses = layer(x).poses
    torch.testing.assert_close(poses.mean(-1), torch.zeros(poses.shape[:-1]), rtol=0, atol=1e-12)
    var = var.squeeze(-1)
    torch.testing.assert_close(poses.var(-1, unbiased=False), var / (var + layer.norm.eps))


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
        layer.beta_u.uniform_(0.5, 2.0)
    child, parent = torch.randn(2, 1, 1, 6, 4), torch.randn(2, 1, 1, 3, 4)
    child_acts = torch.rand(2, 1, 1, 6)
    got = layer(Capsules(child, child_acts), Capsules(parent))[0].activations.reshape(2, 3)
    for b in range(2):
        for j in range(3):
            children = naive_children(layer, child, b, 0, 0)
            agreement = (
                torch.stack(
                    [
                        torch.stack([parent[b, 0, 0, k] @ naive_vote(layer, p, i, k) for k in range(3)])
                        for i, p in enumerate(children)
                    ]
                )
                / 2.0
            )  # (i, k) / sqrt(d)
            r = agreement.softmax(-1)
            mass = r[:, j] * child_acts[b, 0, 0]
            expected = torch.sigmoid(layer.beta_a[j] + layer.beta_u[j] * (mass * agreement[:, j]).sum() / mass.sum())
            torch.testing.assert_close(got[b, j], expected)
    # the same children and parent j scaled up: agreement with j (here positive) grows, so does j's activation
    aligned = parent.clone()
    aligned[:, :, :, 0] = naive_vote(layer, child[0, 0, 0, 0], 0, 0).reshape(-1)
    low = layer(Capsules(child, child_acts), Capsules(aligned))[0].activations[0, 0, 0, 0]
    high = layer(Capsules(child, child_acts), Capsules(aligned * torch.tensor([3.0, 1.0, 1.0])[:, None]))[0]
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
    per_group = max(
        m.weight[:, :, 0].numel() * m.child_rows * m.parent_cols
        for m in model.modules()
        if isinstance(m, (ConvCapsules, FCCapsules))
    )
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
    model = CapsNet(
        num_classes=3,
        in_chans=1,
        img_size=16,
        backbone='resnet',
        primary_caps=2,
        pose_dim=4,
        backbone_args=dict(widths=(4, 4), depths=(1, 1)),
        capsule_layers=(('conv', 2, 3, 1),),
    ).train()
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


@pytest.mark.parametrize('routing_kind, used', [('concurrent', [0, 1, 2]), ('sequential', [2, 2, 2])])
def test_trace_carries_each_layers_geometry_and_the_iteration_the_logits_read(routing_kind, used):
    """tiny_capsnet: 5x5 primary grid of 3 types -> conv k3 s1 (3 types) -> conv k2 s1 (2 types) -> 3 classes.
    With t = 3 and concurrent routing, the class capsules' last update reads the second layer's update of
    iteration 2, which read the first layer's update of iteration 1 (indices 0-based)."""
    model = tiny_capsnet(iterations=3, routing=routing_kind)
    with torch.no_grad():
        trace = model.forward_routing(torch.randn(1, 1, 10, 10))
    assert trace.geometry == [
        ('conv', 3, 1, (5, 5, 3), (3, 3, 3)),
        ('conv', 2, 1, (3, 3, 3), (2, 2, 2)),
        ('fc', None, None, (2, 2, 2), (1, 1, 3)),
    ]
    assert trace.used_iterations == used


def test_routing_rounds_list_the_schedule_the_walkers_follow():
    """Known answers of the one schedule generator (``schedule.routing_rounds``), for tiny_capsnet's two hidden
    layers under class capsules at depth 3: concurrent t = 4 skips the first layer's third update (never read),
    t = 2 routes only the class capsules after the uniform pass, the complete schedule (``forward_routing``)
    routes every layer at every iteration, and sequential routing finishes each layer before the next."""
    from timm_capsules.schedule import routing_rounds

    assert routing_rounds(2, 3, 4, 'concurrent') == [(1, (1, 2)), (2, (1, 2)), (3, (2,))]
    assert routing_rounds(2, 3, 2, 'concurrent') == [(1, (1, 2))]
    assert routing_rounds(3, 3, 3, 'concurrent', complete=True) == [(1, (1, 2, 3)), (2, (1, 2, 3)), (3, (1, 2, 3))]
    assert routing_rounds(2, 3, 2, 'sequential') == [(1, (1,)), (2, (1,)), (1, (2,)), (2, (2,))]
    assert routing_rounds(0, 1, 3, 'concurrent') == [(1, ()), (2, ())]  # no hidden layers: two snapshots to read
