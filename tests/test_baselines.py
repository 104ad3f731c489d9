"""Tests of the paper's comparison systems: dynamic routing, EM routing, their losses, the baseline
models' parameter counts, short real training runs and the CapsNet ablations."""
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import timm_capsules  # noqa: F401  (registers the models)
from timm_capsules.cnn_baselines import BaselineCNN
from timm_capsules.dynamic_capsnet import DynamicCapsNet
from timm_capsules.em_capsnet import EMCapsNet
from timm_capsules.data import diverse_multimnist as dmm
from timm_capsules.data import mnist
from timm_capsules.losses import margin_loss, spread_loss
from timm_capsules.routing_baselines import (
    dynamic_routing, em_routing, em_routing_from_poses, em_routing_kernel, inverse_temperature_schedule, squash)

from ci import unavailable

# ----------------------------------------------------------------------------------- parameter counts
# (exact count we get, the paper's figure in millions as printed)
PARAMS = {
    'dynamic_capsnet_simple_cifar10': (7_992_320, 7.99),
    'dynamic_capsnet_simple_cifar100': (31_585_280, 31.59),
    'dynamic_capsnet_resnet_cifar10': (12_450_880, 12.45),
    'dynamic_capsnet_resnet_cifar100': (36_043_840, 36.04),
    'em_capsnet_simple_cifar10': (452_500, 0.45),
    'em_capsnet_simple_cifar100': (498_760, 0.50),
    'em_capsnet_resnet_cifar10': (1_710_036, 1.71),
    'em_capsnet_resnet_cifar100': (1_756_296, 1.76),
    'cnn_baseline_cifar10': (18_919_434, 18.92),
    'cnn_baseline_cifar100': (19_011_684, 19.01),
    'resnet18_cifar10': (11_173_962, 11.17),
    'cnn_baseline_multimnist': (19_553_162, 19.55),
    'cnn_fc_multimnist': (42_490_762, 42.49),
    'dynamic_capsnet_vector_multimnist': (42_477_568, 42.48),
}


def test_every_baseline_is_registered():
    assert set(PARAMS) | {'resnet18_cifar100'} == set(timm.list_models(module=timm_capsules.MODEL_MODULES[1:]))


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_parameter_count(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    exact, paper = PARAMS[name]
    assert round(count / 1e4) / 100 == paper, f'{name}: {count:,} does not round to the paper\'s {paper}M'
    assert count == exact


def test_cifar_resnet18_is_timms_resnet_with_a_cifar_stem():
    model = timm.create_model('resnet18_cifar10')
    assert isinstance(model, timm.models.ResNet)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert [info['reduction'] for info in model.feature_info] == [1, 1, 2, 4, 8]
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 4, 4)


# --------------------------------------------------------------------------------- naive references
def naive_squash(s):
    norm = math.sqrt(sum(x * x for x in s))
    return [norm / (1 + norm ** 2) * x for x in s]


def naive_dynamic_routing(votes, iterations):
    """Sabour et al.'s Procedure 1 with explicit loops over groups, children, parents and entries."""
    G, I, J, D = votes.shape
    u = votes.tolist()
    out_v, out_c = [], []
    for g in range(G):
        b = [[0.0] * J for _ in range(I)]
        for it in range(iterations):
            c = []
            for i in range(I):
                m = max(b[i])
                e = [math.exp(b[i][j] - m) for j in range(J)]
                c.append([x / sum(e) for x in e])
            v = []
            for j in range(J):
                s = [sum(c[i][j] * u[g][i][j][d] for i in range(I)) for d in range(D)]
                v.append(naive_squash(s))
            if it < iterations - 1:
                for i in range(I):
                    for j in range(J):
                        b[i][j] += sum(u[g][i][j][d] * v[j][d] for d in range(D))
        out_v.append(v)
        out_c.append(c)
    return torch.tensor(out_v, dtype=torch.float64), torch.tensor(out_c, dtype=torch.float64)


