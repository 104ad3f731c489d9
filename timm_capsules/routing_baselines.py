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
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from timm.layers import register_notrace_function

__all__ = ['squash', 'dynamic_routing', 'em_routing', 'inverse_temperature_schedule']


def squash(s: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """Sabour et al.'s non-linearity v = |s|^2 / (1 + |s|^2) * s / |s|: keeps the direction, maps the
    length into [0, 1). Written so that s = 0 has a finite gradient (eps guards the division)."""
    sq = s.float().pow(2).sum(dim, keepdim=True)
    factor = sq / ((1. + sq) * torch.sqrt(sq + eps))
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
        inverse_temperatures: List[float] = (1 / 3, 2 / 3, 1.),
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
    args = (votes.float(), child_activations.float(), beta_u.float(), beta_a.float(),
            [float(t) for t in inverse_temperatures], normalize_cost, eps)
    device_type = votes.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            poses, activations, assignments = _em_routing_fp32(*args)
    else:  # no autocast here (or a device without it, such as meta)
        poses, activations, assignments = _em_routing_fp32(*args)
    return poses.to(votes.dtype), activations.to(votes.dtype), assignments.to(votes.dtype)


def _em_routing_fp32(v, a_in, beta_u, beta_a, inverse_temperatures: List[float], normalize_cost: bool,
                     eps: float) -> Tuple[Tensor, Tensor, Tensor]:
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
        var = (torch.matmul(weights, v_sq) - mu * mu).clamp_min(0.) + eps  # E[V^2] - mu^2, floored
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
        mahalanobis = (torch.matmul(v_sq, inv_var.transpose(-1, -2))
                       - 2 * torch.matmul(v, (mu * inv_var).transpose(-1, -2)))[..., 0] + (mu * mu * inv_var).sum(-1)
        log_p = -0.5 * mahalanobis - 0.5 * var.log().sum(-1)  # (g, j, i)
        assignments = (F.logsigmoid(logits)[..., None] + log_p).softmax(dim=1)
    poses = mu[:, :, 0] * scale[:, 0]
    return poses, activations, assignments.transpose(1, 2)
