"""The paper's CNN baselines: its plain CNNs (CIFAR, DiverseMultiMNIST) and a CIFAR ResNet-18

Paper: `Capsules with Inverted Dot-Product Attention Routing` - https://arxiv.org/abs/2002.04764
(Tsai, Srivastava, Goh, Salakhutdinov, ICLR 2020), Table 1, Fig. 5 and appendix Tables 2-12.

Both return logits (``output_type = 'logits'``): cross-entropy, or binary cross-entropy per class on
DiverseMultiMNIST (see ``losses.py``).
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from timm.layers import create_classifier, to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, ResNet

from .base import build_capsule_model, capsule_cfg, check_timm_args, set_batchnorm_args
from .data.registry import dataset_cfg
from .layers import conv_output_size

__all__ = ['BaselineCNN', 'CifarResNet']


# ---- the CNNs ------------------------------------------------------------------------------------


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
    a feature level. ``drop_rate`` is dropout before the classifier; ``bn_momentum`` / ``bn_eps`` are set on
    every BatchNorm; there are no residual blocks, so ``drop_path_rate`` / ``drop_block_rate`` must be 0 or None.
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
        check_timm_args(type(self).__name__, drop_path_rate, drop_block_rate, residual=False)
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
            grid = tuple(conv_output_size(size, kernel_size, stride, padding) for size in grid)
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{index}'))
            in_chs = out_chs
        self.stages = nn.Sequential(*blocks)
        self.grid = grid
        self.num_features = in_chs
        self.fc_hidden_size = head_hidden_size
        if head == 'fc':
            self.head_hidden_size = head_hidden_size
            self.global_pool = (
                FlattenMlpHead(in_chs * grid[0] * grid[1], head_hidden_size, **dd)
                if global_pool != ''
                else nn.Identity()
            )
            self.fc = nn.Linear(head_hidden_size, num_classes, **dd) if num_classes else nn.Identity()
            if global_pool == '':
                self.head_hidden_size = in_chs
        else:
            self.global_pool, self.fc = create_classifier(
                in_chs, num_classes, pool_type='avg' if global_pool is None else global_pool, **dd
            )
            self.head_hidden_size = in_chs * self.global_pool.feat_mult()
        self.pruned = False
        set_batchnorm_args(self, bn_momentum, bn_eps)

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
                    self.num_features * self.grid[0] * self.grid[1], self.fc_hidden_size, **dd
                )
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
            raise ValueError(f'feature maps are NCHW, got output_fmt={output_fmt!r}')
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
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
            self.stages = self.stages[: max_index + 1]
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

    def __init__(
        self,
        *args,
        in_chans: int = 3,
        bn_momentum: Optional[float] = None,
        bn_eps: Optional[float] = None,
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__(*args, in_chans=in_chans, device=device, dtype=dtype, **kwargs)
        stem_chs = self.bn1.num_features
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, 1, 1, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_normal_(self.conv1.weight, mode='fan_out', nonlinearity='relu')
        self.maxpool = nn.Identity()
        for info in self.feature_info:
            info['reduction'] = max(1, info['reduction'] // 4)
        set_batchnorm_args(self, bn_momentum, bn_eps)  # timm's ResNet does not take them; timm's scripts may pass them


# ---- registration -------------------------------------------------------------------------------------


def _create_cnn_baseline(variant: str, pretrained: bool = False, **kwargs) -> BaselineCNN:
    return build_capsule_model(BaselineCNN, variant, pretrained, **kwargs)


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    args = dict(dict(block=BasicBlock, layers=(2, 2, 2, 2)), **kwargs)
    return build_capsule_model(CifarResNet, variant, pretrained, feature_getter=False, **args)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return capsule_cfg(url, **kwargs)


_cifar10, _cifar100, _multimnist = (dataset_cfg(name) for name in ('cifar10', 'cifar100', 'diverse_multimnist'))
_cnn = dict(first_conv='stages.0.0', classifier='fc')
_resnet = dict(pool_size=(4, 4), fixed_input_size=False, first_conv='conv1', classifier='fc')

default_cfgs = generate_default_cfgs(
    {
        'cnn_baseline_cifar10.cifar10': _cfg(
            hf_hub_id='timm-capsules/cnn_baseline_cifar10.cifar10',
            pool_size=(2, 2),
            fixed_input_size=False,
            **_cnn,
            **_cifar10,
        ),
        'cnn_baseline_cifar100.cifar100': _cfg(
            hf_hub_id='timm-capsules/cnn_baseline_cifar100.cifar100',
            pool_size=(2, 2),
            fixed_input_size=False,
            **_cnn,
            **_cifar100,
        ),
        'cnn_baseline_multimnist.diverse_multimnist': _cfg(
            hf_hub_id='timm-capsules/cnn_baseline_multimnist.diverse_multimnist',
            pool_size=(6, 6),
            fixed_input_size=False,
            **_cnn,
            **_multimnist,
        ),
        'cnn_fc_multimnist.diverse_multimnist': _cfg(
            hf_hub_id='timm-capsules/cnn_fc_multimnist.diverse_multimnist', pool_size=(6, 6), **_cnn, **_multimnist
        ),
        'resnet18_cifar10.cifar10': _cfg(hf_hub_id='timm-capsules/resnet18_cifar10.cifar10', **_resnet, **_cifar10),
        'resnet18_cifar100.cifar100': _cfg(
            hf_hub_id='timm-capsules/resnet18_cifar100.cifar100', **_resnet, **_cifar100
        ),
    }
)

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
    model_args = dict(stages=_CNN_CIFAR_STAGES)
    return _create_cnn_baseline('cnn_baseline_cifar10', pretrained, **dict(model_args, **kwargs))


@register_model
def cnn_baseline_cifar100(pretrained: bool = False, **kwargs) -> BaselineCNN:
    """The paper's baseline CNN for CIFAR-100, 19,011,684 parameters (paper: 19.01M)."""
    model_args = dict(stages=_CNN_CIFAR_STAGES, num_classes=100)
    return _create_cnn_baseline('cnn_baseline_cifar100', pretrained, **dict(model_args, **kwargs))


@register_model
def cnn_baseline_multimnist(pretrained: bool = False, **kwargs) -> BaselineCNN:
    """The paper's DiverseMultiMNIST CNN (average pooling), 19,553,162 parameters (paper: 19.55M)."""
    stages = _CNN_MULTIMNIST_STAGES + ((640, 1, 1, 0, False, False),)
    model_args = dict(stages=stages, in_chans=1, img_size=36)
    return _create_cnn_baseline('cnn_baseline_multimnist', pretrained, **dict(model_args, **kwargs))


@register_model
def cnn_fc_multimnist(pretrained: bool = False, **kwargs) -> BaselineCNN:
    """The paper's DiverseMultiMNIST CNN with a fully connected layer over positions, 42,490,762 parameters
    (paper: 42.49M)."""
    model_args = dict(stages=_CNN_MULTIMNIST_STAGES, in_chans=1, img_size=36, head='fc', head_hidden_size=640)
    return _create_cnn_baseline('cnn_fc_multimnist', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet18_cifar10(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-18 (timm's ResNet, 3x3 stem, no max-pool), 11,173,962 parameters (paper: 11.17M)."""
    return _create_cifar_resnet('resnet18_cifar10', pretrained, **kwargs)


@register_model
def resnet18_cifar100(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-18 for CIFAR-100, 11,220,132 parameters."""
    model_args = dict(num_classes=100)
    return _create_cifar_resnet('resnet18_cifar100', pretrained, **dict(model_args, **kwargs))
