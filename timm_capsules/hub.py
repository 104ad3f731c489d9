"""The Hugging Face Hub side: ``hub_configs/``, model cards, publishing and pretrained loading.

One JSON file per published model tag lives in ``hub_configs/<model>.<tag>.json``. It holds what the
tag's Hub repo needs beyond the weights (repo id, dataset, training preset and recipe, measured results,
the paper's results, parameter count, routing iterations, license, citation, tags) and its ``status``:
``"published"`` or ``"not yet published"``. Model cards and the README's model table are rendered from
these files only.

Publishing builds the exact folder that is uploaded (``config.json`` + ``model.safetensors`` +
``README.md``, never a pickle) with timm's ``save_for_hf``; ``--dry-run DIR`` writes that folder and
stops. Loading goes through timm (``timm.create_model(name, pretrained=True)``, ``hf-hub:`` and
``local-dir:``); ``capsnet._create_capsnet`` calls ``pretrained_guard`` and passes ``check_state_dict``
as timm's ``pretrained_filter_fn`` so that unpublished tags, malformed configs, corrupted files and
weights that do not fit the architecture fail with messages that say what is wrong.

Command line (``python -m timm_capsules.hub -h``)::

    push   --config hub_configs/<tag>.json --checkpoint DIR [--dry-run OUT] [--repo-id ORG/NAME]
    card   --config hub_configs/<tag>.json [--output README.md]
    table  [--check README.md | --write README.md]
    check  --checkpoint DIR
    record --config hub_configs/<tag>.json --top1 ACC [ACC ...] [--checkpoint-top1 ACC]
    cache  --folder DIR --repo-id ORG/NAME [--cache-dir DIR]
"""
import argparse
import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open

import timm
from timm.models import resolve_pretrained_cfg, save_for_hf, split_model_name_tag

from .capsnet import CapsNet

__all__ = [
    'ConfigError', 'WeightsError', 'WeightsNotPublishedError',
    'hub_configs_dir', 'list_hub_configs', 'load_hub_config', 'validate_hub_config', 'is_published',
    'model_card_dict', 'render_card', 'validate_card', 'render_model_table', 'update_readme_table',
    'validate_checkpoint_config', 'check_state_dict', 'pretrained_guard', 'check_checkpoint',
    'push_checkpoint', 'install_in_cache', 'offline_hub_cache', 'record_results',
]

_logger = logging.getLogger(__name__)

HUB_ORG = 'timm-capsules'
CONFIG_DIR_ENV = 'TIMM_CAPSULES_HUB_CONFIGS'
PUBLISHED, NOT_PUBLISHED = 'published', 'not yet published'
STATUSES = (PUBLISHED, NOT_PUBLISHED)
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = 'config.json', 'model.safetensors', 'README.md'
UPLOAD_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.pkl', '.pickle', '.ckpt', '.tar', '.npz', '.h5')
TABLE_BEGIN, TABLE_END = '<!-- model-table -->', '<!-- /model-table -->'
PAPER_URL = 'https://arxiv.org/abs/2002.04764'
ORIGIN_URL = 'https://github.com/apple/ml-capsules-inverted-attention-routing'


class ConfigError(ValueError):
    """A hub config (``hub_configs/*.json``) or a checkpoint's ``config.json`` is malformed."""


class WeightsError(RuntimeError):
    """A weights file is unreadable (corrupted, truncated) or does not fit the architecture."""


class WeightsNotPublishedError(RuntimeError):
    """``pretrained=True`` for a tag whose weights are not on the Hub yet."""


# ---- hub_configs -----------------------------------------------------------------------------------


def hub_configs_dir() -> Optional[Path]:
    """Where the hub configs live: ``$TIMM_CAPSULES_HUB_CONFIGS``, else ``hub_configs/`` of the source
    checkout (editable installs), else ``timm_capsules/hub_configs`` (wheels that ship them)."""
    override = os.environ.get(CONFIG_DIR_ENV)
    if override:
        return Path(override)
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / 'hub_configs', package / 'hub_configs'):
        if candidate.is_dir():
            return candidate
    return None


