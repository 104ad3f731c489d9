"""CIFAR-10/100 and other image-classification datasets through ``datasets``, with the paper's augmentation.

``load_image_dataset`` reads a split from the Hub (``uoft-cs/cifar10``), a folder written by
``save_to_disk``, or any folder ``datasets.load_dataset`` understands (parquet shards, imagefolder).
``check_columns`` / ``label_info`` describe it; ``ImageClassificationData`` turns examples into
normalised ``(image, target)`` pairs for a DataLoader, with the paper's training augmentation
(pad 4 + random crop + horizontal flip, Tsai et al. 2020, appendix A) drawn reproducibly per image.
"""

import os
from pathlib import Path
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .registry import DATASETS, hub_columns

# name -> (Hub id, image column, label column): a thin view of the registry (data/registry.py), kept for callers
KNOWN_DATASETS = {name: hub_columns(name) for name, info in DATASETS.items() if info.hub_id}


class LabelInfo(NamedTuple):
    num_classes: int
    names: Optional[Tuple[str, ...]]
    multi_label: bool  # the label column holds a list of classes per image


def load_image_dataset(path: Union[str, os.PathLike], split: str):
    """One split of an image dataset: a ``save_to_disk`` folder, a data folder or a Hub id."""
    import datasets

    folder = Path(path)
    if (folder / 'dataset_dict.json').is_file() or (folder / 'state.json').is_file():
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f'{path} has splits {sorted(loaded)}, not {split!r}')
            return loaded[split]
        return loaded
    return datasets.load_dataset(str(path), split=split)


def check_columns(dataset, image_column: str, label_column: str, name: str = 'dataset') -> None:
    """Raises ValueError naming the missing columns and the ones that exist."""
    columns = list(dataset.column_names)
    missing = [c for c in (image_column, label_column) if c not in columns]
    if missing:
        raise ValueError(
            f'{name} has no column {" or ".join(map(repr, missing))} (columns: {columns}); '
            f'pass --image-column / --label-column'
        )


def label_info(dataset, label_column: str) -> LabelInfo:
    """Number of classes, class names and whether the task is multi-label, from the column's feature."""
    import datasets

    feature = dataset.features[label_column]
    multi_label = isinstance(feature, (datasets.Sequence, datasets.List, datasets.LargeList, list))
    inner = feature
    if multi_label:
        inner = feature.feature if hasattr(feature, 'feature') else feature[0]
    if isinstance(inner, datasets.ClassLabel):
        return LabelInfo(inner.num_classes, tuple(inner.names), multi_label)
    # plain integers: count the classes from the data
    values = dataset[label_column]
    if multi_label:
        values = [v for row in values for v in row]
    if not values:
        raise ValueError(f'label column {label_column!r} is empty')
    return LabelInfo(int(max(values)) + 1, None, multi_label)


def image_size(dataset, image_column: str) -> Tuple[int, int]:
    """(height, width) of the first image."""
    from PIL import Image
    import numpy as np

    image = dataset[0][image_column]
    if isinstance(image, Image.Image):  # (width, height)
        return image.size[1], image.size[0]
    image = torch.as_tensor(np.asarray(image))  # a tensor, an array or nested lists (an Array3D feature)
    return tuple(image.shape[-2:]) if image.ndim == 3 and image.shape[0] in (1, 3) else tuple(image.shape[:2])


def image_transform(input_size: Sequence[int], *, resize: bool = False):
    """Image (PIL, array) -> float tensor (C, H, W) in [0, 1], converted to RGB or L to match
    ``input_size`` = (channels, height, width), resized to it when ``resize``."""
    from torchvision import transforms

    channels, height, width = input_size
    mode = 'L' if channels == 1 else 'RGB'
    steps: List[Any] = [transforms.Lambda(lambda image: _to_pil(image).convert(mode))]
    if resize:
        steps.append(transforms.Resize((height, width)))
    steps.append(transforms.ToTensor())
    return transforms.Compose(steps)


def _to_pil(image):
    from PIL import Image
    import numpy as np

    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype.kind in 'iu' and array.dtype != np.uint8 and array.min() >= 0 and array.max() <= 255:
        array = array.astype(np.uint8)  # Array2D/3D uint8 columns are read back as lists of Python ints
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)


class ImageClassificationData(torch.utils.data.Dataset):
    """``(image, target)`` pairs: a normalised float image and an int64 class, or a float multi-hot
    vector when multi-label.

    With ``augment`` (training): zero-pad ``padding`` px, random crop back to size, random horizontal
    flip (the paper's CIFAR augmentation, like torchvision's ``RandomCrop(32, padding=4)`` +
    ``RandomHorizontalFlip``). The draws are a pure function of ``(seed, epoch, index)``, not of a
    global random state: any DataLoader worker count gives the same images, and a resumed run sees
    exactly the images an uninterrupted one would. Call ``set_epoch`` before each epoch.
    """

    def __init__(
        self,
        dataset,
        transform,
        image_column: str,
        label_column: str,
        labels: LabelInfo,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        padding: int = 4,
        flip: bool = True,
        seed: int = 0,
    ):
        self.dataset, self.transform = dataset, transform
        self.image_column, self.label_column, self.labels = image_column, label_column, labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment, self.padding, self.flip, self.seed, self.epoch = augment, padding, flip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def _augment(self, image: torch.Tensor, index: int) -> torch.Tensor:
        import numpy as np

        key = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(key) & (2**63 - 1))
        top, left, flip = torch.randint(0, 2 * self.padding + 1, (3,), generator=generator).tolist()
        height, width = image.shape[-2:]
        padded = torch.nn.functional.pad(image, (self.padding,) * 4)
        image = padded[:, top : top + height, left : left + width]
        return image.flip(-1) if self.flip and flip % 2 else image

    def __getitem__(self, index: int):
        example = self.dataset[int(index)]
        label = example[self.label_column]
        if self.labels.multi_label:
            target = torch.zeros(self.labels.num_classes)
            target[torch.as_tensor(label, dtype=torch.long)] = 1.0
        else:
            target = torch.tensor(int(label))
        image = self.transform(example[self.image_column])
        if self.augment:
            image = self._augment(image, int(index))
        return (image - self.mean) / self.std, target
