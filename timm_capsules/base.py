"""The timm model contract of this package's capsule networks, written once.

Every capsule model here is backbone -> primary capsules -> capsule layers -> class capsules, and speaks
timm the same way: ``forward_features`` / ``forward_head``, ``group_matcher``, grad checkpointing,
``reset_classifier``, feature levels, the constructor keywords timm's own scripts pass (``drop_rate``,
``drop_path_rate``, ``drop_block_rate``, ``global_pool``, ``bn_momentum``, ``bn_eps``), the pretrained
guard and weight checks. ``CapsuleModel`` holds what the IDA ``CapsNet`` and the layer-by-layer routing
baselines share; ``LayerwiseCapsuleModel`` adds the walk of models that finish one capsule layer's routing
before the next starts (dynamic and EM routing).
"""

import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from timm.layers import SelectAdaptivePool2d, register_notrace_function, to_2tuple
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices

from .backbones import CifarResNetBackbone, SimpleBackbone, TimmBackbone
from .layers import Capsules, capsules_to_nchw, conv_output_size
from .loading import check_state_dict, pretrained_guard

__all__ = [
    'CapsuleModel',
    'LayerwiseCapsuleModel',
    'check_input',
    'check_timm_args',
    'create_backbone',
    'backbone_grid',
    'set_batchnorm_args',
    'build_capsule_model',
    'capsule_cfg',
    'model_data_config',
]

PAPER = dict(
    license='apache-2.0',
    paper_ids='arXiv:2002.04764',
    paper_name='Capsules with Inverted Dot-Product Attention Routing',
    origin_url='https://github.com/apple/ml-capsules-inverted-attention-routing',
)


@register_notrace_function
def check_input(x: Tensor, in_chans: int, img_size: Tuple[int, int]) -> None:
    if x.ndim != 4 or x.shape[1] != in_chans or tuple(x.shape[-2:]) != tuple(img_size):
        raise ValueError(
            f'expected images of shape (batch, {in_chans}, {img_size[0]}, {img_size[1]}), got {tuple(x.shape)}; '
            f'a capsule network is built for one input size (pass img_size=/in_chans= to create_model to change it)'
        )


def check_timm_args(
    model_name: str, drop_path_rate: Optional[float], drop_block_rate: Optional[float], residual: bool
) -> float:
    """timm's scripts pass these to every model. Stochastic depth needs residual blocks and DropBlock is
    not implemented here, so a rate that could not be honoured is an error, not a silent no-op."""
    if drop_block_rate:
        raise ValueError(f'{model_name} has no DropBlock; drop_block_rate must be 0 or None, got {drop_block_rate}')
    if drop_path_rate and not residual:
        raise ValueError(
            f'{model_name} has no residual blocks for stochastic depth here; drop_path_rate must be '
            f'0 or None with this backbone, got {drop_path_rate}'
        )
    return float(drop_path_rate or 0.0)


def set_batchnorm_args(module: nn.Module, bn_momentum: Optional[float] = None, bn_eps: Optional[float] = None):
    """timm's meaning of ``bn_momentum`` / ``bn_eps``: every BatchNorm of the model gets them."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            if bn_momentum is not None:
                layer.momentum = bn_momentum
            if bn_eps is not None:
                layer.eps = bn_eps


def create_backbone(
    kind: str,
    in_chans: int,
    img_size: Tuple[int, int],
    args: Optional[Dict[str, Any]] = None,
    simple: Callable[..., nn.Module] = SimpleBackbone,
    timm_models: bool = False,
    drop_path_rate: float = 0.0,
    **timm_kwargs,
) -> nn.Module:
    """'simple' (the paper's one-conv stem, or ``simple``), 'resnet' (the paper's CIFAR ResNet) or, with
    ``timm_models``, the name of any timm model (``TimmBackbone``; ``timm_kwargs`` go to it)."""
    args = dict(args or {})
    dd = dict(device=timm_kwargs.pop('device', None), dtype=timm_kwargs.pop('dtype', None))
    if kind == 'simple':
        return simple(in_chans, **args, **dd)
    if kind == 'resnet':
        return CifarResNetBackbone(in_chans, drop_path_rate=drop_path_rate, **args, **dd)
    if not timm_models:
        raise ValueError(f"backbone must be 'simple' or 'resnet', got {kind!r}")
    if drop_path_rate:
        args['drop_path_rate'] = drop_path_rate
    return TimmBackbone(kind, in_chans, img_size, model_kwargs=args, **timm_kwargs, **dd)


def backbone_grid(backbone: nn.Module, img_size: Tuple[int, int]) -> Tuple[int, int]:
    """Size of the backbone's last feature map, from its geometry (no tensors needed)."""
    if isinstance(backbone, TimmBackbone):
        return backbone.grid
    if isinstance(backbone, SimpleBackbone):
        conv = backbone.conv
        return tuple(conv_output_size(size, conv.kernel_size[0], conv.stride[0], conv.padding[0]) for size in img_size)
    reduction = backbone.feature_info[-1]['reduction']  # 'same'-padded stages
    return tuple(math.ceil(size / reduction) for size in img_size)


