"""The hub configs, the model cards (``timm_capsules/hub_cards.py``) and the model table of docs/hub.md, all
generated from ``hub_configs/`` and the presets."""

import shutil

import pytest
import timm
from hub_published import CONFIG_DIR, OUR_TAGS, ROOT, TAGS
from huggingface_hub import ModelCard

import timm_capsules  # noqa: F401
from timm_capsules import hub, loading
from timm_capsules.loading import ConfigError
from timm_capsules.presets import get_preset

# ---- hub_configs, cards, the model table -------------------------------------------------------------


def test_every_published_tag_has_a_hub_config():
    assert TAGS == OUR_TAGS and len(TAGS) == 6
    for tag in TAGS:
        cfg = hub.load_hub_config(tag)
        assert timm.models.get_pretrained_cfg(tag).hf_hub_id == cfg['repo_id'] == f'timm-capsules/{tag}'


@pytest.mark.parametrize('tag', TAGS)
def test_hub_config_describes_the_registered_model(tag):
    cfg = hub.load_hub_config(tag)
    model = timm.create_model(cfg['model'], device='meta')
    assert sum(p.numel() for p in model.parameters()) == cfg['architecture']['params']
    assert model.iterations == cfg['architecture']['routing_iterations']
    assert list(model.pretrained_cfg['input_size']) == cfg['architecture']['input_size']
    assert model.num_classes == cfg['dataset']['num_classes']
    assert cfg['license'] == 'apache-2.0' == model.pretrained_cfg['license']
    assert cfg['results']['mean'] is None and cfg['results']['num_seeds'] is None  # nothing trained yet


def test_paper_results_are_the_papers():
    paper = {tag: hub.load_hub_config(tag)['paper_results'] for tag in TAGS}
    assert (paper['capsnet_resnet_cifar10.cifar10']['mean'], paper['capsnet_resnet_cifar10.cifar10']['best']) == (
        94.85,
        95.14,
    )
    assert (paper['capsnet_resnet_cifar100.cifar100']['mean'], paper['capsnet_resnet_cifar100.cifar100']['best']) == (
        76.27,
        78.02,
    )


@pytest.mark.parametrize('tag', TAGS)
@pytest.mark.parametrize('published', [False, True])
def test_cards_render_and_parse(tag, published):
    cfg = hub.load_hub_config(tag)
    text = hub.render_card(cfg, published=published)
    card = ModelCard(text)
    assert card.data.library_name == 'timm' and card.data.license == 'apache-2.0'
    assert card.data.pipeline_tag == 'image-classification'
    assert card.data.datasets == cfg['dataset']['hub_ids'] and 'capsule-network' in card.data.tags
    assert card.data.eval_results is None  # no measured accuracy exists yet
    assert ('not yet published' in card.text) is not published
    command = loading.training_command(cfg['model'], cfg['training']['preset'])
    assert (
        command
        == f'accelerate launch train_accelerate.py --preset {cfg["training"]["preset"]} --output_dir <output_dir>'
    )
    for needle in (
        'forward_routing',
        'features_only=True',
        'RoutingTrace',
        f'{cfg["architecture"]["params"]:,}',
        command,
        'Capsules with Inverted Dot-Product Attention Routing',
    ):
        assert needle in card.text
    paper = cfg['paper_results']
    if paper['best'] is not None:
        assert f'{paper["mean"]:.2f}' in card.text and f'{paper["best"]:.2f}' in card.text


def test_recorded_results_reach_card_and_table(tmp_path):
    config = tmp_path / 'capsnet_resnet_cifar10.cifar10.json'
    shutil.copy(CONFIG_DIR / config.name, config)
    cfg = hub.record_results(config, [94.61, 94.93, 95.02], checkpoint=95.02)
    assert cfg['results'] == dict(cfg['results'], num_seeds=3, mean=94.85, std=0.22, best=95.02)
    card = ModelCard(hub.render_card(config, published=True))
    assert card.data.eval_results[0].metric_value == 95.02
    assert '94.85 ± 0.22' in card.text
    row = [line for line in hub.render_model_table([cfg]).splitlines() if 'capsnet_resnet_cifar10' in line][0]
    assert '94.85 ± 0.22 (95.02), 3' in row and '1,828,817' in row
    # a summary typed in by hand that disagrees with the per-seed numbers is rejected
    cfg['results']['best'] = 96.0
    with pytest.raises(ConfigError, match='per_seed'):
        hub.validate_hub_config(cfg)


def test_docs_model_table_is_generated_from_hub_configs():
    doc = (ROOT / 'docs' / 'hub.md').read_text()
    table = hub.readme_table(doc)
    assert table is not None, (
        f'docs/hub.md needs the model table between {hub.TABLE_BEGIN} and {hub.TABLE_END}: '
        f'python -m timm_capsules.hub table'
    )
    assert table == hub.render_model_table(), (
        'the model table of docs/hub.md is stale: python -m timm_capsules.hub table --write docs/hub.md'
    )
    for tag in TAGS:
        assert f'`{tag}`' in table


@pytest.mark.parametrize('tag', TAGS)
def test_card_recipe_is_the_preset(tag):
    """The card states the recipe of the preset its hub config names, read from timm_capsules.presets."""
    cfg = hub.load_hub_config(tag)
    text = ModelCard(hub.render_card(cfg)).text
    training = text[text.index('- **Training:**') : text.index('## Model Usage')]
    preset = get_preset(cfg['training']['preset'])
    assert preset['model'] == cfg['model']
    for key, value in preset.items():
        if key not in ('model', 'dataset'):
            assert f'\n  - {key}: {value}\n' in training, key
    loss = 'binary cross-entropy per class' if 'multimnist' in tag else 'cross-entropy'
    assert f'\n  - loss: {loss}\n' in training
    mean = list(timm.models.get_pretrained_cfg(tag).mean)
    assert f'\n  - mean: {mean}\n' in training


def test_hub_config_training_section_names_a_preset_of_its_model(tmp_path):
    cfg = hub.load_hub_config('capsnet_resnet_cifar10.cifar10')
    assert cfg['training'] == {'preset': 'cifar10_resnet'}  # the recipe itself lives in timm_capsules.presets
    with pytest.raises(ConfigError, match=r"training.preset must be one of timm_capsules.presets.PRESETS, got 'c10'"):
        hub.validate_hub_config(dict(cfg, training={'preset': 'c10'}))
    with pytest.raises(
        ConfigError,
        match="training.preset 'cifar10_simple' trains 'capsnet_simple_cifar10', not 'capsnet_resnet_cifar10'",
    ):
        hub.validate_hub_config(dict(cfg, training={'preset': 'cifar10_simple'}))