def naive_em_routing(votes, a_in, beta_u, beta_a, lambdas, normalize_cost, eps):
    """Hinton et al.'s Procedure 1 with explicit loops, in the votes' own units (no rescaling). The
    variance is E_r[V^2] - mu^2 with r = R a / (mass + eps), floored at eps * (max |V| of the group)^2."""
    G, I, J, D = votes.shape
    V, A = votes.tolist(), a_in.tolist()
    bu, ba = beta_u.tolist(), beta_a.tolist()
    poses, acts, assigns = [], [], []
    for g in range(G):
        s = max(abs(V[g][i][j][d]) for i in range(I) for j in range(J) for d in range(D))
        R = [[1.0 / J] * J for _ in range(I)]
        for it, lam in enumerate(lambdas):
            mu, var, cost, mass = [], [], [], []
            for j in range(J):
                r = [R[i][j] * A[g][i] for i in range(I)]
                m = sum(r)
                w = [x / (m + eps) for x in r]
                mu_j = [sum(w[i] * V[g][i][j][d] for i in range(I)) for d in range(D)]
                var_j = [max(sum(w[i] * V[g][i][j][d] ** 2 for i in range(I)) - mu_j[d] ** 2, 0.) + eps * s * s
                         for d in range(D)]
                mu.append(mu_j), var.append(var_j), mass.append(m)
            for j in range(J):
                terms = [bu[j] + 0.5 * math.log(var[j][d]) for d in range(D)]
                if normalize_cost:
                    rel = mass[j] / (sum(mass) / J + eps)
                    cost.append(sum(terms) / D * rel)
                else:
                    cost.append(sum(terms) * mass[j])
            if normalize_cost:
                mean_cost = sum(cost) / J
                cost = [c - mean_cost for c in cost]
            a = [1 / (1 + math.exp(-lam * (ba[j] - cost[j]))) for j in range(J)]
            if it == len(lambdas) - 1:
                break
            for i in range(I):
                logp = []
                for j in range(J):
                    lp = sum(-(V[g][i][j][d] - mu[j][d]) ** 2 / (2 * var[j][d])
                             - 0.5 * math.log(2 * math.pi * var[j][d]) for d in range(D))
                    logp.append(math.log(a[j]) + lp)
                m = max(logp)
                e = [math.exp(x - m) for x in logp]
                R[i] = [x / sum(e) for x in e]
        poses.append(mu), acts.append(a), assigns.append(R)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return t(poses), t(acts), t(assigns)


@pytest.mark.parametrize('iterations', [1, 3])
def test_dynamic_routing_matches_naive_loops(iterations):
    torch.manual_seed(0)
    votes = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    parents, coefficients = dynamic_routing(votes, iterations)
    ref_parents, ref_coefficients = naive_dynamic_routing(votes, iterations)
    torch.testing.assert_close(parents, ref_parents, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(coefficients, ref_coefficients, rtol=1e-6, atol=1e-6)
    assert (parents.norm(dim=-1) < 1).all()


@pytest.mark.parametrize('normalize_cost', [True, False])
@pytest.mark.parametrize('magnitude', [1.0, 1e3])
def test_em_routing_matches_naive_loops(normalize_cost, magnitude):
    torch.manual_seed(1)
    votes = torch.randn(2, 6, 3, 4, dtype=torch.float64) * magnitude
    a_in = torch.rand(2, 6, dtype=torch.float64)
    beta_u, beta_a = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    lambdas = inverse_temperature_schedule(3, 0.5 if normalize_cost else 0.05)
    got = em_routing(votes, a_in, beta_u, beta_a, lambdas, normalize_cost=normalize_cost, eps=1e-6)
    ref = naive_em_routing(votes, a_in, beta_u, beta_a, lambdas, normalize_cost, 1e-6)
    for name, g, r in zip(('poses', 'activations', 'assignments'), got, ref):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g.double(), r, rtol=1e-6, atol=1e-6 * magnitude if name == 'poses' else 1e-6,
                                   msg=name)
    assert not torch.allclose(got[2], torch.full_like(got[2], 1 / 3))  # routing really moved


# ---- the fused EM kernel (csrc/em_routing.cpp) against autograd through the plain tensor ops

@pytest.fixture
def em_kernel():
    """The compiled EM kernel; without it the op runs the plain ops and would be compared with themselves."""
    if em_routing_kernel() is None:
        unavailable('the fused EM routing kernel could not be built on this machine')


def _em_inputs(dtype, G, I, J, side=4, offset=False, seed=4):
    torch.manual_seed(seed)
    grad = dict(dtype=dtype, requires_grad=True)
    children, weight = torch.randn(G, I, side, side, **grad), torch.randn(I, J, side, side, **grad)
    a_in, beta_u, beta_a = torch.rand(G, I, **grad), torch.randn(J, **grad), torch.randn(J, **grad)
    return children, weight, torch.rand(I, side, side, dtype=dtype) if offset else None, a_in, beta_u, beta_a