class CapsuleModel(nn.Module):
    """What every capsule network of this package shares. Subclasses build ``backbone``, ``primary``,
    ``capsule_layers``, ``head`` (the class capsules, None without classes) and ``global_pool``, and set
    ``head_drop`` (the dropout timm's ``drop_rate`` puts on the class capsules' input)."""

    output_type = 'logits'  # what forward returns: 'logits', 'lengths' or 'activations' (see losses.py)
    grad_checkpointing = False

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups (layer-wise lr decay, ...): the backbone's stem and stages (a timm backbone
        as one block), the primary capsules, each capsule layer; the rest (class capsules) last."""
        return dict(
            stem=r'^backbone\.(?:conv1|bn1|conv|bn)\.',
            blocks=[
                (r'^backbone\.stages\.(\d+)' if coarse else r'^backbone\.stages\.(\d+)\.(\d+)', None),
                (r'^backbone\.model', (0,)),
                (r'^primary', (1000,)),
                (r'^capsule_layers\.(\d+)', (1001,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute each routing pass (and the backbone's stages) in the backward pass instead of storing
        its votes: memory then no longer grows with the vote tensors."""
        self.grad_checkpointing = enable
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def _checkpointed(self, step: Callable, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False)
        return step(*args)

    def _set_global_pool(self, global_pool: str):
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class LayerwiseCapsuleModel(CapsuleModel):
    """Capsule networks that route layer by layer (every iteration of a layer before the next layer starts):
    ``forward_features`` is the deepest capsule layer below the class capsules as an NCHW map (channel
    n * d + e holds entry e of capsule type n; with activations, the last N channels hold them), and
    ``forward_head`` routes it to the class capsules.

    Subclasses say how the model walks from the backbone's last map through the capsule levels
    (``_capsule_steps``, every step's output a feature level) and classify (``_classify``), and call
    ``_finish_init`` with a factory of class capsules.
    """

    has_activations = False

    def _finish_init(
        self, head_factory: Callable[..., nn.Module], global_pool: str, drop_rate: float, dd: Dict[str, Any]
    ):
        self._head_factory = head_factory  # (num_classes, device=, dtype=) -> class capsules
        self.num_features = self.head_hidden_size = self.feature_info[-1]['num_chs']
        self._set_global_pool(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = head_factory(self.num_classes, **dd) if self.num_classes else None
        self.num_capsule_levels = len(self.feature_info) - len(self.backbone.feature_info)
        self.pruned = False

    def _capsule_steps(self) -> List[Callable]:
        raise NotImplementedError

    def _classify(self, capsules: Capsules) -> Tensor:
        raise NotImplementedError

    def _from_nchw(self, x: Tensor) -> Capsules:
        B, C, H, W = x.shape
        x = x.permute(0, 2, 3, 1)
        d = self.pose_dim
        n = C // (d + 1) if self.has_activations else C // d
        activations = x[..., n * d :] if self.has_activations else None
        return Capsules(x[..., : n * d].reshape(B, H, W, n, d), activations)

    def _walk(self, x: Tensor, max_index: int) -> List[Tensor]:
        """NCHW maps of the feature levels 0..max_index (fewer when the model was pruned)."""
        check_input(x, self.in_chans, self.img_size)
        levels = list(self.backbone(x))
        if self.primary is None:
            return levels
        state = levels[-1]
        for step in self._capsule_steps()[: self.num_capsule_levels]:
            if len(levels) > max_index:
                break
            state = self._checkpointed(step, state)
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
            raise ValueError(f'capsule feature maps are NCHW, got output_fmt={output_fmt!r}')
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        levels = self._walk(x, max_index if stop_early else len(self.feature_info) - 1)
        if stop_early:
            levels = levels[: max_index + 1]
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
            num_layers = max(
                0, self.num_capsule_levels - (len(self.feature_info) - num_backbone - len(self.capsule_layers))
            )
            self.capsule_layers = self.capsule_layers[:num_layers]
            if max_index < num_backbone:
                self.primary = None
                if isinstance(self.backbone, CifarResNetBackbone):
                    self.backbone.stages = self.backbone.stages[: max_index + 1]
                    self.backbone.feature_info = self.backbone.feature_info[: max_index + 1]
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """New class capsules for ``num_classes`` classes (0 removes them: the model then returns pooled
        features of the deepest capsule layer)."""
        if num_classes and self.pruned:
            raise ValueError('class capsules need the full capsule stack; this model was pruned')
        self.num_classes = num_classes
        if global_pool is not None:
            self._set_global_pool(global_pool)
        if num_classes:
            reference = next(self.parameters())
            self.head = self._head_factory(num_classes, device=reference.device, dtype=reference.dtype)
            self.head.train(self.training)
        else:
            self.head = None

    def forward_features(self, x: Tensor) -> Tensor:
        return self._walk(x, len(self.feature_info) - 1)[-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if pre_logits or self.head is None:
            return self.head_drop(self.global_pool(x))
        return self._classify(self._from_nchw(self.head_drop(x)))


def capsule_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    """The ``pretrained_cfg`` fields every model of the paper shares (CIFAR input by default)."""
    from .data.constants import CIFAR_MEAN, CIFAR_STD

    return {
        'url': url,
        'num_classes': 10,
        'input_size': (3, 32, 32),
        'pool_size': (1, 1),
        'fixed_input_size': True,
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'mean': CIFAR_MEAN,
        'std': CIFAR_STD,
        'first_conv': 'backbone.conv',
        'classifier': 'head',
        **PAPER,
        **kwargs,
    }


# what timm's build_model_with_cfg takes for itself, never the model class
_BUILDER_ONLY = (
    'features_only',
    'out_indices',
    'feature_cls',
    'feature_cfg',
    'output_stride',
    'pretrained_cfg',
    'pretrained_cfg_overlay',
    'pretrained_strict',
    'cache_dir',
    'kwargs_filter',
    'flatten_sequential',
)


def build_capsule_model(cls, variant: str, pretrained: bool, feature_getter: bool = True, **kwargs):
    """``timm.models.build_model_with_cfg`` behind the pretrained guard (clear errors for unpublished tags,
    malformed configs) with the state-dict check (names and shapes listed on a mismatch). With
    ``feature_getter``, ``features_only`` returns every feature level of the model as built (its backbone's,
    which ``backbone_args`` may add, and its capsule stack's), counted on the meta device; without, timm's
    default feature extraction."""
    feature_cfg = None
    if feature_getter and kwargs.get('features_only'):
        feature_cfg = dict(feature_cls='getter')
        if 'out_indices' not in kwargs:
            built = {key: value for key, value in kwargs.items() if key not in _BUILDER_ONLY}
            built.update(device='meta', **({'backbone_pretrained': False} if 'backbone_pretrained' in built else {}))
            feature_cfg['out_indices'] = tuple(range(len(cls(**built).feature_info)))
    with pretrained_guard(variant, pretrained, kwargs, cls):
        model = build_model_with_cfg(
            cls, variant, pretrained, feature_cfg=feature_cfg, pretrained_filter_fn=check_state_dict, **kwargs
        )
    if hasattr(model, 'img_size') and hasattr(model, 'in_chans'):
        # timm's scripts size and normalise their data from pretrained_cfg: make it describe the model as built
        # (img_size= / in_chans= overrides), so that benchmark.py or validate.py need no --input-size
        config = model_data_config(model)
        model.pretrained_cfg = dict(
            model.pretrained_cfg, input_size=config['input_size'], mean=config['mean'], std=config['std']
        )
    return model


def model_data_config(model: nn.Module) -> Dict[str, Any]:
    """timm's ``resolve_data_config`` for the size the model was built for (``img_size=`` / ``in_chans=`` at
    creation change it, and the capsule stacks take only that size), with one mean/std entry per input
    channel (the average of the cfg's, e.g. for an ImageNet backbone built with ``in_chans=1``). Also says
    whether the model takes only that size (``fixed_input_size``)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    if hasattr(model, 'img_size') and hasattr(model, 'in_chans'):
        config['input_size'] = (model.in_chans, *to_2tuple(model.img_size))
    else:  # a timm model built with in_chans= keeps its cfg's channels: ask its first conv
        first_conv = getattr(model, 'pretrained_cfg', {}).get('first_conv')
        conv = model.get_submodule(first_conv) if first_conv else None
        if isinstance(conv, nn.Conv2d):
            config['input_size'] = (conv.in_channels, *config['input_size'][1:])
    channels = config['input_size'][0]
    mean, std = tuple(config['mean']), tuple(config['std'])
    if len(mean) != channels:
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    fixed = bool(getattr(model, 'pretrained_cfg', {}).get('fixed_input_size', False))
    return dict(config, input_size=tuple(config['input_size']), mean=mean, std=std, fixed_input_size=fixed)
