""" The paper's comparison systems as timm models

Paper: `Capsules with Inverted Dot-Product Attention Routing` - https://arxiv.org/abs/2002.04764
(Tsai, Srivastava, Goh, Salakhutdinov, ICLR 2020), Table 1, Fig. 5 and appendix Tables 2-12.

- ``DynamicCapsNet``: vector capsules with dynamic routing (Sabour et al., 2017). Outputs the lengths of
  the class capsules (in [0, 1)); train with ``losses.margin_loss``.
- ``EMCapsNet``: 4x4 matrix capsules with activations and EM routing (Hinton et al., 2018), coordinate
  addition in the class capsules. Outputs the class capsules' activations (in (0, 1)); train with
  ``losses.spread_loss``.
- ``BaselineCNN``: the paper's plain CNNs (CIFAR and DiverseMultiMNIST), logits.
- ``CifarResNet``: ResNet-18 for 32x32 inputs, timm's own ResNet with a 3x3 stride-1 stem and no max-pool.

Each model class says what its forward returns in ``output_type`` (see ``losses.py``).

The capsule baselines route layer by layer (every routing iteration of a layer runs before the next
layer starts), so ``forward_features`` is simply the deepest capsule layer below the class capsules, as
an NCHW map (channel n * d + e holds entry e of capsule type n; with activations, the last N channels
hold the N activations), and ``forward_head`` routes it to the class capsules.
"""
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from timm.layers import SelectAdaptivePool2d, create_classifier, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, ResNet

from .backbones import CifarResNetBackbone, SimpleBackbone, capsule_group_matcher
from .capsnet import CIFAR10_LABELS, CIFAR100_LABELS, CIFAR_MEAN, CIFAR_STD, DIGIT_LABELS, check_input
from .layers import Capsules, ConvCapsules, FCCapsules, PrimaryCapsules, capsules_to_nchw
from .routing import capsule_votes
from .routing_baselines import dynamic_routing, em_routing, inverse_temperature_schedule, squash

__all__ = [
    'DynamicCapsNet', 'EMCapsNet', 'BaselineCNN', 'CifarResNet', 'DynamicConvCapsules', 'DynamicFCCapsules',
    'EMConvCapsules', 'EMClassCapsules',
]

# ---- capsule layers -----------------------------------------------------------------------------


class _DynamicRouting:
    """Routes a capsule layer's votes by agreement (mixed into ConvCapsules / FCCapsules, whose windowing
    and weights it reuses; vector poses, no LayerNorm)."""
    iterations: int

    def reset_parameters(self):
        # N(0, parents^2 / (children * out_dim)): with uniform first-pass routing (c = 1 / parents) and
        # uncorrelated children, |s_j| is then about the children's length, in the squash's useful range
        children, parents, _, out_dim = self.weight.shape
        with torch.no_grad():
            self.weight.normal_(0., parents / math.sqrt(children * out_dim))

    def forward(self, children: Capsules) -> Tuple[Capsules, Tensor]:
        child_poses, _, (B, H, W) = self._children(children)
        votes = capsule_votes(child_poses, self.weight).flatten(-2)  # (groups, children, parents, d)
        parents, coefficients = dynamic_routing(votes, self.iterations)
        return Capsules(parents.reshape(B, H, W, self.out_caps, self.out_dim)), coefficients


class DynamicConvCapsules(_DynamicRouting, ConvCapsules):
    """Convolutional vector-capsule layer with dynamic routing: each k x k window (stride s, no padding)
    is routed to the parent types at one output position; weights are shared across positions."""

    def __init__(self, in_caps: int, out_caps: int, in_dim: int, out_dim: int, kernel_size: int = 3,
                 stride: int = 1, iterations: int = 3, device=None, dtype=None):
        super().__init__(in_caps, out_caps, in_dim, kernel_size, stride, matrix_pose=False, out_dim=out_dim,
                         layer_norm=False, device=device, dtype=dtype)
        self.iterations = iterations


class DynamicFCCapsules(_DynamicRouting, FCCapsules):
    """Fully connected vector-capsule layer with dynamic routing: one weight matrix per (child, parent)."""

    def __init__(self, in_caps: int, out_caps: int, in_dim: int, out_dim: int, iterations: int = 3,
                 device=None, dtype=None):
        super().__init__(in_caps, out_caps, in_dim, matrix_pose=False, out_dim=out_dim, layer_norm=False,
                         device=device, dtype=dtype)
        self.iterations = iterations


def _em_parameters(module: nn.Module, out_caps: int, device=None, dtype=None):
    # beta_u, beta_a: learned per parent capsule type (Hinton et al. learn them discriminatively)
    module.beta_u = nn.Parameter(torch.zeros(out_caps, device=device, dtype=dtype))
    module.beta_a = nn.Parameter(torch.zeros(out_caps, device=device, dtype=dtype))


