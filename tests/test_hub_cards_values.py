"""``timm_capsules/hub_cards.py`` checked by value: the card of a 1-channel and of a 3-channel model field by
field against text written out here from their hub configs and presets, the other families' losses and sections,
the numbers, the family line, the nesting of the details and every message of ``validate_card``. Written for a
mutmut run (tests/README.md); fast, no model is built."""

import copy
import re

import pytest
from huggingface_hub import ModelCard

import timm_capsules  # noqa: F401  (registers the models and their tags)
from timm_capsules import hub, hub_cards
from timm_capsules.citation import BIBTEX
from timm_capsules.loading import ConfigError
from timm_capsules.presets import get_preset

MULTIMNIST, CIFAR10 = 'capsnet_vector_multimnist.diverse_multimnist', 'capsnet_simple_cifar10.cifar10'
COMMAND = 'accelerate launch train_accelerate.py --preset {} --output_dir <output_dir>'


def recipe_lines(preset):
    """The preset's values, one bullet each, but the model and the dataset (a loop over the preset)."""
    lines = []
    for key, value in get_preset(preset).items():
        if key != 'model' and key != 'dataset':
            lines.append(f'  - {key}: {value}')
    return '\n'.join(lines)


def sections(text):
    """The card's body cut at its '## ' headings: {heading: text up to the next one}."""
    body = ModelCard(text).text
    parts = re.split(r'^## (.*)$', body, flags=re.M)
    return {'': parts[0], **{parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}}


def usage(tag, mode, channels, size, predict, routing):
    """The usage section as the card must print it, written out for one model."""
    text = f"""
### Image Classification
```python
import timm
import torch
from PIL import Image

import timm_capsules  # registers the architectures with timm

model = timm.create_model("{tag}", pretrained=True)  # or "hf-hub:timm-capsules/{tag}"
model = model.eval()

data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

img = Image.open("image.png").convert("{mode}")  # any image; resized to {size}x{size}
with torch.no_grad():
    logits = model(transforms(img).unsqueeze(0))
{predict}
```

### Feature Map Extraction
```python
model = timm.create_model("{tag}", pretrained=True, features_only=True).eval()
x = torch.randn(1, {channels}, {size}, {size})
for feature_map in model(x):  # one per feature level (capsule levels: channel n * d + e is entry e of capsule type n)
    print(feature_map.shape)
```

### Image Embeddings
```python
model = timm.create_model("{tag}", pretrained=True).eval()
features = model.forward_features(x)
embedding = model.forward_head(features, pre_logits=True)
# or equivalently: timm.create_model("{tag}", pretrained=True, num_classes=0)
```
"""
    if routing:
        text += """
### Routing Introspection
```python
trace = model.forward_routing(x)  # a RoutingTrace; trace.logits equals model(x)
for name, coefficients in zip(trace.layer_names[1:], trace.coefficients[-1]):
    # (batch, H, W, children, parents) routing coefficients of the last iteration; rows sum to 1
    print(name, tuple(coefficients.shape))
poses = trace.poses[-1][-1]  # class capsule poses (batch, 1, 1, classes, d)
```
"""
    return text + '\n'


MULTI_LABEL = 'labels = (logits.sigmoid() > 0.5).nonzero()  # multi-label: every digit present in the image'
TOP5 = 'top5_probabilities, top5_class_indices = logits.softmax(dim=1).topk(5)'
PAPER = '(the models of [Tsai et al., ICLR 2020](https://arxiv.org/abs/2002.04764))'
PAPERS_AND_ORIGIN = """\
- **Papers:**
  - Capsules with Inverted Dot-Product Attention Routing: https://arxiv.org/abs/2002.04764
"""
ORIGIN = '- **Original:** https://github.com/apple/ml-capsules-inverted-attention-routing\n'


# ---- the 1-channel model, not yet published -----------------------------------------------------------


