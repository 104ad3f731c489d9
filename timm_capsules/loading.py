"""Loading checkpoints safely: reading ``config.json``, state-dict checks and the pretrained guard (the checks of
a model description itself live in ``config_checks``; their names are exported here too).

The model files build every model inside ``pretrained_guard`` and pass ``check_state_dict`` as timm's
``pretrained_filter_fn``, so that whatever ``timm.create_model`` reads (a registry tag's Hub repo, ``hf-hub:``,
``local-dir:``) fails with an error that names the file and what is wrong:

- a ``config.json`` that is not JSON, or lacks what timm needs, is caught where timm reads it (timm parses it
  before any model code runs; see ``_read_config_json_for_timm``);
- its ``pretrained_cfg`` and ``model_args`` are checked for type and range before the model is built; the
  argument types come from the model class's constructor (the timm entrypoint's return annotation); every
  count and size is bounded (``MAX_ITERATIONS``, ``MAX_SIZE``, ``MAX_LIST_LENGTH``);
- the model it describes is then held to a memory budget (parameters plus the activations of one image,
  estimated on the meta device, so nothing is allocated): ``TIMM_CAPSULES_MEMORY_LIMIT_GB``, default 8 GiB;
- weights that are missing on the Hub (or offline and not cached) raise ``WeightsNotPublishedError`` with the
  command that trains them; unreadable safetensors files and weights that do not fit raise ``WeightsError``.

This module imports no model module (the model files import it).
"""

import contextlib
import inspect
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

import timm
from timm.models import resolve_pretrained_cfg

from .config_checks import (
    MAX_ITERATIONS,
    MAX_LIST_LENGTH,
    MAX_SIZE,
    ConfigError,
    _constructor_parameters,
    _require,
    check_memory_budget,
    estimate_model_memory,
    model_class,
    our_architectures,
    validate_checkpoint_config,
    validate_model_args,
)
from .memory_budget import DEFAULT_MEMORY_LIMIT_GB, MEMORY_LIMIT_ENV, memory_limit_bytes
from .presets import preset_for_model

__all__ = [
    'ConfigError',
    'WeightsError',
    'WeightsNotPublishedError',
    'NonFiniteWeightsWarning',
    'MAX_ITERATIONS',
    'MAX_SIZE',
    'MAX_LIST_LENGTH',
    'MEMORY_LIMIT_ENV',
    'DEFAULT_MEMORY_LIMIT_GB',
    'memory_limit_bytes',
    'estimate_model_memory',
    'check_memory_budget',
    'model_class',
    'our_architectures',
    'training_command',
    'validate_model_args',
    'validate_checkpoint_config',
    'read_config_json',
    'check_state_dict',
    'check_weights_file',
    'pretrained_guard',
]

CONFIG_NAME, WEIGHTS_NAME = 'config.json', 'model.safetensors'


class WeightsError(RuntimeError):
    """A weights file is unreadable (corrupted, truncated), holds non-finite values or does not fit the
    architecture."""


class NonFiniteWeightsWarning(UserWarning):
    """Weights that were loaded hold NaN or infinity (the message names the tensors)."""


class WeightsNotPublishedError(RuntimeError):
    """``pretrained=True`` found no weights: the Hub has no such repo or file, or there is no network (or
    ``HF_HUB_OFFLINE=1``) and the local cache does not hold them."""


def _parse_config_json(path: Path) -> Dict[str, Any]:
    """The checks timm's own parser needs to not fail with a bare ``JSONDecodeError``/``KeyError``."""
    try:
        cfg = json.loads(path.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f'{path}: not valid JSON ({error})') from error
    except RecursionError:
        raise ConfigError(f'{path}: nested too deeply to be a config.json') from None
    _require(isinstance(cfg, dict), str(path), 'expected a JSON object')
    _require(isinstance(cfg.get('architecture'), str), str(path), 'missing "architecture"')
    for key in ('pretrained_cfg', 'model_args'):
        _require(isinstance(cfg.get(key, {}), dict), str(path), f'"{key}" must be an object')
    _require(
        timm.is_model(cfg['architecture']),
        str(path),
        f'unknown architecture {cfg["architecture"]!r} (import the package that registers it first)',
    )
    _check_other_architecture_args(cfg['architecture'], cfg.get('model_args', {}), str(path))
    return cfg


# what timm's build_model_with_cfg takes besides the model class's own arguments
_BUILD_ARGS = {
    'features_only',
    'feature_cfg',
    'out_indices',
    'pretrained_strict',
    'pretrained_cfg',
    'pretrained_cfg_overlay',
    'feature_cls',
    'flatten_sequential',
    'kwargs_filter',
}


