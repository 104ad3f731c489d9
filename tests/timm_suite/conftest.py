"""Runs timm's own model test suite against the models this package registers.

timm parametrises its tests over every registered model at import; importing timm_capsules first
brings ours in, and ``pytest_collection_modifyitems`` keeps only our models' items.

Pretrained loading (``test_model_load_pretrained``, ``test_model_features_pretrained``) runs offline for
every tag with a ``hub_configs/`` file: a session fixture pushes a randomly initialised model of each tag
with ``--dry-run``, places the folder in a hand-made Hugging Face cache and, for these tests only, points
huggingface_hub at it (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``). The hub configs still say "not yet published":
loading asks the Hub (here its cache), not them.

Deselected, with the reason:
- ``test_model_inference``: it compares against reference tensors stored in ``timm/`` Hub repos.
- the pretrained tests for tags without a hub config (the baselines' tags): no weights, no network.
- ``test_model_forward_torchscript``: see EXCLUDED_TORCHSCRIPT below.
- tests written for one named timm model (no ``model_name`` parameter of ours).
"""

import pytest
import timm

import timm_capsules  # noqa: F401  (registers our models before timm's tests parametrise)
from timm_capsules import hub

from hub_cache import offline_hub_cache

OUR_MODELS = set(timm.list_models(module=timm_capsules.MODEL_MODULES))
HUB_TESTS = {'test_model_load_pretrained', 'test_model_features_pretrained', 'test_model_inference'}
OFFLINE_HUB_TESTS = {'test_model_load_pretrained', 'test_model_features_pretrained'}  # run against the cache
HUB_TAGS = {cfg['tag'] for cfg in hub.list_hub_configs()}
# TorchScript cannot compile the routing schedule (NamedTuple capsules with optional activations,
# data-dependent Python control flow over layer lists); TorchScript is in maintenance mode in
# PyTorch 2.x, and torch.compile / torch.fx / torch.export are the supported paths, all tested.
EXCLUDED_TORCHSCRIPT = {'test_model_forward_torchscript'}
MARKERS = ['base', 'cfg', 'cfg_nonstd', 'torchscript', 'features', 'fxforward', 'fxbackward', 'forward', 'backward']


def pytest_configure(config):
    for marker in MARKERS:
        config.addinivalue_line('markers', f'{marker}: timm model test suite marker')


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        if 'timm_suite' not in str(item.path) or item.originalname == 'test_timm_model_suite':  # or the placeholder
            keep.append(item)
            continue
        callspec = getattr(item, 'callspec', None)
        model_name = callspec.params.get('model_name') if callspec else None
        name = item.originalname
        ours = model_name is not None and timm.models.split_model_name_tag(model_name)[0] in OUR_MODELS
        if name in HUB_TESTS:  # parametrised over '<model>.<tag>' names
            wanted = name in OFFLINE_HUB_TESTS and model_name in HUB_TAGS
        else:
            wanted = ours and name not in EXCLUDED_TORCHSCRIPT
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope='session')
def offline_hub_cache_dir(tmp_path_factory):
    """A Hugging Face cache holding a dry-run push of every hub_configs tag. Built once, on the first
    pretrained test."""
    root = tmp_path_factory.mktemp('offline_hub')
    cache = root / 'hub_cache'
    for cfg in hub.list_hub_configs():
        checkpoint, upload = root / cfg['tag'] / 'checkpoint', root / cfg['tag'] / 'upload'
        timm.models.save_for_hf(timm.create_model(cfg['model']), checkpoint, safe_serialization=True)
        hub.push_checkpoint(checkpoint, config=cfg['tag'], dry_run=upload)
        hub.install_in_cache(upload, cfg['repo_id'], cache)
        (checkpoint / 'model.safetensors').unlink()  # keep the disk footprint to one copy
    return cache


@pytest.fixture(autouse=True)
def _offline_hub_for_pretrained_tests(request):
    if getattr(request.node, 'originalname', None) not in OFFLINE_HUB_TESTS:
        yield
        return
    with offline_hub_cache(request.getfixturevalue('offline_hub_cache_dir')):
        yield
