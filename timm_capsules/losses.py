"""Training losses for what each model family returns (its ``output_type``).

- ``'logits'`` (the IDA CapsNets, the CNNs): cross-entropy, or binary cross-entropy per class when an image
  may show several classes (DiverseMultiMNIST);
- ``'lengths'`` (dynamic routing, Sabour et al. 2017): class-capsule lengths in [0, 1), margin loss;
- ``'activations'`` (EM routing, Hinton et al. 2018): class activations in (0, 1), spread loss.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'margin_loss',
    'spread_loss',
    'classification_loss',
    'predicted_present',
    'spread_margin',
    'output_type_of',
    'OUTPUT_TYPES',
    'EVALUATION_SPREAD_MARGIN',
]

OUTPUT_TYPES = ('logits', 'lengths', 'activations')
# Hinton et al. raise the spread loss's margin from 0.2 to 0.9 during training (spread_margin); a model is scored
# at the final margin
SPREAD_MARGIN_START, SPREAD_MARGIN_RISE = 0.2, 0.7
EVALUATION_SPREAD_MARGIN = 0.9


def _multi_hot(target: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """Class indices (B,) or a multi-hot matrix (B, classes) -> a multi-hot matrix."""
    if target.ndim == 1:
        return F.one_hot(target.long(), num_classes).to(dtype)
    return target.to(dtype)


def margin_loss(
    lengths: Tensor,
    target: Tensor,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    down_weight: float = 0.5,
    reduction: str = 'mean',
) -> Tensor:
    """Sabour et al.'s margin loss on class-capsule lengths (B, classes), averaged over the batch
    (``reduction='none'``: one value per image).

    L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2, summed over classes.
    ``target``: class indices (B,) or a multi-hot matrix (B, classes) (several digits per image).
    """
    lengths = lengths.float()
    present = _multi_hot(target, lengths.shape[-1], lengths.dtype)
    loss = present * F.relu(m_pos - lengths).pow(2) + down_weight * (1 - present) * F.relu(lengths - m_neg).pow(2)
    loss = loss.sum(-1)
    return loss.mean() if reduction == 'mean' else loss


def spread_loss(activations: Tensor, target: Tensor, margin: float = 0.2, reduction: str = 'mean') -> Tensor:
    """Hinton et al.'s spread loss on class activations (B, classes), averaged over the batch
    (``reduction='none'``: one value per image).

    L = sum over targets t and non-targets i of max(0, m - (a_t - a_i))^2. The paper raises the margin m
    from 0.2 to 0.9 during training. ``target``: class indices (B,) or a multi-hot matrix (B, classes).
    """
    activations = activations.float()
    present = _multi_hot(target, activations.shape[-1], activations.dtype)
    gap = activations[:, :, None] - activations[:, None, :]  # a_t - a_i for every (t, i)
    pairs = present[:, :, None] * (1 - present[:, None, :])
    loss = (pairs * F.relu(margin - gap).pow(2)).sum((1, 2))
    return loss.mean() if reduction == 'mean' else loss


def classification_loss(
    outputs: Tensor,
    targets: Tensor,
    output_type: str = 'logits',
    multi_label: bool = False,
    margin: float = 0.2,
    reduction: str = 'mean',
) -> Tensor:
    """The paper's loss for a model's outputs (B, classes): see the module docstring. ``margin`` is the
    spread loss's, which grows during training; ``reduction='none'`` gives one value per image."""
    outputs = outputs.float()
    if output_type == 'lengths':
        loss = margin_loss(outputs, targets, reduction='none')
    elif output_type == 'activations':
        loss = spread_loss(outputs, targets, margin, reduction='none')
    elif output_type != 'logits':
        raise ValueError(f'output_type must be one of {OUTPUT_TYPES}, got {output_type!r}')
    elif multi_label:
        loss = F.binary_cross_entropy_with_logits(outputs, targets.float(), reduction='none').mean(1)
    else:
        loss = F.cross_entropy(outputs, targets, reduction='none')
    return loss.mean() if reduction == 'mean' else loss


def predicted_present(outputs: Tensor, output_type: str = 'logits') -> Tensor:
    """The classes predicted present in each image: logit > 0, or capsule length / activation > 0.5."""
    return outputs > (0.0 if output_type == 'logits' else 0.5)


def spread_margin(step: int, total_steps: int) -> float:
    """The spread loss's margin at optimizer step ``step`` of ``total_steps``: 0.2 at the start, rising linearly
    to 0.9 at the last step (and staying there). Only the spread loss ('activations') reads it."""
    return SPREAD_MARGIN_START + SPREAD_MARGIN_RISE * min(1.0, step / total_steps)


def output_type_of(model) -> str:
    """What ``model`` returns (see OUTPUT_TYPES): its ``output_type``; timm's own models return logits."""
    return getattr(model, 'output_type', 'logits')
