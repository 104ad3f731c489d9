"""Capsule layers: primary capsules, convolutional and fully connected capsule layers.

Capsules are kept as a grid ``poses (B, H, W, N, d)`` (N capsule types of pose dimension d at every
position), with optional activations ``(B, H, W, N)`` for the EM-style ablation. A fully connected
capsule layer outputs a 1x1 grid, so every layer speaks the same layout.
"""

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from .kernels import is_tracing, norms_fused, plain_ops_only, pose_norm, routes_fused, use_fused_routing
from .routing import DEFAULT_MAX_VOTES, attention_routing, capsule_votes, chunked_attention_routing
from .routing import fused_attention_routing, uniform_routing, uniform_window_routing, window_children

__all__ = ['Capsules', 'PrimaryCapsules', 'RoutedCapsules', 'ConvCapsules', 'FCCapsules', 'PoseNorm', 'pose_shape']
__all__ += ['capsules_to_nchw', 'conv_output_size']


class Capsules(NamedTuple):
    poses: Tensor  # (B, H, W, N, d)
    activations: Optional[Tensor] = None  # (B, H, W, N) in (0, 1), only with EM-style activations


def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution (or capsule window) along one axis; below 1 when it does not fit."""
    return (size + 2 * padding - kernel_size) // stride + 1


def capsules_to_nchw(capsules: Capsules) -> Tensor:
    """A capsule grid as a feature map (B, N * d [+ N], H, W): channel n * d + e holds entry e of capsule
    type n; with activations, the last N channels hold them."""
    poses, activations = capsules
    B, H, W, N, d = poses.shape
    x = poses.reshape(B, H, W, N * d)
    if activations is not None:
        x = torch.cat([x, activations], dim=-1)
    return x.permute(0, 3, 1, 2)


def pose_shape(pose_dim: int, matrix_pose: bool) -> Tuple[int, int]:
    """(rows, cols) a pose is stored as: (sqrt(d), sqrt(d)) for matrix poses, (1, d) for vectors."""
    if not matrix_pose:
        return 1, pose_dim
    side = math.isqrt(pose_dim)
    if side * side != pose_dim:
        raise ValueError(f'a matrix pose needs a square pose dimension (16, 36, 64, ...), got {pose_dim}')
    return side, side


class PoseNorm(nn.LayerNorm):
    """LayerNorm over the d pose entries, gain and bias shared by every capsule of a layer, computed
    in at least float32 so that bf16/fp16 training keeps a stable normalisation.

    On the CPU, 16-entry poses (the paper's 4x4) are normalised in the fused routing kernel's extension
    (``kernels.pose_norm``; ``fused_routing=None`` follows ``TIMM_CAPSULES_FUSED_ROUTING``): torch's layer_norm
    pays a fixed cost per row that rows of 16 values do not amortise."""

    fused_kernel = 'routing'  # the extension it normalises in (see kernels.preload)

    def __init__(self, pose_dim: int, eps: float = 1e-5, fused_routing: Optional[bool] = None, device=None, dtype=None):
        super().__init__(pose_dim, eps=eps, device=device, dtype=dtype)
        self.fused_routing = use_fused_routing() if fused_routing is None else fused_routing

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        if norms_fused(x, self.fused_routing):
            return pose_norm(x.to(dtype), weight, bias, self.eps).to(x.dtype)
        return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def _capsule_norm(
    pose_dim: int, layer_norm: bool, fused_routing: Optional[bool] = None, device=None, dtype=None
) -> nn.Module:
    if not layer_norm:
        return nn.Identity()
    return PoseNorm(pose_dim, eps=1e-5, fused_routing=fused_routing, device=device, dtype=dtype)


class PrimaryCapsules(nn.Module):
    """A bias-free conv whose channel c becomes entry c % d of capsule c // d, then LayerNorm."""

    def __init__(
        self,
        in_chs: int,
        num_caps: int,
        pose_dim: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        layer_norm: bool = True,
        activations: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_caps, self.pose_dim, self.stride = num_caps, pose_dim, stride
        self.has_activations = activations
        out_chs = num_caps * pose_dim + (num_caps if activations else 0)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, bias=False, device=device, dtype=dtype)
        self.norm = _capsule_norm(pose_dim, layer_norm, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Capsules:
        # channels-last in, so channels-last out: the capsules' (B, H, W, C) layout is then a view, not a
        # copy as large as the output (on the CPU this halves the layer's training cost)
        x = self.conv(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)  # (B, H, W, C)
        B, H, W, _ = x.shape
        n, d = self.num_caps, self.pose_dim
        activations = None
        if self.has_activations:  # split, not two slices: each slice's gradient would be a zero-filled copy of x
            x, activations = x.split([n * d, n], dim=-1)
            activations = activations.sigmoid()
        return Capsules(self.norm(x.reshape(B, H, W, n, d)), activations)


class RoutedCapsules(nn.Module):
    """A capsule layer whose parents are found by inverted dot-product attention routing.

    Subclasses say how the child grid is cut into groups of children (``_children``).

    On the CPU, attention passes run in the fused kernel, which never stores votes
    (``routing.fused_attention_routing``; ``fused_routing=None`` follows ``TIMM_CAPSULES_FUSED_ROUTING``);
    otherwise a pass whose vote tensor would exceed ``max_votes`` elements is formed chunk by chunk
    (``routing.chunked_attention_routing``; None never chunks). ``kernels.routes_fused`` decides.
    """

    fused_kernel = 'routing'  # the extension it routes in (see kernels.preload)

    def __init__(
        self,
        children_per_group: int,
        in_dim: int,
        out_caps: int,
        out_dim: int,
        matrix_pose: bool,
        layer_norm: bool,
        activations: bool,
        max_votes: Optional[int] = DEFAULT_MAX_VOTES,
        fused_routing: Optional[bool] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if matrix_pose and in_dim != out_dim:
            raise ValueError(f'matrix poses keep their dimension, got {in_dim} -> {out_dim}')
        self.child_rows, self.child_cols = pose_shape(in_dim, matrix_pose)
        _, self.parent_cols = pose_shape(out_dim, matrix_pose)
        self.matrix_pose = matrix_pose
        self.out_caps, self.out_dim = out_caps, out_dim
        self.weight = nn.Parameter(
            torch.empty(children_per_group, out_caps, self.child_cols, self.parent_cols, device=device, dtype=dtype)
        )
        self.norm = _capsule_norm(out_dim, layer_norm, fused_routing, device, dtype)
        if activations:
            # EM-style activations (the paper's ablation C): a parent is active when the children
            # routed to it agree with it; beta_a / beta_u play the roles they have in EM routing.
            self.beta_a = nn.Parameter(torch.zeros(out_caps, device=device, dtype=dtype))
            self.beta_u = nn.Parameter(torch.ones(out_caps, device=device, dtype=dtype))
        else:
            self.beta_a = self.beta_u = None
        self.fused_routing = use_fused_routing() if fused_routing is None else fused_routing
        self.max_votes = max_votes
        self.reset_parameters()

    def reset_parameters(self):
        # the authors' init: N(0, 1) * sqrt(#parents / (pose columns * #children))
        children, parents, cols, _ = self.weight.shape
        with torch.no_grad():
            self.weight.normal_(0.0, math.sqrt(parents / (cols * children)))

    def _children(self, capsules: Capsules) -> Tuple[Tensor, Optional[Tensor], Tuple[int, int, int]]:
        """Groups of children (groups, children, rows, cols), their activations (groups, children) and the
        output grid (B, Ho, Wo)."""
        raise NotImplementedError

    def _child_grid(self, capsules: Capsules) -> Tuple[Tensor, Optional[Tensor], Tuple[int, int], Tuple[int, int, int]]:
        """What the fused kernel reads instead: the children as a grid (B, H, W, N, rows, cols) whose
        (kernel_size, stride) windows are the groups, their activations (B, H, W, N), the window and the
        output grid."""
        raise NotImplementedError

    def _uniform(self, children: Capsules) -> Tuple[Tensor, Tuple[int, int, int]]:
        """The uniform first pass: un-normalised parent poses (groups, parents, rows, cols)."""
        child_poses, child_activations, grid = self._children(children)
        return uniform_routing(child_poses, self.weight, child_activations), grid

    def _fused(self, poses: Tensor) -> bool:
        return routes_fused(poses, self.child_rows, self.weight.shape, self.fused_routing)

    def _too_many_votes(self, child_poses: Tensor) -> bool:
        if self.max_votes is None or plain_ops_only():
            return False
        groups, children, rows = child_poses.shape[:3]
        return groups * children * rows * self.weight[0, :, 0].numel() > self.max_votes

    def votes(self, children: Capsules) -> Tensor:
        """Every child's vote for every parent, (groups, children, parents, rows, cols)."""
        return capsule_votes(self._children(children)[0], self.weight)

    def fixed_votes(self, children: Capsules) -> Optional[Tensor]:
        """Votes to reuse over several passes with the same children, or None when passes form their
        own: in the fused kernel, or chunk by chunk when there are more than ``max_votes``."""
        if self._fused(children.poses):
            return None
        child_poses, _, _ = self._children(children)
        return None if self._too_many_votes(child_poses) else capsule_votes(child_poses, self.weight)

    def forward(
        self,
        children: Capsules,
        parents: Optional[Capsules] = None,
        votes: Optional[Tensor] = None,
        return_coefficients: bool = False,
    ) -> Tuple[Capsules, Optional[Tensor]]:
        """One routing pass: uniform when ``parents`` is None, else attention to the given parents.

        ``votes`` may be passed in when the children did not change since they were last computed.
        Returns the parent capsules and, with ``return_coefficients``, the routing coefficients
        (groups, children, parents) of an attention pass (else None: they are as large as the votes / d).
        """
        coefficients = agreement = None
        if parents is None:
            poses, (B, H, W) = self._uniform(children)
            child_activations = None
        elif votes is None and self._fused(children.poses):
            grid, grid_activations, window, (B, H, W) = self._child_grid(children)
            parent_poses = parents.poses.reshape(-1, self.out_caps, self.child_rows, self.parent_cols)
            with_routing = return_coefficients or self.beta_a is not None
            poses, coefficients, agreement = fused_attention_routing(
                grid, self.weight, parent_poses, grid_activations, with_routing, window
            )
            child_activations = None if grid_activations is None else window_children(grid_activations, *window)
        else:
            child_poses, child_activations, (B, H, W) = self._children(children)
            parent_poses = parents.poses.reshape(-1, self.out_caps, self.child_rows, self.parent_cols)
            if votes is None and self._too_many_votes(child_poses):
                poses, coefficients, agreement = chunked_attention_routing(
                    child_poses, self.weight, parent_poses, child_activations, self.max_votes
                )
            else:
                if votes is None:
                    votes = capsule_votes(child_poses, self.weight)
                poses, coefficients, agreement = attention_routing(votes, parent_poses, child_activations)
        poses = self.norm(poses.reshape(B, H, W, self.out_caps, self.out_dim))
        activations = None
        if self.beta_a is not None:
            activations = self._parent_activations(coefficients, agreement, child_activations, poses)
        return Capsules(poses, activations), coefficients if return_coefficients else None

    def _parent_activations(self, coefficients, agreement, child_activations, poses) -> Tensor:
        if agreement is None:  # uniform pass: no parent state yet, so no agreement either
            mean_agreement = poses.new_zeros(poses.shape[:-1])
        else:
            mass = coefficients if child_activations is None else coefficients * child_activations[..., None]
            mean_agreement = (mass * agreement).sum(1) / mass.sum(1).clamp_min(1e-6)
            mean_agreement = mean_agreement.reshape(poses.shape[:-1])
        return torch.sigmoid(self.beta_a + self.beta_u * mean_agreement)


class ConvCapsules(RoutedCapsules):
    """Convolutional capsule layer: every k x k window (stride s, no padding) of the child grid is
    routed to the parent types at one output position; a window's children are (ky, kx, child type)."""

    kind = 'conv'

    def __init__(
        self,
        in_caps: int,
        out_caps: int,
        pose_dim: int,
        kernel_size: int = 3,
        stride: int = 1,
        matrix_pose: bool = True,
        out_dim: Optional[int] = None,
        layer_norm: bool = True,
        activations: bool = False,
        max_votes: Optional[int] = DEFAULT_MAX_VOTES,
        fused_routing: Optional[bool] = None,
        device=None,
        dtype=None,
    ):
        self.in_caps, self.kernel_size, self.stride = in_caps, kernel_size, stride
        super().__init__(
            kernel_size * kernel_size * in_caps,
            pose_dim,
            out_caps,
            out_dim or pose_dim,
            matrix_pose,
            layer_norm,
            activations,
            max_votes,
            fused_routing,
            device,
            dtype,
        )

    def output_grid(self, height: int, width: int) -> Tuple[int, int]:
        return conv_output_size(height, self.kernel_size, self.stride), conv_output_size(
            width, self.kernel_size, self.stride
        )

    def _uniform(self, children: Capsules) -> Tuple[Tensor, Tuple[int, int, int]]:
        poses, activations = children
        self._check_grid(poses)
        B, H, W, N, _ = poses.shape
        if activations is not None:
            poses = poses * activations[..., None]
        grid = poses.reshape(B, H, W, N, self.child_rows, self.child_cols)
        poses = uniform_window_routing(grid, self.weight, self.kernel_size, self.stride, keep_copy=plain_ops_only())
        return poses, (B, *self.output_grid(H, W))

    def _check_grid(self, poses: Tensor):
        H, W = poses.shape[1], poses.shape[2]
        k, s = self.kernel_size, self.stride
        if not is_tracing() and (H < k or W < k):
            raise ValueError(
                f'{type(self).__name__}(kernel_size={k}, stride={s}) needs a child grid of at least {k}x{k}, '
                f'got {H}x{W}: the input image is too small for this capsule stack'
            )

    def _child_grid(self, capsules: Capsules):
        poses, activations = capsules
        self._check_grid(poses)
        B, H, W, N, _ = poses.shape
        grid = poses.reshape(B, H, W, N, self.child_rows, self.child_cols)
        return grid, activations, (self.kernel_size, self.stride), (B, *self.output_grid(H, W))

    def _children(self, capsules: Capsules):
        grid, activations, window, out_grid = self._child_grid(capsules)
        children = window_children(grid, *window)
        return children, None if activations is None else window_children(activations, *window), out_grid


class FCCapsules(RoutedCapsules):
    """Fully connected capsule layer: every child capsule of the grid (flattened type-major, i.e.
    in (type, h, w) order) is routed to every parent; the output is a 1x1 grid."""

    kind = 'fc'

    def __init__(
        self,
        in_caps: int,
        out_caps: int,
        pose_dim: int,
        matrix_pose: bool = True,
        out_dim: Optional[int] = None,
        layer_norm: bool = True,
        activations: bool = False,
        max_votes: Optional[int] = DEFAULT_MAX_VOTES,
        fused_routing: Optional[bool] = None,
        device=None,
        dtype=None,
    ):
        self.in_caps = in_caps
        super().__init__(
            in_caps,
            pose_dim,
            out_caps,
            out_dim or pose_dim,
            matrix_pose,
            layer_norm,
            activations,
            max_votes,
            fused_routing,
            device,
            dtype,
        )

    def output_grid(self, height: int, width: int) -> Tuple[int, int]:
        return 1, 1

    def _children(self, capsules: Capsules):
        poses, activations = capsules
        B, H, W, N, _ = poses.shape
        if not is_tracing() and N * H * W != self.in_caps:
            raise ValueError(
                f'{type(self).__name__} was built for {self.in_caps} child capsules, got a {H}x{W} grid of '
                f'{N} types = {N * H * W}: the input image size differs from the one the model was built for'
            )
        children = poses.permute(0, 3, 1, 2, 4).reshape(B, N * H * W, self.child_rows, self.child_cols)
        if activations is not None:
            activations = activations.permute(0, 3, 1, 2).reshape(B, N * H * W)
        return children, activations, (B, 1, 1)

    def _child_grid(self, capsules: Capsules):
        children, activations, out_grid = self._children(capsules)  # one 1 x 1 window per image
        return children[:, None, None], None if activations is None else activations[:, None, None], (1, 1), out_grid
