"""Model cards (the Hub repo's README.md): our template, with metadata written and read back by
``huggingface_hub``'s ``ModelCard``/``ModelCardData``.

A card is rendered from a validated hub config (see ``hub.py``), the training preset it names
(``timm_capsules.presets``) and the registered model itself (its class, ``pretrained_cfg`` and what it
returns), so nothing in it is typed twice.
"""

from typing import Any, Dict, Mapping, Optional

import timm

from .citation import BIBTEX
from .config_checks import _require, model_class
from .data.registry import dataset_info
from .loading import training_command
from .presets import get_preset

__all__ = ['PUBLISHED', 'NOT_PUBLISHED', 'model_card', 'validate_card']

PUBLISHED, NOT_PUBLISHED = 'published', 'not yet published'
PAPER_URL = 'https://arxiv.org/abs/2002.04764'
PAPER_TITLE = 'Capsules with Inverted Dot-Product Attention Routing'
ORIGIN_URL = 'https://github.com/apple/ml-capsules-inverted-attention-routing'
# what each output kind is trained with (see losses.py)
LOSSES = {
    'logits': 'cross-entropy',
    'lengths': 'margin loss (Sabour et al., 2017)',
    'activations': 'spread loss (Hinton et al., 2018)',
}

CARD_TEMPLATE = """\
# Model card for {tag}

{description}

## Model Details
{details}

## Model Usage
{usage}
## Model Comparison
{comparison}
## Citation
```bibtex
{citation}
```
"""


def fmt(value: Optional[float]) -> str:
    return '—' if value is None else f'{value:.2f}'


def mean_std(results: Mapping[str, Any]) -> str:
    if results.get('mean') is None:
        return '—'
    if results.get('std') is None:
        return fmt(results['mean'])
    return f'{fmt(results["mean"])} ± {fmt(results["std"])}'


def _family(architecture: str) -> str:
    """The first sentence of the model class's docstring, e.g. 'Capsule network with ... routing'."""
    doc = (model_class(architecture).__doc__ or model_class(architecture).__name__).strip()
    return doc.split('\n\n')[0].replace('\n', ' ').split('. ')[0].split(': ')[0].rstrip('.')


def _multilabel(cfg: Mapping[str, Any]) -> bool:
    return dataset_info(cfg['tag'].split('.')[-1]).multi_label  # the tag names the dataset (data/registry.py)


def _usage(cfg: Mapping[str, Any]) -> str:
    tag, repo = cfg['tag'], cfg['repo_id']
    channels, height, width = cfg['architecture']['input_size']
    mode = 'L' if channels == 1 else 'RGB'
    predict = (
        'labels = (logits.sigmoid() > 0.5).nonzero()  # multi-label: every digit present in the image'
        if _multilabel(cfg)
        else 'top5_probabilities, top5_class_indices = logits.softmax(dim=1).topk(5)'
    )
    text = f"""### Image Classification
```python
import timm
import torch
from PIL import Image

import timm_capsules  # registers the architectures with timm

model = timm.create_model("{tag}", pretrained=True)  # or "hf-hub:{repo}"
model = model.eval()

data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

img = Image.open("image.png").convert("{mode}")  # any image; resized to {height}x{width}
with torch.no_grad():
    logits = model(transforms(img).unsqueeze(0))
{predict}
```

### Feature Map Extraction
```python
model = timm.create_model("{tag}", pretrained=True, features_only=True).eval()
x = torch.randn(1, {channels}, {height}, {width})
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
    if hasattr(model_class(cfg['model']), 'forward_routing'):
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
    return text


def _results_table(cfg: Mapping[str, Any], published: bool) -> str:
    results, paper = cfg['results'], cfg['paper_results']
    rows = [
        '| | metric | mean ± std | best | seeds | these weights |',
        '|---|---|---|---|---|---|',
        f'| timm_capsules (`{cfg["training"]["preset"]}`) | {results["metric"]} | {mean_std(results)} | '
        f'{fmt(results.get("best"))} | {results.get("num_seeds") or "—"} | '
        f'{fmt(results.get("checkpoint")) if published else "not yet published"} |',
        f'| paper (Tsai et al., 2020) | {paper["metric"]} | {mean_std(paper)} | {fmt(paper.get("best"))} | '
        f'{paper.get("num_seeds") or "—"} | — |',
    ]
    notes = [f'Evaluated on {cfg["dataset"]["name"]} {results.get("eval_split", "test")}.']
    if results.get('mean') is None:
        notes.append('No measured results yet: this project has not trained this model yet (— means no number).')
    if paper.get('source'):
        notes.append(f'Paper numbers: {paper["source"]}.')
    else:
        notes.append('No paper number is recorded for this configuration in its hub config.')
    return '\n'.join(rows) + '\n\n' + ' '.join(notes) + '\n'


def _training(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The recipe: the preset's argument values, the loss its output kind takes, the normalisation."""
    preset = cfg['training']['preset']
    recipe = {key: value for key, value in get_preset(preset).items() if key not in ('model', 'dataset')}
    output_type = getattr(model_class(cfg['model']), 'output_type', 'logits')
    loss = LOSSES[output_type]
    if output_type == 'logits' and _multilabel(cfg):
        loss = 'binary cross-entropy per class'
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg['tag'])
    augmentation = cfg['dataset'].get('train_augmentation')
    return {
        'Preset': f'`{preset}`',
        'Command': f'`{training_command(cfg["model"], preset)}`',
        **recipe,
        'loss': loss,
        **({'train_augmentation': augmentation} if augmentation else {}),
        'mean': list(pretrained_cfg.mean),
        'std': list(pretrained_cfg.std),
    }


