"""Capsule networks with EM routing (Hinton et al., 2018), the paper's second comparison system

Paper: `Capsules with Inverted Dot-Product Attention Routing` - https://arxiv.org/abs/2002.04764
(Tsai, Srivastava, Goh, Salakhutdinov, ICLR 2020), Table 1 and appendix; EM routing:
`Matrix capsules with EM routing` - https://openreview.net/forum?id=HJWLfGWRb

4x4 matrix poses with activations, EM routing (``routing_baselines.em_routing_from_poses``), coordinate
addition in the class capsules. The model returns the class capsules' activations (``output_type = 'activations'``, in
(0, 1)); train with ``losses.spread_loss``. Routing runs layer by layer (see ``base.LayerwiseCapsuleModel``).
"""

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from timm.layers import to_2tuple
from timm.models import generate_default_cfgs, register_model

from .backbones import SimpleBackbone
from .base import (
    LayerwiseCapsuleModel,
    backbone_grid,
    build_capsule_model,
    capsule_cfg,
    check_timm_args,
    create_backbone,
    set_batchnorm_args,
)
from .data.registry import dataset_cfg
from .layers import Capsules, ConvCapsules, PrimaryCapsules, conv_output_size
from .routing_baselines import em_routing_from_poses, inverse_temperature_schedule

__all__ = ['EMCapsNet', 'EMConvCapsules', 'EMClassCapsules']


# ---- capsule layers and stem --------------------------------------------------------------------


def _em_parameters(module: nn.Module, out_caps: int, device=None, dtype=None):
    # beta_u, beta_a: learned per parent capsule type (Hinton et al. learn them discriminatively)
    module.beta_u = nn.Parameter(torch.zeros(out_caps, device=device, dtype=dtype))
    module.beta_a = nn.Parameter(torch.zeros(out_caps, device=device, dtype=dtype))


class EMConvCapsules(ConvCapsules):
    """Convolutional matrix-capsule layer with EM routing: a 4x4 weight per (kernel offset, child type,
    parent type), shared across positions; each window is routed to the parent types at its position."""

    fused_kernel = 'em_routing'  # the extension it routes in (see kernels.preload)

    def __init__(
        self,
        in_caps: int,
        out_caps: int,
        pose_dim: int = 16,
        kernel_size: int = 3,
        stride: int = 1,
        inverse_temperatures: Sequence[float] = (1 / 3, 2 / 3, 1.0),
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_caps,
            out_caps,
            pose_dim,
            kernel_size,
            stride,
            matrix_pose=True,
            layer_norm=False,
            device=device,
            dtype=dtype,
        )
        self.inverse_temperatures = [float(t) for t in inverse_temperatures]
        _em_parameters(self, out_caps, device, dtype)

    def forward(self, children: Capsules) -> Capsules:
        grid, grid_activations, window, (B, H, W) = self._child_grid(children)  # the kernel reads the windows
        poses, activations, _ = em_routing_from_poses(
            grid,
            self.weight,
            grid_activations,
            self.beta_u,
            self.beta_a,
            self.inverse_temperatures,
            True,
            1e-6,
            None,
            window,
            False,
        )  # every argument spelled out: TorchScript of an fx graph drops defaults
        poses = poses.reshape(B, H, W, self.out_caps, self.out_dim)
        return Capsules(poses, activations.reshape(B, H, W, self.out_caps))