def _require(condition: bool, where: str, message: str):
    if not condition:
        raise ConfigError(f'{where}: {message}')


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_hub_config(cfg: Mapping[str, Any], where: str = 'hub config') -> Dict[str, Any]:
    """Checks a hub config's fields and types; returns it as a dict. Raises ``ConfigError``."""
    _require(isinstance(cfg, Mapping), where, 'expected a JSON object')
    cfg = dict(cfg)
    for key in ('tag', 'model', 'repo_id', 'status', 'dataset', 'architecture', 'training', 'results',
                'paper_results', 'license', 'tags', 'citation'):
        _require(key in cfg, where, f'missing field {key!r}')
    model, tag = split_model_name_tag(cfg['tag'])
    _require(bool(tag) and model == cfg['model'], where, f"tag {cfg['tag']!r} must be '<model>.<tag>' of model {cfg['model']!r}")
    _require(cfg['status'] in STATUSES, where, f"status must be one of {STATUSES}, got {cfg['status']!r}")
    _require(isinstance(cfg['repo_id'], str) and cfg['repo_id'].count('/') == 1, where, 'repo_id must be "org/name"')
    dataset = cfg['dataset']
    _require(isinstance(dataset, Mapping) and isinstance(dataset.get('name'), str), where, 'dataset.name missing')
    _require(isinstance(dataset.get('hub_ids'), list) and all(isinstance(d, str) for d in dataset['hub_ids']),
             where, 'dataset.hub_ids must be a list of Hub dataset ids')
    _require(_is_int(dataset.get('num_classes')) and dataset['num_classes'] > 0, where, 'dataset.num_classes must be a positive int')
    arch = cfg['architecture']
    _require(_is_int(arch.get('params')) and arch['params'] > 0, where, 'architecture.params must be a positive int')
    _require(_is_int(arch.get('routing_iterations')) and arch['routing_iterations'] >= 1, where,
             'architecture.routing_iterations must be an int >= 1')
    training = cfg['training']
    _require(isinstance(training.get('preset'), str) and training['preset'], where, 'training.preset missing')
    _require(f"--preset {training['preset']}" in training.get('command', ''), where,
             'training.command must run training.preset')
    for key in ('results', 'paper_results'):
        results = cfg[key]
        _require(isinstance(results, Mapping), where, f'{key} must be an object')
        for stat in ('mean', 'std', 'best') + (('checkpoint',) if key == 'results' else ()):
            value = results.get(stat)
            _require(value is None or (_is_number(value) and 0 <= value <= 100), where,
                     f'{key}.{stat} must be null or a percentage, got {value!r}')
    results = cfg['results']
    seeds = results.get('num_seeds')
    per_seed = results.get('per_seed') or []
    _require(seeds is None or (_is_int(seeds) and seeds == len(per_seed)), where,
             'results.num_seeds must equal the number of results.per_seed entries')
    if per_seed:  # the summary must be computed from the per-seed numbers, not typed in
        summary = _summarise(per_seed)
        for stat in ('mean', 'std', 'best'):
            _require(results.get(stat) == summary[stat], where,
                     f'results.{stat}={results.get(stat)!r} does not match results.per_seed (expected {summary[stat]!r}); '
                     f'use `python -m timm_capsules.hub record`')
    else:
        _require(all(results.get(s) is None for s in ('mean', 'std', 'best')), where,
                 'results.mean/std/best need results.per_seed')
    _require(isinstance(cfg['tags'], list) and {'timm', 'image-classification'} <= set(cfg['tags']), where,
             "tags must be a list containing 'timm' and 'image-classification'")
    _require(isinstance(cfg['citation'], str) and cfg['citation'].lstrip().startswith('@'), where,
             'citation must be a BibTeX entry')
    return cfg


def _config_path(tag_or_path: Union[str, os.PathLike], directory: Optional[Path] = None) -> Path:
    path = Path(tag_or_path)
    if path.suffix == '.json' and (path.exists() or path.parent != Path('.')):
        return path
    directory = directory or hub_configs_dir()
    if directory is None:
        raise ConfigError(f'no hub_configs directory found (set ${CONFIG_DIR_ENV})')
    return directory / f'{tag_or_path}.json'


