"""What ``python -m timm_capsules.parse_tree`` looks at: the dataset a model belongs to, DiverseMultiMNIST test
images with each digit's own mask (for the part-whole probe), and image files, preprocessed as the model's
data config says."""

from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
import torch.nn.functional as F

from ..base import model_data_config
from ..data.registry import DATASETS as REGISTRY

__all__ = ['DATASETS', 'model_dataset', 'diverse_multimnist_samples', 'load_images', 'prepare_arrays', 'display_image']

# what the analysis needs to know of a dataset (from the registry, data/registry.py): how to score (sigmoid for
# multi-label) and the class names
DATASETS = {name: dict(multi_label=info.multi_label, label_names=info.label_names) for name, info in REGISTRY.items()}


def model_dataset(pretrained_cfg: Optional[Dict[str, Any]]) -> Optional[str]:
    """The dataset (a key of ``DATASETS``) a model's ``pretrained_cfg`` says it was trained on: its
    ``dataset`` field, else its pretrained tag (timm tags name the training data, e.g. ``.cifar10``;
    ``create_model('local-dir:...')`` keeps the tag). None when neither names a known dataset."""
    cfg = pretrained_cfg or {}
    for key in ('dataset', 'tag'):
        if cfg.get(key) in DATASETS:
            return cfg[key]
    return None


def diverse_multimnist_samples(
    count: int, seed: int = 0, source: Optional[str] = None, split: str = 'test', two_digit_only: bool = False
):
    """The first ``count`` (two-digit, with ``two_digit_only``) images of a DiverseMultiMNIST split, as
    ``make_split`` writes it, with their per-digit masks: (images uint8 (n, S, S), masks float32 (n, 2, S, S)
    in [0, 1], each digit's own pixels before overlaying (zeros for an absent second digit), labels (n, 2)
    int64 with -1 for an absent digit, the images' indices in the split, and the MNIST digits' source)."""
    from ..data.diverse_multimnist import DIGIT_SIZE, make_split
    from ..data.mnist import load_mnist

    digits = load_mnist(split, source)
    size = count + count // 4 + 8  # a sixth of the images hold one digit
    while True:
        batch = make_split(split, size, digits=digits, seed=seed)
        keep = np.flatnonzero(batch.num_digits == 2) if two_digit_only else np.arange(size)
        if len(keep) >= count:
            break
        size *= 2
    keep = keep[:count]
    canvas = batch.images.shape[-1]
    masks = np.zeros((len(keep), 2, canvas, canvas), np.float32)
    for n, k in enumerate(keep):
        for d in range(2):
            if batch.sources[k, d] >= 0:
                r, c = batch.offsets[k, d]
                masks[n, d, r : r + DIGIT_SIZE, c : c + DIGIT_SIZE] = digits.images[batch.sources[k, d]] / 255.0
    return batch.images[keep], masks, batch.classes[keep], keep.tolist(), digits.source


def load_images(model, paths: Sequence[str]) -> Tensor:
    """Image files preprocessed with timm's ``resolve_data_config`` + ``create_transform`` (eval)."""
    from timm.data import create_transform

    config = model_data_config(model)
    config.pop('fixed_input_size')
    transform = create_transform(**config, is_training=False)
    mode = 'L' if model.in_chans == 1 else 'RGB'
    return torch.stack([transform(_read_image(p, mode)) for p in paths])


MAX_IMAGE_PIXELS = 8192 * 8192  # PIL refuses twice its own 89M limit; a parse tree needs far fewer


def _read_image(path, mode: str):
    """The image at ``path`` in ``mode``; ``ValueError`` naming the file when it is not a readable image,
    is truncated, or has more than ``MAX_IMAGE_PIXELS`` pixels (checked from the header, before decoding)."""
    import warnings
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise ValueError(
                        f'{path}: {image.width}x{image.height} pixels, more than the {MAX_IMAGE_PIXELS} '
                        f'this tool reads (resize it first)'
                    )
                return image.convert(mode)
    except ValueError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f'{path}: not a readable image ({error})') from None


def prepare_arrays(model, images: np.ndarray, masks: Optional[np.ndarray] = None):
    """uint8 (n, S, S) grey images (and masks) -> model input (n, C, H, W) normalised with the model's data
    config; resized bilinearly when the model's input size differs from S."""
    config = model_data_config(model)
    x = torch.from_numpy(np.asarray(images)).float().div(255.0)[:, None]
    H, W = model.img_size
    if x.shape[-2:] != (H, W):
        x = F.interpolate(x, size=(H, W), mode='bilinear', align_corners=False, antialias=True)
        if masks is not None:
            masks = F.interpolate(
                torch.as_tensor(masks), size=(H, W), mode='bilinear', align_corners=False, antialias=True
            ).clamp_min(0)
    x = x.expand(-1, model.in_chans, -1, -1)
    mean = torch.tensor(config['mean']).view(1, -1, 1, 1)
    std = torch.tensor(config['std']).view(1, -1, 1, 1)
    x = (x - mean) / std
    return x, (None if masks is None else torch.as_tensor(masks))


def display_image(model, x: Tensor) -> np.ndarray:
    """Model input (C, H, W) back to [0, 1] for display."""
    config = model_data_config(model)
    mean = torch.tensor(config['mean']).view(-1, 1, 1)
    std = torch.tensor(config['std']).view(-1, 1, 1)
    img = (x.cpu().float() * std + mean).clamp(0, 1)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