class EMConvCapsules(ConvCapsules):
    """Convolutional matrix-capsule layer with EM routing: a 4x4 weight per (kernel offset, child type,
    parent type), shared across positions; each window is routed to the parent types at its position."""

    def __init__(self, in_caps: int, out_caps: int, pose_dim: int = 16, kernel_size: int = 3, stride: int = 1,
                 inverse_temperatures: Sequence[float] = (1 / 3, 2 / 3, 1.), device=None, dtype=None):
        super().__init__(in_caps, out_caps, pose_dim, kernel_size, stride, matrix_pose=True, layer_norm=False,
                         device=device, dtype=dtype)
        self.inverse_temperatures = [float(t) for t in inverse_temperatures]
        _em_parameters(self, out_caps, device, dtype)

    def forward(self, children: Capsules) -> Tuple[Capsules, Tensor]:
        child_poses, child_activations, (B, H, W) = self._children(children)
        # votes laid out (groups, parents, children, d) in memory, the layout em_routing works in;
        # em_routing gets every argument spelled out (TorchScript calls it without its defaults)
        votes = torch.einsum('girc,ijct->gjirt', child_poses, self.weight).flatten(-2).transpose(1, 2)
        poses, activations, assignments = em_routing(
            votes, child_activations, self.beta_u, self.beta_a, self.inverse_temperatures, True, 1e-6)
        poses = poses.reshape(B, H, W, self.out_caps, self.out_dim)
        return Capsules(poses, activations.reshape(B, H, W, self.out_caps)), assignments


