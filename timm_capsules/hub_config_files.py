"""The hub configs (``hub_configs/<model>.<tag>.json``): where they live, their validation, reading and listing
them, recording measured results into them, and the model table of ``docs/hub.md`` rendered from them. Releasing
(check, push, the offline cache, the command line) is ``hub.py``'s; the model cards are ``hub_cards.py``'s.
"""

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from timm.models import model_entrypoint, split_model_name_tag

from .config_checks import MAX_ITERATIONS, ConfigError, _is_int, _is_number, _require, our_architectures
from .hub_cards import NOT_PUBLISHED, PUBLISHED, fmt, mean_std, model_card
from .presets import PRESETS

__all__ = [
    'hub_configs_dir',
    'list_hub_configs',
    'load_hub_config',
    'validate_hub_config',
    'render_card',
    'render_model_table',
    'readme_table',
    'update_readme_table',
    'record_results',
]

CONFIG_DIR_ENV = 'TIMM_CAPSULES_HUB_CONFIGS'
STATUSES = (PUBLISHED, NOT_PUBLISHED)
TABLE_BEGIN, TABLE_END = '<!-- model-table -->', '<!-- /model-table -->'


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


def validate_hub_config(cfg: Mapping[str, Any], where: str = 'hub config') -> Dict[str, Any]:
    """Checks a hub config's fields and types; returns it as a dict. Raises ``ConfigError``."""
    _require(isinstance(cfg, Mapping), where, 'expected a JSON object')
    cfg = dict(cfg)
    for key in (
        'tag',
        'model',
        'repo_id',
        'status',
        'dataset',
        'architecture',
        'training',
        'results',
        'paper_results',
        'license',
        'tags',
    ):
        _require(key in cfg, where, f'missing field {key!r}')
    model, tag = split_model_name_tag(cfg['tag'])
    _require(
        bool(tag) and model == cfg['model'],
        where,
        f"tag {cfg['tag']!r} must be '<model>.<tag>' of model {cfg['model']!r}",
    )
    _require(model in our_architectures(), where, f'{model!r} is not a registered timm_capsules architecture')
    _require(cfg['status'] in STATUSES, where, f'status must be one of {STATUSES}, got {cfg["status"]!r}')
    _require(isinstance(cfg['repo_id'], str) and cfg['repo_id'].count('/') == 1, where, 'repo_id must be "org/name"')
    dataset = cfg['dataset']
    _require(isinstance(dataset, Mapping) and isinstance(dataset.get('name'), str), where, 'dataset.name missing')
    _require(
        isinstance(dataset.get('hub_ids'), list) and all(isinstance(d, str) for d in dataset['hub_ids']),
        where,
        'dataset.hub_ids must be a list of Hub dataset ids',
    )
    _require(
        _is_int(dataset.get('num_classes')) and dataset['num_classes'] > 0,
        where,
        'dataset.num_classes must be a positive int',
    )
    arch = cfg['architecture']
    _require(_is_int(arch.get('params')) and arch['params'] > 0, where, 'architecture.params must be a positive int')
    iterations = arch.get('routing_iterations')
    _require(
        iterations is None or (_is_int(iterations) and 1 <= iterations <= MAX_ITERATIONS),
        where,
        f'architecture.routing_iterations must be null (no routing) or an int in 1..{MAX_ITERATIONS}',
    )
    preset = cfg['training'].get('preset') if isinstance(cfg['training'], Mapping) else None
    _require(preset in PRESETS, where, f'training.preset must be one of timm_capsules.presets.PRESETS, got {preset!r}')
    _require(
        PRESETS[preset]['model'] == model,
        where,
        f'training.preset {preset!r} trains {PRESETS[preset]["model"]!r}, not {model!r}',
    )
    for key in ('results', 'paper_results'):
        results = cfg[key]
        _require(isinstance(results, Mapping), where, f'{key} must be an object')
        for stat in ('mean', 'std', 'best') + (('checkpoint',) if key == 'results' else ()):
            value = results.get(stat)
            _require(
                value is None or (_is_number(value) and 0 <= value <= 100),
                where,
                f'{key}.{stat} must be null or a percentage, got {value!r}',
            )
    results = cfg['results']
    seeds = results.get('num_seeds')
    per_seed = results.get('per_seed') or []
    _require(
        seeds is None or (_is_int(seeds) and seeds == len(per_seed)),
        where,
        'results.num_seeds must equal the number of results.per_seed entries',
    )
    if per_seed:  # the summary must be computed from the per-seed numbers, not typed in
        summary = _summarise(per_seed)
        for stat in ('mean', 'std', 'best'):
            _require(
                results.get(stat) == summary[stat],
                where,
                f'results.{stat}={results.get(stat)!r} does not match results.per_seed (expected {summary[stat]!r}); '
                f'use `python -m timm_capsules.hub record`',
            )
    else:
        _require(
            all(results.get(s) is None for s in ('mean', 'std', 'best')),
            where,
            'results.mean/std/best need results.per_seed',
        )
    _require(
        isinstance(cfg['tags'], list) and {'timm', 'image-classification'} <= set(cfg['tags']),
        where,
        "tags must be a list containing 'timm' and 'image-classification'",
    )
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
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f'{path}: not valid JSON ({error})') from error
    cfg = validate_hub_config(cfg, str(path))
    _require(path.stem == cfg['tag'], str(path), f'file name must be {cfg["tag"]}.json')
    return cfg