def load_hub_config(tag_or_path: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
    """Reads and validates a hub config, given a tag (``capsnet_resnet_cifar10.cifar10``), a path or a dict."""
    if isinstance(tag_or_path, Mapping):
        return validate_hub_config(tag_or_path)
    path = _config_path(tag_or_path)
    if not path.is_file():
        raise ConfigError(f'no hub config {path}')
    try:
        cfg = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as error:
        raise ConfigError(f'{path}: not valid JSON ({error})') from error
    cfg = validate_hub_config(cfg, str(path))
    _require(path.stem == cfg['tag'], str(path), f"file name must be {cfg['tag']}.json")
    return cfg


def list_hub_configs(directory: Optional[Union[str, os.PathLike]] = None) -> List[Dict[str, Any]]:
    """Every hub config in ``directory`` (default ``hub_configs_dir()``), sorted by tag."""
    directory = Path(directory) if directory else hub_configs_dir()
    if directory is None:
        return []
    from .capsnet import default_cfgs
    order = {tag: index for index, tag in enumerate(default_cfgs)}  # the registry's order
    configs = [load_hub_config(path) for path in directory.glob('*.json')]
    return sorted(configs, key=lambda cfg: (order.get(cfg['model'], len(order)), cfg['tag']))


def is_published(tag: str) -> Optional[bool]:
    """True/False from the tag's hub config; None when there is no hub config for it."""
    directory = hub_configs_dir()
    if directory is None or not (directory / f'{tag}.json').is_file():
        return None
    return load_hub_config(directory / f'{tag}.json')['status'] == PUBLISHED


def _summarise(values: Sequence[float]) -> Dict[str, Optional[float]]:
    values = [float(v) for v in values]
    return dict(
        mean=round(statistics.fmean(values), 2),
        std=round(statistics.stdev(values), 2) if len(values) > 1 else None,  # sample std over seeds
        best=round(max(values), 2),
    )


def record_results(config: Union[str, os.PathLike], top1: Sequence[float], checkpoint: Optional[float] = None) -> Dict[str, Any]:
    """Writes measured accuracies (one per seed, in %) into a hub config file: ``per_seed``, ``num_seeds``
    and the mean, sample std and best computed from them; ``checkpoint`` is the accuracy of the weights
    that are (or will be) uploaded."""
    path = _config_path(config)
    cfg = load_hub_config(path)
    if not top1 or not all(_is_number(v) and 0 <= v <= 100 for v in top1):
        raise ConfigError(f'accuracies must be percentages in [0, 100], got {list(top1)!r}')
    cfg['results'].update(per_seed=[float(v) for v in top1], num_seeds=len(top1), **_summarise(top1))
    if checkpoint is not None:
        cfg['results']['checkpoint'] = float(checkpoint)
    validate_hub_config(cfg, str(path))
    path.write_text(json.dumps(cfg, indent=2) + '\n', encoding='utf-8')
    return cfg


# ---- model cards -----------------------------------------------------------------------------------


def _fmt(value: Optional[float]) -> str:
    return '—' if value is None else f'{value:.2f}'


def _mean_std(results: Mapping[str, Any]) -> str:
    if results.get('mean') is None:
        return '—'
    if results.get('std') is None:
        return _fmt(results['mean'])
    return f"{_fmt(results['mean'])} ± {_fmt(results['std'])}"


def _usage(cfg: Mapping[str, Any]) -> str:
    tag, repo = cfg['tag'], cfg['repo_id']
    channels, height, width = cfg['architecture']['input_size']
    multilabel = cfg['dataset']['name'] == 'DiverseMultiMNIST'
    mode = 'L' if channels == 1 else 'RGB'
    predict = (
        'labels = (logits.sigmoid() > 0.5).nonzero()  # multi-label: every digit present in the image'
        if multilabel else
        'top5_probabilities, top5_class_indices = logits.softmax(dim=1).topk(5)')
    return f'''### Image Classification
```python
import timm
import torch
from PIL import Image

import timm_capsules  # registers the CapsNet architectures with timm

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
for feature_map in model(x):  # backbone levels, primary capsules, convolutional capsule layers
    print(feature_map.shape)  # capsule levels: channel n * d + e is pose entry e of capsule type n
```

### Image Embeddings
```python
model = timm.create_model("{tag}", pretrained=True).eval()
features = model.forward_features(x)                  # poses the class capsules route from
embedding = model.forward_head(features, pre_logits=True)
# or equivalently: timm.create_model("{tag}", pretrained=True, num_classes=0)
```

### Routing Introspection
```python
trace = model.forward_routing(x)  # a RoutingTrace; trace.logits equals model(x)
for name, coefficients in zip(trace.layer_names[1:], trace.coefficients[-1]):
    # (batch, H, W, children, parents) routing coefficients of the last iteration; rows sum to 1
    print(name, tuple(coefficients.shape))
poses = trace.poses[-1][-1]  # class capsule poses (batch, 1, 1, classes, d)
```
'''


def _results_table(cfg: Mapping[str, Any], published: bool) -> str:
    results, paper = cfg['results'], cfg['paper_results']
    rows = [
        '| | metric | mean ± std | best | seeds | these weights |',
        '|---|---|---|---|---|---|',
        f"| timm_capsules (`{cfg['training']['preset']}`) | {results['metric']} | {_mean_std(results)} | "
        f"{_fmt(results.get('best'))} | {results.get('num_seeds') or '—'} | "
        f"{_fmt(results.get('checkpoint')) if published else 'not yet published'} |",
        f"| paper (Tsai et al., 2020) | {paper['metric']} | {_mean_std(paper)} | {_fmt(paper.get('best'))} | "
        f"{paper.get('num_seeds') or '—'} | — |",
    ]
    notes = [f"Evaluated on {cfg['dataset']['name']} {results.get('eval_split', 'test')}."]
    if results.get('mean') is None:
        notes.append('No measured results yet: this project has not trained this model yet (— means no number).')
    if paper.get('source'):
        notes.append(f"Paper numbers: {paper['source']}.")
    else:
        notes.append('No paper number is recorded for this configuration in its hub config.')
    return '\n'.join(rows) + '\n\n' + ' '.join(notes) + '\n'


def model_card_dict(cfg: Mapping[str, Any], published: Optional[bool] = None) -> Dict[str, Any]:
    """The ``model_card`` dict of timm's card generator (``timm.models._hub.generate_readme``)."""
    cfg = validate_hub_config(cfg)
    published = cfg['status'] == PUBLISHED if published is None else published
    arch, training, dataset = cfg['architecture'], cfg['training'], cfg['dataset']
    channels, height, width = arch['input_size']
    status = (
        'Weights: published in this repository.' if published else
        f"**Status: not yet published.** No weights have been trained for this tag yet. Train them with "
        f"`{training['command']}`.")
    description = (
        f"A capsule network with inverted dot-product attention routing "
        f"([Tsai et al., ICLR 2020]({PAPER_URL})) for {dataset['name']}, built as a timm model by "
        f"the `timm_capsules` package. {status}")
    return {
        'tags': list(cfg['tags']),
        'license': cfg['license'],
        'description': description,
        'details': {
            'Model Type': ('Multi-label image classification' if dataset['name'] == 'DiverseMultiMNIST'
                           else 'Image classification') + ' / feature backbone (capsule network)',
            'Model Stats': {
                'Params (M)': round(arch['params'] / 1e6, 2),
                'Params': f"{arch['params']:,}",
                'Routing': arch.get('routing', 'inverted dot-product attention'),
                'Routing iterations': arch['routing_iterations'],
                'Pose': arch.get('pose', ''),
                'Image size': f'{height} x {width} ({channels} channel{"s" if channels > 1 else ""})',
            },
            'Architecture': {'Backbone': arch.get('backbone', ''), 'Capsules': arch.get('capsules', '')},
            'Papers': {'Capsules with Inverted Dot-Product Attention Routing': PAPER_URL},
            'Dataset': dataset['name'],
            'Original': ORIGIN_URL,
            'Training': {
                'Preset': f"`{training['preset']}`",
                'Command': f"`{training['command']}`",
                **{key: value for key, value in training.get('recipe', {}).items()},
            },
        },
        'usage': _usage(cfg),
        'comparison': _results_table(cfg, published),
        'citation': cfg['citation'],
    }


def render_card(cfg: Union[Mapping[str, Any], str, os.PathLike], published: Optional[bool] = None) -> str:
    """The model card (README.md) of a hub config, in timm's card style, checked by ``validate_card``."""
    from huggingface_hub import EvalResult, ModelCard
    from timm.models._hub import generate_readme

    cfg = load_hub_config(cfg)
    published = cfg['status'] == PUBLISHED if published is None else published
    text = generate_readme(model_card_dict(cfg, published), cfg['tag'], task_name='image-classification')
    card = ModelCard(text)
    card.data.datasets = list(cfg['dataset']['hub_ids'])
    card.data.metrics = ['accuracy']
    checkpoint = cfg['results'].get('checkpoint')
    if published and checkpoint is not None:  # only numbers measured on the uploaded weights
        dataset = cfg['dataset']
        card.data.model_name = cfg['tag']
        card.data.eval_results = [EvalResult(
            task_type='image-classification', dataset_type=dataset.get('eval_id', dataset['hub_ids'][0]),
            dataset_name=dataset['name'], dataset_split='test', metric_type='accuracy',
            metric_name=cfg['results']['metric'], metric_value=checkpoint)]
    text = str(card)
    validate_card(text, cfg)
    return text


def validate_card(text: str, cfg: Mapping[str, Any]) -> 'ModelCard':
    """Parses a card with ``huggingface_hub.ModelCard`` and checks its metadata against the hub config."""
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    data, where = card.data, f"model card of {cfg['tag']}"
    _require(data.library_name == 'timm', where, f'library_name is {data.library_name!r}, not timm')
    _require(data.license == cfg['license'], where, f'license is {data.license!r}')
    _require(data.pipeline_tag == 'image-classification', where, f'pipeline_tag is {data.pipeline_tag!r}')
    _require(set(cfg['tags']) <= set(data.tags or []), where, f'tags {data.tags} miss some of {cfg["tags"]}')
    _require(list(data.datasets or []) == list(cfg['dataset']['hub_ids']), where, f'datasets are {data.datasets}')
    for needle in (f"# Model card for {cfg['tag']}", '## Model Details', '## Model Usage', 'forward_routing',
                   'features_only=True', '## Citation', cfg['citation'], cfg['training']['command']):
        _require(needle in card.text, where, f'missing {needle!r}')
    return card


# ---- README model table ----------------------------------------------------------------------------


def render_model_table(configs: Optional[Sequence[Mapping[str, Any]]] = None) -> str:
    """The README's model table (Markdown), from the hub configs only."""
    configs = list_hub_configs() if configs is None else [validate_hub_config(c) for c in configs]
    lines = [
        '| tag | dataset | params | iterations | status | metric | ours: mean ± std (best), seeds | paper: mean (best) | train with |',
        '|---|---|---:|---:|---|---|---|---|---|',
    ]
    for cfg in configs:
        results, paper = cfg['results'], cfg['paper_results']
        ours = '—'
        if results.get('mean') is not None:
            ours = f"{_mean_std(results)} ({_fmt(results['best'])}), {results['num_seeds']}"
        paper_text = '—' if paper.get('mean') is None and paper.get('best') is None else \
            f"{_fmt(paper.get('mean'))} ({_fmt(paper.get('best'))})"
        status = (f"[published](https://huggingface.co/{cfg['repo_id']})" if cfg['status'] == PUBLISHED
                  else 'not yet published')
        lines.append(
            f"| `{cfg['tag']}` | {cfg['dataset']['name']} | {cfg['architecture']['params']:,} | "
            f"{cfg['architecture']['routing_iterations']} | {status} | {results['metric'].split(':')[0]} | "
            f"{ours} | {paper_text} | "
            f"`--preset {cfg['training']['preset']}` |")
    return '\n'.join(lines) + '\n'


def _table_block(table: str) -> str:
    return f'{TABLE_BEGIN}\n{table}{TABLE_END}'


def readme_table(readme_text: str) -> Optional[str]:
    """The table between the README's markers (None if the markers are missing)."""
    start, end = readme_text.find(TABLE_BEGIN), readme_text.find(TABLE_END)
    if start < 0 or end < start:
        return None
    return readme_text[start + len(TABLE_BEGIN):end].strip('\n') + '\n'


def update_readme_table(readme: Union[str, os.PathLike], write: bool = False) -> bool:
    """True if the README's table equals ``render_model_table()``; with ``write``, replaces it."""
    path = Path(readme)
    text = path.read_text(encoding='utf-8')
    current, table = readme_table(text), render_model_table()
    if current is None:
        raise ConfigError(f'{path} has no {TABLE_BEGIN} ... {TABLE_END} markers')
    if current == table:
        return True
    if write:
        start, end = text.find(TABLE_BEGIN), text.find(TABLE_END) + len(TABLE_END)
        path.write_text(text[:start] + _table_block(table) + text[end:], encoding='utf-8')
    return False


# ---- integrity ---------------------------------------------------------------------------------------

_INT_ARGS = {'num_classes': 0, 'in_chans': 1, 'iterations': 1, 'primary_caps': 1, 'pose_dim': 1,
             'primary_kernel_size': 1, 'primary_stride': 1, 'primary_padding': 0}
_BOOL_ARGS = ('matrix_pose', 'layer_norm', 'activations', 'backbone_pretrained')
_FACTORY_ARGS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'features_only', 'out_indices',
                 'feature_cls', 'pruned')