def test_card_of_the_one_channel_model_field_by_field():
    cfg = hub.load_hub_config(MULTIMNIST)
    text = hub_cards.model_card(cfg, published=False)
    assert text.startswith(
        '---\ndatasets:\n- ylecun/mnist\nlibrary_name: timm\nlicense: apache-2.0\nmetrics:\n- accuracy\n'
        'pipeline_tag: image-classification\ntags:\n- image-classification\n- timm\n- capsule-network\n'
        '- arxiv:2002.04764\n- mnist\n- multi-label\n---\n\n# Model card for ' + MULTIMNIST + '\n\n'
    )
    data = ModelCard(text).data
    assert data.model_name is None and data.eval_results is None
    command = COMMAND.format('multimnist_vector')
    part = sections(text)
    assert part[''] == (
        f'\n# Model card for {MULTIMNIST}\n\nCapsule network with inverted dot-product attention routing, for '
        f'DiverseMultiMNIST, built as a timm model by the `timm_capsules` package {PAPER}. **Status: not yet '
        f'published.** No weights have been trained for this tag yet. Train them with `{command}`.\n\n'
    )
    assert part['Model Details'] == (
        '\n- **Model Type:** Multi-label image classification / feature backbone\n'
        '- **Model Stats:**\n'
        '  - Params (M): 42.48\n'
        '  - Params: 42,478,017\n'
        '  - Routing: inverted dot-product attention, concurrent\n'
        '  - Routing iterations: 2\n'
        '  - Pose: 64-d vector\n'
        '  - Image size: 36 x 36 (1 channel)\n'
        '- **Architecture:**\n'
        '  - backbone: conv3x3 s2, 1->1024, ReLU (36x36 -> 18x18)\n'
        '  - capsules: primary conv3x3 s2 16x(64-d vector); conv caps 16 k3 s1; class caps 10\n'
        + PAPERS_AND_ORIGIN
        + '- **Dataset:** DiverseMultiMNIST\n'
        + ORIGIN
        + '- **Training:**\n'
        '  - Preset: `multimnist_vector`\n'
        f'  - Command: `{command}`\n' + recipe_lines('multimnist_vector') + '\n'
        '  - loss: binary cross-entropy per class\n'
        '  - mean: [0.0]\n'
        '  - std: [1.0]\n\n'
    )
    assert part['Model Usage'] == usage(MULTIMNIST, 'L', 1, 36, MULTI_LABEL, routing=True)
    metric = 'exact-match accuracy (%): thresholded prediction equals the label set'
    assert part['Model Comparison'] == (
        '\n| | metric | mean ± std | best | seeds | these weights |\n|---|---|---|---|---|---|\n'
        f'| timm_capsules (`multimnist_vector`) | {metric} | — | — | — | not yet published |\n'
        f'| paper (Tsai et al., 2020) | {metric} | — | — | — | — |\n\n'
        'Evaluated on DiverseMultiMNIST fixed 10,000-image test set from MNIST test digits (seed 0). No measured '
        'results yet: this project has not trained this model yet (— means no number). No paper number is '
        'recorded for this configuration in its hub config.\n\n'
    )
    assert part['Citation'] == f'\n```bibtex\n{BIBTEX}\n```\n'


def test_published_multimnist_card_evaluates_on_its_own_test_set():
    """The eval result names the hub config's eval_id (the generated test set), not MNIST's Hub id."""
    cfg = hub.load_hub_config(MULTIMNIST)
    cfg['results'].update(num_seeds=1, mean=91.0, std=None, best=91.0, checkpoint=91.0, per_seed=[91.0])
    result = ModelCard(hub_cards.model_card(cfg, published=True)).data.eval_results[0]
    assert (result.dataset_type, result.dataset_name) == ('diverse_multimnist', 'DiverseMultiMNIST')


# ---- the 3-channel model, published, with results -----------------------------------------------------


def cifar10_with_results():
    cfg = hub.load_hub_config(CIFAR10)
    cfg['results'].update(
        num_seeds=3, mean=94.85, std=0.2249, best=95.02, checkpoint=95.017, per_seed=[94.61, 94.93, 95.02]
    )
    del cfg['results']['eval_split']  # then 'test'
    cfg['paper_results'].update(source='Table 2 of the paper', mean=84.0, std=None, best=85.0, num_seeds=5)
    return cfg


