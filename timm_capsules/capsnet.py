"""Capsule networks with inverted dot-product attention routing

Paper: `Capsules with Inverted Dot-Product Attention Routing` - https://arxiv.org/abs/2002.04764
(Tsai, Srivastava, Goh, Salakhutdinov, ICLR 2020)

A CapsNet is: backbone -> primary capsules -> hidden capsule layers -> class capsules -> one
``Linear(d, 1)`` shared by every class capsule, giving one logit per class.

Routing runs concurrently over the capsule stack by default (the paper's Procedure 2): iteration 1
is a feed-forward pass with uniform routing, and each later iteration updates every layer at once from
the previous iteration's child and parent poses. The class capsules at iteration k therefore read the
hidden capsules of iteration k-1, so ``forward_features`` returns exactly what the class capsules
read: the last hidden layer's poses at iterations 1..max(1, t-1), stacked on the channel axis (one
snapshot for the paper's default of t=2). Updates that cannot reach the output (e.g. the hidden layers'
own last update) are skipped; ``forward_routing`` runs the complete schedule and returns every routing
coefficient and pose for inspection, with the same logits.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from timm.layers import to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .backbones import CifarResNetBackbone
from .base import (
    CapsuleModel,
    backbone_grid,
    build_capsule_model,
    capsule_cfg,
    check_input,
    check_timm_args,
    create_backbone,
    set_batchnorm_args,
)
from .data.registry import dataset_cfg
from .loading import MAX_ITERATIONS  # a hostile config.json must not ask for more, so loading checks it too
from .layers import (
    Capsules,
    ConvCapsules,
    FCCapsules,
    PrimaryCapsules,
    RoutedCapsules,
    capsules_to_nchw,
    conv_output_size,
)
from . import kernels
from .kernels import use_fused_routing
from .routing import DEFAULT_MAX_VOTES
from .schedule import (
    RoutingGeometry,
    RoutingTrace,
    children_fixed,
    last_useful_iteration,
    layer_iterations,
    routing_rounds,
)

__all__ = ['CapsNet', 'RoutingTrace', 'RoutingGeometry', 'last_useful_iteration', 'MAX_ITERATIONS']

# the input check stays one call in torch.fx graphs traced from methods defined in this file (timm's
# register_notrace_function only reaches the module of the traced root, CapsuleModel.forward in base.py)
torch.fx.wrap('check_input')

# (kind, num_caps, kernel_size, stride) for conv layers, (kind, num_caps) for fully connected ones
LayerSpec = Union[Tuple[str, int, int, int], Tuple[str, int]]


class ClassCapsules(nn.Module):
    """Class capsules (a fully connected capsule layer) and the classifier shared by all of them."""

    def __init__(
        self, in_caps: int, num_classes: int, pose_dim: int, layer_kwargs: Dict[str, Any], device=None, dtype=None
    ):
        super().__init__()
        # class capsules weigh their children's votes by the children's activations (if any) but carry
        # none of their own: the logits come from the poses, so parent activations would never be used
        layer_kwargs = dict(layer_kwargs, activations=False)
        self.capsules = FCCapsules(in_caps, num_classes, pose_dim, device=device, dtype=dtype, **layer_kwargs)
        self.fc = nn.Linear(pose_dim, 1, device=device, dtype=dtype)

    def forward(self, capsules: Capsules) -> Tensor:
        return self.fc(capsules.poses).flatten(1)  # (B, 1, 1, classes, d) -> (B, classes)


class CapsNet(CapsuleModel):
    """Capsule network with inverted dot-product attention routing. Returns logits.

    Args:
        num_classes: number of class capsules (0 for a pooled feature extractor).
        in_chans: image channels.
        img_size: input size the capsule stack is built for (fully connected capsules fix it).
        backbone: 'simple' (the paper's one conv), 'resnet' (the paper's CIFAR ResNet) or the name of any
            timm model, used through timm's ``features_only`` machinery.
        backbone_args: extra arguments of the backbone (for a timm model: its ``create_model`` kwargs).
        backbone_pretrained: load a timm backbone's pretrained weights.
        backbone_out_index: feature level of a timm backbone (default: deepest level the capsules fit).
        primary_caps, pose_dim: number of primary capsule types and pose dimension d of every capsule.
        primary_kernel_size, primary_stride, primary_padding: the primary capsule conv.
        capsule_layers: hidden capsule layers: ('conv', types, kernel, stride) or ('fc', capsules).
        matrix_pose: sqrt(d) x sqrt(d) matrix poses (True) or d-dimensional vector poses.
        iterations: routing iterations t (1 means a feed-forward pass with uniform routing), at most 64.
        routing: 'concurrent' (the paper's default) or 'sequential' (ablation B).
        layer_norm: LayerNorm on capsule poses (False is ablation A).
        activations: EM-style capsule activations that weight each child's votes (ablation C).
        global_pool: pooling of the features when ``num_classes == 0`` ('avg', 'max', 'fast', ... or '' for none).
        drop_rate: dropout on the class capsules' input (the last hidden capsules' poses), timm's ``drop_rate``.
        drop_path_rate: stochastic depth of a residual backbone ('resnet' or a timm model).
        drop_block_rate: must be 0 or None (no DropBlock here); accepted because timm's scripts pass it.
        bn_momentum, bn_eps: set on every BatchNorm of the model (timm's meaning).
        max_votes: with plain tensor-op routing (on a GPU, or with ``set_fused_routing(False)``), a pass whose
            vote tensor would hold more elements runs in chunks of at most this many, each recomputed in the
            backward pass (bounded memory for large inputs); None never chunks. The fused CPU kernel never
            stores votes, so it needs no chunks.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: Union[int, Tuple[int, int]] = 32,
        backbone: str = 'simple',
        backbone_args: Optional[Dict[str, Any]] = None,
        backbone_pretrained: bool = False,
        backbone_out_index: Optional[int] = None,
        primary_caps: int = 32,
        pose_dim: int = 16,
        primary_kernel_size: int = 1,
        primary_stride: int = 1,
        primary_padding: int = 0,
        capsule_layers: Sequence[LayerSpec] = (('conv', 32, 3, 2), ('conv', 32, 3, 1)),
        matrix_pose: bool = True,
        iterations: int = 2,
        routing: str = 'concurrent',
        layer_norm: bool = True,
        activations: bool = False,
        global_pool: str = 'avg',
        max_votes: Optional[int] = DEFAULT_MAX_VOTES,
        drop_rate: float = 0.0,
        drop_path_rate: Optional[float] = None,
        drop_block_rate: Optional[float] = None,
        bn_momentum: Optional[float] = None,
        bn_eps: Optional[float] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise ValueError(f'iterations must be between 1 and {MAX_ITERATIONS}, got {iterations}')
        if routing not in ('concurrent', 'sequential'):
            raise ValueError(f"routing must be 'concurrent' or 'sequential', got {routing!r}")
        dd = dict(device=device, dtype=dtype)
        drop_path_rate = check_timm_args(type(self).__name__, drop_path_rate, drop_block_rate, backbone != 'simple')
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, to_2tuple(img_size)
        self.iterations, self.routing = iterations, routing
        self.pose_dim, self.has_activations = pose_dim, activations
        layer_kwargs = dict(
            matrix_pose=matrix_pose,
            layer_norm=layer_norm,
            activations=activations,
            max_votes=max_votes,
            fused_routing=use_fused_routing(),
        )

        # the capsule stack decides how large a feature map it needs; build it on sizes, not tensors
        self.primary_args = dict(kernel_size=primary_kernel_size, stride=primary_stride, padding=primary_padding)
        self.layer_specs = [tuple(spec) for spec in capsule_layers]
        self.backbone = create_backbone(
            backbone,
            in_chans,
            self.img_size,
            backbone_args,
            timm_models=True,
            drop_path_rate=drop_path_rate,
            pretrained=backbone_pretrained,
            out_index=backbone_out_index,
            fits=lambda h, w: self._stack_grids(h, w) is not None,
            **dd,
        )
        feature_reduction = self.backbone.feature_info[-1]['reduction']
        feature_grid = backbone_grid(self.backbone, self.img_size)
        grids = self._stack_grids(*feature_grid)
        if grids is None:
            raise ValueError(
                f'input size {self.img_size} gives a {feature_grid[0]}x{feature_grid[1]} feature map, too small '
                f'for the capsule stack {self.layer_specs}'
            )

        self.primary = PrimaryCapsules(
            self.backbone.num_features,
            primary_caps,
            pose_dim,
            **self.primary_args,
            layer_norm=layer_norm,
            activations=activations,
            **dd,
        )
        self.feature_info = [dict(info, module=f'backbone.{info["module"]}') for info in self.backbone.feature_info]
        reduction = feature_reduction * primary_stride
        self.feature_info.append(dict(num_chs=primary_caps * pose_dim, reduction=reduction, module='primary'))
        layers = []
        in_caps, grid = primary_caps, grids[0]
        for index, spec in enumerate(self.layer_specs):
            if spec[0] == 'conv':
                _, out_caps, kernel_size, stride = spec
                layers.append(ConvCapsules(in_caps, out_caps, pose_dim, kernel_size, stride, **layer_kwargs, **dd))
                reduction *= stride
                self.feature_info.append(
                    dict(num_chs=out_caps * pose_dim, reduction=reduction, module=f'capsule_layers.{index}')
                )
            elif spec[0] == 'fc':
                out_caps = spec[1]
                layers.append(FCCapsules(in_caps * grid[0] * grid[1], out_caps, pose_dim, **layer_kwargs, **dd))
            else:
                raise ValueError(f"unknown capsule layer kind {spec[0]!r} (use 'conv' or 'fc')")
            in_caps, grid = out_caps, grids[index + 1]
        self.capsule_layers = nn.ModuleList(layers)
        self.depth = len(layers) + 1  # the class capsules sit at this depth, whether or not a head is attached
        self.head_in_caps = in_caps * grid[0] * grid[1]
        self.head_layer_kwargs = layer_kwargs
        self.snapshots = max(1, iterations - 1) if routing == 'concurrent' else 1
        self.head_hidden_size = in_caps * (pose_dim + (1 if activations else 0))
        self.num_features = self.snapshots * self.head_hidden_size
        self._set_global_pool(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = ClassCapsules(self.head_in_caps, num_classes, pose_dim, layer_kwargs, **dd) if num_classes else None
        self.pruned = False
        set_batchnorm_args(self, bn_momentum, bn_eps)

    @property
    def fused_routing(self) -> bool:
        return self.head_layer_kwargs['fused_routing']

    @property
    def max_votes(self) -> Optional[int]:
        return self.head_layer_kwargs['max_votes']

    def set_fused_routing(self, enable: bool = True):
        """Route on the CPU with the fused kernel (the default; see ``routing.fused_attention_routing``)
        or with plain tensor ops, the reference it is tested against (``kernels.set_fused_routing``)."""
        self.head_layer_kwargs['fused_routing'] = enable  # class capsules made later by reset_classifier get it too
        kernels.set_fused_routing(self, enable)

    def set_max_votes(self, max_votes: Optional[int]):
        """Vote-tensor size above which plain tensor-op routing runs in memory-bounded chunks (None: never)."""
        self.head_layer_kwargs['max_votes'] = max_votes
        for module in self.modules():
            if isinstance(module, RoutedCapsules):
                module.max_votes = max_votes

    # ---- construction helpers -------------------------------------------------------------------

    def _stack_grids(self, height: int, width: int) -> Optional[List[Tuple[int, int]]]:
        """Grid sizes of the primary and hidden capsule layers for a feature map, or None if too small."""
        grids = [tuple(conv_output_size(size, **self.primary_args) for size in (height, width))]
        for spec in self.layer_specs:
            grids.append(
                tuple(conv_output_size(size, *spec[2:]) for size in grids[-1]) if spec[0] == 'conv' else (1, 1)
            )
        return grids if min(min(grid) for grid in grids) >= 1 else None

    # ---- timm model contract (the rest is CapsuleModel's) --------------------------------------

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """New class capsules for ``num_classes`` classes (0 removes them: the model then returns
        pooled features of the last hidden capsules)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self._set_global_pool(global_pool)
        if num_classes:
            reference = next(self.parameters())
            self.head = ClassCapsules(
                self.head_in_caps,
                num_classes,
                self.pose_dim,
                self.head_layer_kwargs,
                device=reference.device,
                dtype=reference.dtype,
            ).train(self.training)
        else:
            self.head = None

    # ---- routing ------------------------------------------------------------------------------

    def _route(
        self, layer: nn.Module, children: Capsules, parents: Optional[Capsules] = None, votes: Optional[Tensor] = None
    ) -> Tuple[Capsules, Optional[Tensor]]:
        if parents is not None and self.grad_checkpointing:  # votes recomputed in the backward pass, never stored
            return self._checkpointed(layer, children, parents)
        return layer(children, parents, votes)

    def _route_hidden(self, primary: Capsules, num_layers: int) -> Tuple[List[Capsules], List[Capsules]]:
        """Routes the first ``num_layers`` hidden layers as ``schedule.routing_rounds`` orders them. Returns every
        layer's latest capsules (primary first) and the snapshots of the last one that the class capsules read:
        after each round (concurrent), or its final poses (sequential)."""
        layers = self.capsule_layers[:num_layers]
        num_layers = len(layers)  # a pruned model holds fewer than its feature levels ask for
        capsules: List[Optional[Capsules]] = [primary] + [None] * num_layers
        snapshots: List[Capsules] = []
        fixed_votes: Dict[int, Optional[Tensor]] = {}  # per layer whose children never change: voted once
        for iteration, depths in routing_rounds(num_layers, self.depth, self.iterations, self.routing):
            previous = list(capsules)
            for depth in depths:
                layer = layers[depth - 1]
                if iteration == 1:  # the uniform pass, feed-forward
                    capsules[depth] = layer(capsules[depth - 1])[0]
                    continue
                children = previous[depth - 1]
                votes = None
                if children_fixed(depth, self.routing) and not self.grad_checkpointing:
                    if depth not in fixed_votes:
                        fixed_votes[depth] = layer.fixed_votes(children)
                    votes = fixed_votes[depth]
                capsules[depth] = self._route(layer, children, previous[depth], votes)[0]
            if self.routing == 'concurrent':
                snapshots.append(capsules[-1])
        return capsules, snapshots or [capsules[-1]]

    def _classify(self, snapshots: List[Capsules]) -> Tensor:
        """Routes the class capsules from the hidden snapshots (see the module docstring): at iteration k they
        read the snapshot of iteration k - 1 (the last one once the hidden layers stop)."""
        layer = self.head.capsules
        parents, _ = layer(snapshots[0])
        votes: Optional[Tensor] = None
        for iteration in layer_iterations(self.depth, self.depth, self.iterations, self.routing)[1:]:
            index = min(iteration - 2, len(snapshots) - 1)
            if len(snapshots) == 1 and votes is None and not self.grad_checkpointing:
                votes = layer.fixed_votes(snapshots[0])  # children fixed across iterations: vote once
            parents, _ = self._route(layer, snapshots[index], parents, votes)
        return self.head(parents)

    # ---- capsules <-> feature maps -------------------------------------------------------------

    def _from_nchw(self, x: Tensor) -> List[Capsules]:
        B, _, H, W = x.shape
        n, d = self.head_hidden_size // (self.pose_dim + self.has_activations), self.pose_dim
        # split, not slices: the backward pass of a slice fills a zero gradient as large as x. (Indexed, not
        # iterated or unpacked: fx traces a split as one value of unknown length.)
        chunks = x.permute(0, 2, 3, 1).split(self.head_hidden_size, dim=-1)
        snapshots = []
        for index in range(self.snapshots):
            poses, activations = chunks[index], None
            if self.has_activations:
                parts = poses.split([n * d, n], dim=-1)
                poses, activations = parts[0], parts[1]
            snapshots.append(Capsules(poses.reshape(B, H, W, n, d), activations))
        return snapshots

    # ---- forward ------------------------------------------------------------------------------

    def _layers_for_level(self, level: int) -> int:
        """How many hidden capsule layers must run to produce feature level ``level``."""
        conv_index = level - len(self.backbone.feature_info) - 1
        conv_layers = [i for i, spec in enumerate(self.layer_specs) if spec[0] == 'conv']
        return conv_layers[conv_index] + 1 if conv_index >= 0 else 0

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = 'NCHW',
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Feature maps of the backbone levels, the primary capsules and each convolutional capsule
        layer (its poses as the class capsules' routing last read them), as NCHW maps with channel
        n * d + e holding entry e of capsule type n."""
        if output_fmt != 'NCHW':
            raise ValueError(f'capsule feature maps are NCHW, got output_fmt={output_fmt!r}')
        check_input(x, self.in_chans, self.img_size)
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        backbone_maps = self.backbone(x)
        intermediates = [m for level, m in enumerate(backbone_maps) if level in take_indices]
        features = backbone_maps[-1]
        num_backbone = len(backbone_maps)
        if self.primary is None or (stop_early and max_index < num_backbone):
            return intermediates if intermediates_only else (features, intermediates)

        early = stop_early or self.pruned
        num_layers = self._layers_for_level(max_index) if early else len(self.capsule_layers)
        capsules, snapshots = self._route_hidden(self.primary(features), num_layers)
        levels = [c for c, spec in zip(capsules, [('primary',)] + self.layer_specs) if spec[0] != 'fc']
        intermediates += [capsules_to_nchw(c) for level, c in enumerate(levels, num_backbone) if level in take_indices]
        if intermediates_only:
            return intermediates
        if early:
            return capsules_to_nchw(capsules[-1]), intermediates
        return torch.cat([capsules_to_nchw(s) for s in snapshots], dim=1), intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drops the layers after the deepest requested feature level (and, by default, the head)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        num_backbone = len(self.backbone.feature_info)
        if max_index < len(self.feature_info) - 1:
            self.pruned = True
            self.capsule_layers = self.capsule_layers[: self._layers_for_level(max_index)]
            if max_index < num_backbone:
                self.primary = None
                if isinstance(self.backbone, CifarResNetBackbone):
                    self.backbone.stages = self.backbone.stages[: max_index + 1]
                    self.backbone.feature_info = self.backbone.feature_info[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        if self.pruned or self.primary is None:
            return self.forward_intermediates(x, stop_early=True)[0]
        check_input(x, self.in_chans, self.img_size)
        features = self.backbone(x)[-1]
        _, snapshots = self._route_hidden(self.primary(features), len(self.capsule_layers))
        return torch.cat([capsules_to_nchw(s) for s in snapshots], dim=1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if pre_logits or self.head is None:
            return self.head_drop(self.global_pool(x[:, -self.head_hidden_size :]))
        return self._classify(self._from_nchw(self.head_drop(x)))

    @torch.jit.ignore
    def forward_routing(self, x: Tensor) -> RoutingTrace:
        """Runs the complete routing schedule and returns every layer's routing coefficients and poses
        at every iteration (see ``RoutingTrace``). Its logits equal ``forward(x)``."""
        if self.head is None:
            raise ValueError('forward_routing needs class capsules (num_classes > 0)')
        check_input(x, self.in_chans, self.img_size)
        layers = list(self.capsule_layers) + [self.head.capsules]
        primary = self.primary(self.backbone(x)[-1])
        # history[k][l]: layer l after iteration k + 1; routing[k][l - 1]: its coefficients
        history: List[List[Any]] = [[primary] + [None] * len(layers) for _ in range(self.iterations)]
        routing: List[List[Any]] = [[None] * len(layers) for _ in range(self.iterations)]
        for iteration, depths in routing_rounds(len(layers), len(layers), self.iterations, self.routing, True):
            k = iteration - 1
            for depth in depths:
                layer = layers[depth - 1]
                # concurrent: the layer below as this (uniform pass) or the previous iteration left it; sequential:
                # as it finished
                below = history[max(k - 1, 0) if self.routing == 'concurrent' else -1][depth - 1]
                if k == 0:  # the uniform pass, feed-forward
                    parents = layer(below)[0]
                    coefficients = self._uniform_coefficients(layer, parents)
                else:
                    parents, coefficients = layer(below, history[k - 1][depth], return_coefficients=True)
                    coefficients = self._unflatten_coefficients(coefficients, parents)
                history[k][depth], routing[k][depth - 1] = parents, coefficients
        names = ['primary'] + [f'capsule_layers.{i}' for i in range(len(self.capsule_layers))] + ['head.capsules']
        grids = [tuple(c.poses.shape[1:4]) for c in history[0]]
        return RoutingTrace(
            logits=self.head(history[-1][-1]),
            layer_names=names,
            poses=[[c.poses for c in step] for step in history],
            coefficients=routing,
            activations=[[c.activations for c in step] for step in history],
            geometry=[
                RoutingGeometry(
                    layer.kind,
                    getattr(layer, 'kernel_size', None),
                    getattr(layer, 'stride', None),
                    grids[depth - 1],
                    grids[depth],
                )
                for depth, layer in enumerate(layers, 1)
            ],
            used_iterations=[
                last_useful_iteration(depth, len(layers), self.iterations, self.routing) - 1
                for depth in range(1, len(layers) + 1)
            ],
        )

    @staticmethod
    def _unflatten_coefficients(weights: Tensor, parents: Capsules) -> Tensor:
        B, H, W = parents.poses.shape[:3]
        return weights.reshape(B, H, W, *weights.shape[1:])

    @staticmethod
    def _uniform_coefficients(layer, parents: Capsules) -> Tensor:
        B, H, W, J = parents.poses.shape[:4]
        children = layer.weight.shape[0]
        return parents.poses.new_full((B, H, W, children, J), 1.0 / J)


def _create_capsnet(variant: str, pretrained: bool = False, **kwargs) -> CapsNet:
    return build_capsule_model(CapsNet, variant, pretrained, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return capsule_cfg(url, **{'pool_size': (5, 5), 'classifier': ('head.capsules', 'head.fc'), **kwargs})


_cifar10 = dataset_cfg('cifar10')
_cifar100 = dataset_cfg('cifar100', pool_size=(1, 1))
_multimnist = dataset_cfg('diverse_multimnist', pool_size=(6, 6))

default_cfgs = generate_default_cfgs(
    {
        'capsnet_simple_cifar10.cifar10': _cfg(hf_hub_id='timm-capsules/capsnet_simple_cifar10.cifar10', **_cifar10),
        'capsnet_simple_cifar100.cifar100': _cfg(
            hf_hub_id='timm-capsules/capsnet_simple_cifar100.cifar100', **_cifar100
        ),
        'capsnet_resnet_cifar10.cifar10': _cfg(
            hf_hub_id='timm-capsules/capsnet_resnet_cifar10.cifar10', first_conv='backbone.conv1', **_cifar10
        ),
        'capsnet_resnet_cifar100.cifar100': _cfg(
            hf_hub_id='timm-capsules/capsnet_resnet_cifar100.cifar100', first_conv='backbone.conv1', **_cifar100
        ),
        'capsnet_matrix_multimnist.diverse_multimnist': _cfg(
            hf_hub_id='timm-capsules/capsnet_matrix_multimnist.diverse_multimnist', **_multimnist
        ),
        'capsnet_vector_multimnist.diverse_multimnist': _cfg(
            hf_hub_id='timm-capsules/capsnet_vector_multimnist.diverse_multimnist', **_multimnist
        ),
    }
)

_CIFAR10_STACK = (('conv', 32, 3, 2), ('conv', 32, 3, 1))
_CIFAR100_STACK = (('conv', 32, 3, 2), ('conv', 32, 3, 1), ('fc', 20))
_MULTIMNIST_STACK = (('conv', 16, 3, 1),)


@register_model
def capsnet_simple_cifar10(pretrained: bool = False, **kwargs) -> CapsNet:
    """Simple backbone (conv3x3 s2, 256 ch), 4x4 matrix poses, 561,297 parameters."""
    model_args = dict(
        backbone='simple', backbone_args=dict(out_chs=256), primary_caps=32, pose_dim=16, capsule_layers=_CIFAR10_STACK
    )
    return _create_capsnet('capsnet_simple_cifar10', pretrained, **dict(model_args, **kwargs))


@register_model
def capsnet_simple_cifar100(pretrained: bool = False, **kwargs) -> CapsNet:
    """Simple backbone (conv3x3 s2, 128 ch), 6x6 matrix poses, 1,462,989 parameters."""
    model_args = dict(
        num_classes=100,
        backbone='simple',
        backbone_args=dict(out_chs=128),
        primary_caps=32,
        pose_dim=36,
        capsule_layers=_CIFAR100_STACK,
    )
    return _create_capsnet('capsnet_simple_cifar100', pretrained, **dict(model_args, **kwargs))


@register_model
def capsnet_resnet_cifar10(pretrained: bool = False, **kwargs) -> CapsNet:
    """CIFAR ResNet backbone, 4x4 matrix poses, 1,828,817 parameters. ``backbone=<timm model>`` swaps
    the backbone for any timm model."""
    model_args = dict(backbone='resnet', primary_caps=32, pose_dim=16, capsule_layers=_CIFAR10_STACK)
    return _create_capsnet('capsnet_resnet_cifar10', pretrained, **dict(model_args, **kwargs))


@register_model
def capsnet_resnet_cifar100(pretrained: bool = False, **kwargs) -> CapsNet:
    """CIFAR ResNet backbone, 6x6 matrix poses, 2,799,629 parameters."""
    model_args = dict(num_classes=100, backbone='resnet', primary_caps=32, pose_dim=36, capsule_layers=_CIFAR100_STACK)
    return _create_capsnet('capsnet_resnet_cifar100', pretrained, **dict(model_args, **kwargs))


@register_model
def capsnet_matrix_multimnist(pretrained: bool = False, **kwargs) -> CapsNet:
    """DiverseMultiMNIST CapsNet, 8x8 matrix poses, 9,963,969 parameters."""
    model_args = dict(
        in_chans=1,
        img_size=36,
        backbone='simple',
        backbone_args=dict(out_chs=1024),
        primary_caps=16,
        pose_dim=64,
        primary_kernel_size=3,
        primary_stride=2,
        capsule_layers=_MULTIMNIST_STACK,
    )
    return _create_capsnet('capsnet_matrix_multimnist', pretrained, **dict(model_args, **kwargs))


@register_model
def capsnet_vector_multimnist(pretrained: bool = False, **kwargs) -> CapsNet:
    """DiverseMultiMNIST CapsNet, 64-d vector poses, 42,478,017 parameters."""
    model_args = dict(
        in_chans=1,
        img_size=36,
        backbone='simple',
        backbone_args=dict(out_chs=1024),
        primary_caps=16,
        pose_dim=64,
        primary_kernel_size=3,
        primary_stride=2,
        capsule_layers=_MULTIMNIST_STACK,
        matrix_pose=False,
    )
    return _create_capsnet('capsnet_vector_multimnist', pretrained, **dict(model_args, **kwargs))
