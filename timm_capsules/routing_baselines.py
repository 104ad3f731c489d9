"""The paper's comparison routings as plain tensor functions: dynamic routing (Sabour et al., 2017) and
EM routing (Hinton et al., 2018). The losses they were trained with are in ``losses.py``.

Same conventions as ``routing.py``: every function routes *groups* of children to the same set of
parents (one group is one image for a fully connected capsule layer, one (image, output position)
window for a convolutional one), and votes come from ``routing.capsule_votes``, flattened to one pose
vector per (child, parent).

Axis names used in the einsums:
    g  group (image, or image x output position)
    i  child capsule within the group
    j  parent capsule
    d  pose entries (a 4x4 matrix pose is flattened to 16 entries)

Routing logits, coefficients and EM statistics are computed in float32, so that routing stays stable
under bf16/fp16 autocast; results are returned in the votes' dtype.

``em_routing_from_poses`` (what the EM capsule layers call) runs EM routing on the CPU in one C++ kernel
(``csrc/em_routing.cpp``) that never stores the votes and reads a convolutional layer's windows from the child
grid; the plain tensor ops of ``em_routing`` (on ``routing.window_children``) are its reference and its fallback.
"""

import contextlib
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from timm.layers import register_notrace_function

from . import kernels
from .kernels import em_routing_kernel  # noqa: F401  (a thin re-export: it moved to kernels.py)
from .routing import capsule_votes, window_children

__all__ = ['squash', 'dynamic_routing', 'em_routing', 'em_routing_from_poses', 'inverse_temperature_schedule']