def test_card_of_the_three_channel_model_published_with_results():
    cfg = cifar10_with_results()
    text = hub_cards.model_card(cfg, published=True)
    assert text.startswith('---\ndatasets:\n- uoft-cs/cifar10\n')
    data = ModelCard(text).data
    assert (data.library_name, data.license, data.pipeline_tag, data.metrics) == (
        'timm',
        'apache-2.0',
        'image-classification',
        ['accuracy'],
    )
    assert data.tags == cfg['tags'] and data.datasets == ['uoft-cs/cifar10'] and data.model_name == CIFAR10
    [result] = data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_name, result.dataset_split) == (
        'image-classification',
        'uoft-cs/cifar10',
        'CIFAR-10',
        'test',
    )
    assert (result.metric_type, result.metric_name, result.metric_value) == ('accuracy', 'top-1 accuracy (%)', 95.017)
    command = COMMAND.format('cifar10_simple')
    part = sections(text)
    assert part[''] == (
        f'\n# Model card for {CIFAR10}\n\nCapsule network with inverted dot-product attention routing, for '
        f'CIFAR-10, built as a timm model by the `timm_capsules` package {PAPER}. Weights: published in this '
        'repository.\n\n'
    )
    assert part['Model Details'] == (
        '\n- **Model Type:** Image classification / feature backbone\n'
        '- **Model Stats:**\n'
        '  - Params (M): 0.56\n'
        '  - Params: 561,297\n'
        '  - Routing: inverted dot-product attention, concurrent\n'
        '  - Routing iterations: 2\n'
        '  - Pose: 4x4 matrix\n'
        '  - Image size: 32 x 32 (3 channels)\n'
        '- **Architecture:**\n'
        '  - backbone: simple: conv3x3 s2, 3->256, ReLU\n'
        '  - capsules: primary 32x(4x4); conv caps 32 k3 s2; conv caps 32 k3 s1; class caps 10\n'
        + PAPERS_AND_ORIGIN
        + '- **Dataset:** CIFAR-10\n'
        + ORIGIN
        + '- **Training:**\n'
        '  - Preset: `cifar10_simple`\n'
        f'  - Command: `{command}`\n' + recipe_lines('cifar10_simple') + '\n'
        '  - loss: cross-entropy\n'
        '  - train_augmentation: pad 4 + random crop 32 + horizontal flip\n'
        '  - mean: [0.4914, 0.4822, 0.4465]\n'
        '  - std: [0.2023, 0.1994, 0.201]\n\n'
    )
    assert part['Model Usage'] == usage(CIFAR10, 'RGB', 3, 32, TOP5, routing=True)
    assert part['Model Comparison'] == (
        '\n| | metric | mean ± std | best | seeds | these weights |\n|---|---|---|---|---|---|\n'
        '| timm_capsules (`cifar10_simple`) | top-1 accuracy (%) | 94.85 ± 0.22 | 95.02 | 3 | 95.02 |\n'
        '| paper (Tsai et al., 2020) | top-1 accuracy (%) | 84.00 | 85.00 | 5 | — |\n\n'
        'Evaluated on CIFAR-10 test. Paper numbers: Table 2 of the paper.\n\n'
    )


def test_unpublished_or_unmeasured_weights_get_no_eval_result():
    cfg = cifar10_with_results()
    unpublished = hub_cards.model_card(cfg, published=False)
    assert ModelCard(unpublished).data.eval_results is None and ModelCard(unpublished).data.model_name is None
    assert '| 3 | not yet published |' in unpublished and '**Status: not yet published.**' in unpublished
    cfg['results']['checkpoint'] = None
    published = hub_cards.model_card(cfg, published=True)
    assert ModelCard(published).data.eval_results is None
    assert '| timm_capsules (`cifar10_simple`) | top-1 accuracy (%) | 94.85 ± 0.22 | 95.02 | 3 | — |' in published


# ---- the other families -------------------------------------------------------------------------------