def _registry_order(cfg: Mapping[str, Any]) -> tuple:
    """(model file, position in its ``default_cfgs``): the order the model files list their models in."""
    module = sys.modules[model_entrypoint(cfg['model']).__module__]
    models = list(getattr(module, 'default_cfgs', {}))
    return module.__name__, models.index(cfg['model']) if cfg['model'] in models else len(models), cfg['tag']


def list_hub_configs(directory: Optional[Union[str, os.PathLike]] = None) -> List[Dict[str, Any]]:
    """Every hub config in ``directory`` (default ``hub_configs_dir()``), in the model files' order."""
    directory = Path(directory) if directory else hub_configs_dir()
    if directory is None:
        return []
    return sorted((load_hub_config(path) for path in directory.glob('*.json')), key=_registry_order)


def _summarise(values: Sequence[float]) -> Dict[str, Optional[float]]:
    values = [float(v) for v in values]
    return dict(
        mean=round(statistics.fmean(values), 2),
        std=round(statistics.stdev(values), 2) if len(values) > 1 else None,  # sample std over seeds
        best=round(max(values), 2),
    )


def record_results(
    config: Union[str, os.PathLike], top1: Sequence[float], checkpoint: Optional[float] = None
) -> Dict[str, Any]:
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


def render_card(cfg: Union[Mapping[str, Any], str, os.PathLike], published: Optional[bool] = None) -> str:
    """The model card (README.md) of a hub config (tag, path or dict); ``published`` defaults to its status."""
    cfg = load_hub_config(cfg)
    return model_card(cfg, cfg['status'] == PUBLISHED if published is None else published)


# ---- the model table (docs/hub.md) -------------------------------------------------------------------------


def render_model_table(configs: Optional[Sequence[Mapping[str, Any]]] = None) -> str:
    """The model table of docs/hub.md (Markdown), from the hub configs only."""
    configs = list_hub_configs() if configs is None else [validate_hub_config(c) for c in configs]
    lines = [
        '| tag | dataset | params | iterations | status | metric | ours: mean ± std (best), seeds '
        '| paper: mean (best) | train with |',
        '|---|---|---:|---:|---|---|---|---|---|',
    ]
    for cfg in configs:
        results, paper = cfg['results'], cfg['paper_results']
        ours = '—'
        if results.get('mean') is not None:
            ours = f'{mean_std(results)} ({fmt(results["best"])}), {results["num_seeds"]}'
        paper_text = (
            '—'
            if paper.get('mean') is None and paper.get('best') is None
            else f'{fmt(paper.get("mean"))} ({fmt(paper.get("best"))})'
        )
        status = (
            f'[published](https://huggingface.co/{cfg["repo_id"]})'
            if cfg['status'] == PUBLISHED
            else 'not yet published'
        )
        iterations = cfg['architecture'].get('routing_iterations')
        lines.append(
            f'| `{cfg["tag"]}` | {cfg["dataset"]["name"]} | {cfg["architecture"]["params"]:,} | '
            f'{"—" if iterations is None else iterations} | {status} | {results["metric"].split(":")[0]} | '
            f'{ours} | {paper_text} | `--preset {cfg["training"]["preset"]}` |'
        )
    return '\n'.join(lines) + '\n'


def _table_block(table: str) -> str:
    return f'{TABLE_BEGIN}\n{table}{TABLE_END}'


def readme_table(readme_text: str) -> Optional[str]:
    """The table between a document's markers (None if the markers are missing)."""
    start, end = readme_text.find(TABLE_BEGIN), readme_text.find(TABLE_END)
    if start < 0 or end < start:
        return None
    return readme_text[start + len(TABLE_BEGIN) : end].strip('\n') + '\n'


def update_readme_table(readme: Union[str, os.PathLike], write: bool = False) -> bool:
    """True if the document's table equals ``render_model_table()``; with ``write``, replaces it."""
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