def squash(s: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """Sabour et al.'s non-linearity v = |s|^2 / (1 + |s|^2) * s / |s|: keeps the direction, maps the
    length into [0, 1). Written so that s = 0 has a finite gradient (eps guards the division)."""
    sq = s.float().pow(2).sum(dim, keepdim=True)
    factor = sq / ((1.0 + sq) * torch.sqrt(sq + eps))
    return (s.float() * factor).to(s.dtype)


def dynamic_routing(votes: Tensor, iterations: int = 3) -> Tuple[Tensor, Tensor]:
    """Routing by agreement (Sabour et al., 2017, Procedure 1).

    votes u_j|i (g, i, j, d) -> parents v_j (g, j, d) (squashed) and the last coefficients c_ij (g, i, j).
    Logits b_ij start at 0; each iteration c_i = softmax_j(b_i), s_j = sum_i c_ij u_j|i, v_j = squash(s_j),
    and, except after the last one, b_ij += <u_j|i, v_j>.
    """
    if iterations < 1:
        raise ValueError(f'dynamic routing needs at least 1 iteration, got {iterations}')
    logits = votes.new_zeros(votes.shape[:3], dtype=torch.float32)
    parents = coefficients = None
    for iteration in range(iterations):
        coefficients = logits.softmax(dim=-1).to(votes.dtype)
        parents = squash(torch.einsum('gij,gijd->gjd', coefficients, votes))
        if iteration < iterations - 1:
            logits = logits + torch.einsum('gijd,gjd->gij', votes, parents).float()
    return parents, coefficients


def inverse_temperature_schedule(iterations: int, final: float = 1.0) -> List[float]:
    """EM routing's inverse temperature lambda, raised at every iteration (a linear ramp to ``final``)."""
    return [final * (t + 1) / iterations for t in range(iterations)]


@register_notrace_function  # torch.fx records it as one call: it switches autocast off inside
@torch.jit.ignore  # and timm's fx + TorchScript test scripts that graph: the call stays Python
def em_routing(
    votes: Tensor,
    child_activations: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    inverse_temperatures: List[float] = (1 / 3, 2 / 3, 1.0),
    normalize_cost: bool = True,
    eps: float = 1e-6,
) -> Tuple[Tensor, Tensor, Tensor]:
    """EM routing (Hinton et al., 2018, Procedure 1), one iteration per inverse temperature.

    votes V_ij (g, i, j, d), child activations a_i (g, i), beta_u / beta_a (j,) ->
        parent poses mu_j (g, j, d), parent activations a_j (g, j), assignments R_ij (g, i, j).

    M-step: with r_ij = R_ij a_i and mass_j = sum_i r_ij, mu_j = sum_i r_ij V_ij / mass_j, sigma_j^2
    likewise, cost_j = sum_d (beta_u + log sigma_jd) mass_j and a_j = sigmoid(lambda (beta_a - cost_j)).
    E-step: R_ij = softmax_j(log a_j + log N(V_ij; mu_j, sigma_j^2)), done in log space.

    ``normalize_cost`` (default) measures the cost per pose entry (mean over d instead of the sum), per
    unit of *relative* mass (mass_j divided by its mean over parents) and relative to the mean cost of
    the group's parents. Hinton et al.'s literal cost grows with the number of children and pose entries
    and shifts with the scale of the poses, which saturates the sigmoid (every activation ~1 at
    initialisation) unless lambda and beta_a are tuned for every layer; in these units one lambda schedule
    serves every layer. ``normalize_cost=False`` is the literal formula.

    Numerics: statistics are float32 with autocast off. The votes of each group are divided by their
    largest magnitude s (a constant for autograd) and the log s terms are added back where they matter
    (log sigma in the cost; in the E-step they are equal for every parent and cancel in the softmax), so
    routing stays finite for poses of any magnitude. Guards: ``eps`` is added to the routed mass, and
    sigma^2 is floored at ``eps * s^2``.
    """
    args = (
        votes.float(),
        child_activations.float(),
        beta_u.float(),
        beta_a.float(),
        [float(t) for t in inverse_temperatures],
        normalize_cost,
        eps,
    )
    device_type = votes.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            poses, activations, assignments = _em_routing_fp32(*args)
    else:  # no autocast here (or a device without it, such as meta)
        poses, activations, assignments = _em_routing_fp32(*args)
    return poses.to(votes.dtype), activations.to(votes.dtype), assignments.to(votes.dtype)


def _em_routing_fp32(
    v, a_in, beta_u, beta_a, inverse_temperatures: List[float], normalize_cost: bool, eps: float
) -> Tuple[Tensor, Tensor, Tensor]:
    G, I, J, D = v.shape
    # (g, j, i, d): every sum over children below is then one batched matmul, with no big temporaries
    # (free when the caller's votes already lie in that layout, as the layers' do)
    v = v.transpose(1, 2).contiguous()
    low, high = torch.aminmax(v.detach().reshape(G, -1), dim=-1)
    scale = torch.maximum(high, -low).clamp_min(torch.finfo(torch.float32).tiny).reshape(G, 1, 1, 1)
    v = v / scale
    v_sq = v * v
    log_scale = scale.log().reshape(G, 1, 1)
    assignments = v.new_full((G, J, I), 1.0 / J)
    a_in = a_in[:, None, :]  # (g, 1, i)
    mu = activations = v.new_zeros(())
    for iteration, inverse_temperature in enumerate(inverse_temperatures):
        # M-step
        routed = assignments * a_in  # r_ij as (g, j, i)
        mass = routed.sum(-1)  # (g, j)
        weights = (routed / (mass[..., None] + eps))[:, :, None, :]  # (g, j, 1, i)
        mu = torch.matmul(weights, v)  # (g, j, 1, d)
        var = (torch.matmul(weights, v_sq) - mu * mu).clamp_min(0.0) + eps  # E[V^2] - mu^2, floored
        log_sigma = 0.5 * var.log() + log_scale[..., None]  # log sigma in the votes' own units
        if normalize_cost:
            relative_mass = mass / (mass.mean(-1, keepdim=True) + eps)
            cost = (beta_u[:, None] + log_sigma[:, :, 0]).mean(-1) * relative_mass
            cost = cost - cost.mean(-1, keepdim=True)
        else:
            cost = (beta_u[:, None] + log_sigma[:, :, 0]).sum(-1) * mass
        logits = inverse_temperature * (beta_a - cost)  # (g, j)
        activations = torch.sigmoid(logits)
        if iteration == len(inverse_temperatures) - 1:
            break
        # E-step: sum_d (V - mu)^2 / var = V^2 . (1/var) - 2 V . (mu/var) + mu^2 . (1/var), as matmuls;
        # the constant -d/2 log(2 pi) and the per-group log s cancel in the softmax over parents
        inv_var = 1.0 / var  # (g, j, 1, d)
        mahalanobis = (
            torch.matmul(v_sq, inv_var.transpose(-1, -2)) - 2 * torch.matmul(v, (mu * inv_var).transpose(-1, -2))
        )[..., 0] + (mu * mu * inv_var).sum(-1)
        log_p = -0.5 * mahalanobis - 0.5 * var.log().sum(-1)  # (g, j, i)
        assignments = (F.logsigmoid(logits)[..., None] + log_p).softmax(dim=1)
    poses = mu[:, :, 0] * scale[:, 0]
    return poses, activations, assignments.transpose(1, 2)


# ---- EM routing from child poses: the fused CPU kernel ----------------------------------------------------


@register_notrace_function
@torch.jit.ignore
def em_routing_from_poses(
    children: Tensor,
    weight: Tensor,
    child_activations: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    inverse_temperatures: List[float] = (1 / 3, 2 / 3, 1.0),
    normalize_cost: bool = True,
    eps: float = 1e-6,
    offset: Optional[Tensor] = None,
    window: Optional[Tuple[int, int]] = None,
    with_assignments: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``em_routing`` of the votes ``capsule_votes(children, weight) (+ offset)``, flattened to (g, i, j, d).

    children (g, i, r, c), weight (i, j, c, t), offset (i, r, t) or None: a constant added to child i's votes
    (coordinate addition), which gets no gradient. With ``window=(kernel_size, stride)``, ``children`` is a
    child grid (B, H, W, N, r, c) (activations (B, H, W, N)) and the groups are its windows,
    ``routing.window_children(children, *window)``, which the kernel reads from the grid instead of a copy.
    ``with_assignments=False``: the assignments (as large as the votes / d) are not returned (an empty tensor).

    On the CPU (eager or torch.compile) this is one kernel (``csrc/em_routing.cpp``): each group's votes are
    formed in a per-thread buffer, routed there, and formed again in the backward pass, which runs the
    iterations backwards by hand. Memory is that of the inputs and outputs; the arithmetic is ``em_routing``'s
    (float32, same guards), up to rounding. Under torch.export and fx tracing (graphs that must run without
    this package), on other devices, without a C++ compiler or with ``TIMM_CAPSULES_FUSED_ROUTING=0``,
    the votes are materialised and routed by ``em_routing``.
    """
    temperatures = [float(t) for t in inverse_temperatures]
    if window is None:  # every group is one 1 x 1 window of its own
        children, child_activations, window = children[:, None, None], child_activations[:, None, None], (1, 1)
    if not kernels.em_kernel_applies(children):
        children = window_children(children, *window)
        child_activations = window_children(child_activations, *window)
        votes = capsule_votes(children, weight)
        if offset is not None:
            votes = votes + offset[:, None].to(votes.dtype)  # (i, 1, r, t) onto (g, i, j, r, t)
        poses, activations, assignments = em_routing(
            votes.flatten(-2), child_activations, beta_u, beta_a, temperatures, normalize_cost, eps
        )
        return poses, activations, assignments if with_assignments else assignments.new_empty(0)
    device_type = children.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    with torch.autocast(device_type=device_type, enabled=False) if autocast else contextlib.nullcontext():
        dtype = children.dtype if children.dtype in (torch.float32, torch.float64) else torch.float32
        # contiguous here, so that the op saves the copy it routes and its backward does not copy again
        cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
        outputs = torch.ops.timm_capsules.em_routing(
            cast(children),
            cast(weight),
            cast(offset),
            cast(child_activations),
            cast(beta_u),
            cast(beta_a),
            *window,
            temperatures,
            normalize_cost,
            eps,
            with_assignments,
        )
    return tuple(t.to(children.dtype) for t in outputs)


def _kernel_inputs(children, weight, offset, child_activations, beta_u, beta_a):
    """The kernel's layouts: weight (i, j, c, t) -> (i, c, t, j), offset (i, r, t) -> (i, r t)."""
    weight = weight.permute(0, 2, 3, 1).contiguous()
    offset = None if offset is None else offset.reshape(offset.shape[0], -1).contiguous()
    return (
        children.contiguous(),
        weight,
        offset,
        child_activations.contiguous(),
        beta_u.contiguous(),
        beta_a.contiguous(),
    )


def _em_reference(
    children, weight, offset, child_activations, beta_u, beta_a, kernel_size, stride, temperatures, normalize_cost, eps
):
    """The op in plain tensor ops: the windows copied out, the votes materialised."""
    votes = capsule_votes(window_children(children, kernel_size, stride), weight)
    child_activations = window_children(child_activations, kernel_size, stride)
    if offset is not None:
        votes = votes + offset[:, None]
    return _em_routing_fp32(votes.flatten(-2), child_activations, beta_u, beta_a, temperatures, normalize_cost, eps)


@torch.library.custom_op('timm_capsules::em_routing', mutates_args=())
def _em_routing_op(
    children: Tensor,
    weight: Tensor,
    offset: Optional[Tensor],
    child_activations: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    kernel_size: int,
    stride: int,
    inverse_temperatures: List[float],
    normalize_cost: bool,
    eps: float,
    with_assignments: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    kernel = kernels.em_routing_kernel()
    if kernel is None:  # only under torch.compile without a build: the fake kernel promised contiguous outputs
        with torch.no_grad():
            poses, activations, assignments = _em_reference(
                children,
                weight,
                offset,
                child_activations,
                beta_u,
                beta_a,
                kernel_size,
                stride,
                inverse_temperatures,
                normalize_cost,
                eps,
            )
        return (
            poses.contiguous(),
            activations.contiguous(),
            assignments.contiguous() if with_assignments else assignments.new_empty(0),
        )
    poses, activations, assignments = kernel.forward(
        *_kernel_inputs(children, weight, offset, child_activations, beta_u, beta_a),
        kernel_size,
        stride,
        inverse_temperatures,
        normalize_cost,
        eps,
        with_assignments,
    )
    return poses, activations, assignments


@_em_routing_op.register_fake
def _(
    children,
    weight,
    offset,
    child_activations,
    beta_u,
    beta_a,
    kernel_size,
    stride,
    inverse_temperatures,
    normalize_cost,
    eps,
    with_assignments,
):
    B, H, W, N, R, _ = children.shape
    G = B * ((H - kernel_size) // stride + 1) * ((W - kernel_size) // stride + 1)
    I, J, T = kernel_size * kernel_size * N, weight.shape[1], weight.shape[3]
    assignments = children.new_empty(G, I, J) if with_assignments else children.new_empty(0)
    return children.new_empty(G, J, R * T), children.new_empty(G, J), assignments


@torch.library.custom_op('timm_capsules::em_routing_backward', mutates_args=())
def _em_routing_backward_op(
    grad_poses: Optional[Tensor],
    grad_activations: Optional[Tensor],
    grad_assignments: Optional[Tensor],
    children: Tensor,
    weight: Tensor,
    offset: Optional[Tensor],
    child_activations: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    kernel_size: int,
    stride: int,
    inverse_temperatures: List[float],
    normalize_cost: bool,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for children, weight, child activations, beta_u and beta_a."""
    kernel = kernels.em_routing_kernel()
    if kernel is None:  # torch.func's vjp: autograd's own dispatch is switched off inside a custom op

        def reference(*leaves):
            return _em_reference(
                leaves[0],
                leaves[1],
                offset,
                *leaves[2:],
                kernel_size,
                stride,
                inverse_temperatures,
                normalize_cost,
                eps,
            )

        outputs, vjp = torch.func.vjp(reference, children, weight, child_activations, beta_u, beta_a)
        grads = [
            torch.zeros_like(o) if g is None else g
            for o, g in zip(outputs, (grad_poses, grad_activations, grad_assignments))
        ]
        return tuple(g.contiguous() for g in vjp(tuple(grads)))
    flat = lambda t: None if t is None else t.contiguous()  # noqa: E731
    d_children, d_weight, d_activations, d_beta_u, d_beta_a = kernel.backward(
        flat(grad_poses),
        flat(grad_activations),
        flat(grad_assignments),
        *_kernel_inputs(children, weight, offset, child_activations, beta_u, beta_a),
        kernel_size,
        stride,
        inverse_temperatures,
        normalize_cost,
        eps,
    )
    d_weight = d_weight.permute(0, 3, 1, 2).contiguous()  # (i, c, t, j) -> (i, j, c, t)
    return d_children, d_weight, d_activations, d_beta_u, d_beta_a


@_em_routing_backward_op.register_fake
def _(
    grad_poses,
    grad_activations,
    grad_assignments,
    children,
    weight,
    offset,
    child_activations,
    beta_u,
    beta_a,
    kernel_size,
    stride,
    inverse_temperatures,
    normalize_cost,
    eps,
):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return like(children), like(weight), like(child_activations), like(beta_u), like(beta_a)


def _em_setup_context(ctx, inputs, output):
    *tensors, kernel_size, stride, inverse_temperatures, normalize_cost, eps, _ = inputs
    ctx.save_for_backward(*tensors)  # the grid only: the windows are read from it, the votes formed again
    ctx.config = (kernel_size, stride, inverse_temperatures, normalize_cost, eps)
    ctx.set_materialize_grads(False)


def _em_backward(ctx, grad_poses, grad_activations, grad_assignments):
    if grad_assignments is not None and grad_assignments.numel() == 0:  # not returned: nothing to pass back
        grad_assignments = None
    children, weight, offset, child_activations, beta_u, beta_a = ctx.saved_tensors
    d_children, d_weight, d_activations, d_beta_u, d_beta_a = _em_routing_backward_op(
        grad_poses,
        grad_activations,
        grad_assignments,
        children,
        weight,
        offset,
        child_activations,
        beta_u,
        beta_a,
        *ctx.config,
    )
    return d_children, d_weight, None, d_activations, d_beta_u, d_beta_a, None, None, None, None, None, None


_em_routing_op.register_autograd(_em_backward, setup_context=_em_setup_context)
