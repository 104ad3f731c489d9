"""Checking a model description before anything is built: the arguments a ``config.json`` (or a hub config)
gives one of this package's models, for name, type and range against the model class's constructor, and the
memory the model they describe would take (``memory_budget``). ``loading`` runs these checks wherever timm reads
a checkpoint; they raise ``ConfigError`` naming the file and the argument.

This module imports no model module (the model files import it, through ``loading``).
"""

import collections.abc
import inspect
import json
import math
import typing
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import timm
from timm.layers import SelectAdaptivePool2d
from timm.models import model_entrypoint

from .memory_budget import MEMORY_LIMIT_ENV, estimate_memory, memory_limit_bytes

__all__ = [
    'ConfigError',
    'MAX_ITERATIONS',
    'MAX_SIZE',
    'MAX_LIST_LENGTH',
    'model_class',
    'our_architectures',
    'validate_model_args',
    'validate_checkpoint_config',
    'estimate_model_memory',
    'check_memory_budget',
]

# the paper studies t = 1..5; every iteration keeps a pose snapshot per layer, so an unbounded t (say from a
# hostile config.json) would only exhaust memory
MAX_ITERATIONS = 64
# every other count or size in a config.json (channels, capsules, pose entries, classes, image sides, kernel
# sizes, ...) is at most MAX_SIZE, and a list (capsule_layers, ...) holds at most MAX_LIST_LENGTH entries; what
# these allow together is then held to the memory budget (check_memory_budget), estimated on the meta device
# before anything is allocated
MAX_SIZE = 2**16
MAX_LIST_LENGTH = 256
_PACKAGE = __name__.rpartition('.')[0]


class ConfigError(ValueError):
    """A hub config (``hub_configs/*.json``) or a checkpoint's ``config.json`` is malformed."""


def _require(condition: bool, where: str, message: str):
    if not condition:
        raise ConfigError(f'{where}: {message}')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- what the model classes accept ----------------------------------------------------------------------


def our_architectures() -> List[str]:
    """Every architecture registered with timm by this package, whatever its model file."""
    return [name for name in timm.list_models() if model_entrypoint(name).__module__.startswith(f'{_PACKAGE}.')]


def model_class(architecture: str) -> type:
    """The class a timm entrypoint builds, from its return annotation."""
    return typing.get_type_hints(model_entrypoint(architecture))['return']


def _constructor_parameters(cls: type) -> Dict[str, Tuple[Any, Any]]:
    """{argument: (type hint, default)} of ``cls``'s constructor, following ``**kwargs`` up the bases
    (e.g. a subclass of timm's ResNet that passes its keywords on)."""
    parameters = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get('__init__')
        if init is None:
            continue
        try:
            hints = typing.get_type_hints(init)
        except (NameError, TypeError):  # annotations that do not resolve: treat them as Any
            hints = {}
        passes_on = False
        for name, parameter in inspect.signature(init).parameters.items():
            if name == 'self' or parameter.kind == parameter.VAR_POSITIONAL:
                continue
            if parameter.kind == parameter.VAR_KEYWORD:
                passes_on = True
                continue
            default = None if parameter.default is parameter.empty else parameter.default
            hint = hints.get(name, type(default) if default is not None else Any)
            parameters.setdefault(name, (hint, default))
        if not passes_on:
            break
    return parameters


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace('typing.', '')


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value can stand for ``hint`` (lists stand for tuples and sequences)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union or type(hint).__name__ == 'UnionType':
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return not args or (len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args)))
    if origin in (list, collections.abc.Sequence):
        return isinstance(value, (list, tuple)) and (not args or all(_matches(v, args[0]) for v in value))
    if origin in (dict, collections.abc.Mapping):
        return (
            isinstance(value, dict)
            and all(isinstance(k, str) for k in value)
            and (not args or all(_matches(v, args[1]) for v in value.values()))
        )
    return False  # a class, a callable, a torch type: nothing a JSON file can hold