def family_cfg(tag, preset, **architecture):
    """A hub config for another family's registered tag (model_card reads the counts from the config only)."""
    base = hub.load_hub_config(MULTIMNIST if 'multimnist' in tag else CIFAR10)
    cfg = copy.deepcopy(base)
    cfg.update(tag=tag, model=tag.split('.')[0], repo_id=f'timm-capsules/{tag}', training={'preset': preset})
    cfg['architecture'] = dict(input_size=base['architecture']['input_size'], **architecture)
    cfg['dataset'].pop('train_augmentation', None)
    return cfg


@pytest.mark.parametrize(
    'tag, preset, loss, family, multilabel',
    [
        (
            'dynamic_capsnet_simple_cifar10.cifar10',
            'cifar10_dynamic_simple',
            'margin loss (Sabour et al., 2017)',
            'Capsule network with vector poses and dynamic routing (Sabour et al., 2017)',
            False,
        ),
        (
            'em_capsnet_simple_cifar10.cifar10',
            'cifar10_em_simple',
            'spread loss (Hinton et al., 2018)',
            'Capsule network with 4x4 matrix poses, activations and EM routing (Hinton et al., 2018)',
            False,
        ),
        (
            'dynamic_capsnet_vector_multimnist.diverse_multimnist',
            'multimnist_dynamic_vector',
            'margin loss (Sabour et al., 2017)',  # lengths, multi-label: still the margin loss
            'Capsule network with vector poses and dynamic routing (Sabour et al., 2017)',
            True,
        ),
    ],
)
def test_other_capsule_families_name_their_loss_and_skip_the_routing_section(tag, preset, loss, family, multilabel):
    cfg = family_cfg(tag, preset, params=1_235_001, routing='', routing_iterations=3, backbone='a stem', capsules='')
    text = hub_cards.model_card(cfg, published=False)
    part = sections(text)
    assert part[''].split('\n')[3].startswith(f'{family}, for {cfg["dataset"]["name"]}, built as a timm model')
    kind = 'Multi-label image classification' if multilabel else 'Image classification'
    size, channels = ('36 x 36 (1 channel)', 1) if multilabel else ('32 x 32 (3 channels)', 3)
    assert part['Model Details'].startswith(
        f'\n- **Model Type:** {kind} / feature backbone\n'
        '- **Model Stats:**\n'
        '  - Params (M): 1.24\n'  # 1.235001 rounded
        '  - Params: 1,235,001\n'
        '  - Routing iterations: 3\n'  # an empty routing and no pose are left out
        f'  - Image size: {size}\n'
        '- **Architecture:**\n'
        '  - backbone: a stem\n'  # an empty capsules line is left out
        '- **Papers:**\n'
    )
    assert (
        f'  - Command: `{COMMAND.format(preset)}`\n' + recipe_lines(preset) + f'\n  - loss: {loss}\n  - mean: '
        in (part['Model Details'])
    )
    assert 'train_augmentation' not in text
    predict = MULTI_LABEL if multilabel else TOP5
    size = 36 if multilabel else 32
    assert part['Model Usage'] == usage(tag, 'L' if multilabel else 'RGB', channels, size, predict, routing=False)


def test_a_family_without_routing_iterations_states_none():
    cfg = family_cfg('cnn_baseline_cifar10.cifar10', 'cifar10_cnn', params=18_919_434, routing='dynamic', pose='')
    stats = sections(hub_cards.model_card(cfg, published=False))['Model Details'].split('- **Papers:**')[0]
    assert stats == (
        '\n- **Model Type:** Image classification / feature backbone\n- **Model Stats:**\n'
        '  - Params (M): 18.92\n  - Params: 18,919,434\n  - Image size: 32 x 32 (3 channels)\n'
    )


def test_a_class_without_docstring_or_output_type_is_named_by_its_class_and_takes_cross_entropy(monkeypatch):
    cfg = family_cfg('cnn_baseline_cifar10.cifar10', 'cifar10_cnn', params=10, pose='p')
    monkeypatch.setattr(hub_cards, 'model_class', lambda architecture: type('PlainNet', (), {}))
    text = hub_cards.model_card(cfg, published=False)
    assert '\n\nPlainNet, for CIFAR-10, built as a timm model' in text
    assert '  - warmup_epochs: 0\n  - loss: cross-entropy\n  - mean: [0.4914, 0.4822, 0.4465]\n' in text
    assert '  - Params (M): 0.0\n  - Params: 10\n  - Pose: p\n  - Image size: 32 x 32 (3 channels)\n' in text


