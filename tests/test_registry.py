"""The dataset registry (data/registry.py) is the one home of the datasets' facts: the models' pretrained cfgs,
the training data's Hub columns, the parse tree and the Hub configs agree with it."""

import json
from pathlib import Path

import pytest
import timm
from timm.models import get_pretrained_cfg

import timm_capsules  # noqa: F401  (registers the models)
from timm_capsules.data.cifar import KNOWN_DATASETS
from timm_capsules.data.registry import ALIASES, DATASETS, chance_level, dataset_cfg, dataset_info, hub_columns
from timm_capsules.parse_tree.inputs import DATASETS as PARSE_TREE_DATASETS

HUB_CONFIGS = sorted((Path(__file__).parents[1] / 'hub_configs').glob('*.json'))
TAGS = [name for name in timm.list_models(pretrained=True) if name.split('.')[-1] in DATASETS]


def test_every_pretrained_tag_of_the_package_names_a_registered_dataset():
    ours = [
        name
        for name in timm.list_models(pretrained=True)
        if (get_pretrained_cfg(name).hf_hub_id or '').startswith('timm-capsules/')
    ]
    assert len(ours) >= 21 and sorted(ours) == sorted(TAGS)


@pytest.mark.parametrize('tag', TAGS)
def test_pretrained_cfgs_take_the_registry_facts_of_their_dataset(tag):
    info, cfg = dataset_info(tag.split('.')[-1]), get_pretrained_cfg(tag)
    assert cfg.num_classes == info.num_classes and tuple(cfg.label_names) == info.label_names
    assert tuple(cfg.input_size) == info.input_size
    assert tuple(cfg.mean) == info.mean and tuple(cfg.std) == info.std


def test_the_training_and_parse_tree_views_are_the_registry():
    assert KNOWN_DATASETS == {
        'cifar10': ('uoft-cs/cifar10', 'img', 'label'),
        'cifar100': ('uoft-cs/cifar100', 'img', 'fine_label'),
    }
    assert set(PARSE_TREE_DATASETS) == set(DATASETS)
    for name, facts in PARSE_TREE_DATASETS.items():
        assert facts == dict(multi_label=DATASETS[name].multi_label, label_names=DATASETS[name].label_names)
    assert DATASETS['diverse_multimnist'].multi_label and not DATASETS['cifar100'].multi_label


@pytest.mark.parametrize('path', HUB_CONFIGS, ids=lambda p: p.stem)
def test_hub_configs_describe_their_dataset_as_the_registry_does(path):
    config = json.loads(path.read_text())
    info = dataset_info(config['tag'].split('.')[-1])
    dataset = config['dataset']
    assert dataset['name'] == info.title and tuple(dataset['hub_ids']) == info.sources
    assert dataset['num_classes'] == info.num_classes
    assert tuple(config['architecture']['input_size']) == info.input_size


def test_aliases_unknown_names_and_generated_datasets():
    assert (
        ALIASES['multimnist'] == 'diverse_multimnist' and dataset_info('multimnist') is DATASETS['diverse_multimnist']
    )
    with pytest.raises(KeyError, match='unknown dataset'):
        dataset_info('imagenet')
    with pytest.raises(KeyError, match='generated here'):
        hub_columns('diverse_multimnist')
    assert dataset_cfg('cifar100', pool_size=(1, 1))['pool_size'] == (1, 1)
    assert dataset_cfg('diverse_multimnist')['input_size'] == (1, 36, 36)


def test_chance_level_is_the_share_of_the_most_frequent_label_or_label_set():
    assert chance_level([3, 3, 1, 2]) == 0.5
    assert chance_level([(1, 2), (1, 2), (2,), (1, 2), (0, 5)]) == 0.6
    assert chance_level([]) == 0.0
    assert DATASETS['diverse_multimnist'].chance_rule == 'always the most frequent label set'
    assert DATASETS['cifar10'].chance_rule == 'always the most frequent label'