def _capsnet_args() -> set:
    return set(inspect.signature(CapsNet.__init__).parameters) - {'self'}


def _our_architectures() -> set:
    return set(timm.list_models(module='capsnet'))


def validate_checkpoint_config(
        pretrained_cfg: Mapping[str, Any],
        model_args: Optional[Mapping[str, Any]] = None,
        architecture: Optional[str] = None,
        where: str = 'config.json',
) -> None:
    """Checks the fields of a timm ``config.json`` (its ``pretrained_cfg`` and ``model_args``) that
    building and loading rely on, before any weights are read. Raises ``ConfigError``."""
    _require(isinstance(pretrained_cfg, Mapping), where, 'pretrained_cfg must be an object')
    if architecture is not None:
        _require(architecture in _our_architectures(), where,
                 f'unknown architecture {architecture!r} (timm_capsules has {sorted(_our_architectures())})')
    num_classes = pretrained_cfg.get('num_classes')
    _require(_is_int(num_classes) and num_classes >= 0, where, f'num_classes must be an int >= 0, got {num_classes!r}')
    size = pretrained_cfg.get('input_size')
    _require(isinstance(size, (list, tuple)) and len(size) == 3 and all(_is_int(s) and s > 0 for s in size), where,
             f'input_size must be [channels, height, width] of positive ints, got {size!r}')
    for key in ('mean', 'std'):
        value = pretrained_cfg.get(key)
        _require(isinstance(value, (list, tuple)) and len(value) == size[0] and all(_is_number(v) for v in value),
                 where, f'{key} must hold {size[0]} numbers (one per input channel), got {value!r}')
    _require(all(v > 0 for v in pretrained_cfg['std']), where, 'std must be positive')
    labels = pretrained_cfg.get('label_names')
    _require(labels is None or (isinstance(labels, (list, tuple, dict)) and len(labels) == num_classes), where,
             f'label_names must have num_classes={num_classes} entries, got {None if labels is None else len(labels)}')
    for key in ('classifier', 'first_conv'):
        value = pretrained_cfg.get(key)
        names = (value,) if isinstance(value, str) else value
        _require(value is None or (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)),
                 where, f'{key} must be a module name or a list of them, got {value!r}')
    model_args = dict(model_args or {})
    unknown = sorted(set(model_args) - _capsnet_args())
    _require(not unknown, where, f'model_args has unknown arguments {unknown} (CapsNet takes {sorted(_capsnet_args())})')
    for key, minimum in _INT_ARGS.items():
        if key in model_args:
            value = model_args[key]
            _require(_is_int(value) and value >= minimum, where, f'model_args.{key} must be an int >= {minimum}, got {value!r}')
    for key in _BOOL_ARGS:
        if key in model_args:
            _require(isinstance(model_args[key], bool), where, f'model_args.{key} must be true/false, got {model_args[key]!r}')
    if 'img_size' in model_args:
        value = model_args['img_size']
        ok = (_is_int(value) and value > 0) or (
            isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value))
        _require(ok, where, f'model_args.img_size must be an int or [height, width], got {value!r}')
    if 'num_classes' in model_args:
        _require(model_args['num_classes'] == num_classes, where,
                 f"model_args.num_classes={model_args['num_classes']} disagrees with num_classes={num_classes}")
    if 'in_chans' in model_args:
        _require(model_args['in_chans'] == size[0], where,
                 f"model_args.in_chans={model_args['in_chans']} disagrees with input_size[0]={size[0]}")


