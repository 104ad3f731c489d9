"""timm_capsules.presets: the look-ups by value (the recipes themselves are checked against the paper in
tests/test_train.py, tests/test_hub_cards.py and tests/test_experiments.py)."""

import pytest

from timm_capsules.presets import PRESETS, QUICK, get_preset, preset_for_model


def test_get_preset_is_a_copy_and_none_is_the_quick_run():
    preset = get_preset('cifar10_resnet')
    assert preset == PRESETS['cifar10_resnet'] and preset is not PRESETS['cifar10_resnet']
    preset['lr'] = 123.0
    assert PRESETS['cifar10_resnet']['lr'] == 0.1
    quick = get_preset(None)
    assert quick == QUICK and quick is not QUICK


def test_an_unknown_preset_names_the_known_ones_in_order():
    with pytest.raises(KeyError) as error:
        get_preset('cifar10')
    known = ', '.join(sorted(PRESETS))
    assert error.value.args == (f"unknown preset 'cifar10'; known: {known}",)
    assert known.startswith('cifar100_cnn, cifar100_dynamic_resnet, ')


def test_preset_for_model_is_the_first_that_trains_it_or_none():
    assert preset_for_model('capsnet_resnet_cifar10') == 'cifar10_resnet'
    assert preset_for_model('cnn_fc_multimnist') == 'multimnist_cnn_fc'
    for name, preset in PRESETS.items():
        found = preset_for_model(preset['model'])
        assert PRESETS[found]['model'] == preset['model'] and list(PRESETS).index(found) <= list(PRESETS).index(name)
    assert preset_for_model('resnet50') is None  # timm's own model: no recipe here