# ---- the pieces ---------------------------------------------------------------------------------------


def test_numbers_print_with_two_decimals_and_a_dash_for_none():
    assert [hub_cards.fmt(v) for v in (None, 93.456, 7, 0.005, -1.0, 0)] == [
        '—',
        '93.46',
        '7.00',
        '0.01',
        '-1.00',
        '0.00',
    ]
    assert hub_cards.mean_std({}) == '—' and hub_cards.mean_std({'mean': None, 'std': 0.5}) == '—'
    assert hub_cards.mean_std({'mean': 94.851}) == '94.85' == hub_cards.mean_std({'mean': 94.851, 'std': None})
    assert hub_cards.mean_std({'mean': 0.0, 'std': 0.0}) == '0.00 ± 0.00'
    assert hub_cards.mean_std({'mean': 94.851, 'std': 0.2249}) == '94.85 ± 0.22'


@pytest.mark.parametrize(
    'doc, family',
    [
        ('\n    Two lines\n    of a first paragraph\n\n    Second paragraph', 'Two lines     of a first paragraph'),
        ('A net.\n\nMore', 'A net'),
        ('A net. It routes. Often', 'A net'),
        ('A net: with details. More', 'A net'),
        ('A net (v2)...', 'A net (v2)'),
        ('A net.x. y', 'A net.x'),
        ('Pooling by MAX.', 'Pooling by MAX'),
        (None, 'Fake'),
        ('', 'Fake'),
    ],
)
def test_family_is_the_first_sentence_of_the_docstring(doc, family, monkeypatch):
    fake = type('Fake', (), {'__doc__': doc})
    monkeypatch.setattr(hub_cards, 'model_class', lambda architecture: {'any': fake}[architecture])
    assert hub_cards._family('any') == family


def test_bullets_nest_two_spaces_a_level_and_bold_only_the_top_level():
    items = {'A': 1, 'B': {'c': 2, 'd': {'e': [3]}}, 'F': 'x'}
    assert hub_cards._bullets(items) == '- **A:** 1\n- **B:**\n  - c: 2\n  - **d:**\n    - e: [3]\n- **F:** x'
    assert hub_cards._bullets({'g': 4}, '  ') == '  - g: 4'
    assert hub_cards._bullets({'A': 1, 'B': {}, 'C': {'d': {}, 'e': 2}}) == '- **A:** 1\n- **C:**\n  - e: 2'


def test_a_config_with_neither_backbone_nor_capsules_has_no_architecture_heading():
    cfg = family_cfg('cnn_baseline_cifar10.cifar10', 'cifar10_cnn', params=10, backbone='', capsules='')
    details = sections(hub_cards.model_card(cfg, published=False))['Model Details']
    assert 'Architecture' not in details
    assert '  - Image size: 32 x 32 (3 channels)\n- **Papers:**\n' in details


def test_multilabel_comes_from_the_dataset_the_tag_names():
    assert hub_cards._multilabel({'tag': 'a.b.diverse_multimnist'}) is True
    assert hub_cards._multilabel({'tag': 'diverse_multimnist.cifar10'}) is False


# ---- validate_card ------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def valid():
    cfg = hub.load_hub_config(MULTIMNIST)
    return cfg, hub_cards.model_card(cfg, published=False)


def test_validate_card_returns_the_parsed_card(valid):
    cfg, text = valid
    card = hub_cards.validate_card(text, cfg)
    assert isinstance(card, ModelCard) and card.data.library_name == 'timm' and card.text == ModelCard(text).text


