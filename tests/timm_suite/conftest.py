"""Runs timm's own model test suite against the models this package registers.

timm parametrises its tests over every registered model at import; importing timm_capsules first
brings ours in, and ``pytest_collection_modifyitems`` keeps only our models' items.

Deselected, with the reason:
- tests that load pretrained weights from the Hub (``test_model_load_pretrained``,
  ``test_model_features_pretrained``, ``test_model_inference``): no network here; the Hub tests
  run them against a hand-made offline cache.
- ``test_model_forward_torchscript``: see EXCLUDED_TORCHSCRIPT below.
- tests written for one named timm model (no ``model_name`` parameter of ours).
"""
import timm

import timm_capsules  # noqa: F401  (registers our models before timm's tests parametrise)

OUR_MODELS = set(timm.list_models(module=['capsnet', 'baselines']))
HUB_TESTS = {'test_model_load_pretrained', 'test_model_features_pretrained', 'test_model_inference'}
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
        if 'timm_suite' not in str(item.path):
            keep.append(item)
            continue
        callspec = getattr(item, 'callspec', None)
        model_name = callspec.params.get('model_name') if callspec else None
        name = item.originalname
        ours = model_name in OUR_MODELS
        (keep if ours and name not in HUB_TESTS | EXCLUDED_TORCHSCRIPT else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