def _read_config_json(folder: Path) -> Dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f'{folder}: no {CONFIG_NAME}')
    try:
        cfg = json.loads(path.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f'{path}: not valid JSON ({error})') from error
    _require(isinstance(cfg, dict), str(path), 'expected a JSON object')
    _require(isinstance(cfg.get('architecture'), str), str(path), 'missing "architecture"')
    _require(isinstance(cfg.get('pretrained_cfg'), dict), str(path), 'missing "pretrained_cfg" object')
    _require(isinstance(cfg.get('model_args', {}), dict), str(path), '"model_args" must be an object')
    pretrained_cfg = dict(cfg['pretrained_cfg'])
    if 'num_classes' in cfg:  # timm's top-level override
        pretrained_cfg['num_classes'] = cfg['num_classes']
    validate_checkpoint_config(pretrained_cfg, cfg.get('model_args'), cfg['architecture'], str(path))
    return cfg


def _names(value) -> tuple:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def check_state_dict(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: the checkpoint's tensor names and shapes must be the model's, except
    where timm adapts them (the classifier when ``num_classes`` differs, the first conv's input channels
    when ``in_chans`` differs). Raises ``WeightsError`` listing every mismatch."""
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    expected = model.state_dict()
    head_adapted = getattr(model, 'num_classes', None) != cfg.get('num_classes')
    classifiers = _names(cfg.get('classifier')) if head_adapted else ()
    first_convs = {f'{name}.weight' for name in _names(cfg.get('first_conv'))}
    source_chans = (cfg.get('input_size') or (3,))[0]

    def adapted(key: str) -> bool:
        return any(key.startswith(f'{name}.') for name in classifiers)

    missing = [k for k in expected if k not in state_dict and not adapted(k)]
    unexpected = [k for k in state_dict if k not in expected and not adapted(k)]
    wrong = []
    for key, tensor in state_dict.items():
        if key not in expected or adapted(key):
            continue
        want = expected[key]
        if not isinstance(tensor, torch.Tensor):
            wrong.append(f'{key}: not a tensor ({type(tensor).__name__})')
        elif tuple(tensor.shape) != tuple(want.shape):
            in_chans_change = (
                key in first_convs and tensor.ndim == 4 and tensor.shape[1] == source_chans
                and tensor.shape[0] == want.shape[0] and tensor.shape[2:] == want.shape[2:])
            if not in_chans_change:
                wrong.append(f'{key}: checkpoint {tuple(tensor.shape)}, model {tuple(want.shape)}')
    if missing or unexpected or wrong:
        def block(title, items):
            shown = items[:20] + ([f'... and {len(items) - 20} more'] if len(items) > 20 else [])
            return f'\n  {title} ({len(items)}):\n    ' + '\n    '.join(shown) if items else ''
        source = cfg.get('file') or cfg.get('hf_hub_id') or 'the checkpoint'
        raise WeightsError(
            f"the weights from {source} do not fit {cfg.get('architecture', type(model).__name__)} "
            f"(built with {getattr(model, 'num_classes', '?')} classes, {getattr(model, 'in_chans', '?')} input channels):"
            + block('shape mismatches', wrong) + block('missing from the checkpoint', missing)
            + block('not in the model', unexpected))
    return state_dict


def _weights_location(cfg: Mapping[str, Any]) -> str:
    if cfg.get('source') == 'local-dir' or cfg.get('file'):
        return str(cfg.get('file'))
    if cfg.get('hf_hub_id'):
        return f"Hub repo {cfg['hf_hub_id']} (cached file model.safetensors)"
    return 'the checkpoint'


@contextlib.contextmanager
def pretrained_guard(variant: str, pretrained: bool, kwargs: Mapping[str, Any]) -> Iterator[None]:
    """Wraps building a CapsNet in ``capsnet._create_capsnet``:

    - a ``config.json`` from ``hf-hub:``/``local-dir:`` is validated before the model is built or any
      weights are read (``ConfigError``);
    - ``pretrained=True`` for a registry tag whose hub config says "not yet published" raises
      ``WeightsNotPublishedError`` naming the tag and its training command;
    - an unreadable safetensors file (corrupted, truncated) raises ``WeightsError`` naming the file.
    """
    given = kwargs.get('pretrained_cfg')
    if isinstance(given, Mapping) and given.get('source') in ('hf-hub', 'local-dir'):
        where = f"config.json of {given.get('hf_hub_id') or given.get('file')}"
        validate_checkpoint_config(given, kwargs.get('pretrained_model_args'), variant, where)
    cfg = None
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, given, kwargs.get('pretrained_cfg_overlay')).to_dict()
        from_registry = (
            cfg.get('source') not in ('hf-hub', 'local-dir') and not cfg.get('file') and not cfg.get('state_dict'))
        tag = f"{cfg.get('architecture') or variant}.{cfg.get('tag')}"
        if from_registry and cfg.get('hf_hub_id') and is_published(tag) is False:
            hub_cfg = load_hub_config(tag)
            if cfg['hf_hub_id'] == hub_cfg['repo_id']:
                raise WeightsNotPublishedError(
                    f"No pretrained weights are published for {tag} yet (status in hub_configs/{tag}.json: "
                    f"{hub_cfg['status']!r}; Hub repo {hub_cfg['repo_id']}). Train them with\n"
                    f"    {hub_cfg['training']['command']}\n"
                    f"and load the result with timm.create_model('local-dir:<checkpoint folder>'), "
                    f"or use pretrained=False for random initialisation.")
    try:
        yield
    except SafetensorError as error:
        location = _weights_location(cfg or {})
        raise WeightsError(
            f'cannot read the weights of {variant} from {location}: the safetensors file is corrupted or '
            f'truncated ({error}). Delete it (for the Hub: its snapshot in the Hugging Face cache) and '
            f'download or export it again.') from error


def check_weights_file(path: Union[str, os.PathLike]) -> Dict[str, tuple]:
    """Reads a safetensors file's header and every tensor; returns {name: shape}. Raises ``WeightsError``."""
    path = Path(path)
    try:
        shapes = {}
        with safe_open(str(path), framework='pt') as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_tensor(key).shape)
        return shapes
    except (SafetensorError, OSError) as error:
        raise WeightsError(f'{path}: not a readable safetensors file (corrupted or truncated?): {error}') from error


