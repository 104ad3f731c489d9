"""timm_capsules.losses by hand: every loss, reduction, default and dispatch on small batches whose values are
worked out in the comments (the pure-Python module mutmut runs against these tests: tests/README.md)."""

import math

import pytest
import torch
import torch.nn.functional as F

from timm_capsules.losses import (
    EVALUATION_SPREAD_MARGIN,
    OUTPUT_TYPES,
    classification_loss,
    margin_loss,
    output_type_of,
    predicted_present,
    spread_loss,
    spread_margin,
)

LENGTHS = torch.tensor([[0.95, 0.5, 0.05], [0.3, 0.2, 0.8]])
# m+ 0.9, m- 0.1, lambda 0.5. Image 0 (class 0): 0 + 0.5 * 0.4^2 + 0 = 0.08; image 1 (class 2):
# 0.5 * 0.2^2 + 0.5 * 0.1^2 + 0.1^2 = 0.035
MARGIN_LOSSES = [0.08, 0.035]
ACTIVATIONS = torch.tensor([[0.5, 0.4, 0.45], [0.1, 0.7, 0.65]])
# targets 0 and 1. Margin 0.2: image 0: (0.2 - 0.1)^2 + (0.2 - 0.05)^2 = 0.0325; image 1: 0 + (0.2 - 0.05)^2 = 0.0225.
# Margin 0.9: image 0: 0.8^2 + 0.85^2 = 1.3625; image 1: 0.3^2 + 0.85^2 = 0.8125
SPREAD_02, SPREAD_09 = [0.0325, 0.0225], [1.3625, 0.8125]


def test_margin_loss_by_hand_for_indices_and_multi_hot_targets():
    for target in (torch.tensor([0, 2]), torch.tensor([[1.0, 0, 0], [0, 0, 1]])):
        assert margin_loss(LENGTHS, target, reduction='none').tolist() == pytest.approx(MARGIN_LOSSES)
        assert margin_loss(LENGTHS, target).item() == pytest.approx(sum(MARGIN_LOSSES) / 2)
    # m+ 0.8, m- 0.3, lambda 1: image 0: 0 + 0.2^2 + 0 = 0.04; image 1: 0 + 0 + 0 (both on their margins)
    other = margin_loss(LENGTHS, torch.tensor([0, 2]), m_pos=0.8, m_neg=0.3, down_weight=1.0, reduction='none')
    assert other.tolist() == pytest.approx([0.04, 0.0], abs=1e-7)


def test_losses_compute_in_float32_whatever_the_inputs():
    multi_hot = torch.tensor([[1.0, 0, 0], [0, 0, 1]], dtype=torch.float64)
    assert margin_loss(LENGTHS.half(), multi_hot).dtype == torch.float32
    assert spread_loss(ACTIVATIONS.half(), multi_hot).dtype == torch.float32
    for output_type in OUTPUT_TYPES:
        assert classification_loss(LENGTHS.half(), torch.tensor([0, 2]), output_type).dtype == torch.float32


def test_spread_loss_by_hand_default_margin_and_reductions():
    target = torch.tensor([0, 1])
    assert spread_loss(ACTIVATIONS, target, reduction='none').tolist() == pytest.approx(SPREAD_02)  # default 0.2
    assert spread_loss(ACTIVATIONS, target, 0.9, reduction='none').tolist() == pytest.approx(SPREAD_09)
    assert spread_loss(ACTIVATIONS, target, 0.9).item() == pytest.approx(sum(SPREAD_09) / 2)
    assert spread_loss(ACTIVATIONS, target).item() == pytest.approx(sum(SPREAD_02) / 2)
    # two targets in image 0 (classes 0 and 2, one non-target 1): (0.2 - 0.1)^2 + (0.2 - 0.05)^2
    two = spread_loss(ACTIVATIONS, torch.tensor([[1.0, 0, 1], [0, 1, 0]]), reduction='none')
    assert two.tolist() == pytest.approx([0.0325, 0.0225])
    # every gap at least the margin: no loss
    assert spread_loss(torch.tensor([[0.9, 0.1, 0.2]]), torch.tensor([0])).item() == 0.0


def test_classification_loss_dispatches_on_the_output_type():
    indices = torch.tensor([0, 2])
    lengths = classification_loss(LENGTHS, indices, 'lengths', reduction='none')
    assert lengths.tolist() == pytest.approx(MARGIN_LOSSES)
    assert classification_loss(LENGTHS, indices, 'lengths').item() == pytest.approx(sum(MARGIN_LOSSES) / 2)
    target = torch.tensor([0, 1])
    assert classification_loss(ACTIVATIONS, target, 'activations', reduction='none').tolist() == pytest.approx(
        SPREAD_02
    )  # the default margin
    assert classification_loss(ACTIVATIONS, target, 'activations', False, 0.9).item() == pytest.approx(
        sum(SPREAD_09) / 2
    )
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    # cross-entropy: -log softmax at the target; the default output type is logits, single-label
    ce = [-(2.0 - math.log(math.exp(2) + 1 + math.exp(-1))), -(0.0 - math.log(math.exp(0.5) + math.exp(1.5) + 1))]
    assert classification_loss(logits, indices, reduction='none').tolist() == pytest.approx(ce)
    assert classification_loss(logits, indices).item() == pytest.approx(sum(ce) / 2)
    # multi-label: binary cross-entropy per class, averaged over the classes
    multi_hot = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    bce = [
        sum(math.log1p(math.exp(-x if y else x)) for x, y in zip(row, labels)) / 3
        for row, labels in zip(logits.tolist(), multi_hot.tolist())
    ]
    assert classification_loss(logits, multi_hot, 'logits', True, reduction='none').tolist() == pytest.approx(bce)
    assert classification_loss(logits, multi_hot, multi_label=True).item() == pytest.approx(sum(bce) / 2)
    assert classification_loss(logits, multi_hot, multi_label=True).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, multi_hot).item()
    )  # a second way
    with pytest.raises(
        ValueError,
        match=r"output_type must be one of \('logits', 'lengths', 'activations'\), got "
        r"'LENGTHS'",
    ):
        classification_loss(LENGTHS, indices, 'LENGTHS')


def test_predicted_present_thresholds():
    assert predicted_present(torch.tensor([[-0.1, 0.0, 0.1]])).tolist() == [[False, False, True]]  # logits: > 0
    for output_type in ('lengths', 'activations'):  # > 0.5
        assert predicted_present(torch.tensor([[0.4, 0.5, 0.6]]), output_type).tolist() == [[False, False, True]]
    assert OUTPUT_TYPES == ('logits', 'lengths', 'activations')


def test_spread_margin_rises_from_0_2_to_0_9_by_optimizer_step():
    """Hinton et al.'s schedule: 0.2 at the first step, linear in the step, 0.9 at the last (and after it); a
    model is evaluated at that final margin."""
    assert spread_margin(0, 100) == 0.2
    assert spread_margin(50, 100) == pytest.approx(0.55)
    assert spread_margin(99, 100) == pytest.approx(0.2 + 0.7 * 99 / 100)
    assert spread_margin(100, 100) == pytest.approx(0.9) and spread_margin(150, 100) == pytest.approx(0.9)
    assert [spread_margin(s, 4) for s in range(4)] == pytest.approx([0.2, 0.375, 0.55, 0.725])
    assert EVALUATION_SPREAD_MARGIN == 0.9


def test_output_type_of_asks_the_model():
    class Activations(torch.nn.Module):
        output_type = 'activations'

    assert output_type_of(Activations()) == 'activations'
    assert output_type_of(torch.nn.Linear(2, 2)) == 'logits'  # timm's own models: logits