class EMClassCapsules(nn.Module):
    """Class capsules of an EM CapsNet: every child capsule of the grid votes for every class with one 4x4
    weight per (child type, class), shared across positions; with coordinate addition, the scaled (row,
    column) of the child's position (cell centre, in [0, 1]) is added to the first two entries of the
    right-hand column of its vote. Returns the class activations (B, classes)."""

    fused_kernel = 'em_routing'

    def __init__(
        self,
        in_caps: int,
        num_classes: int,
        grid: Tuple[int, int],
        pose_dim: int = 16,
        coordinate_addition: bool = True,
        inverse_temperatures: Sequence[float] = (1 / 3, 2 / 3, 1.0),
        device=None,
        dtype=None,
    ):
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
            self.weight.normal_(0.0, self.side**-0.5)

    def forward(self, children: Capsules) -> Tensor:
        poses, activations = children
        B, H, W, N, _ = poses.shape
        side, J = self.side, self.out_caps
        # children in (h, w, type) order, each with its type's weight (EM routing does not depend on the
        # order of the children); coordinate addition is a constant added to every vote of a child
        weight = self.weight.expand(H * W, N, J, side, side).reshape(H * W * N, J, side, side)
        offset = None
        if self.coordinate_addition:
            # sizes from construction (ints), not from the input: torch.fx traces the buffer as a tensor
            offset = self.coordinates[:, :, None].expand(-1, -1, self.in_caps, -1).reshape(-1, side, side)
        routed = em_routing_from_poses(
            poses.reshape(B, H * W * N, side, side),
            weight,
            activations.reshape(B, H * W * N),
            self.beta_u,
            self.beta_a,
            self.inverse_temperatures,
            True,
            1e-6,
            offset,
            None,
            False,
        )  # all spelled out
        return routed[1]  # the class activations (routed[0] holds the class poses)