def _check_other_architecture_args(architecture: str, model_args: Mapping[str, Any], where: str):
    """Ours are checked in full before they are built (``validate_model_args``); another package's model
    (e.g. timm's resnet18) only for argument names its constructor cannot take, where it says which it takes
    (no ``**kwargs`` left open), so that the error names the file instead of a bare ``TypeError``."""
    if not model_args or architecture in our_architectures():
        return
    try:
        cls = model_class(architecture)
    except (KeyError, NameError, TypeError):
        return  # no return annotation: nothing to check against
    if not isinstance(cls, type):
        return
    for klass in cls.__mro__:  # closed: a constructor without **kwargs, or nn.Module's (which refuses them)
        init = klass.__dict__.get('__init__')
        if init is not None and (
            klass is torch.nn.Module
            or inspect.Parameter.VAR_KEYWORD not in [p.kind for p in inspect.signature(init).parameters.values()]
        ):
            break
    else:
        return  # passes its keywords on to something we cannot see
    unknown = sorted(set(model_args) - set(_constructor_parameters(cls)) - _BUILD_ARGS)
    _require(
        not unknown,
        where,
        f'model_args has arguments {unknown} that {architecture} '
        f'({cls.__name__}) does not take; is "architecture" the model these args are for?',
    )


def read_config_json(folder: Union[str, Path]) -> Dict[str, Any]:
    """Reads and validates a checkpoint folder's ``config.json`` (one of this package's models)."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f'{folder}: no {CONFIG_NAME}')
    cfg = _parse_config_json(path)
    _require(isinstance(cfg.get('pretrained_cfg'), dict), str(path), 'missing "pretrained_cfg" object')
    pretrained_cfg = dict(cfg['pretrained_cfg'])
    if 'num_classes' in cfg:  # timm's top-level override
        pretrained_cfg['num_classes'] = cfg['num_classes']
    validate_checkpoint_config(pretrained_cfg, cfg.get('model_args'), cfg['architecture'], str(path))
    return cfg


def _read_config_json_for_timm(path: Union[str, Path]) -> Dict[str, Any]:
    return _parse_config_json(Path(path))


def _install_config_json_check():
    """timm reads ``config.json`` (``local-dir:``, ``hf-hub:``) in ``timm.models._hub.load_cfg_from_json``
    before any model code runs, so a broken file surfaces as a bare ``JSONDecodeError`` or ``KeyError`` that
    names no file; no hook of timm's runs earlier. Replacing that one reader (same result for every valid
    file, of any timm model) is the only place to name the file."""
    from timm.models import _hub

    if _hub.load_cfg_from_json is not _read_config_json_for_timm:
        _hub.load_cfg_from_json = _read_config_json_for_timm


_install_config_json_check()


# ---- weights -------------------------------------------------------------------------------------------


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
                key in first_convs
                and tensor.ndim == 4
                and tensor.shape[1] == source_chans
                and tensor.shape[0] == want.shape[0]
                and tensor.shape[2:] == want.shape[2:]
            )
            if not in_chans_change:
                wrong.append(f'{key}: checkpoint {tuple(tensor.shape)}, model {tuple(want.shape)}')
    if missing or unexpected or wrong:

        def block(title, items):
            shown = items[:20] + ([f'... and {len(items) - 20} more'] if len(items) > 20 else [])
            return f'\n  {title} ({len(items)}):\n    ' + '\n    '.join(shown) if items else ''

        source = cfg.get('file') or cfg.get('hf_hub_id') or 'the checkpoint'
        raise WeightsError(
            f'the weights from {source} do not fit {cfg.get("architecture", type(model).__name__)} '
            f'(built with {getattr(model, "num_classes", "?")} classes, '
            f'{getattr(model, "in_chans", "?")} input channels):'
            + block('shape mismatches', wrong)
            + block('missing from the checkpoint', missing)
            + block('not in the model', unexpected)
        )
    bad = non_finite_tensors({k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)})
    if bad:
        source = cfg.get('file') or cfg.get('hf_hub_id') or 'the checkpoint'
        shown = ', '.join(bad[:20]) + (f' and {len(bad) - 20} more' if len(bad) > 20 else '')
        warnings.warn(
            f'{source}: {len(bad)} tensor(s) hold NaN or infinity (a diverged run?): {shown}',
            NonFiniteWeightsWarning,
            stacklevel=2,
        )
    return state_dict


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors holding NaN or infinity."""
    return [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def check_weights_file(path: Union[str, Path]) -> Dict[str, tuple]:
    """Reads a safetensors file's header and every tensor; returns {name: shape}. Raises ``WeightsError``
    for an unreadable file or non-finite values (naming the tensors)."""
    path = Path(path)
    shapes, bad = {}, []
    try:
        with safe_open(str(path), framework='pt') as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                shapes[key] = tuple(tensor.shape)
                bad += non_finite_tensors({key: tensor})
    except (SafetensorError, OSError) as error:
        raise WeightsError(f'{path}: not a readable safetensors file (corrupted or truncated?): {error}') from error
    if bad:
        shown = ', '.join(bad[:20]) + (f' and {len(bad) - 20} more' if len(bad) > 20 else '')
        raise WeightsError(f'{path}: {len(bad)} tensor(s) hold NaN or infinity (a diverged run?): {shown}')
    return shapes


# ---- the guard around building ---------------------------------------------------------------------------


def training_command(architecture: str, preset: Optional[str] = None) -> str:
    """The command that trains ``architecture``'s weights with ``preset`` (default: the preset that trains
    it, the paper's recipe)."""
    preset = preset or preset_for_model(architecture)
    how = f'--preset {preset}' if preset else f'--model {architecture}'
    return f'accelerate launch train_accelerate.py {how} --output_dir <output_dir>'


def _weights_location(cfg: Mapping[str, Any]) -> str:
    if cfg.get('source') == 'local-dir' or cfg.get('file'):
        return str(cfg.get('file'))
    if cfg.get('hf_hub_id'):
        return f'Hub repo {cfg["hf_hub_id"]} (cached file model.safetensors)'
    return 'the checkpoint'


def _config_location(cfg: Mapping[str, Any]) -> str:
    if cfg.get('source') == 'local-dir':
        return str(Path(cfg['file']) / CONFIG_NAME)
    return f'{CONFIG_NAME} of hf-hub:{cfg.get("hf_hub_id")}'


def _not_found_reason(error: Exception, repo: str) -> Optional[str]:
    """Why the Hub gave no weights, when that is what ``error`` says; None for any other failure."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, LocalEntryNotFoundError):
        mode = 'HF_HUB_OFFLINE=1' if constants.HF_HUB_OFFLINE else 'the Hub cannot be reached'
        return f'{mode} and the Hugging Face cache ({constants.HF_HUB_CACHE}) does not hold {repo}'
    if isinstance(error, GatedRepoError):
        return None  # it exists: access is the problem, and huggingface_hub's message says so
    if isinstance(error, RepositoryNotFoundError):
        return f'the Hub has no repo {repo}'
    if isinstance(error, RevisionNotFoundError):
        return f'the Hub repo {repo} has no such revision'
    if isinstance(error, EntryNotFoundError):
        return f'the Hub repo {repo} holds no weights file'
    return None


@contextlib.contextmanager
def pretrained_guard(
    variant: str, pretrained: bool, kwargs: Mapping[str, Any], cls: Optional[type] = None
) -> Iterator[None]:
    """Wraps ``build_model_with_cfg`` in the model files:

    - a ``config.json`` from ``hf-hub:``/``local-dir:`` is validated before the model is built or any weights
      are read, and the constructor's own objections to its arguments name the file (``ConfigError``);
    - the model it describes (``cls`` built with ``kwargs``) is held to the memory budget, estimated on the meta
      device before anything is allocated (``check_memory_budget``);
    - ``pretrained=True`` goes through timm's usual path (Hub download, or the local cache with
      ``HF_HUB_OFFLINE=1``); only when the Hub has no such repo or file, or it cannot be reached and nothing is
      cached, it raises ``WeightsNotPublishedError`` with the command that trains the weights;
    - an unreadable safetensors file (corrupted, truncated) raises ``WeightsError`` naming the file.
    """
    given = kwargs.get('pretrained_cfg')
    from_file = isinstance(given, Mapping) and given.get('source') in ('hf-hub', 'local-dir')
    if from_file:
        validate_checkpoint_config(given, kwargs.get('pretrained_model_args'), variant, _config_location(given))
    cfg = resolve_pretrained_cfg(variant, given, kwargs.get('pretrained_cfg_overlay')).to_dict() if pretrained else {}
    try:
        if from_file and cls is not None:
            check_memory_budget(
                cls,
                kwargs,
                _config_location(given),
                tuple(given.get('input_size') or ()) or None,
                named=kwargs.get('pretrained_model_args') or {},
            )
        yield
    except SafetensorError as error:
        raise WeightsError(
            f'cannot read the weights of {variant} from {_weights_location(cfg)}: the safetensors file is '
            f'corrupted or truncated ({error}). Delete it (for the Hub: its snapshot in the Hugging Face cache) '
            f'and download or export it again.'
        ) from error
    except (TypeError, ValueError, AssertionError) as error:
        if not from_file or isinstance(error, ConfigError):
            raise
        raise ConfigError(f'{_config_location(given)}: its model_args do not build {variant}: {error}') from error
    except Exception as error:
        repo = cfg.get('hf_hub_id')
        reason = _not_found_reason(error, repo) if pretrained and repo and cfg.get('source') != 'local-dir' else None
        if reason is None:
            raise
        tag = f'{variant}.{cfg["tag"]}' if cfg.get('tag') else variant
        raise WeightsNotPublishedError(
            f'no pretrained weights for {tag}: {reason}. Train them with\n'
            f'    {training_command(variant)}\n'
            f"and load the result with timm.create_model('local-dir:<output_dir>', pretrained=True), "
            f'or use pretrained=False for random initialisation.'
        ) from error
