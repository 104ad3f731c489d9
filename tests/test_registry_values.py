"""``timm_capsules/data/registry.py`` called directly, checked by value: each dataset's derived facts against what
is known of the dataset itself, the exact messages of the look-ups, ``dataset_cfg``'s fields and overrides, and
``chance_level`` against a count done by hand. Written for a mutmut run (tests/README.md); fast, nothing is built."""

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from timm_capsules.data import registry
from timm_capsules.data.registry import ALIASES, DATASETS, chance_level, dataset_cfg, dataset_info, hub_columns

# what is known of each dataset, written down here rather than read from the registry
KNOWN = {
    'cifar10': dict(classes=10, channels=3, first='airplane', last='truck'),
    'cifar100': dict(classes=100, channels=3, first='apple', last='worm'),
    'diverse_multimnist': dict(classes=10, channels=1, first='0', last='9'),
}


@pytest.mark.parametrize('name', sorted(KNOWN))
def test_classes_and_channels_are_what_the_dataset_has(name):
    info, known = DATASETS[name], KNOWN[name]
    assert info.num_classes == known['classes'] and info.channels == known['channels']
    assert (info.label_names[0], info.label_names[-1]) == (known['first'], known['last'])
    assert len(info.mean) == len(info.std) == known['channels']


def test_chance_rule_names_a_label_or_a_label_set():
    assert DATASETS['cifar10'].chance_rule == 'always the most frequent label'
    assert DATASETS['cifar100'].chance_rule == 'always the most frequent label'
    assert DATASETS['diverse_multimnist'].chance_rule == 'always the most frequent label set'


@pytest.mark.parametrize('name', sorted(KNOWN))
def test_dataset_info_returns_the_entry_itself(name):
    assert dataset_info(name) is DATASETS[name] and dataset_info(name).name == name


def test_an_alias_is_the_entry_it_names():
    assert dataset_info('multimnist') is DATASETS['diverse_multimnist']
    assert set(ALIASES.values()) <= set(DATASETS)


@pytest.mark.parametrize('name', ['imagenet', 'CIFAR10', '', 'diverse-multimnist'])
def test_an_unknown_name_is_a_key_error_listing_every_known_name(name):
    with pytest.raises(KeyError) as info:
        dataset_info(name)
    expected = f"unknown dataset {name!r}: known are ['cifar10', 'cifar100', 'diverse_multimnist'] (and ['multimnist'])"
    assert info.value.args == (expected,)


@pytest.mark.parametrize('name', sorted(KNOWN))
def test_dataset_cfg_holds_exactly_the_five_fields_of_the_entry(name):
    info = DATASETS[name]
    cfg = dataset_cfg(name)
    assert cfg == {
        'num_classes': KNOWN[name]['classes'],
        'label_names': info.label_names,
        'input_size': info.input_size,
        'mean': info.mean,
        'std': info.std,
    }
    assert cfg['num_classes'] == len(cfg['label_names'])


def test_dataset_cfg_takes_aliases_and_lets_overrides_add_and_win():
    assert dataset_cfg('multimnist') == dataset_cfg('diverse_multimnist')
    cfg = dataset_cfg('cifar100', pool_size=(1, 1), num_classes=7, input_size=(3, 64, 64))
    assert cfg['pool_size'] == (1, 1) and cfg['num_classes'] == 7 and cfg['input_size'] == (3, 64, 64)
    assert cfg['mean'] == DATASETS['cifar100'].mean and len(cfg) == 6
    # mean and std are overridden like the other fields (once a TypeError: dict() got multiple values for 'mean')
    cfg = dataset_cfg('cifar10', mean=(0.5,) * 3, std=(0.25,) * 3)
    assert cfg['mean'] == (0.5,) * 3 and cfg['std'] == (0.25,) * 3 and cfg['num_classes'] == 10
    with pytest.raises(KeyError, match='unknown dataset'):
        dataset_cfg('svhn')


def test_hub_columns_by_hand():
    assert hub_columns('cifar10') == ('uoft-cs/cifar10', 'img', 'label')
    assert hub_columns('cifar100') == ('uoft-cs/cifar100', 'img', 'fine_label')


@pytest.mark.parametrize('name', ['diverse_multimnist', 'multimnist'])
def test_a_generated_dataset_has_no_hub_columns(name):
    with pytest.raises(KeyError) as info:
        hub_columns(name)
    assert info.value.args == (f'{name!r} is generated here, not loaded from the Hub',)


def test_chance_level_by_hand():
    assert chance_level([3, 3, 1, 2]) == 0.5
    assert chance_level([7]) == 1.0
    assert chance_level([1, 2, 3, 4]) == 0.25
    assert chance_level([(1, 2), (1, 2), (2,), (1, 2), (0, 5)]) == 0.6
    assert chance_level([]) == 0.0 and isinstance(chance_level([]), float)
    assert chance_level(()) == 0.0


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=30))
def test_chance_level_is_the_largest_share_counted_by_hand(labels):
    best = Fraction(0)
    for label in set(labels):
        best = max(best, Fraction(sum(1 for other in labels if other == label), len(labels)))
    assert chance_level(labels) == pytest.approx(float(best), abs=1e-12)
    assert chance_level(labels) >= 1 / len(set(labels))


def test_the_module_exports_what_it_names():
    assert all(hasattr(registry, name) for name in registry.__all__)
