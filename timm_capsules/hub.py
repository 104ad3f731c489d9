"""Releasing models on the Hugging Face Hub: checking and publishing checkpoints, the offline cache and the command
line (the hub configs, recording results and the model table: ``hub_config_files.py``, whose names are re-exported here;
model cards: ``hub_cards.py``; loading them back: ``loading.py``).

One JSON file per model tag lives in ``hub_configs/<model>.<tag>.json``, for any registered family. It holds
what the tag's Hub repo needs beyond the weights and the training recipe (repo id, dataset, training preset,
measured results, the paper's results, parameter count, routing iterations, license, tags; the citation is
``citation.py``'s) and its ``status``: ``"published"`` or ``"not yet published"``, which the model cards and the
model table show. The recipe itself is the preset's (``timm_capsules.presets``). Loading never reads these files:
``pretrained=True`` asks the Hub (or the local cache), so weights published later load with any installed version.

Publishing builds the exact folder that is uploaded (``config.json`` + ``model.safetensors`` + ``README.md``,
never a pickle) with timm's ``save_for_hf``; ``--dry-run DIR`` writes that folder and stops. ``check`` and
``push`` refuse weights that hold NaN or infinity.

Command line (``python -m timm_capsules.hub -h``)::

    push   --config hub_configs/<tag>.json --checkpoint DIR [--dry-run OUT] [--repo-id ORG/NAME]
    card   --config hub_configs/<tag>.json [--output README.md]
    table  [--check docs/hub.md | --write docs/hub.md]
    check  --checkpoint DIR
    record --config hub_configs/<tag>.json --top1 ACC [ACC ...] [--checkpoint-top1 ACC]
    cache  --folder DIR --repo-id ORG/NAME [--cache-dir DIR]
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import load_file

import timm
from timm.models import save_for_hf

from .config_checks import ConfigError
from .hub_cards import NOT_PUBLISHED, PUBLISHED, model_card  # noqa: F401  (NOT_PUBLISHED: callers read it here)
from .loading import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    NonFiniteWeightsWarning,
    WeightsError,
    WeightsNotPublishedError,
    check_weights_file,
    read_config_json,
)
from .hub_config_files import (  # noqa: F401  (re-exported: hub is where callers find the hub configs too)
    CONFIG_DIR_ENV,
    STATUSES,
    TABLE_BEGIN,
    TABLE_END,
    _config_path,
    _table_block,
    hub_configs_dir,
    list_hub_configs,
    load_hub_config,
    readme_table,
    record_results,
    render_card,
    render_model_table,
    update_readme_table,
    validate_hub_config,
)

__all__ = [
    'ConfigError',
    'WeightsError',
    'WeightsNotPublishedError',
    'hub_configs_dir',
    'list_hub_configs',
    'load_hub_config',
    'validate_hub_config',
    'render_card',
    'render_model_table',
    'update_readme_table',
    'check_checkpoint',
    'push_checkpoint',
    'install_in_cache',
    'record_results',
]

_logger = logging.getLogger(__name__)

CARD_NAME = 'README.md'
UPLOAD_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.pkl', '.pickle', '.ckpt', '.tar', '.npz', '.h5')


# ---- checking and publishing ---------------------------------------------------------------------------


def check_checkpoint(checkpoint_dir: Union[str, os.PathLike], **model_kwargs) -> torch.nn.Module:
    """Validates a timm-style checkpoint folder (``config.json`` + ``model.safetensors``: readable, finite,
    fitting the architecture) and returns the model it loads into (through
    ``timm.create_model('local-dir:...', pretrained=True)``)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise ConfigError(f'{folder}: not a directory')
    read_config_json(folder)  # config first: nothing is read from the weights before it is valid
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        raise WeightsError(
            f'{folder}: no {WEIGHTS_NAME}'
            + (
                f' (found pickle files {pickles}; only safetensors are '
                f'published: re-export with timm.models.save_for_hf(..., '
                f'safe_serialization=True))'
                if pickles
                else ''
            )
        )
    with warnings.catch_warnings():  # the error below names them
        warnings.simplefilter('ignore', NonFiniteWeightsWarning)
        model = timm.create_model(f'local-dir:{folder}', pretrained=True, **model_kwargs)
    check_weights_file(weights)  # loaded, so readable: this finds the tensors holding NaN or infinity
    return model


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
        f'(one of {[c["tag"] for c in configs]}) or add hub_configs/<model>.<tag>.json'
    )