class SimpleBnBackbone(SimpleBackbone):
    """One conv, BatchNorm and ReLU (the EM CapsNet's stem)."""

    def __init__(
        self,
        in_chans: int,
        out_chs: int,
        kernel_size: int = 4,
        stride: int = 2,
        padding: int = 1,
        device=None,
        dtype=None,
    ):
        super().__init__(in_chans, out_chs, kernel_size, stride, padding, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_chs, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> List[Tensor]:
        return [self.act(self.bn(self.conv(x)))]


# ---- the model ------------------------------------------------------------------------------------


class EMCapsNet(LayerwiseCapsuleModel):
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
        drop_rate: dropout on the class capsules' input; drop_path_rate: stochastic depth of the 'resnet'
            backbone; drop_block_rate: 0 or None; bn_momentum, bn_eps: set on every BatchNorm (timm's meaning).
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
        drop_rate: float = 0.0,
        drop_path_rate: Optional[float] = None,
        drop_block_rate: Optional[float] = None,
        bn_momentum: Optional[float] = None,
        bn_eps: Optional[float] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        drop_path_rate = check_timm_args(type(self).__name__, drop_path_rate, drop_block_rate, backbone == 'resnet')
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, to_2tuple(img_size)
        self.pose_dim, self.iterations = pose_dim, iterations
        temperatures = inverse_temperature_schedule(iterations, final_inverse_temperature)
        self.backbone = create_backbone(
            backbone, in_chans, self.img_size, backbone_args, SimpleBnBackbone, drop_path_rate=drop_path_rate, **dd
        )
        grid = backbone_grid(self.backbone, self.img_size)
        self.primary = PrimaryCapsules(
            self.backbone.num_features, primary_caps, pose_dim, layer_norm=False, activations=True, **dd
        )
        reduction = self.backbone.feature_info[-1]['reduction']
        self.feature_info = [dict(info, module=f'backbone.{info["module"]}') for info in self.backbone.feature_info]
        self.feature_info.append(dict(num_chs=primary_caps * (pose_dim + 1), reduction=reduction, module='primary'))
        layers, in_caps = [], primary_caps
        for index, spec in enumerate(capsule_layers):
            kind, out_caps, kernel_size, stride = spec
            if kind != 'conv':
                raise ValueError(f"EMCapsNet hidden capsule layers are 'conv' layers, got {kind!r}")
            layers.append(EMConvCapsules(in_caps, out_caps, pose_dim, kernel_size, stride, temperatures, **dd))
            grid = tuple(conv_output_size(size, kernel_size, stride) for size in grid)
            reduction = self.img_size[0] // max(1, grid[0])
            self.feature_info.append(
                dict(num_chs=out_caps * (pose_dim + 1), reduction=reduction, module=f'capsule_layers.{index}')
            )
            in_caps = out_caps
        if min(grid) < 1:
            raise ValueError(f'input size {self.img_size} is too small for this capsule stack')
        self.capsule_layers = nn.ModuleList(layers)
        head_grid = grid
        self._finish_init(
            lambda n, **dd: EMClassCapsules(in_caps, n, head_grid, pose_dim, coordinate_addition, temperatures, **dd),
            global_pool,
            drop_rate,
            dd,
        )
        set_batchnorm_args(self, bn_momentum, bn_eps)

    def _capsule_steps(self) -> List[Callable]:
        return [self.primary, *self.capsule_layers]

    def _classify(self, capsules: Capsules) -> Tensor:
        return self.head(capsules)


# ---- registration -------------------------------------------------------------------------------------


def _create_em_capsnet(variant: str, pretrained: bool = False, **kwargs) -> EMCapsNet:
    return build_capsule_model(EMCapsNet, variant, pretrained, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return capsule_cfg(url, **{'pool_size': (5, 5), **kwargs})


_cifar10, _cifar100 = dataset_cfg('cifar10'), dataset_cfg('cifar100')
_resnet_stem = dict(first_conv='backbone.conv1')

default_cfgs = generate_default_cfgs(
    {
        'em_capsnet_simple_cifar10.cifar10': _cfg(
            hf_hub_id='timm-capsules/em_capsnet_simple_cifar10.cifar10', **_cifar10
        ),
        'em_capsnet_simple_cifar100.cifar100': _cfg(
            hf_hub_id='timm-capsules/em_capsnet_simple_cifar100.cifar100', **_cifar100
        ),
        'em_capsnet_resnet_cifar10.cifar10': _cfg(
            hf_hub_id='timm-capsules/em_capsnet_resnet_cifar10.cifar10', **_resnet_stem, **_cifar10
        ),
        'em_capsnet_resnet_cifar100.cifar100': _cfg(
            hf_hub_id='timm-capsules/em_capsnet_resnet_cifar100.cifar100', **_resnet_stem, **_cifar100
        ),
    }
)

# EM CapsNet: conv4x4 s2 p1 3->256 + BN + ReLU (32 -> 16) or the CIFAR ResNet (16x16x128); primary
# capsules 1x1 -> 32 x (4x4 pose + activation); conv EM caps 32 k3 s2 (16 -> 7); conv EM caps 32 k3 s1
# (7 -> 5); class capsules with coordinate addition.
_EM_SIMPLE = dict(backbone='simple', backbone_args=dict(out_chs=256))
_EM_RESNET = dict(backbone='resnet')


@register_model
def em_capsnet_simple_cifar10(pretrained: bool = False, **kwargs) -> EMCapsNet:
    """EM-routing CapsNet, simple backbone, 452,500 parameters (paper: 0.45M)."""
    return _create_em_capsnet('em_capsnet_simple_cifar10', pretrained, **dict(_EM_SIMPLE, **kwargs))


@register_model
def em_capsnet_simple_cifar100(pretrained: bool = False, **kwargs) -> EMCapsNet:
    """EM-routing CapsNet, simple backbone, 498,760 parameters (paper: 0.50M)."""
    model_args = dict(_EM_SIMPLE, num_classes=100)
    return _create_em_capsnet('em_capsnet_simple_cifar100', pretrained, **dict(model_args, **kwargs))


@register_model
def em_capsnet_resnet_cifar10(pretrained: bool = False, **kwargs) -> EMCapsNet:
    """EM-routing CapsNet, CIFAR ResNet backbone, 1,710,036 parameters (paper: 1.71M)."""
    return _create_em_capsnet('em_capsnet_resnet_cifar10', pretrained, **dict(_EM_RESNET, **kwargs))


@register_model
def em_capsnet_resnet_cifar100(pretrained: bool = False, **kwargs) -> EMCapsNet:
    """EM-routing CapsNet, CIFAR ResNet backbone, 1,756,296 parameters (paper: 1.76M)."""
    model_args = dict(_EM_RESNET, num_classes=100)
    return _create_em_capsnet('em_capsnet_resnet_cifar100', pretrained, **dict(model_args, **kwargs))
