"""The comparison systems' routing as tensor functions (``routing_baselines.py``): dynamic routing and EM routing
against naive loops written here, squash, the fused EM kernel (``csrc/em_routing.cpp``) against autograd through
the plain tensor ops, and EM routing's finiteness at extreme inputs."""

import math

import pytest
import torch

from timm_capsules.kernels import em_routing_kernel
from timm_capsules.routing_baselines import (
    dynamic_routing,
    em_routing,
    em_routing_from_poses,
    inverse_temperature_schedule,
    squash,
)

from ci import unavailable


# --------------------------------------------------------------------------------- naive references
def naive_squash(s):
    norm = math.sqrt(sum(x * x for x in s))
    return [norm / (1 + norm**2) * x for x in s]


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
                var_j = [
                    max(sum(w[i] * V[g][i][j][d] ** 2 for i in range(I)) - mu_j[d] ** 2, 0.0) + eps * s * s
                    for d in range(D)
                ]
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
                    lp = sum(
                        -((V[g][i][j][d] - mu[j][d]) ** 2) / (2 * var[j][d]) - 0.5 * math.log(2 * math.pi * var[j][d])
                        for d in range(D)
                    )
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
        torch.testing.assert_close(
            g.double(), r, rtol=1e-6, atol=1e-6 * magnitude if name == 'poses' else 1e-6, msg=name
        )
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
    temperatures = inverse_temperature_schedule(iterations, 1.0 if normalize_cost else 0.05)
    for got, ref in zip(*_em_kernel_and_reference(inputs, temperatures, normalize_cost)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def _em_grid_inputs(window, J, N=3, seed=6):
    torch.manual_seed(seed)
    grad = dict(dtype=torch.float64, requires_grad=True)
    k = window[0]
    return (
        torch.randn(2, 7, 6, N, 4, 4, **grad),
        torch.randn(k * k * N, J, 4, 4, **grad),
        None,
        torch.rand(2, 7, 6, N, **grad),
        torch.randn(J, **grad),
        torch.randn(J, **grad),
    )


@pytest.mark.parametrize('window', [(3, 2), (3, 1), (2, 1)])  # overlapping windows, strided or not
@pytest.mark.parametrize('J', [5, 32])
def test_em_kernel_over_grid_windows_equals_copied_windows(em_kernel, window, J):
    """The kernel reads a conv layer's windows from the child grid and adds their gradients back into it; the
    reference copies every window out (``window_children``) and differentiates through the copy."""
    inputs = _em_grid_inputs(window, J)
    for got, ref in zip(*_em_kernel_and_reference(inputs, [1 / 3, 2 / 3, 1.0], True, window=window)):
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
    for got, ref in zip(*_em_kernel_and_reference(inputs, [0.5, 1.0], True)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    children, weight, offset, a_in, beta_u, beta_a = inputs

    def routed(children, weight, a_in, beta_u, beta_a):
        return torch.ops.timm_capsules.em_routing(
            children[:, None, None],
            weight,
            offset,
            a_in[:, None, None],
            beta_u,
            beta_a,
            1,
            1,
            [0.5, 1.0],
            True,
            1e-6,
            True,
        )

    assert torch.autograd.gradcheck(routed, (children, weight, a_in, beta_u, beta_a))


@pytest.mark.parametrize('G, I, J, offset', [(16, 288, 32, False), (4, 800, 10, True)])  # conv and class layers
def test_em_kernel_in_float32_is_as_accurate_as_the_plain_ops(em_kernel, G, I, J, offset):
    """EM's statistics (E[v^2] - mu^2, log sigma) lose digits in float32 whatever the order of the sums: the
    kernel is held to the plain ops' own float32 error against float64, not to the plain ops' rounding."""
    truth, _ = _em_kernel_and_reference(_em_inputs(torch.float64, G, I, J, offset=offset), [1 / 3, 2 / 3, 1.0], True)
    inputs32 = [
        None if t is None else t.detach().float().requires_grad_(t.requires_grad)
        for t in _em_inputs(torch.float64, G, I, J, offset=offset)
    ]
    got, ref = _em_kernel_and_reference(inputs32, [1 / 3, 2 / 3, 1.0], True)

    def error(x, t):
        return ((x.double() - t).abs().max() / t.abs().max()).item()

    for k, (g, r, t) in enumerate(zip(got, ref, truth)):
        assert g.dtype == torch.float32 and error(g, t) <= max(3 * error(r, t), 2e-5), k


def test_without_a_compiler_em_routing_warns_and_falls_back_to_the_plain_ops(em_kernel, monkeypatch, tmp_path):
    """No build: em_routing_from_poses routes the materialised votes with em_routing, and the op itself (what
    torch.compile records) runs the plain ops forward and backward."""
    import torch.utils.cpp_extension
    from timm_capsules import kernels

    def no_compiler(*args, **kwargs):
        raise RuntimeError('no C++ compiler here')

    inputs = _em_inputs(torch.float32, 4, 18, 5, offset=True)
    children, weight, offset, a_in, beta_u, beta_a = inputs
    with_kernel = em_routing_from_poses(children, weight, a_in, beta_u, beta_a, offset=offset)
    monkeypatch.setattr(kernels, '_em_kernel', None)
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
    for got, ref in zip(*_em_kernel_and_reference(inputs, [1 / 3, 2 / 3, 1.0], True)):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('extreme', ['huge', 'tiny', 'zero', 'mixed'])
@pytest.mark.parametrize('autocast', [False, True])
def test_em_kernel_stays_finite(em_kernel, extreme, autocast):
    children, weight, _, a_in, beta_u, beta_a = _em_inputs(torch.float32, 4, 18, 5)
    scale = dict(huge=1e30, tiny=1e-30, zero=0.0)
    with torch.no_grad():
        children *= scale[extreme] if extreme in scale else torch.logspace(-30, 30, 18)[None, :, None, None]
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        poses, activations, assignments = em_routing_from_poses(
            children.to(torch.bfloat16) if autocast else children, weight, a_in, beta_u, beta_a
        )
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
            votes.to(torch.bfloat16) if autocast else votes, a_in, beta_u, beta_a
        )
        loss = poses.float().sum() * 0 + activations.float().sum()
    loss.backward()
    for tensor in (poses, activations, assignments, votes.grad, beta_u.grad, beta_a.grad):
        assert torch.isfinite(tensor.float()).all()
    torch.testing.assert_close(assignments.float().sum(-1), torch.ones(4, 18), rtol=0, atol=1e-2)


def test_squash():
    s = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], requires_grad=True)
    v = squash(s)
    torch.testing.assert_close(v[0], torch.tensor([3.0, 4.0]) / 5 * 25 / 26)
    torch.testing.assert_close(v[2], torch.tensor([1e-6, 0.0]), rtol=1e-3, atol=0)
    v.sum().backward()
    assert torch.isfinite(s.grad).all()  # squash(s) ~ |s| s near 0: the true derivative there is 0
    assert s.grad[1].abs().sum() == 0 and s.grad[2].abs().sum() > 0