@pytest.mark.parametrize(
    'old, new, message',
    [
        ('library_name: timm', 'library_name: torch', "library_name is 'torch', not timm"),
        ('license: apache-2.0', 'license: mit', "license is 'mit'"),
        ('pipeline_tag: image-classification', 'pipeline_tag: other', "pipeline_tag is 'other'"),
        (
            '- multi-label\n',
            '',
            "tags ['image-classification', 'timm', 'capsule-network', 'arxiv:2002.04764', 'mnist'] miss some of "
            "['image-classification', 'timm', 'capsule-network', 'arxiv:2002.04764', 'mnist', 'multi-label']",
        ),
        ('- ylecun/mnist\n', '- ylecun/mnist\n- other/data\n', r"datasets are ['ylecun/mnist', 'other/data']"),
        (f'# Model card for {MULTIMNIST}', '# Card', f"missing '# Model card for {MULTIMNIST}'"),
        ('## Model Details', '## Details', "missing '## Model Details'"),
        ('## Model Usage', '## Usage', "missing '## Model Usage'"),
        ('features_only=True', 'features_only=1', "missing 'features_only=True'"),
        ('## Citation', '## Cite', "missing '## Citation'"),
        ('year      = {2020}', 'year = {2020}', 'missing ' + repr(BIBTEX)),
        ('--preset multimnist_vector', '--preset other', "missing '" + COMMAND.format('multimnist_vector') + "'"),
        ('forward_routing', 'forward', "missing 'forward_routing'"),
    ],
)
def test_validate_card_names_what_is_wrong(valid, old, new, message):
    cfg, text = valid
    assert old in text
    with pytest.raises(ConfigError) as error:
        hub_cards.validate_card(text.replace(old, new), cfg)
    assert str(error.value) == f'model card of {MULTIMNIST}: {message}'


def test_validate_card_without_tags_or_datasets(valid):
    cfg, text = valid
    bare = re.sub(r'tags:\n(- .*\n)+', '', text)
    with pytest.raises(ConfigError, match=r'tags None miss some of'):
        hub_cards.validate_card(bare, cfg)
    hub_cards.validate_card(bare, dict(cfg, tags=[]))  # no tag asked for: none needed
    no_data = re.sub(r'datasets:\n(- .*\n)+', '', text)
    with pytest.raises(ConfigError, match=r'datasets are None$'):
        hub_cards.validate_card(no_data, cfg)
    hub_cards.validate_card(no_data, dict(cfg, dataset=dict(cfg['dataset'], hub_ids=[])))


def test_validate_card_asks_for_forward_routing_only_of_a_routing_model():
    cfg = family_cfg('cnn_baseline_cifar10.cifar10', 'cifar10_cnn', params=10)
    text = hub_cards.model_card(cfg, published=False)
    assert 'forward_routing' not in text
    assert hub_cards.validate_card(text, cfg).data.license == 'apache-2.0'


def test_a_model_trained_by_two_presets_is_carded_with_the_configs(monkeypatch):
    """The command names the hub config's preset, not the first preset that trains the model."""
    from timm_capsules import presets

    monkeypatch.setitem(presets.PRESETS, 'cifar10_simple_b', dict(presets.PRESETS['cifar10_simple'], lr=0.5))
    cfg = dict(hub.load_hub_config(CIFAR10), training={'preset': 'cifar10_simple_b'})
    text = hub_cards.model_card(hub.validate_hub_config(cfg), published=False)
    command = COMMAND.format('cifar10_simple_b')
    assert f'Train them with `{command}`.' in text and f'  - Command: `{command}`\n' in text
    assert '  - lr: 0.5\n' in text and '--preset cifar10_simple ' not in text
    with pytest.raises(ConfigError, match='missing .*--preset cifar10_simple_b --output_dir'):
        hub_cards.validate_card(text.replace('--preset cifar10_simple_b', '--preset cifar10_simple'), cfg)


def test_routing_named_only_when_the_config_names_it_and_channels_in_the_plural_above_one():
    cfg = hub.load_hub_config(CIFAR10)
    del cfg['architecture']['routing']
    cfg['architecture']['input_size'] = [2, 32, 32]
    stats = sections(hub_cards.model_card(cfg, published=False))['Model Details'].split('- **Architecture:**')[0]
    assert stats.endswith(
        '  - Params: 561,297\n  - Routing iterations: 2\n  - Pose: 4x4 matrix\n  - Image size: 32 x 32 (2 channels)\n'
    )
