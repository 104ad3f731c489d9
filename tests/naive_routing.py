"""The naive reference the routing tests compare with, written here with explicit loops, and what the routing
and kernel tests share (``tiny_capsnet``, the ``kernel`` and ``float64`` fixtures).

The reference follows the paper's Procedures 1 and 2 (Tsai et al., ICLR 2020, §3) literally: per output
position, per child (window offset and child type, or type-major grid index), per parent: vote,
agreement / sqrt(d), softmax over parents, sum, LayerNorm; uniform first pass; concurrent or sequential
schedule over the whole stack.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from timm_capsules import kernels
from timm_capsules.capsnet import CapsNet
from timm_capsules.layers import ConvCapsules

from ci import unavailable


@pytest.fixture
def kernel():
    """The compiled routing kernel. Without it the fused op runs its plain-op fallback, and a 'fused vs
    plain' comparison would compare the plain ops with themselves."""
    if kernels.routing_kernel() is None:
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
            history[k] += [
                naive_layer(layer, history[k - 1][l], history[k - 1][l + 1])[0] for l, layer in enumerate(layers)
            ]
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
        num_classes=3,
        in_chans=1,
        img_size=10,
        backbone='simple',
        backbone_args=dict(out_chs=6),
        primary_caps=3,
        pose_dim=pose_dim,
        matrix_pose=matrix_pose,
        iterations=iterations,
        routing=routing,
        capsule_layers=capsule_layers or (('conv', 3, 3, 1), ('conv', 2, 2, 1)),
        **kwargs,
    ).eval()