def _em_kernel_and_reference(inputs, temperatures, normalize_cost, probes_seed=5, window=None):
    """Outputs and the gradients of every input for the same random output gradients, from the kernel's op
    and from autograd through the plain ops. Groups (G, I, ...) are 1 x 1 windows; with ``window``, the
    children and their activations are a grid (B, H, W, N, ...)."""
    import timm_capsules.routing_baselines as rb
    children, weight, offset, a_in, beta_u, beta_a = inputs
    leaves = [children, weight, a_in, beta_u, beta_a]
    grid, grid_a = (children, a_in) if window else (children[:, None, None], a_in[:, None, None])
    args = (grid, weight, offset, grid_a, beta_u, beta_a, *(window or (1, 1)), temperatures, normalize_cost, 1e-6)
    got = torch.ops.timm_capsules.em_routing(*args, True)
    ref = rb._em_reference(*args)
    torch.manual_seed(probes_seed)
    used = [k for k, r in enumerate(ref) if r.requires_grad]  # one iteration: the assignments are constant
    probes = [torch.randn_like(ref[k]) for k in used]
    got_grads = torch.autograd.grad([got[k] for k in used], leaves, [p.to(got[0].dtype) for p in probes])
    ref_grads = torch.autograd.grad([ref[k] for k in used], leaves, probes)
    return list(got) + list(got_grads), list(ref) + list(ref_grads)


