"""Backbones that feed the primary capsules.

Every backbone maps an image (B, C, H, W) to a list of feature maps, one per feature level, and
describes them in ``feature_info`` (timm's format: ``num_chs``, ``reduction``, ``module``). The
capsule network reads the last one.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
import timm
from timm.layers import DropPath
from timm.models.resnet import BasicBlock, downsample_conv

__all__ = ['SimpleBackbone', 'CifarResNetBackbone', 'TimmBackbone']


class SimpleBackbone(nn.Module):
    """The paper's simple backbone: one conv (with bias) and a ReLU."""

    def __init__(
        self,
        in_chans: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 2,
        padding: int = 1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chs, kernel_size, stride, padding, device=device, dtype=dtype)
        self.act = nn.ReLU(inplace=True)
        self.num_features = out_chs
        self.feature_info = [dict(num_chs=out_chs, reduction=stride, module='conv')]

    def set_grad_checkpointing(self, enable: bool = True):
        pass  # a single conv: nothing worth recomputing

    def forward(self, x: Tensor) -> List[Tensor]:
        return [self.act(self.conv(x))]


class CifarResNetBackbone(nn.Module):
    """The paper's CIFAR ResNet backbone: conv3x3 (stride 1, no max-pool), BN, ReLU, then stages of
    timm BasicBlocks (3 x 64 channels, then 4 x 128 channels with the first at stride 2)."""

    def __init__(
        self,
        in_chans: int,
        widths: Sequence[int] = (64, 128),
        depths: Sequence[int] = (3, 4),
        strides: Sequence[int] = (1, 2),
        drop_path_rate: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(widths[0], **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.grad_checkpointing = False
        stages, self.feature_info = [], []
        in_chs, reduction = widths[0], 1
        num_blocks, block_number = sum(depths), 0
        for index, (width, depth, stride) in enumerate(zip(widths, depths, strides)):
            blocks = []
            for block_index in range(depth):
                block_stride = stride if block_index == 0 else 1
                downsample = None
                if block_stride != 1 or in_chs != width:
                    downsample = downsample_conv(in_chs, width, 1, block_stride, **dd)
                # stochastic depth rising linearly to drop_path_rate over the blocks, as in timm's ResNet
                rate = drop_path_rate * block_number / max(1, num_blocks - 1)
                block_number += 1
                blocks.append(
                    BasicBlock(
                        in_chs, width, block_stride, downsample, drop_path=DropPath(rate) if rate > 0 else None, **dd
                    )
                )
                in_chs = width
            reduction *= stride
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f'stages.{index}'))
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def forward(self, x: Tensor) -> List[Tensor]:
        # channels-last: oneDNN's CPU convolutions train about 8% faster on it for these wide, shallow stages
        # (and the primary capsules want it next); the features keep their NCHW shape, only their strides change
        x = self.act1(self.bn1(self.conv1(x.contiguous(memory_format=torch.channels_last))))
        features = []
        for stage in self.stages:
            if self.grad_checkpointing:
                x = timm.models.checkpoint_seq(stage, x)
            else:
                x = stage(x)
            features.append(x)
        return features


class TimmBackbone(nn.Module):
    """Any timm model as a capsule backbone, through timm's ``features_only`` machinery.

    ``out_index`` picks the feature level (index into the model's ``feature_info``); None picks the
    deepest level whose feature map still ``fits`` the capsule stack, measured by a dry run on the meta
    device (no weights, no compute). Token models (ViT and friends) come out as NCHW maps through timm's
    feature getter, and are told the input size when they take ``img_size``.
    """

    def __init__(
        self,
        model_name: str,
        in_chans: int,
        img_size: Sequence[int],
        pretrained: bool = False,
        out_index: Optional[int] = None,
        fits: Optional[Callable[[int, int], bool]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        model_kwargs = dict(model_kwargs or {}, in_chans=in_chans)
        probe, model_kwargs = self._meta_model(model_name, tuple(img_size), model_kwargs)
        with torch.device('meta'):
            grids = [tuple(m.shape[-2:]) for m in probe(torch.zeros(1, in_chans, *img_size))]
        levels = list(probe.feature_info.out_indices)
        if out_index is None:
            usable = [level for level, grid in zip(levels, grids) if fits is None or fits(*grid)]
            if not usable:
                raise ValueError(
                    f'no feature level of {model_name} at input size {tuple(img_size)} is large enough for the '
                    f'capsule stack (feature map sizes {grids}); use a larger img_size'
                )
            out_index = usable[-1]
        if out_index not in levels:
            raise ValueError(f'{model_name} has feature levels {levels}, got backbone_out_index={out_index}')
        self.grid = grids[levels.index(out_index)]
        self.model = timm.create_model(
            model_name,
            pretrained=pretrained,
            features_only=True,
            out_indices=(out_index,),
            device=device,
            dtype=dtype,
            **model_kwargs,
        )
        info = self.model.feature_info.get_dicts()[-1]
        self.feature_info = [dict(num_chs=info['num_chs'], reduction=info['reduction'], module='model')]
        self.num_features = info['num_chs']
        self.out_index = out_index

    @staticmethod
    def _meta_model(model_name: str, img_size: Tuple[int, int], model_kwargs: Dict[str, Any]):
        """The backbone on the meta device, told the input size if its constructor takes one."""
        with torch.device('meta'):
            if 'img_size' not in model_kwargs:
                try:
                    kwargs = dict(model_kwargs, img_size=img_size)
                    return timm.create_model(model_name, features_only=True, **kwargs).eval(), kwargs
                except TypeError:
                    pass
            return timm.create_model(model_name, features_only=True, **model_kwargs).eval(), model_kwargs

    def set_grad_checkpointing(self, enable: bool = True):
        if hasattr(self.model, 'set_grad_checkpointing'):
            self.model.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> List[Tensor]:
        return [self.model(x)[-1]]