def _check_numbers(arg: str, name: str, value: Any, where: str, in_list: bool = False):
    """Sizes and counts are positive (a named ``num_classes``, padding or index may be 0; entries of a list
    of mixed specs only non-negative) and at most ``MAX_SIZE`` (``max_votes``, a chunk size, at most 2**40),
    lists and objects hold at most ``MAX_LIST_LENGTH`` entries, other numbers are non-negative, rates and
    momenta at most 1."""
    if isinstance(value, (dict, list, tuple)):
        _require(
            len(value) <= MAX_LIST_LENGTH, where, f'{arg} must hold at most {MAX_LIST_LENGTH} entries, got {len(value)}'
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _check_numbers(f'{arg}.{key}', key, item, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_numbers(arg, name, item, where, in_list=True)
    elif _is_int(value):
        if in_list or name == 'num_classes' or name.endswith(('padding', 'index')):
            _require(value >= 0, where, f'{arg} must not be negative, got {value!r}')
        else:
            _require(value >= 1, where, f'{arg} must be positive, got {value!r}')
        top = 2**40 if name == 'max_votes' else MAX_SIZE
        _require(value <= top, where, f'{arg} must be at most {top}, got {value!r}')
    elif isinstance(value, float):
        if name.endswith('eps'):
            _require(value > 0, where, f'{arg} must be positive, got {value!r}')
        _require(value >= 0, where, f'{arg} must not be negative, got {value!r}')
        if name.endswith(('_rate', 'momentum')):
            _require(value <= 1, where, f'{arg} must be in [0, 1], got {value!r}')


def _check_range(name: str, value: Any, where: str):
    """Ranges the types cannot say; the arguments that set how much memory a model takes are bounded."""
    arg = f'model_args.{name}'
    if name == 'iterations':
        _require(1 <= value <= MAX_ITERATIONS, where, f'{arg} must be between 1 and {MAX_ITERATIONS}, got {value!r}')
    elif name == 'img_size':
        sizes = value if isinstance(value, (list, tuple)) else [value]
        _require(all(size >= 1 for size in sizes), where, f'{arg} must be positive, got {value!r}')
    elif name == 'capsule_layers':
        for spec in value:
            _require(
                spec[0] in ('conv', 'fc') and len(spec) == (4 if spec[0] == 'conv' else 2),
                where,
                f"{arg}: each layer is ['conv', capsules, kernel, stride] or ['fc', capsules], got {spec!r}",
            )
            _require(all(size >= 1 for size in spec[1:]), where, f'{arg}: sizes must be positive, got {spec!r}')
    elif name == 'global_pool' and value is not None:
        try:
            SelectAdaptivePool2d(pool_type=value)  # timm's own list of pool types
        except (AssertionError, ValueError, TypeError, KeyError):
            raise ConfigError(f'{where}: {arg}: unknown pool type {value!r}') from None
    elif name == 'backbone':
        _require(
            value in ('simple', 'resnet') or timm.is_model(value),
            where,
            f"{arg} must be 'simple', 'resnet' or a timm model name, got {value!r}",
        )
    _check_numbers(arg, name, value, where)


def validate_model_args(model_args: Mapping[str, Any], architecture: str, where: str = 'config.json') -> None:
    """Checks every model argument of a ``config.json`` for name, type and range against the constructor of
    the architecture's class, before anything is built. Raises ``ConfigError`` naming the argument."""
    _require(isinstance(model_args, Mapping), where, '"model_args" must be an object')
    parameters = _constructor_parameters(model_class(architecture))
    placement = sorted({'device', 'dtype'} & set(model_args))
    _require(
        not placement,
        where,
        f'model_args must not set {placement}: where a model lives and its precision '
        f'are chosen when loading (create_model(..., device=, dtype=)), not by a checkpoint',
    )
    unknown = sorted(set(model_args) - set(parameters))
    _require(
        not unknown,
        where,
        f'model_args has unknown arguments {unknown} ({model_class(architecture).__name__} takes {sorted(parameters)})',
    )
    for name, value in model_args.items():
        hint, _ = parameters[name]
        if isinstance(value, (list, tuple, dict)):  # before walking it
            _require(
                len(value) <= MAX_LIST_LENGTH,
                where,
                f'model_args.{name} must hold at most {MAX_LIST_LENGTH} entries, got {len(value)}',
            )
        _require(_matches(value, hint), where, f'model_args.{name} must be {_type_name(hint)}, got {value!r}')
        _check_range(name, value, where)


def validate_checkpoint_config(
    pretrained_cfg: Mapping[str, Any],
    model_args: Optional[Mapping[str, Any]] = None,
    architecture: Optional[str] = None,
    where: str = 'config.json',
) -> None:
    """Checks the fields of a timm ``config.json`` (its ``pretrained_cfg`` and ``model_args``) that building
    and loading rely on, before any weights are read. Raises ``ConfigError``."""
    _require(isinstance(pretrained_cfg, Mapping), where, 'pretrained_cfg must be an object')
    if architecture is not None:
        ours = our_architectures()
        _require(architecture in ours, where, f'unknown architecture {architecture!r} (timm_capsules has {ours})')
    num_classes = pretrained_cfg.get('num_classes')
    _require(_is_int(num_classes) and num_classes >= 0, where, f'num_classes must be an int >= 0, got {num_classes!r}')
    _require(num_classes <= MAX_SIZE, where, f'num_classes must be at most {MAX_SIZE}, got {num_classes!r}')
    size = pretrained_cfg.get('input_size')
    _require(
        isinstance(size, (list, tuple)) and len(size) == 3 and all(_is_int(s) and s > 0 for s in size),
        where,
        f'input_size must be [channels, height, width] of positive ints, got {size!r}',
    )
    _require(all(s <= MAX_SIZE for s in size), where, f'input_size entries must be at most {MAX_SIZE}, got {size!r}')
    for key in ('mean', 'std'):
        value = pretrained_cfg.get(key)
        _require(
            isinstance(value, (list, tuple)) and len(value) == size[0] and all(_is_number(v) for v in value),
            where,
            f'{key} must hold {size[0]} numbers (one per input channel), got {value!r}',
        )
    _require(all(v > 0 for v in pretrained_cfg['std']), where, 'std must be positive')
    labels = pretrained_cfg.get('label_names')
    _require(
        labels is None or (isinstance(labels, (list, tuple, dict)) and len(labels) == num_classes),
        where,
        f'label_names must have num_classes={num_classes} entries, got {None if labels is None else len(labels)}',
    )
    for key in ('classifier', 'first_conv'):
        value = pretrained_cfg.get(key)
        names = (value,) if isinstance(value, str) else value
        _require(
            value is None or (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)),
            where,
            f'{key} must be a module name or a list of them, got {value!r}',
        )
    model_args = dict(model_args or {})
    if architecture is not None:
        validate_model_args(model_args, architecture, where)
    if 'num_classes' in model_args:
        _require(
            model_args['num_classes'] == num_classes,
            where,
            f'model_args.num_classes={model_args["num_classes"]} disagrees with num_classes={num_classes}',
        )
    if 'in_chans' in model_args:
        _require(
            model_args['in_chans'] == size[0],
            where,
            f'model_args.in_chans={model_args["in_chans"]} disagrees with input_size[0]={size[0]}',
        )


# ---- the memory budget ------------------------------------------------------------------------------------


def estimate_model_memory(
    cls: type,
    model_kwargs: Mapping[str, Any],
    input_size: Optional[Tuple[int, int, int]] = None,
) -> Tuple[int, Optional[int]]:
    """``memory_budget.estimate_memory`` of ``cls`` built with those of ``model_kwargs`` its constructor takes
    (``backbone_pretrained`` off: nothing is downloaded for an estimate)."""
    parameters = _constructor_parameters(cls)
    kwargs = {k: v for k, v in model_kwargs.items() if k in parameters and k not in ('device', 'dtype')}
    if 'backbone_pretrained' in kwargs:
        kwargs['backbone_pretrained'] = False
    placement = {'device': 'meta'} if 'device' in parameters else {}
    return estimate_memory(lambda: cls(**kwargs, **placement), input_size)


def check_memory_budget(
    cls: type,
    model_kwargs: Mapping[str, Any],
    where: str,
    input_size: Optional[Tuple[int, int, int]] = None,
    named: Optional[Mapping[str, Any]] = None,
) -> None:
    """Refuses (``ConfigError`` naming ``where`` and the size arguments of ``named``, the config's own
    model_args, default all of ``model_kwargs``) a model whose parameters plus batch-1 activations, estimated
    on the meta device, exceed ``memory_limit_bytes()``."""
    try:
        limit = memory_limit_bytes()
    except ValueError as error:
        raise ConfigError(str(error)) from None
    weights, activations = estimate_model_memory(cls, model_kwargs, input_size)
    if weights + (activations or 0) <= limit:
        return
    sizes = {
        k: v
        for k, v in (model_kwargs if named is None else named).items()
        if (_is_int(v) or k in ('img_size', 'capsule_layers', 'backbone_args')) and k != 'max_votes'
    }
    what = f'{weights / 2**30:.3g} GiB of parameters' + (
        f' and {activations / 2**30:.3g} GiB of activations for one image' if activations else ''
    )
    raise ConfigError(
        f'{where}: model_args ask for {what}, over the memory budget of {limit / 2**30:.3g} GiB '
        f'(set {MEMORY_LIMIT_ENV} to allow more); its size arguments: '
        + ', '.join(f'{k}={json.dumps(v)}' for k, v in sorted(sizes.items()))
    )