class EMClassCapsules(nn.Module):
    """Class capsules of an EM CapsNet: every child capsule of the grid votes for every class with one 4x4
    weight per (child type, class), shared across positions; with coordinate addition, the scaled (row,
    column) of the child's position (cell centre, in [0, 1]) is added to the first two entries of the
    right-hand column of its vote. Returns the class activations (B, classes)."""

    def __init__(self, in_caps: int, num_classes: int, grid: Tuple[int, int], pose_dim: int = 16,
                 coordinate_addition: bool = True,
                 inverse_temperatures: Sequence[float] = (1 / 3, 2 / 3, 1.), device=None, dtype=None):
        super().__init__()
        side = math.isqrt(pose_dim)
        if side * side != pose_dim:
            raise ValueError(f'EM capsules have square matrix poses, got pose_dim={pose_dim}')
        self.in_caps, self.out_caps, self.side = in_caps, num_classes, side
        self.inverse_temperatures = [float(t) for t in inverse_temperatures]
        self.weight = nn.Parameter(torch.empty(in_caps, num_classes, side, side, device=device, dtype=dtype))
        _em_parameters(self, num_classes, device, dtype)
        self.coordinate_addition = coordinate_addition
        rows = (torch.arange(grid[0], device=device, dtype=torch.float32) + 0.5) / grid[0]
        cols = (torch.arange(grid[1], device=device, dtype=torch.float32) + 0.5) / grid[1]
        coordinates = torch.zeros(grid[0], grid[1], side, side, device=device, dtype=torch.float32)
        coordinates[..., 0, side - 1] = rows[:, None]
        coordinates[..., 1, side - 1] = cols[None, :]
        buffer_dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.register_buffer('coordinates', coordinates.flatten(-2).to(buffer_dtype), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.weight.normal_(0., self.side ** -0.5)

    def forward(self, children: Capsules) -> Tensor:
        poses, activations = children
        B, H, W, N, _ = poses.shape
        votes = capsule_votes(poses.reshape(B * H * W, N, self.side, self.side), self.weight)
        votes = votes.reshape(B, H, W, N, self.out_caps, self.side * self.side)
        if self.coordinate_addition:
            votes = votes + self.coordinates[:, :, None, None, :].to(votes.dtype)
        # children in (h, w, type) order; EM routing does not depend on the order of the children
        routed = em_routing(
            votes.reshape(B, H * W * N, self.out_caps, -1), activations.reshape(B, H * W * N),
            self.beta_u, self.beta_a, self.inverse_temperatures, True, 1e-6)
        return routed[1]  # the class activations (routed[0] holds the class poses)


class SimpleBnBackbone(SimpleBackbone):
    """One conv, BatchNorm and ReLU (the EM CapsNet's stem)."""

    def __init__(self, in_chans: int, out_chs: int, kernel_size: int = 4, stride: int = 2, padding: int = 1,
                 device=None, dtype=None):
        super().__init__(in_chans, out_chs, kernel_size, stride, padding, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_chs, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> List[Tensor]:
        return [self.act(self.bn(self.conv(x)))]


# ---- capsule baselines ------------------------------------------------------------------------------


class _CapsuleBaseline(nn.Module):
    """The timm contract shared by the dynamic-routing and EM CapsNets.

    Subclasses build ``backbone``, ``primary``, ``capsule_layers`` and ``head`` and say how the model walks
    from the backbone's last map through the capsule levels (``_capsule_steps``); every step's output is a
    feature level.
    """
    has_activations = False
    output_type = 'logits'

    def _finish_init(self, head_factory: Callable[..., nn.Module], global_pool: str, dd: Dict[str, Any]):
        self._head_factory = head_factory  # (num_classes, device=, dtype=) -> class capsules
        self.num_features = self.head_hidden_size = self.feature_info[-1]['num_chs']
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head = head_factory(self.num_classes, **dd) if self.num_classes else None
        self.num_capsule_levels = len(self.feature_info) - len(self.backbone.feature_info)
        self.pruned = False
        self.grad_checkpointing = False

    def _capsule_steps(self) -> List[Callable]:
        raise NotImplementedError

    # ---- capsules <-> feature maps ------------------------------------------------------------

    def _from_nchw(self, x: Tensor) -> Capsules:
        B, C, H, W = x.shape
        x = x.permute(0, 2, 3, 1)
        d = self.pose_dim
        n = C // (d + 1) if self.has_activations else C // d
        activations = x[..., n * d:] if self.has_activations else None
        return Capsules(x[..., :n * d].reshape(B, H, W, n, d), activations)

    # ---- forward ----------------------------------------------------------------------------------

    def _run(self, step: Callable, state):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(step, state, use_reentrant=False)
        return step(state)

    def _walk(self, x: Tensor, max_index: int) -> List[Tensor]:
        """NCHW maps of the feature levels 0..max_index (fewer when the model was pruned)."""
        check_input(x, self.in_chans, self.img_size)
        levels = list(self.backbone(x))
        if self.primary is None:
            return levels
        state = levels[-1]
        for step in self._capsule_steps()[:self.num_capsule_levels]:
            if len(levels) > max_index:
                break
            state = self._run(step, state)
            levels.append(capsules_to_nchw(state))
        return levels

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Feature maps of the backbone levels and of every capsule level below the class capsules."""
        if output_fmt != 'NCHW':
            raise ValueError(f"capsule feature maps are NCHW, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        levels = self._walk(x, max_index if stop_early else len(self.feature_info) - 1)
        if stop_early:
            levels = levels[:max_index + 1]
        intermediates = [level for index, level in enumerate(levels) if index in take_indices]
        if intermediates_only:
            return intermediates
        return levels[-1], intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drops the layers after the deepest requested feature level (and, by default, the head)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        num_backbone = len(self.backbone.feature_info)
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:
            self.pruned = True
            self.num_capsule_levels = max(0, max_index - num_backbone + 1)
            # capsule layers come after the primary levels, one level each
            num_layers = max(0, self.num_capsule_levels - (len(self.feature_info) - num_backbone
                                                           - len(self.capsule_layers)))
            self.capsule_layers = self.capsule_layers[:num_layers]
            if max_index < num_backbone:
                self.primary = None
                if isinstance(self.backbone, CifarResNetBackbone):
                    self.backbone.stages = self.backbone.stages[:max_index + 1]
                    self.backbone.feature_info = self.backbone.feature_info[:max_index + 1]
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        return self._walk(x, len(self.feature_info) - 1)[-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if pre_logits or self.head is None:
            return self.global_pool(x)
        return self._classify(self._from_nchw(x))

    def _classify(self, capsules: Capsules) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # ---- timm model contract ------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return capsule_group_matcher(coarse)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute each capsule layer's routing (and the backbone's stages) in the backward pass."""
        self.grad_checkpointing = enable
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """New class capsules for ``num_classes`` classes (0 removes them: the model then returns pooled
        features of the deepest capsule layer)."""
        if num_classes and self.pruned:
            raise ValueError('class capsules need the full capsule stack; this model was pruned')
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        if num_classes:
            reference = next(self.parameters())
            self.head = self._head_factory(num_classes, device=reference.device, dtype=reference.dtype)
            self.head.train(self.training)
        else:
            self.head = None


_DR_STACK = ()  # the CIFAR models route the primary capsules straight to the class capsules
_DR_MULTIMNIST_STACK = (('conv', 16, 3, 1),)


class DynamicCapsNet(_CapsuleBaseline):
    """Capsule network with vector poses and dynamic routing (Sabour et al., 2017).

    backbone -> primary capsules (conv, squash) -> convolutional capsule layers -> class capsules
    (fully connected, one weight matrix per child and class). The output is the length of each class
    capsule, in [0, 1); an image shows class k when length k > 0.5. Train with the margin loss.

    Feature levels: the backbone's, the primary capsules before the squash ('primary.conv'), after it
    ('primary'), then each convolutional capsule layer.

    Args:
        num_classes: number of class capsules (0 for a pooled feature extractor).
        in_chans, img_size: input channels and the input size the class capsules are built for.
        backbone: 'simple' (one conv + ReLU) or 'resnet' (the paper's CIFAR ResNet, ``CifarResNetBackbone``).
        backbone_args: arguments of the backbone (e.g. ``out_chs``, ``kernel_size``; ``widths``, ``depths``).
        primary_caps, primary_dim: number of primary capsule types and their pose dimension.
        primary_kernel_size, primary_stride: the primary capsule conv (no padding).
        capsule_layers: hidden convolutional capsule layers ('conv', types, kernel, stride), each keeping
            the primary pose dimension.
        class_dim: pose dimension of the class capsules.
        iterations: routing iterations of every routed layer.
        global_pool: pooling of the features when ``num_classes == 0``.
    """
    output_type = 'lengths'

    def __init__(
            self,
            num_classes: int = 10,
            in_chans: int = 3,
            img_size: Union[int, Tuple[int, int]] = 32,
            backbone: str = 'simple',
            backbone_args: Optional[Dict[str, Any]] = None,
            primary_caps: int = 32,
            primary_dim: int = 8,
            primary_kernel_size: int = 9,
            primary_stride: int = 2,
            capsule_layers: Sequence[Tuple[str, int, int, int]] = _DR_STACK,
            class_dim: int = 16,
            iterations: int = 3,
            global_pool: str = 'avg',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, to_2tuple(img_size)
        self.pose_dim, self.iterations = primary_dim, iterations
        self.backbone = _make_backbone(backbone, in_chans, backbone_args, SimpleBackbone, dd)
        grid = _grid_after(self.backbone, self.img_size)
        # squashed in the second capsule step, so that the raw capsules are a feature level of their own
        self.primary = PrimaryCapsules(
            self.backbone.num_features, primary_caps, primary_dim, primary_kernel_size, primary_stride,
            layer_norm=False, **dd)
        grid = tuple((size - primary_kernel_size) // primary_stride + 1 for size in grid)
        # unpadded convs shrink the grid by more than their stride: reductions come from the grid sizes
        reduction = self.img_size[0] // grid[0]
        self.feature_info = [dict(info, module=f"backbone.{info['module']}") for info in self.backbone.feature_info]
        self.feature_info.append(dict(num_chs=primary_caps * primary_dim, reduction=reduction, module='primary.conv'))
        self.feature_info.append(dict(num_chs=primary_caps * primary_dim, reduction=reduction, module='primary'))
        layers, in_caps = [], primary_caps
        for index, spec in enumerate(capsule_layers):
            kind, out_caps, kernel_size, stride = spec
            if kind != 'conv':
                raise ValueError(f"DynamicCapsNet hidden capsule layers are 'conv' layers, got {kind!r}")
            layers.append(DynamicConvCapsules(
                in_caps, out_caps, primary_dim, primary_dim, kernel_size, stride, iterations, **dd))
            grid = tuple((size - kernel_size) // stride + 1 for size in grid)
            reduction = self.img_size[0] // max(1, grid[0])
            self.feature_info.append(
                dict(num_chs=out_caps * primary_dim, reduction=reduction, module=f'capsule_layers.{index}'))
            in_caps = out_caps
        if min(grid) < 1:
            raise ValueError(f'input size {self.img_size} is too small for this capsule stack')
        self.capsule_layers = nn.ModuleList(layers)
        head_in_caps = in_caps * grid[0] * grid[1]
        self._finish_init(
            lambda n, **dd: DynamicFCCapsules(head_in_caps, n, primary_dim, class_dim, iterations, **dd),
            global_pool, dd)

    def _capsule_steps(self) -> List[Callable]:
        return [self.primary, self._squash] + list(self.capsule_layers_as_steps())

    def capsule_layers_as_steps(self):
        for layer in self.capsule_layers:
            yield lambda capsules, layer=layer: layer(capsules)[0]

    @staticmethod
    def _squash(capsules: Capsules) -> Capsules:
        return Capsules(squash(capsules.poses))

    def _classify(self, capsules: Capsules) -> Tensor:
        classes, _ = self.head(capsules)
        return torch.linalg.vector_norm(classes.poses.float(), dim=-1).flatten(1).to(classes.poses.dtype)


class EMCapsNet(_CapsuleBaseline):
    """Capsule network with 4x4 matrix poses, activations and EM routing (Hinton et al., 2018).

    backbone -> primary capsules (1x1 conv: poses and sigmoid activations) -> convolutional EM capsule
    layers -> class capsules (weights shared across positions, coordinate addition). The output is the
    class capsules' activations, in (0, 1). Train with the spread loss.

    Args:
        num_classes: number of class capsules (0 for a pooled feature extractor).
        in_chans, img_size: input channels and the input size the class capsules are built for.
        backbone: 'simple' (conv4x4 s2 p1 + BN + ReLU) or 'resnet' (the paper's CIFAR ResNet).
        backbone_args: arguments of the backbone.
        primary_caps, pose_dim: number of primary capsule types and pose dimension (16 = 4x4).
        capsule_layers: convolutional capsule layers ('conv', types, kernel, stride).
        iterations: EM iterations per routed layer; ``final_inverse_temperature``: the last one's lambda
            (lambda rises linearly to it, see ``routing_baselines.inverse_temperature_schedule``).
        coordinate_addition: add the children's scaled positions to their class votes.
        global_pool: pooling of the features when ``num_classes == 0``.
    """
    has_activations = True
    output_type = 'activations'

    def __init__(
            self,
            num_classes: int = 10,
            in_chans: int = 3,
            img_size: Union[int, Tuple[int, int]] = 32,
            backbone: str = 'simple',
            backbone_args: Optional[Dict[str, Any]] = None,
            primary_caps: int = 32,
            pose_dim: int = 16,
            capsule_layers: Sequence[Tuple[str, int, int, int]] = (('conv', 32, 3, 2), ('conv', 32, 3, 1)),
            iterations: int = 3,
            final_inverse_temperature: float = 1.0,
            coordinate_addition: bool = True,
            global_pool: str = 'avg',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, to_2tuple(img_size)
        self.pose_dim, self.iterations = pose_dim, iterations
        temperatures = inverse_temperature_schedule(iterations, final_inverse_temperature)
        self.backbone = _make_backbone(backbone, in_chans, backbone_args, SimpleBnBackbone, dd)
        grid = _grid_after(self.backbone, self.img_size)
        self.primary = PrimaryCapsules(
            self.backbone.num_features, primary_caps, pose_dim, layer_norm=False, activations=True, **dd)
        reduction = self.backbone.feature_info[-1]['reduction']
        self.feature_info = [dict(info, module=f"backbone.{info['module']}") for info in self.backbone.feature_info]
        self.feature_info.append(dict(num_chs=primary_caps * (pose_dim + 1), reduction=reduction, module='primary'))
        layers, in_caps = [], primary_caps
        for index, spec in enumerate(capsule_layers):
            kind, out_caps, kernel_size, stride = spec
            if kind != 'conv':
                raise ValueError(f"EMCapsNet hidden capsule layers are 'conv' layers, got {kind!r}")
            layers.append(EMConvCapsules(in_caps, out_caps, pose_dim, kernel_size, stride, temperatures, **dd))
            grid = tuple((size - kernel_size) // stride + 1 for size in grid)
            reduction = self.img_size[0] // max(1, grid[0])
            self.feature_info.append(
                dict(num_chs=out_caps * (pose_dim + 1), reduction=reduction, module=f'capsule_layers.{index}'))
            in_caps = out_caps
        if min(grid) < 1:
            raise ValueError(f'input size {self.img_size} is too small for this capsule stack')
        self.capsule_layers = nn.ModuleList(layers)
        head_grid = grid
        self._finish_init(
            lambda n, **dd: EMClassCapsules(in_caps, n, head_grid, pose_dim, coordinate_addition, temperatures, **dd),
            global_pool, dd)

    def _capsule_steps(self) -> List[Callable]:
        steps = [self.primary]
        for layer in self.capsule_layers:
            steps.append(lambda capsules, layer=layer: layer(capsules)[0])
        return steps

    def _classify(self, capsules: Capsules) -> Tensor:
        return self.head(capsules)


def _make_backbone(kind: str, in_chans: int, args: Optional[Dict[str, Any]], simple_cls, dd) -> nn.Module:
    args = dict(args or {})
    if kind == 'simple':
        return simple_cls(in_chans, **args, **dd)
    if kind == 'resnet':
        return CifarResNetBackbone(in_chans, **args, **dd)
    raise ValueError(f"backbone must be 'simple' or 'resnet', got {kind!r}")


def _grid_after(backbone: nn.Module, img_size: Tuple[int, int]) -> Tuple[int, int]:
    """Size of the backbone's last feature map, from its layer geometry (no tensors needed)."""
    if isinstance(backbone, SimpleBackbone):
        conv = backbone.conv
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        return tuple((size + 2 * p - k) // s + 1 for size in img_size)
    reduction = backbone.feature_info[-1]['reduction']
    return tuple(math.ceil(size / reduction) for size in img_size)


# ---- CNN baselines ------------------------------------------------------------------------------------


class FlattenMlpHead(nn.Module):
    """A fully connected layer over every position of the feature map (flatten -> Linear -> ReLU), the
    DiverseMultiMNIST 'fully connected' CNN's replacement for average pooling."""

    def __init__(self, in_features: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.fc = nn.Linear(in_features, hidden, device=device, dtype=dtype)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.fc(x.flatten(1)))


class BaselineCNN(nn.Module):
    """The paper's baseline CNNs: a stack of conv (+ ReLU, + BatchNorm) stages, then either global average
    pooling or a fully connected layer over all positions (``head='fc'``), then a linear classifier.

    Each stage is (out_chs, kernel, stride, padding, avg_pool_first, batch_norm): an optional 2x2 average
    pooling, a conv with bias, ReLU, and an optional BatchNorm (the paper's "ReLU+BN" order). Every stage is
    a feature level.
    """
    output_type = 'logits'

    def __init__(
            self,
            num_classes: int = 10,
            in_chans: int = 3,
            img_size: Union[int, Tuple[int, int]] = 32,
            stages: Sequence[Tuple[int, int, int, int, bool, bool]] = (),
            head: str = 'pool',
            head_hidden_size: int = 640,
            global_pool: Optional[str] = None,
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if head not in ('pool', 'fc'):
            raise ValueError(f"head must be 'pool' or 'fc', got {head!r}")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, to_2tuple(img_size)
        self.head_type, self.drop_rate = head, drop_rate
        self.grad_checkpointing = False
        blocks, self.feature_info = [], []
        in_chs, reduction, grid = in_chans, 1, self.img_size
        for index, (out_chs, kernel_size, stride, padding, pool_first, batch_norm) in enumerate(stages):
            layers = []
            if pool_first:
                layers.append(nn.AvgPool2d(2))
                reduction, grid = reduction * 2, tuple(size // 2 for size in grid)
            layers += [nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, **dd), nn.ReLU(inplace=True)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_chs, **dd))
            blocks.append(nn.Sequential(*layers))
            reduction *= stride
            grid = tuple((size + 2 * padding - kernel_size) // stride + 1 for size in grid)
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{index}'))
            in_chs = out_chs
        self.stages = nn.Sequential(*blocks)
        self.grid = grid
        self.num_features = in_chs
        self.fc_hidden_size = head_hidden_size
        if head == 'fc':
            self.head_hidden_size = head_hidden_size
            self.global_pool = FlattenMlpHead(in_chs * grid[0] * grid[1], head_hidden_size, **dd) \
                if global_pool != '' else nn.Identity()
            self.fc = nn.Linear(head_hidden_size, num_classes, **dd) if num_classes else nn.Identity()
            if global_pool == '':
                self.head_hidden_size = in_chs
        else:
            self.global_pool, self.fc = create_classifier(
                in_chs, num_classes, pool_type='avg' if global_pool is None else global_pool, **dd)
            self.head_hidden_size = in_chs * self.global_pool.feat_mult()
        self.pruned = False

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stages\.0\.', blocks=r'^stages\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        reference = next(self.parameters())
        dd = dict(device=reference.device, dtype=reference.dtype)
        self.num_classes = num_classes
        if self.head_type == 'fc':
            if global_pool == '':
                self.global_pool = nn.Identity()
                self.head_hidden_size = self.num_features
            elif global_pool is not None or isinstance(self.global_pool, nn.Identity):
                if self.pruned:
                    raise ValueError('the fully connected head needs the full network; this model was pruned')
                self.global_pool = FlattenMlpHead(
                    self.num_features * self.grid[0] * self.grid[1], self.fc_hidden_size, **dd)
                self.head_hidden_size = self.fc_hidden_size
            self.fc = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes else nn.Identity()
        else:
            if global_pool is None:
                global_pool = self.global_pool.pool_type
            self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
            self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        if output_fmt != 'NCHW':
            raise ValueError(f"feature maps are NCHW, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        for index, stage in enumerate(stages):
            x = self._run(stage, x)
            if index in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:
            self.pruned = True
            self.stages = self.stages[:max_index + 1]
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def _run(self, stage: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward_features(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = self._run(stage, x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class CifarResNet(ResNet):
    """timm's ResNet for 32x32 inputs: a 3x3 stride-1 stem conv (64 channels), BN, ReLU and no max-pool;
    the stages are timm's own. Feature reductions are 1, 1, 2, 4, 8."""
    output_type = 'logits'

    def __init__(self, *args, in_chans: int = 3, device=None, dtype=None, **kwargs):
        super().__init__(*args, in_chans=in_chans, device=device, dtype=dtype, **kwargs)
        stem_chs = self.bn1.num_features
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, 1, 1, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_normal_(self.conv1.weight, mode='fan_out', nonlinearity='relu')
        self.maxpool = nn.Identity()
        for info in self.feature_info:
            info['reduction'] = max(1, info['reduction'] // 4)


# ---- registration -------------------------------------------------------------------------------------


def _create(cls, variant: str, pretrained: bool, num_levels: int, **kwargs):
    return build_model_with_cfg(
        cls, variant, pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=tuple(range(num_levels))),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (1, 1), 'fixed_input_size': True,
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CIFAR_MEAN, 'std': CIFAR_STD,
        'first_conv': 'backbone.conv', 'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2002.04764',
        'paper_name': 'Capsules with Inverted Dot-Product Attention Routing',
        'origin_url': 'https://github.com/apple/ml-capsules-inverted-attention-routing',
        **kwargs,
    }


_cifar10 = dict(num_classes=10, label_names=CIFAR10_LABELS)
_cifar100 = dict(num_classes=100, label_names=CIFAR100_LABELS)
_multimnist = dict(num_classes=10, label_names=DIGIT_LABELS, input_size=(1, 36, 36), mean=(0.,), std=(1.,))
_resnet_stem = dict(first_conv='backbone.conv1')
_cnn = dict(first_conv='stages.0.0', classifier='fc')


def _tagged(name: str, tag: str, **kwargs) -> Tuple[str, Dict[str, Any]]:
    return f'{name}.{tag}', _cfg(hf_hub_id=f'timm-capsules/{name}.{tag}', **kwargs)


default_cfgs = generate_default_cfgs(dict([
    _tagged('dynamic_capsnet_simple_cifar10', 'cifar10', pool_size=(8, 8), **_cifar10),
    _tagged('dynamic_capsnet_simple_cifar100', 'cifar100', pool_size=(8, 8), **_cifar100),
    _tagged('dynamic_capsnet_resnet_cifar10', 'cifar10', pool_size=(8, 8), **_resnet_stem, **_cifar10),
    _tagged('dynamic_capsnet_resnet_cifar100', 'cifar100', pool_size=(8, 8), **_resnet_stem, **_cifar100),
    _tagged('em_capsnet_simple_cifar10', 'cifar10', pool_size=(5, 5), **_cifar10),
    _tagged('em_capsnet_simple_cifar100', 'cifar100', pool_size=(5, 5), **_cifar100),
    _tagged('em_capsnet_resnet_cifar10', 'cifar10', pool_size=(5, 5), **_resnet_stem, **_cifar10),
    _tagged('em_capsnet_resnet_cifar100', 'cifar100', pool_size=(5, 5), **_resnet_stem, **_cifar100),
    _tagged('cnn_baseline_cifar10', 'cifar10', pool_size=(2, 2), fixed_input_size=False, **_cnn, **_cifar10),
    _tagged('cnn_baseline_cifar100', 'cifar100', pool_size=(2, 2), fixed_input_size=False, **_cnn, **_cifar100),
    _tagged('resnet18_cifar10', 'cifar10', pool_size=(4, 4), fixed_input_size=False, first_conv='conv1',
            classifier='fc', **_cifar10),
    _tagged('resnet18_cifar100', 'cifar100', pool_size=(4, 4), fixed_input_size=False, first_conv='conv1',
            classifier='fc', **_cifar100),
    _tagged('cnn_baseline_multimnist', 'diverse_multimnist', pool_size=(6, 6), fixed_input_size=False,
            **_cnn, **_multimnist),
    _tagged('cnn_fc_multimnist', 'diverse_multimnist', pool_size=(6, 6), **_cnn, **_multimnist),
    _tagged('dynamic_capsnet_vector_multimnist', 'diverse_multimnist', pool_size=(6, 6), **_multimnist),
]))

# DR CapsNet, simple backbone (paper's Table): conv9x9 3->256 + ReLU (32 -> 24); primary capsules
# conv9x9 s2 256 -> 32 x 8-d, squash (24 -> 8); 2048 capsules -> dynamic routing -> classes x 16-d.
_DR_SIMPLE = dict(backbone='simple', backbone_args=dict(out_chs=256, kernel_size=9, stride=1, padding=0),
                  primary_caps=32, primary_dim=8, primary_kernel_size=9, primary_stride=2, class_dim=16)
# DR CapsNet, ResNet backbone: the paper's CIFAR ResNet (3 BasicBlocks of 64, then 4 of 256 with the first
# at stride 2 -> 16x16x256), primary capsules conv9x9 s1 256 -> 32 x 8-d (16 -> 8), then as above.
_DR_RESNET = dict(backbone='resnet', backbone_args=dict(widths=(64, 256)),
                  primary_caps=32, primary_dim=8, primary_kernel_size=9, primary_stride=1, class_dim=16)
# EM CapsNet: conv4x4 s2 p1 3->256 + BN + ReLU (32 -> 16) or the CIFAR ResNet (16x16x128); primary
# capsules 1x1 -> 32 x (4x4 pose + activation); conv EM caps 32 k3 s2 (16 -> 7); conv EM caps 32 k3 s1
# (7 -> 5); class capsules with coordinate addition.
_EM_SIMPLE = dict(backbone='simple', backbone_args=dict(out_chs=256))
_EM_RESNET = dict(backbone='resnet')


def _dynamic(variant: str, pretrained: bool, defaults: Dict[str, Any], kwargs: Dict[str, Any]) -> DynamicCapsNet:
    args = dict(defaults, **kwargs)
    backbone_levels = 2 if args.get('backbone') == 'resnet' else 1
    num_levels = backbone_levels + 2 + len(args.get('capsule_layers', ()))
    return _create(DynamicCapsNet, variant, pretrained, num_levels, **args)


def _em(variant: str, pretrained: bool, defaults: Dict[str, Any], kwargs: Dict[str, Any]) -> EMCapsNet:
    args = dict(defaults, **kwargs)
    backbone_levels = 2 if args.get('backbone') == 'resnet' else 1
    num_levels = backbone_levels + 1 + len(args.get('capsule_layers', (('conv',),) * 2))
    return _create(EMCapsNet, variant, pretrained, num_levels, **args)


@register_model
def dynamic_capsnet_simple_cifar10(pretrained: bool = False, **kwargs) -> DynamicCapsNet:
    """Dynamic-routing CapsNet, simple backbone, 7,992,320 parameters (paper: 7.99M)."""
    return _dynamic('dynamic_capsnet_simple_cifar10', pretrained, _DR_SIMPLE, kwargs)


@register_model
def dynamic_capsnet_simple_cifar100(pretrained: bool = False, **kwargs) -> DynamicCapsNet:
    """Dynamic-routing CapsNet, simple backbone, 31,585,280 parameters (paper: 31.59M)."""
    return _dynamic('dynamic_capsnet_simple_cifar100', pretrained, dict(_DR_SIMPLE, num_classes=100), kwargs)


@register_model
def dynamic_capsnet_resnet_cifar10(pretrained: bool = False, **kwargs) -> DynamicCapsNet:
    """Dynamic-routing CapsNet, CIFAR ResNet backbone, 12,450,880 parameters (paper: 12.45M)."""
    return _dynamic('dynamic_capsnet_resnet_cifar10', pretrained, _DR_RESNET, kwargs)


@register_model
def dynamic_capsnet_resnet_cifar100(pretrained: bool = False, **kwargs) -> DynamicCapsNet:
    """Dynamic-routing CapsNet, CIFAR ResNet backbone, 36,043,840 parameters (paper: 36.04M)."""
    return _dynamic('dynamic_capsnet_resnet_cifar100', pretrained, dict(_DR_RESNET, num_classes=100), kwargs)


@register_model
def em_capsnet_simple_cifar10(pretrained: bool = False, **kwargs) -> EMCapsNet:
    """EM-routing CapsNet, simple backbone, 452,500 parameters (paper: 0.45M)."""
    return _em('em_capsnet_simple_cifar10', pretrained, _EM_SIMPLE, kwargs)


@register_model
def em_capsnet_simple_cifar100(pretrained: bool = False, **kwargs) -> EMCapsNet:
    """EM-routing CapsNet, simple backbone, 498,760 parameters (paper: 0.50M)."""
    return _em('em_capsnet_simple_cifar100', pretrained, dict(_EM_SIMPLE, num_classes=100), kwargs)


@register_model
def em_capsnet_resnet_cifar10(pretrained: bool = False, **kwargs) -> EMCapsNet:
    """EM-routing CapsNet, CIFAR ResNet backbone, 1,710,036 parameters (paper: 1.71M)."""
    return _em('em_capsnet_resnet_cifar10', pretrained, _EM_RESNET, kwargs)


@register_model
def em_capsnet_resnet_cifar100(pretrained: bool = False, **kwargs) -> EMCapsNet:
    """EM-routing CapsNet, CIFAR ResNet backbone, 1,756,296 parameters (paper: 1.76M)."""
    return _em('em_capsnet_resnet_cifar100', pretrained, dict(_EM_RESNET, num_classes=100), kwargs)


# Baseline CNN (CIFAR): conv3x3 s2 p1 3->1024 ReLU; conv3x3 s2 p1 1024->1024 ReLU+BN; avgpool 2;
# conv3x3 s2 p1 1024->1024 ReLU+BN; avgpool 2 (the global average pool of the head); linear 1024->classes.
_CNN_CIFAR_STAGES = ((1024, 3, 2, 1, False, False), (1024, 3, 2, 1, False, True), (1024, 3, 2, 1, True, True))
# DiverseMultiMNIST CNN: conv3x3 s2 p1 1->1024 ReLU (36 -> 18); conv3x3 s2 1024->1024 ReLU+BN (-> 8);
# conv3x3 s1 1024->1024 ReLU+BN (-> 6); then either a per-position linear 1024->640 + ReLU (a 1x1 conv),
# global average pooling (6x6) and linear 640->10, or a fully connected layer over all positions
# (6*6*1024 -> 640, ReLU) and linear 640->10. The loss applies the sigmoid (binary cross-entropy).
_CNN_MULTIMNIST_STAGES = ((1024, 3, 2, 1, False, False), (1024, 3, 2, 0, False, True), (1024, 3, 1, 0, False, True))


@register_model
def cnn_baseline_cifar10(pretrained: bool = False, **kwargs) -> BaselineCNN:
    """The paper's baseline CNN for CIFAR-10, 18,919,434 parameters (paper: 18.92M)."""
    args = dict(dict(stages=_CNN_CIFAR_STAGES), **kwargs)
    return _create(BaselineCNN, 'cnn_baseline_cifar10', pretrained, len(args['stages']), **args)


@register_model
def cnn_baseline_cifar100(pretrained: bool = False, **kwargs) -> BaselineCNN:
    """The paper's baseline CNN for CIFAR-100, 19,011,684 parameters (paper: 19.01M)."""
    args = dict(dict(stages=_CNN_CIFAR_STAGES, num_classes=100), **kwargs)
    return _create(BaselineCNN, 'cnn_baseline_cifar100', pretrained, len(args['stages']), **args)


@register_model
def cnn_baseline_multimnist(pretrained: bool = False, **kwargs) -> BaselineCNN:
    """The paper's DiverseMultiMNIST CNN (average pooling), 19,553,162 parameters (paper: 19.55M)."""
    stages = _CNN_MULTIMNIST_STAGES + ((640, 1, 1, 0, False, False),)
    args = dict(dict(stages=stages, in_chans=1, img_size=36), **kwargs)
    return _create(BaselineCNN, 'cnn_baseline_multimnist', pretrained, len(args['stages']), **args)


@register_model
def cnn_fc_multimnist(pretrained: bool = False, **kwargs) -> BaselineCNN:
    """The paper's DiverseMultiMNIST CNN with a fully connected layer over positions, 42,490,762 parameters
    (paper: 42.49M)."""
    args = dict(dict(stages=_CNN_MULTIMNIST_STAGES, in_chans=1, img_size=36, head='fc', head_hidden_size=640),
                **kwargs)
    return _create(BaselineCNN, 'cnn_fc_multimnist', pretrained, len(args['stages']), **args)


@register_model
def dynamic_capsnet_vector_multimnist(pretrained: bool = False, **kwargs) -> DynamicCapsNet:
    """Dynamic-routing vector CapsNet for DiverseMultiMNIST (the stack of ``capsnet_vector_multimnist``
    with dynamic routing, squash and no LayerNorm), 42,477,568 parameters (paper: 42.48M)."""
    defaults = dict(
        in_chans=1, img_size=36, backbone='simple', backbone_args=dict(out_chs=1024), primary_caps=16,
        primary_dim=64, primary_kernel_size=3, primary_stride=2, capsule_layers=_DR_MULTIMNIST_STACK,
        class_dim=64)
    return _dynamic('dynamic_capsnet_vector_multimnist', pretrained, defaults, kwargs)


def _cifar_resnet(variant: str, pretrained: bool, **kwargs) -> CifarResNet:
    args = dict(dict(block=BasicBlock, layers=(2, 2, 2, 2)), **kwargs)
    return build_model_with_cfg(CifarResNet, variant, pretrained, **args)


@register_model
def resnet18_cifar10(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-18 (timm's ResNet, 3x3 stem, no max-pool), 11,173,962 parameters (paper: 11.17M)."""
    return _cifar_resnet('resnet18_cifar10', pretrained, **kwargs)


@register_model
def resnet18_cifar100(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-18 for CIFAR-100, 11,220,132 parameters."""
    return _cifar_resnet('resnet18_cifar100', pretrained, **dict(dict(num_classes=100), **kwargs))