def _bullets(items: Mapping[str, Any], indent: str = '') -> str:
    lines = []
    for key, value in items.items():
        if isinstance(value, Mapping) and not value:
            continue  # a heading over nothing (e.g. no backbone or capsules line) reads as a broken card
        if isinstance(value, Mapping):
            lines.append(f'{indent}- **{key}:**')
            lines.append(_bullets(value, indent + '  '))
        else:
            lines.append(f'{indent}- {key}: {value}' if indent else f'- **{key}:** {value}')
    return '\n'.join(lines)


def model_card(cfg: Mapping[str, Any], published: bool) -> str:
    """The model card of a validated hub config, checked by ``validate_card``."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    arch, dataset = cfg['architecture'], cfg['dataset']
    channels, height, width = arch['input_size']
    status = (
        'Weights: published in this repository.'
        if published
        else f'**Status: not yet published.** No weights have been trained for this tag yet. Train them with '
        f'`{training_command(cfg["model"], cfg["training"]["preset"])}`.'
    )
    description = (
        f'{_family(cfg["model"])}, for {dataset["name"]}, built as a timm model by the `timm_capsules` package '
        f'(the models of [Tsai et al., ICLR 2020]({PAPER_URL})). {status}'
    )
    stats = {'Params (M)': round(arch['params'] / 1e6, 2), 'Params': f'{arch["params"]:,}'}
    if arch.get('routing_iterations') is not None:
        stats.update({'Routing': arch.get('routing', ''), 'Routing iterations': arch['routing_iterations']})
    stats.update(
        {
            'Pose': arch.get('pose', ''),
            'Image size': f'{height} x {width} ({channels} channel{"s" if channels > 1 else ""})',
        }
    )
    details = {
        'Model Type': ('Multi-label image classification' if _multilabel(cfg) else 'Image classification')
        + ' / feature backbone',
        'Model Stats': {key: value for key, value in stats.items() if value != ''},
        'Architecture': {key: arch[key] for key in ('backbone', 'capsules') if arch.get(key)},
        'Papers': {PAPER_TITLE: PAPER_URL},
        'Dataset': dataset['name'],
        'Original': ORIGIN_URL,
        'Training': _training(cfg),
    }
    data = ModelCardData(
        library_name='timm',
        license=cfg['license'],
        tags=list(cfg['tags']),
        datasets=list(dataset['hub_ids']),
        metrics=['accuracy'],
        pipeline_tag='image-classification',
    )
    checkpoint = cfg['results'].get('checkpoint')
    if published and checkpoint is not None:  # only numbers measured on the uploaded weights
        data.model_name = cfg['tag']
        data.eval_results = [
            EvalResult(
                task_type='image-classification',
                dataset_type=dataset.get('eval_id', dataset['hub_ids'][0]),
                dataset_name=dataset['name'],
                dataset_split='test',
                metric_type='accuracy',
                metric_name=cfg['results']['metric'],
                metric_value=checkpoint,
            )
        ]
    body = CARD_TEMPLATE.format(
        tag=cfg['tag'],
        description=description,
        details=_bullets(details),
        usage=_usage(cfg),
        comparison=_results_table(cfg, published),
        citation=BIBTEX,
    )
    text = str(ModelCard(f'---\n{data.to_yaml()}\n---\n\n{body}'))
    validate_card(text, cfg)
    return text


def validate_card(text: str, cfg: Mapping[str, Any]):
    """Parses a card with ``huggingface_hub.ModelCard`` and checks its metadata against the hub config."""
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    data, where = card.data, f'model card of {cfg["tag"]}'
    _require(data.library_name == 'timm', where, f'library_name is {data.library_name!r}, not timm')
    _require(data.license == cfg['license'], where, f'license is {data.license!r}')
    _require(data.pipeline_tag == 'image-classification', where, f'pipeline_tag is {data.pipeline_tag!r}')
    _require(set(cfg['tags']) <= set(data.tags or []), where, f'tags {data.tags} miss some of {cfg["tags"]}')
    _require(list(data.datasets or []) == list(cfg['dataset']['hub_ids']), where, f'datasets are {data.datasets}')
    needles = [
        f'# Model card for {cfg["tag"]}',
        '## Model Details',
        '## Model Usage',
        'features_only=True',
        '## Citation',
        BIBTEX,
        training_command(cfg['model'], cfg['training']['preset']),
    ]
    if hasattr(model_class(cfg['model']), 'forward_routing'):
        needles.append('forward_routing')
    for needle in needles:
        _require(needle in card.text, where, f'missing {needle!r}')
    return card