@pytest.mark.parametrize('J', [5, 32])  # 32: the kernel's compiled-size path; 5: sizes read at run time
@pytest.mark.parametrize('iterations', [1, 2, 3])
@pytest.mark.parametrize('normalize_cost', [True, False])
@pytest.mark.parametrize('offset', [False, True])
def test_em_kernel_and_its_backward_match_autograd(em_kernel, J, iterations, normalize_cost, offset):
    inputs = _em_inputs(torch.float64, 3, 7, J, offset=offset)
    temperatures = inverse_temperature_schedule(iterations, 1. if normalize_cost else 0.05)
    for got, ref in zip(*_em_kernel_and_reference(inputs, temperatures, normalize_cost)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def _em_grid_inputs(window, J, N=3, seed=6):
    torch.manual_seed(seed)
    grad = dict(dtype=torch.float64, requires_grad=True)
    k = window[0]
    return (torch.randn(2, 7, 6, N, 4, 4, **grad), torch.randn(k * k * N, J, 4, 4, **grad), None,
            torch.rand(2, 7, 6, N, **grad), torch.randn(J, **grad), torch.randn(J, **grad))


@pytest.mark.parametrize('window', [(3, 2), (3, 1), (2, 1)])  # overlapping windows, strided or not
@pytest.mark.parametrize('J', [5, 32])
def test_em_kernel_over_grid_windows_equals_copied_windows(em_kernel, window, J):
    """The kernel reads a conv layer's windows from the child grid and adds their gradients back into it; the
    reference copies every window out (``window_children``) and differentiates through the copy."""
    inputs = _em_grid_inputs(window, J)
    for got, ref in zip(*_em_kernel_and_reference(inputs, [1 / 3, 2 / 3, 1.], True, window=window)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_em_kernel_over_grid_windows_keeps_only_the_grid(em_kernel):
    """The windows (9/4 of the grid here) are neither copied for the kernel nor kept for its backward pass."""
    from timm_capsules.routing import window_children
    grid, weight, _, a_grid, beta_u, beta_a = _em_grid_inputs((3, 2), 32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        em_routing_from_poses(grid, weight, a_grid, beta_u, beta_a, window=(3, 2))
    assert sorted(saved) == sorted(t.numel() for t in (grid, weight, a_grid, beta_u, beta_a))
    assert window_children(grid, 3, 2).numel() not in saved


@pytest.mark.parametrize('fused', [True, False])
def test_em_routing_without_assignments_gives_the_same_poses_and_gradients(em_kernel, fused, monkeypatch):
    """A conv layer that does not use the last assignments does not get them (they are as large as the votes
    / d): the third output is empty, the rest and every gradient are unchanged; the same without the kernel."""
    if not fused:
        monkeypatch.setenv('TIMM_CAPSULES_FUSED_ROUTING', '0')
    grid, weight, _, a_grid, beta_u, beta_a = _em_grid_inputs((3, 2), 32)
    leaves = (grid, weight, a_grid, beta_u, beta_a)
    full = em_routing_from_poses(grid, weight, a_grid, beta_u, beta_a, window=(3, 2))
    lean = em_routing_from_poses(grid, weight, a_grid, beta_u, beta_a, window=(3, 2), with_assignments=False)
    assert full[2].shape == (2 * 3 * 2, 27, 32) and lean[2].numel() == 0
    for a, b in zip(full[:2], lean[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    probes = [torch.randn_like(t) for t in full[:2]]
    loss = lambda outputs: sum((o * p).sum() for o, p in zip(outputs, probes))  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(full[:2]), leaves), torch.autograd.grad(loss(lean[:2]), leaves)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_em_kernel_with_other_pose_sizes_and_gradcheck(em_kernel):
    inputs = _em_inputs(torch.float64, 2, 5, 3, side=2, offset=True)  # 2x2 poses: no compiled-size path
    for got, ref in zip(*_em_kernel_and_reference(inputs, [0.5, 1.], True)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    children, weight, offset, a_in, beta_u, beta_a = inputs

    def routed(children, weight, a_in, beta_u, beta_a):
        return torch.ops.timm_capsules.em_routing(children[:, None, None], weight, offset, a_in[:, None, None],
                                                  beta_u, beta_a, 1, 1, [0.5, 1.], True, 1e-6, True)
    assert torch.autograd.gradcheck(routed, (children, weight, a_in, beta_u, beta_a))


@pytest.mark.parametrize('G, I, J, offset', [(16, 288, 32, False), (4, 800, 10, True)])  # conv and class layers
def test_em_kernel_in_float32_is_as_accurate_as_the_plain_ops(em_kernel, G, I, J, offset):
    """EM's statistics (E[v^2] - mu^2, log sigma) lose digits in float32 whatever the order of the sums: the
    kernel is held to the plain ops' own float32 error against float64, not to the plain ops' rounding."""
    truth, _ = _em_kernel_and_reference(_em_inputs(torch.float64, G, I, J, offset=offset), [1 / 3, 2 / 3, 1.], True)
    inputs32 = [None if t is None else t.detach().float().requires_grad_(t.requires_grad)
                for t in _em_inputs(torch.float64, G, I, J, offset=offset)]
    got, ref = _em_kernel_and_reference(inputs32, [1 / 3, 2 / 3, 1.], True)
    def error(x, t):
        return ((x.double() - t).abs().max() / t.abs().max()).item()
    for k, (g, r, t) in enumerate(zip(got, ref, truth)):
        assert g.dtype == torch.float32 and error(g, t) <= max(3 * error(r, t), 2e-5), k


def test_without_a_compiler_em_routing_warns_and_falls_back_to_the_plain_ops(em_kernel, monkeypatch, tmp_path):
    """No build: em_routing_from_poses routes the materialised votes with em_routing, and the op itself (what
    torch.compile records) runs the plain ops forward and backward."""
    import torch.utils.cpp_extension
    import timm_capsules.routing_baselines as rb

    def no_compiler(*args, **kwargs):
        raise RuntimeError('no C++ compiler here')

    inputs = _em_inputs(torch.float32, 4, 18, 5, offset=True)
    children, weight, offset, a_in, beta_u, beta_a = inputs
    with_kernel = em_routing_from_poses(children, weight, a_in, beta_u, beta_a, offset=offset)
    monkeypatch.setattr(rb, '_em_kernel', None)
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))  # nothing built here yet
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', no_compiler)
    with pytest.warns(UserWarning, match='no C.. compiler here'):
        assert em_routing_kernel() is None
    without = em_routing_from_poses(children, weight, a_in, beta_u, beta_a, offset=offset)
    votes = torch.einsum('girc,ijct->gijrt', children, weight) + offset[:, None]
    plain = em_routing(votes.flatten(-2), a_in, beta_u, beta_a)
    for a, b, c in zip(without, plain, with_kernel):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    for got, ref in zip(*_em_kernel_and_reference(inputs, [1 / 3, 2 / 3, 1.], True)):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('extreme', ['huge', 'tiny', 'zero', 'mixed'])
@pytest.mark.parametrize('autocast', [False, True])
def test_em_kernel_stays_finite(em_kernel, extreme, autocast):
    children, weight, _, a_in, beta_u, beta_a = _em_inputs(torch.float32, 4, 18, 5)
    scale = dict(huge=1e30, tiny=1e-30, zero=0.)
    with torch.no_grad():
        children *= scale[extreme] if extreme in scale else torch.logspace(-30, 30, 18)[None, :, None, None]
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        poses, activations, assignments = em_routing_from_poses(
            children.to(torch.bfloat16) if autocast else children, weight, a_in, beta_u, beta_a)
        loss = poses.float().sum() * 0 + activations.float().sum()
    loss.backward()
    for tensor in (poses, activations, assignments, children.grad, weight.grad, beta_u.grad, beta_a.grad):
        assert torch.isfinite(tensor.float()).all()
    torch.testing.assert_close(assignments.float().sum(-1), torch.ones(4, 18), rtol=0, atol=1e-2)


def test_inverse_temperature_rises():
    assert inverse_temperature_schedule(3, 0.9) == pytest.approx([0.3, 0.6, 0.9])


EXTREMES = {
    'huge': lambda v: v * 1e30,
    'tiny': lambda v: v * 1e-30,
    'zero': lambda v: v * 0,
    'mixed': lambda v: v * torch.logspace(-30, 30, v.shape[1])[None, :, None, None],
}


@pytest.mark.parametrize('extreme', sorted(EXTREMES))
@pytest.mark.parametrize('zero_activations', [False, True])
@pytest.mark.parametrize('autocast', [False, True])
def test_em_routing_stays_finite(extreme, zero_activations, autocast):
    torch.manual_seed(2)
    votes = EXTREMES[extreme](torch.randn(4, 18, 5, 16))
    a_in = torch.zeros(4, 18) if zero_activations else torch.rand(4, 18)
    beta_u, beta_a = torch.zeros(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    votes.requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        poses, activations, assignments = em_routing(
            votes.to(torch.bfloat16) if autocast else votes, a_in, beta_u, beta_a)
        loss = poses.float().sum() * 0 + activations.float().sum()
    loss.backward()
    for tensor in (poses, activations, assignments, votes.grad, beta_u.grad, beta_a.grad):
        assert torch.isfinite(tensor.float()).all()
    torch.testing.assert_close(assignments.float().sum(-1), torch.ones(4, 18), rtol=0, atol=1e-2)


def test_em_model_stays_finite_under_bf16_autocast_with_extreme_images():
    torch.manual_seed(3)
    model = EMCapsNet(in_chans=1, img_size=20, backbone_args=dict(out_chs=16), primary_caps=4,
                      capsule_layers=(('conv', 4, 3, 2), ('conv', 4, 3, 1)))
    for scale in (1e6, 1e-6, 0.):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(torch.randn(2, 1, 20, 20) * scale)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ------------------------------------------------------------------------------------ squash, losses
def test_squash():
    s = torch.tensor([[3., 4.], [0., 0.], [1e-3, 0.]], requires_grad=True)
    v = squash(s)
    torch.testing.assert_close(v[0], torch.tensor([3., 4.]) / 5 * 25 / 26)
    torch.testing.assert_close(v[2], torch.tensor([1e-6, 0.]), rtol=1e-3, atol=0)
    v.sum().backward()
    assert torch.isfinite(s.grad).all()  # squash(s) ~ |s| s near 0: the true derivative there is 0
    assert s.grad[1].abs().sum() == 0 and s.grad[2].abs().sum() > 0


def test_margin_loss_by_hand():
    lengths = torch.tensor([[0.95, 0.3, 0.05], [0.5, 0.0, 0.8]])
    # image 0, class 0: 0 + class 1: 0.5 * 0.2^2 + class 2: 0; image 1 (classes 0 and 2): 0.4^2 + 0 + 0.1^2
    expected = ((0.5 * 0.2 ** 2) + (0.4 ** 2 + 0.1 ** 2)) / 2
    assert margin_loss(lengths, torch.tensor([[1., 0, 0], [1, 0, 1]])).item() == pytest.approx(expected)
    assert margin_loss(lengths[:1], torch.tensor([0])).item() == pytest.approx(0.5 * 0.2 ** 2)


def test_spread_loss_by_hand():
    a = torch.tensor([[0.9, 0.8, 0.1]])
    # target 0: (0.2 - 0.1)^2 from class 1, nothing from class 2 (gap 0.8 > margin)
    assert spread_loss(a, torch.tensor([0]), margin=0.2).item() == pytest.approx(0.01)
    assert spread_loss(a, torch.tensor([2]), margin=0.2).item() == pytest.approx(1.0 ** 2 + 0.9 ** 2)
    multi = spread_loss(a, torch.tensor([[1., 1., 0.]]), margin=0.9)
    assert multi.item() == pytest.approx(0.1 ** 2 + 0.2 ** 2)


# --------------------------------------------------------------------------- short real training runs
@pytest.fixture(scope='module')
def multimnist_batch():
    batch = dmm.make_split('train', 8, digits=mnist.load_sample('train'), seed=0)
    images = torch.from_numpy(batch.images).float()[:, None] / 255.
    return images, torch.from_numpy(batch.targets)


def _train(model, images, targets, loss_fn, optimizer, steps):
    losses = []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(images), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _assert_learns(losses):
    assert all(math.isfinite(loss) for loss in losses)
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.7 * first, f'loss did not drop: {losses}'


# the families' own classes and code paths at reduced widths, so that a few dozen steps take seconds
@pytest.mark.slow
def test_dynamic_capsnet_trains_on_diverse_multimnist(multimnist_batch):
    torch.manual_seed(0)
    images, targets = multimnist_batch
    model = DynamicCapsNet(in_chans=1, img_size=36, backbone_args=dict(out_chs=16), primary_caps=4, primary_dim=8,
                           primary_kernel_size=3, primary_stride=2, capsule_layers=(('conv', 4, 3, 1),), class_dim=8)
    losses = _train(model, images, targets, margin_loss, torch.optim.Adam(model.parameters(), 1e-2), 20)
    _assert_learns(losses)


@pytest.mark.slow
def test_em_capsnet_trains_on_diverse_multimnist(multimnist_batch):
    torch.manual_seed(0)
    images, targets = multimnist_batch
    model = EMCapsNet(in_chans=1, img_size=36, backbone_args=dict(out_chs=16), primary_caps=4,
                      capsule_layers=(('conv', 4, 3, 2), ('conv', 4, 3, 1)))
    losses = _train(model, images, targets, lambda a, t: spread_loss(a, t, margin=0.5),
                    torch.optim.Adam(model.parameters(), 1e-2), 20)
    _assert_learns(losses)


def test_cnn_baselines_train_on_diverse_multimnist(multimnist_batch):
    images, targets = multimnist_batch
    stages = ((16, 3, 2, 1, False, False), (16, 3, 2, 0, False, True), (16, 3, 1, 0, False, True))
    for head, extra in (('pool', ((24, 1, 1, 0, False, False),)), ('fc', ())):
        torch.manual_seed(0)
        model = BaselineCNN(in_chans=1, img_size=36, stages=stages + extra, head=head, head_hidden_size=24)
        losses = _train(model, images, targets, F.binary_cross_entropy_with_logits,
                        torch.optim.SGD(model.parameters(), 0.1, momentum=0.9), 20)
        _assert_learns(losses)


@pytest.mark.slow
def test_cifar_resnet_trains():
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    model = timm.create_model('resnet18_cifar10', layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))
    losses = _train(model, images, labels, F.cross_entropy, torch.optim.SGD(model.parameters(), 0.1, momentum=0.9), 12)
    _assert_learns(losses)


# --------------------------------------------------------------------------------- models, contract
@pytest.mark.parametrize('name', ['dynamic_capsnet_simple_cifar10', 'em_capsnet_simple_cifar10'])
def test_capsule_baseline_outputs_are_probabilities(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and (out >= 0).all() and (out <= 1).all()
    assert out.std() > 0  # not saturated to a constant


def test_head_routes_forward_features():
    """forward_head(forward_features(x)) is the model: features carry everything the class capsules need."""
    torch.manual_seed(0)
    model = EMCapsNet(in_chans=1, img_size=20, backbone_args=dict(out_chs=16), primary_caps=4,
                      capsule_layers=(('conv', 4, 3, 2), ('conv', 4, 3, 1))).eval()
    x = torch.randn(2, 1, 20, 20)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 4 * 17, 2, 2)
        activations = features[:, 4 * 16:]
        assert ((activations > 0) & (activations < 1)).all()
        torch.testing.assert_close(model.forward_head(features), model(x))


def test_dynamic_capsnet_output_by_hand():
    """Sabour et al.: the primary capsules are squashed, every one (type, h, w) votes u_i W_ij for every class,
    three iterations of routing by agreement, and the model returns the class capsules' lengths."""
    torch.manual_seed(0)
    model = DynamicCapsNet(in_chans=1, img_size=20, backbone_args=dict(out_chs=16), primary_caps=4, primary_dim=8,
                           primary_kernel_size=3, primary_stride=2, class_dim=8).eval()
    x = torch.randn(2, 1, 20, 20)
    with torch.no_grad():
        raw = model.primary(model.backbone(x)[-1]).poses  # (B, 4, 4, 4 types, 8)
        levels = model.forward_intermediates(x, intermediates_only=True)
        logits = model(x)
    assert [info['module'] for info in model.feature_info][-2:] == ['primary.conv', 'primary']
    squashed = raw * (raw.norm(dim=-1, keepdim=True) ** 2 / (1 + raw.norm(dim=-1, keepdim=True) ** 2)
                      / raw.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(levels[-2], raw.flatten(3).permute(0, 3, 1, 2))  # channel n * d + e
    torch.testing.assert_close(levels[-1], squashed.flatten(3).permute(0, 3, 1, 2))
    children = squashed.permute(0, 3, 1, 2, 4).reshape(2, 64, 8).double()
    votes = torch.einsum('bic,ijct->bijt', children, model.head.weight.double())
    classes, _ = naive_dynamic_routing(votes, 3)
    torch.testing.assert_close(logits.double(), classes.norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_em_coordinate_addition_changes_votes():
    torch.manual_seed(0)
    kwargs = dict(in_chans=1, img_size=20, backbone_args=dict(out_chs=16), primary_caps=4,
                  capsule_layers=(('conv', 4, 3, 2), ('conv', 4, 3, 1)))
    with_coords = EMCapsNet(**kwargs).eval()
    without = EMCapsNet(**kwargs, coordinate_addition=False).eval()
    without.load_state_dict(with_coords.state_dict())
    coords = with_coords.head.coordinates.reshape(2, 2, 4, 4)
    assert coords[1, 0, 0, 3] == 0.75 and coords[0, 1, 1, 3] == 0.75 and coords[..., :, :3].abs().sum() == 0
    x = torch.randn(2, 1, 20, 20)
    with torch.no_grad():
        assert not torch.allclose(with_coords(x), without(x))


# ------------------------------------------------------------------------------ CapsNet ablations run
@pytest.mark.parametrize('ablation', [dict(layer_norm=False), dict(routing='sequential'), dict(activations=True)])
def test_capsnet_ablations_run(ablation):
    torch.manual_seed(0)
    base = timm.create_model('capsnet_simple_cifar10').eval()
    model = timm.create_model('capsnet_simple_cifar10', **ablation)
    ours = model.state_dict()
    # the ablation alone changes the outputs: every weight the two models share is the same
    model.load_state_dict({k: v for k, v in base.state_dict().items() if k in ours and ours[k].shape == v.shape},
                          strict=False)
    assert any('.norm.' in key for key in ours) is ('layer_norm' not in ablation)
    assert model.routing == ablation.get('routing', 'concurrent')
    assert (ours['primary.conv.weight'].shape[0] == 32 * 17) is ('activations' in ablation)  # + 1 activation
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(x), base(x), rtol=1e-3, atol=1e-3)
    out = model.train()(x)
    out.sum().backward()
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert model.backbone.conv.weight.grad is not None and torch.isfinite(model.backbone.conv.weight.grad).all()


def test_an_input_too_small_for_the_dynamic_capsule_stack_is_refused_with_the_reason():
    """16 x 16 leaves the 9 x 9 primary capsule conv no room (found running timm's scripts at small inputs)."""
    with pytest.raises(ValueError, match=r'input size \(16, 16\) is too small for this capsule stack'):
        timm.create_model('dynamic_capsnet_simple_cifar10', img_size=16)
    assert timm.create_model('dynamic_capsnet_simple_cifar10', img_size=20, device='meta').img_size == (20, 20)
