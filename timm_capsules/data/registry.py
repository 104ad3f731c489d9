"""The datasets this package trains and analyses on, each described once: where it lives, its columns, its input,
its classes, how to normalise it and what chance is. The models' ``pretrained_cfg`` (``dataset_cfg``), the
training data, the parse tree and the model cards read these entries instead of keeping copies.
"""

import collections
from dataclasses import dataclass
from typing import Any, Dict, Hashable, Optional, Sequence, Tuple

from .constants import (
    CIFAR10_LABELS,
    CIFAR100_LABELS,
    CIFAR_MEAN,
    CIFAR_STD,
    DIGIT_LABELS,
    MULTIMNIST_MEAN,
    MULTIMNIST_STD,
)

__all__ = ['DatasetInfo', 'DATASETS', 'ALIASES', 'dataset_info', 'dataset_cfg', 'chance_level', 'hub_columns']


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset. ``hub_id`` is None for one generated here (DiverseMultiMNIST is made from MNIST on the fly);
    ``sources`` are the Hub datasets it comes from (what a model card lists)."""

    name: str
    title: str  # as a model card names it
    hub_id: Optional[str]
    sources: Tuple[str, ...]
    image_column: str
    label_column: str
    input_size: Tuple[int, int, int]  # (channels, height, width)
    label_names: Tuple[str, ...]
    multi_label: bool  # a label is a set of classes, scored by exact match of the thresholded prediction
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def chance_rule(self) -> str:
        """What ``chance_level`` measures for this dataset."""
        return f'always the most frequent label{" set" if self.multi_label else ""}'


_CIFAR = dict(image_column='img', input_size=(3, 32, 32), multi_label=False, mean=CIFAR_MEAN, std=CIFAR_STD)
DATASETS: Dict[str, DatasetInfo] = {
    'cifar10': DatasetInfo(
        name='cifar10',
        title='CIFAR-10',
        hub_id='uoft-cs/cifar10',
        sources=('uoft-cs/cifar10',),
        label_column='label',
        label_names=CIFAR10_LABELS,
        **_CIFAR,
    ),
    'cifar100': DatasetInfo(
        name='cifar100',
        title='CIFAR-100',
        hub_id='uoft-cs/cifar100',
        sources=('uoft-cs/cifar100',),
        label_column='fine_label',
        label_names=CIFAR100_LABELS,
        **_CIFAR,
    ),
    # made from MNIST on the fly; pixels in [0, 1], not normalised (the paper's code)
    'diverse_multimnist': DatasetInfo(
        name='diverse_multimnist',
        title='DiverseMultiMNIST',
        hub_id=None,
        sources=('ylecun/mnist',),
        image_column='image',
        label_column='labels',
        input_size=(1, 36, 36),
        label_names=DIGIT_LABELS,
        multi_label=True,
        mean=MULTIMNIST_MEAN,
        std=MULTIMNIST_STD,
    ),
}
ALIASES = {'multimnist': 'diverse_multimnist'}  # other names the training script accepts


def dataset_info(name: str) -> DatasetInfo:
    """The entry of ``name`` (or of the dataset it is another name for); KeyError naming the known ones."""
    name = ALIASES.get(name, name)
    if name not in DATASETS:
        raise KeyError(f'unknown dataset {name!r}: known are {sorted(DATASETS)} (and {sorted(ALIASES)})')
    return DATASETS[name]


def dataset_cfg(name: str, **overrides: Any) -> Dict[str, Any]:
    """The ``pretrained_cfg`` fields a model trained on ``name`` takes from it (classes, their names, input size,
    mean and std); ``overrides`` win (e.g. another ``pool_size``)."""
    info = dataset_info(name)
    cfg = dict(num_classes=info.num_classes, label_names=info.label_names, input_size=info.input_size)
    return {**cfg, 'mean': info.mean, 'std': info.std, **overrides}


def hub_columns(name: str) -> Tuple[str, str, str]:
    """(Hub id, image column, label column) of a dataset on the Hub."""
    info = dataset_info(name)
    if info.hub_id is None:
        raise KeyError(f'{name!r} is generated here, not loaded from the Hub')
    return info.hub_id, info.image_column, info.label_column


def chance_level(labels: Sequence[Hashable]) -> float:
    """The accuracy (top-1, or exact match) of always answering the most frequent label (set) of ``labels``:
    what a model has to beat. A multi-label dataset's labels are given as sorted tuples."""
    counts = collections.Counter(labels)
    return max(counts.values()) / len(labels) if labels else 0.0
