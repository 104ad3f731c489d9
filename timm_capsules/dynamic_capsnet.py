"""Capsule networks with dynamic routing (Sabour et al., 2017), the paper's first comparison system

Paper: `Capsules with Inverted Dot-Product Attention Routing` - https://arxiv.org/abs/2002.04764
(Tsai, Srivastava, Goh, Salakhutdinov, ICLR 2020), Table 1 and appendix; dynamic routing:
`Dynamic Routing Between Capsules` - https://arxiv.org/abs/1710.09829

Vector capsules, squash, routing by agreement (``routing_baselines.dynamic_routing``). The model returns the
lengths of the class capsules (``output_type = 'lengths'``, in [0, 1)); train with ``losses.margin_loss``.
Routing runs layer by layer, so ``forward_features`` is the deepest capsule layer below the class capsules
(see ``base.LayerwiseCapsuleModel``).
"""

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from timm.layers import to_2tuple
from timm.models import generate_default_cfgs, register_model

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
from .layers import Capsules, ConvCapsules, FCCapsules, PrimaryCapsules, conv_output_size
from .routing import capsule_votes
from .routing_baselines import dynamic_routing, squash

__all__ = ['DynamicCapsNet', 'DynamicConvCapsules', 'DynamicFCCapsules']


# ---- capsule layers -----------------------------------------------------------------------------


class _DynamicRouting:
    """Routes a capsule layer's votes by agreement (mixed into ConvCapsules / FCCapsules, whose windowing
    and weights it reuses; vector poses, no LayerNorm)."""

    fused_kernel = None  # routes in plain tensor ops: no extension to load
    iterations: int

    def reset_parameters(self):
        # N(0, parents^2 / (children * out_dim)): with uniform first-pass routing (c = 1 / parents) and
        # uncorrelated children, |s_j| is then about the children's length, in the squash's useful range
        children, parents, _, out_dim = self.weight.shape
        with torch.no_grad():
            self.weight.normal_(0.0, parents / math.sqrt(children * out_dim))

    def forward(self, children: Capsules) -> Tuple[Capsules, Tensor]:
        child_poses, _, (B, H, W) = self._children(children)
        votes = capsule_votes(child_poses, self.weight).flatten(-2)  # (groups, children, parents, d)
        parents, coefficients = dynamic_routing(votes, self.iterations)
        return Capsules(parents.reshape(B, H, W, self.out_caps, self.out_dim)), coefficients


class DynamicConvCapsules(_DynamicRouting, ConvCapsules):
    """Convolutional vector-capsule layer with dynamic routing: each k x k window (stride s, no padding)
    is routed to the parent types at one output position; weights are shared across positions."""

    def __init__(
        self,
        in_caps: int,
        out_caps: int,
        in_dim: int,
        out_dim: int,
        kernel_size: int = 3,
        stride: int = 1,
        iterations: int = 3,
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_caps,
            out_caps,
            in_dim,
            kernel_size,
            stride,
            matrix_pose=False,
            out_dim=out_dim,
            layer_norm=False,
            device=device,
            dtype=dtype,
        )
        self.iterations = iterations


class DynamicFCCapsules(_DynamicRouting, FCCapsules):
    """Fully connected vector-capsule layer with dynamic routing: one weight matrix per (child, parent)."""

    def __init__(
        self, in_caps: int, out_caps: int, in_dim: int, out_dim: int, iterations: int = 3, device=None, dtype=None
    ):
        super().__init__(
            in_caps, out_caps, in_dim, matrix_pose=False, out_dim=out_dim, layer_norm=False, device=device, dtype=dtype
        )
        self.iterations = iterations


# ---- the model ------------------------------------------------------------------------------------

_DR_STACK = ()  # the CIFAR models route the primary capsules straight to the class capsules
_DR_MULTIMNIST_STACK = (('conv', 16, 3, 1),)