def _check_upload_folder(folder: Path, model: torch.nn.Module) -> None:
    names = sorted(p.name for p in folder.iterdir())
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles or names != sorted(UPLOAD_FILES):
        raise WeightsError(
            f'{folder}: the upload folder must hold exactly {sorted(UPLOAD_FILES)} (never a pickle), got {names}'
        )
    check_weights_file(folder / WEIGHTS_NAME)
    reloaded, original = load_file(folder / WEIGHTS_NAME), model.state_dict()
    if reloaded.keys() != original.keys() or not all(torch.equal(reloaded[k], original[k]) for k in original):
        raise WeightsError(f'{folder / WEIGHTS_NAME} does not load back into the checkpoint model')


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
    if dry_run is not None and Path(dry_run).exists() and not Path(dry_run).is_dir():  # before any work
        raise FileExistsError(f'{dry_run}: the dry-run folder is a file (give a new or empty folder)')
    checkpoint_cfg = read_config_json(folder)
    tag = checkpoint_cfg['pretrained_cfg'].get('tag')
    hub_cfg = (
        load_hub_config(config)
        if config is not None
        else _find_hub_config(repo_id, checkpoint_cfg['architecture'], tag)
    )
    repo_id = repo_id or hub_cfg['repo_id']
    if checkpoint_cfg['architecture'] != hub_cfg['model']:
        raise ConfigError(
            f'checkpoint architecture {checkpoint_cfg["architecture"]!r} is not {hub_cfg["model"]!r} '
            f'of hub config {hub_cfg["tag"]}'
        )

    model = check_checkpoint(folder)  # readable, finite weights that fit the architecture
    params = sum(p.numel() for p in model.parameters())
    iterations = getattr(model, 'iterations', None)  # None: a family without routing iterations
    arch = hub_cfg['architecture']
    if params != arch['params'] or iterations != arch.get('routing_iterations'):
        raise ConfigError(
            f'checkpoint ({params:,} params, {iterations} routing iterations) does not match hub config '
            f'{hub_cfg["tag"]} ({arch["params"]:,} params, {arch.get("routing_iterations")} '
            f'iterations): its card would describe another model'
        )
    if model.num_classes != hub_cfg['dataset']['num_classes']:
        raise ConfigError(
            f'checkpoint has {model.num_classes} classes, {hub_cfg["dataset"]["name"]} has '
            f'{hub_cfg["dataset"]["num_classes"]}'
        )
    if hub_cfg['results'].get('mean') is None:
        _logger.warning('%s: no measured results in its hub config; the card will say so', hub_cfg['tag'])

    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(dry_run) if dry_run is not None else Path(tmp) / 'upload'
        if staging.exists() and any(staging.iterdir()):
            raise FileExistsError(f'{staging} is not empty')
        save_for_hf(model, staging, safe_serialization=True)  # timm's exporter: config.json + model.safetensors
        (staging / CARD_NAME).write_text(model_card(hub_cfg, published=True), encoding='utf-8')
        _check_upload_folder(staging, model)  # what is uploaded must load back into the same weights
        if dry_run is not None:
            return staging

        from huggingface_hub import HfApi
        from . import __version__

        api = HfApi(token=token, library_name='timm_capsules', library_version=__version__)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            revision=revision,
            commit_message=commit_message or f'Upload {hub_cfg["tag"]} ({hub_cfg["training"]["preset"]})',
        )
    if update_config and repo_id == hub_cfg['repo_id'] and not isinstance(config, Mapping):
        path = _config_path(config) if config is not None else hub_configs_dir() / f'{hub_cfg["tag"]}.json'
        hub_cfg['status'] = PUBLISHED
        hub_cfg['hub_commit'] = getattr(commit, 'oid', None)
        path.write_text(json.dumps(hub_cfg, indent=2) + '\n', encoding='utf-8')
    return commit


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
    repo = cache / f'models--{repo_id.replace("/", "--")}'
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
    table = sub.add_parser('table', help='print the model table (docs/hub.md)')
    group = table.add_mutually_exclusive_group()
    group.add_argument('--check', metavar='DOC', help='exit 1 if the table in DOC (docs/hub.md) is out of date')
    group.add_argument('--write', metavar='DOC', help='replace the table between the markers in DOC')
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
    except Exception as error:  # a model constructor's TypeError/AssertionError/...: one line, never a traceback
        where = getattr(args, 'checkpoint', None) or getattr(args, 'config', None) or getattr(args, 'folder', '')
        print(f'error: {where}: {type(error).__name__}: {error}', file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == 'push':
        result = push_checkpoint(
            args.checkpoint,
            repo_id=args.repo_id,
            config=args.config,
            dry_run=args.dry_run,
            commit_message=args.commit_message,
            private=args.private,
            revision=args.revision,
        )
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
            print(
                'model table is up to date'
                if ok
                else ('model table rewritten' if args.write else 'model table is out of date')
            )
            return 0 if ok or args.write else 1
        sys.stdout.write(_table_block(render_model_table()) + '\n')
    elif args.command == 'check':
        model = check_checkpoint(args.checkpoint)
        print(
            f'{args.checkpoint}: OK ({model.pretrained_cfg.get("architecture")}, '
            f'{sum(p.numel() for p in model.parameters()):,} params)'
        )
    elif args.command == 'record':
        cfg = record_results(args.config, args.top1, args.checkpoint_top1)
        print(json.dumps(cfg['results'], indent=2))
    elif args.command == 'cache':
        print(install_in_cache(args.folder, args.repo_id, args.cache_dir))
    return 0


if __name__ == '__main__':
    sys.exit(main())