def check_checkpoint(checkpoint_dir: Union[str, os.PathLike], **model_kwargs) -> torch.nn.Module:
    """Validates a timm-style checkpoint folder (``config.json`` + ``model.safetensors``) and returns the
    model it loads into (through ``timm.create_model('local-dir:...', pretrained=True)``)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise ConfigError(f'{folder}: not a directory')
    _read_config_json(folder)  # config first: nothing is read from the weights before it is valid
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        raise WeightsError(
            f'{folder}: no {WEIGHTS_NAME}' + (f' (found pickle files {pickles}; only safetensors are '
                                              f'published: re-export with timm.models.save_for_hf(..., '
                                              f'safe_serialization=True))' if pickles else ''))
    check_weights_file(weights)
    return timm.create_model(f'local-dir:{folder}', pretrained=True, **model_kwargs)


# ---- publishing ----------------------------------------------------------------------------------------


def _find_hub_config(repo_id: Optional[str], architecture: str, tag: Optional[str]) -> Dict[str, Any]:
    configs = list_hub_configs()
    for cfg in configs:
        if repo_id and cfg['repo_id'] == repo_id:
            return cfg
    for cfg in configs:
        if tag and cfg['tag'] == f'{architecture}.{tag}':
            return cfg
    matches = [cfg for cfg in configs if cfg['model'] == architecture]
    if len(matches) == 1:
        return matches[0]
    raise ConfigError(
        f'no hub config for repo {repo_id!r} / architecture {architecture!r}: pass config= '
        f"(one of {[c['tag'] for c in configs]}) or add hub_configs/<model>.<tag>.json")


def _assert_upload_folder(folder: Path) -> None:
    names = sorted(p.name for p in folder.iterdir())
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    assert not pickles, f'pickle files must never be published: {pickles}'
    assert names == sorted(UPLOAD_FILES), f'the upload folder must hold exactly {sorted(UPLOAD_FILES)}, got {names}'


def push_checkpoint(
        checkpoint_dir: Union[str, os.PathLike],
        repo_id: Optional[str] = None,
        config: Optional[Union[str, os.PathLike, Mapping[str, Any]]] = None,
        dry_run: Optional[Union[str, os.PathLike]] = None,
        commit_message: Optional[str] = None,
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        update_config: bool = True,
):
    """Publishes a trained checkpoint folder to the Hub (or, with ``dry_run``, writes the folder that
    would be uploaded and returns its path).

    Args:
        checkpoint_dir: a timm-style folder, ``config.json`` + ``model.safetensors``, as written by
            ``timm.models.save_for_hf(model, dir, safe_serialization=True)``.
        repo_id: target repo; default: the hub config's ``repo_id``.
        config: the hub config (tag, path or dict); default: found by ``repo_id``, else by the
            checkpoint's architecture and pretrained tag.
        dry_run: a new or empty directory: write ``config.json``, ``model.safetensors`` and ``README.md``
            there and upload nothing.
        update_config: after a real push to the hub config's own repo, set its ``status`` to
            "published" and record the commit in the hub config file.

    Returns:
        the dry-run folder (``Path``), or the ``huggingface_hub.CommitInfo`` of the upload.
    """
    folder = Path(checkpoint_dir)
    checkpoint_cfg = _read_config_json(folder)
    tag = checkpoint_cfg['pretrained_cfg'].get('tag')
    hub_cfg = load_hub_config(config) if config is not None else _find_hub_config(
        repo_id, checkpoint_cfg['architecture'], tag)
    repo_id = repo_id or hub_cfg['repo_id']
    if checkpoint_cfg['architecture'] != hub_cfg['model']:
        raise ConfigError(f"checkpoint architecture {checkpoint_cfg['architecture']!r} is not {hub_cfg['model']!r} "
                          f"of hub config {hub_cfg['tag']}")

    model = check_checkpoint(folder)
    params = sum(p.numel() for p in model.parameters())
    if params != hub_cfg['architecture']['params'] or model.iterations != hub_cfg['architecture']['routing_iterations']:
        raise ConfigError(
            f"checkpoint ({params:,} params, {model.iterations} routing iterations) does not match hub config "
            f"{hub_cfg['tag']} ({hub_cfg['architecture']['params']:,} params, "
            f"{hub_cfg['architecture']['routing_iterations']} iterations): its card would describe another model")
    if model.num_classes != hub_cfg['dataset']['num_classes']:
        raise ConfigError(f"checkpoint has {model.num_classes} classes, {hub_cfg['dataset']['name']} has "
                          f"{hub_cfg['dataset']['num_classes']}")
    if hub_cfg['results'].get('mean') is None:
        _logger.warning('%s: no measured results in its hub config; the card will say so', hub_cfg['tag'])

    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(dry_run) if dry_run is not None else Path(tmp) / 'upload'
        if staging.exists() and any(staging.iterdir()):
            raise FileExistsError(f'{staging} is not empty')
        save_for_hf(model, staging, safe_serialization=True)  # timm's exporter: config.json + model.safetensors
        (staging / CARD_NAME).write_text(render_card(hub_cfg, published=True), encoding='utf-8')
        _assert_upload_folder(staging)
        # what is uploaded must load back into the same weights
        reloaded = dict(_read_safetensors(staging / WEIGHTS_NAME))
        original = model.state_dict()
        assert reloaded.keys() == original.keys() and all(torch.equal(reloaded[k], original[k]) for k in original)
        if dry_run is not None:
            return staging

        from huggingface_hub import HfApi
        from . import __version__
        api = HfApi(token=token, library_name='timm_capsules', library_version=__version__)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=staging, revision=revision,
            commit_message=commit_message or f"Upload {hub_cfg['tag']} ({hub_cfg['training']['preset']})")
    if update_config and repo_id == hub_cfg['repo_id'] and not isinstance(config, Mapping):
        path = _config_path(config) if config is not None else hub_configs_dir() / f"{hub_cfg['tag']}.json"
        hub_cfg['status'] = PUBLISHED
        hub_cfg['hub_commit'] = getattr(commit, 'oid', None)
        path.write_text(json.dumps(hub_cfg, indent=2) + '\n', encoding='utf-8')
    return commit


def _read_safetensors(path: Path) -> Iterator:
    with safe_open(str(path), framework='pt') as handle:
        for key in handle.keys():
            yield key, handle.get_tensor(key)


def install_in_cache(
        folder: Union[str, os.PathLike],
        repo_id: str,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        revision: str = 'main',
) -> Path:
    """Places a repo folder (e.g. a ``push --dry-run`` folder) in a Hugging Face Hub cache, as a download
    would (``models--org--name/refs/<revision>`` holding a 40-hex commit, ``snapshots/<commit>/``), so
    that ``pretrained=True`` and ``hf-hub:`` load it with ``HF_HUB_OFFLINE=1``. Returns the snapshot."""
    from huggingface_hub import constants

    folder = Path(folder)
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    digest = hashlib.sha1()
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for path in files:
        digest.update(path.name.encode())
        with path.open('rb') as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b''):
                digest.update(chunk)
    commit = digest.hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in files:
        target = snapshot / path.name
        if target.exists():
            target.unlink()
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'refs' / revision).write_text(commit)
    return snapshot


@contextlib.contextmanager
def offline_hub_cache(
        cache_dir: Union[str, os.PathLike],
        hub_configs: Optional[Union[str, os.PathLike]] = None,
) -> Iterator[Path]:
    """Points huggingface_hub at a local Hub cache in offline mode (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``),
    optionally with another hub_configs directory, and restores everything on exit. huggingface_hub reads
    these variables once, at import, into ``huggingface_hub.constants``; both are set here. For tests and
    machines without network (fill the cache with ``install_in_cache``)."""
    from huggingface_hub import constants

    env = {'HF_HUB_CACHE': str(cache_dir), 'HF_HUB_OFFLINE': '1'}
    if hub_configs is not None:
        env[CONFIG_DIR_ENV] = str(hub_configs)
    saved_env = {key: os.environ.get(key) for key in env}
    saved = (constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)
    os.environ.update(env)
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache_dir), True
    try:
        yield Path(cache_dir)
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---- command line ------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m timm_capsules.hub', description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    push = sub.add_parser('push', help='publish a checkpoint folder (or --dry-run it)')
    push.add_argument('--config', required=True, help='hub_configs/<tag>.json (or the tag)')
    push.add_argument('--checkpoint', required=True, help='folder with config.json + model.safetensors')
    push.add_argument('--dry-run', metavar='DIR', help='write the upload folder here; upload nothing')
    push.add_argument('--repo-id', help="override the hub config's repo_id")
    push.add_argument('--commit-message')
    push.add_argument('--private', action='store_true')
    push.add_argument('--revision')
    card = sub.add_parser('card', help='render a model card')
    card.add_argument('--config', required=True)
    card.add_argument('--output')
    card.add_argument('--published', action='store_true', help='render it as the published card')
    table = sub.add_parser('table', help='print the README model table')
    group = table.add_mutually_exclusive_group()
    group.add_argument('--check', metavar='README', help='exit 1 if the README table is out of date')
    group.add_argument('--write', metavar='README', help='replace the table between the markers')
    check = sub.add_parser('check', help='validate a checkpoint folder')
    check.add_argument('--checkpoint', required=True)
    record = sub.add_parser('record', help='write measured accuracies (one per seed) into a hub config')
    record.add_argument('--config', required=True)
    record.add_argument('--top1', type=float, nargs='+', required=True)
    record.add_argument('--checkpoint-top1', type=float)
    cache = sub.add_parser('cache', help='place a dry-run folder in a local Hub cache (offline use)')
    cache.add_argument('--folder', required=True)
    cache.add_argument('--repo-id', required=True)
    cache.add_argument('--cache-dir')
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ConfigError, WeightsError, WeightsNotPublishedError, FileExistsError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == 'push':
        result = push_checkpoint(args.checkpoint, repo_id=args.repo_id, config=args.config, dry_run=args.dry_run,
                                 commit_message=args.commit_message, private=args.private, revision=args.revision)
        print(result if args.dry_run else getattr(result, 'commit_url', result))
    elif args.command == 'card':
        text = render_card(args.config, published=True if args.published else None)
        if args.output:
            Path(args.output).write_text(text, encoding='utf-8')
        else:
            sys.stdout.write(text)
    elif args.command == 'table':
        if args.check or args.write:
            ok = update_readme_table(args.check or args.write, write=bool(args.write))
            print('README model table is up to date' if ok else
                  ('README model table rewritten' if args.write else 'README model table is out of date'))
            return 0 if ok or args.write else 1
        sys.stdout.write(_table_block(render_model_table()) + '\n')
    elif args.command == 'check':
        model = check_checkpoint(args.checkpoint)
        print(f"{args.checkpoint}: OK ({model.pretrained_cfg.get('architecture')}, "
              f"{sum(p.numel() for p in model.parameters()):,} params)")
    elif args.command == 'record':
        cfg = record_results(args.config, args.top1, args.checkpoint_top1)
        print(json.dumps(cfg['results'], indent=2))
    elif args.command == 'cache':
        print(install_in_cache(args.folder, args.repo_id, args.cache_dir))
    return 0


if __name__ == '__main__':
    # `python -m` runs this file as `__main__`, a second copy of the module: its error classes are not the
    # ones the library raises (capsnet imports timm_capsules.hub), so main() here would not catch them
    from timm_capsules.hub import main as package_main
    sys.exit(package_main())