class DynamicCapsNet(LayerwiseCapsuleModel):
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
        drop_rate: dropout on the class capsules' input; drop_path_rate: stochastic depth of the 'resnet'
            backbone; drop_block_rate: 0 or None; bn_momentum, bn_eps: set on every BatchNorm (timm's meaning).
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
        self.pose_dim, self.iterations = primary_dim, iterations
        self.backbone = create_backbone(
            backbone, in_chans, self.img_size, backbone_args, drop_path_rate=drop_path_rate, **dd
        )
        grid = backbone_grid(self.backbone, self.img_size)
        # squashed in the second capsule step, so that the raw capsules are a feature level of their own
        self.primary = PrimaryCapsules(
            self.backbone.num_features,
            primary_caps,
            primary_dim,
            primary_kernel_size,
            primary_stride,
            layer_norm=False,
            **dd,
        )
        grid = tuple(conv_output_size(size, primary_kernel_size, primary_stride) for size in grid)
        # unpadded convs shrink the grid by more than their stride: reductions come from the grid sizes
        reduction = self.img_size[0] // max(1, grid[0])  # a grid of 0: refused below, with the reason
        self.feature_info = [dict(info, module=f'backbone.{info["module"]}') for info in self.backbone.feature_info]
        self.feature_info.append(dict(num_chs=primary_caps * primary_dim, reduction=reduction, module='primary.conv'))
        self.feature_info.append(dict(num_chs=primary_caps * primary_dim, reduction=reduction, module='primary'))
        layers, in_caps = [], primary_caps
        for index, spec in enumerate(capsule_layers):
            kind, out_caps, kernel_size, stride = spec
            if kind != 'conv':
                raise ValueError(f"DynamicCapsNet hidden capsule layers are 'conv' layers, got {kind!r}")
            layers.append(
                DynamicConvCapsules(in_caps, out_caps, primary_dim, primary_dim, kernel_size, stride, iterations, **dd)
            )
            grid = tuple(conv_output_size(size, kernel_size, stride) for size in grid)
            reduction = self.img_size[0] // max(1, grid[0])
            self.feature_info.append(
                dict(num_chs=out_caps * primary_dim, reduction=reduction, module=f'capsule_layers.{index}')
            )
            in_caps = out_caps
        if min(grid) < 1:
            raise ValueError(f'input size {self.img_size} is too small for this capsule stack')
        self.capsule_layers = nn.ModuleList(layers)
        head_in_caps = in_caps * grid[0] * grid[1]
        self._finish_init(
            lambda n, **dd: DynamicFCCapsules(head_in_caps, n, primary_dim, class_dim, iterations, **dd),
            global_pool,
            drop_rate,
            dd,
        )
        set_batchnorm_args(self, bn_momentum, bn_eps)

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


# ---- registration -------------------------------------------------------------------------------------


def _create_dynamic_capsnet(variant: str, pretrained: bool = False, **kwargs) -> DynamicCapsNet:
    return build_capsule_model(DynamicCapsNet, variant, pretrained, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return capsule_cfg(url, **{'pool_size': (8, 8), **kwargs})


_cifar10, _cifar100 = dataset_cfg('cifar10'), dataset_cfg('cifar100')
_resnet_stem = dict(first_conv='backbone.conv1')

default_cfgs = generate_default_cfgs(
    {
        'dynamic_capsnet_simple_cifar10.cifar10': _cfg(
            hf_hub_id='timm-capsules/dynamic_capsnet_simple_cifar10.cifar10', **_cifar10
        ),
        'dynamic_capsnet_simple_cifar100.cifar100': _cfg(
            hf_hub_id='timm-capsules/dynamic_capsnet_simple_cifar100.cifar100', **_cifar100
        ),
        'dynamic_capsnet_resnet_cifar10.cifar10': _cfg(
            hf_hub_id='timm-capsules/dynamic_capsnet_resnet_cifar10.cifar10', **_resnet_stem, **_cifar10
        ),
        'dynamic_capsnet_resnet_cifar100.cifar100': _cfg(
            hf_hub_id='timm-capsules/dynamic_capsnet_resnet_cifar100.cifar100', **_resnet_stem, **_cifar100
        ),
        'dynamic_capsnet_vector_multimnist.diverse_multimnist': _cfg(
            hf_hub_id='timm-capsules/dynamic_capsnet_vector_multimnist.diverse_multimnist',
            **dataset_cfg('diverse_multimnist', pool_size=(6, 6)),
        ),
    }
)

# DR CapsNet, simple backbone (paper's Table): conv9x9 3->256 + ReLU (32 -> 24); primary capsules
# conv9x9 s2 256 -> 32 x 8-d, squash (24 -> 8); 2048 capsules -> dynamic routing -> classes x 16-d.
_DR_SIMPLE = dict(
    backbone='simple',
    backbone_args=dict(out_chs=256, kernel_size=9, stride=1, padding=0),
    primary_caps=32,
    primary_dim=8,
    primary_kernel_size=9,
    primary_stride=2,
    class_dim=16,
)
# DR CapsNet, ResNet backbone: the paper's CIFAR ResNet (3 BasicBlocks of 64, then 4 of 256 with the first
# at stride 2 -> 16x16x256), primary capsules conv9x9 s1 256 -> 32 x 8-d (16 -> 8), then as above.
_DR_RESNET = dict(
    backbone='resnet',
    backbone_args=dict(widths=(64, 256)),
    primary_caps=32,
    primary_dim=8,
    primary_kernel_size=9,
    primary_stride=1,
    class_dim=16,
)


@register_model
def dynamic_capsnet_simple_cifar10(pretrained: bool = False, **kwargs) -> DynamicCapsNet:
    """Dynamic-routing CapsNet, simple backbone, 7,992,320 parameters (paper: 7.99M)."""
    return _create_dynamic_capsnet('dynamic_capsnet_simple_cifar10', pretrained, **dict(_DR_SIMPLE, **kwargs))


@register_model
def dynamic_capsnet_simple_cifar100(pretrained: bool = False, **kwargs) -> DynamicCapsNet:
    """Dynamic-routing CapsNet, simple backbone, 31,585,280 parameters (paper: 31.59M)."""
    model_args = dict(_DR_SIMPLE, num_classes=100)
    return _create_dynamic_capsnet('dynamic_capsnet_simple_cifar100', pretrained, **dict(model_args, **kwargs))


@register_model
def dynamic_capsnet_resnet_cifar10(pretrained: bool = False, **kwargs) -> DynamicCapsNet:
    """Dynamic-routing CapsNet, CIFAR ResNet backbone, 12,450,880 parameters (paper: 12.45M)."""
    return _create_dynamic_capsnet('dynamic_capsnet_resnet_cifar10', pretrained, **dict(_DR_RESNET, **kwargs))


@register_model
def dynamic_capsnet_resnet_cifar100(pretrained: bool = False, **kwargs) -> DynamicCapsNet:
    """Dynamic-routing CapsNet, CIFAR ResNet backbone, 36,043,840 parameters (paper: 36.04M)."""
    model_args = dict(_DR_RESNET, num_classes=100)
    return _create_dynamic_capsnet('dynamic_capsnet_resnet_cifar100', pretrained, **dict(model_args, **kwargs))


@register_model
def dynamic_capsnet_vector_multimnist(pretrained: bool = False, **kwargs) -> DynamicCapsNet:
    """Dynamic-routing vector CapsNet for DiverseMultiMNIST (the stack of ``capsnet_vector_multimnist``
    with dynamic routing, squash and no LayerNorm), 42,477,568 parameters (paper: 42.48M)."""
    defaults = dict(
        in_chans=1,
        img_size=36,
        backbone='simple',
        backbone_args=dict(out_chs=1024),
        primary_caps=16,
        primary_dim=64,
        primary_kernel_size=3,
        primary_stride=2,
        capsule_layers=_DR_MULTIMNIST_STACK,
        class_dim=64,
    )
    return _create_dynamic_capsnet('dynamic_capsnet_vector_multimnist', pretrained, **dict(defaults, **kwargs))
