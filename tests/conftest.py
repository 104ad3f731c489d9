"""Shared test setup. Fetches timm's own model test suite (see tests/timm_suite/conftest.py)."""

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # nothing here may reach the Hub
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

import pytest  # noqa: E402

from timm_suite.fetch import fetch_timm_model_tests  # noqa: E402

# the Hub tests' published model (test_loading.py, test_hub_release.py, test_hub_cards.py)
from hub_published import offline, resnet, simple  # noqa: E402,F401

# the training tests' (test_train_*.py, test_run_safety.py, ...): a command line run in-process, a CPU Accelerator
from train_fixtures import accelerator, run  # noqa: E402,F401

# the compiled routing kernel, or a skip (test_routing.py, test_kernels.py)
from naive_routing import kernel  # noqa: E402,F401


def pytest_configure(config):
    if hasattr(config, 'workerinput'):
        return  # a pytest-xdist worker: the controller has fetched and built before it started the workers
    fetch_timm_model_tests()
    # build the fused routing kernels once, up front (about a minute each on a fresh machine), instead of
    # inside whichever test, or subprocess with its own timeout, routes first
    from timm_capsules.kernels import em_routing_kernel, routing_kernel

    routing_kernel()
    em_routing_kernel()


# ---- the MNIST-derived datasets' tests (DiverseMultiMNIST, affine MNIST) -----------------------------------


@pytest.fixture
def offline_mnist(monkeypatch):
    """No Hub, and no MNIST_DIR from the developer's shell: the built-in sample is the source."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.delenv('MNIST_DIR', raising=False)


@pytest.fixture(scope='module')
def train_digits():
    from timm_capsules.data import mnist

    return mnist.load_sample('train')


@pytest.fixture(scope='module')
def test_digits():
    from timm_capsules.data import mnist

    return mnist.load_sample('test')


@pytest.fixture
def figure(monkeypatch):
    """The previews' figures, kept open: pyplot.close is recorded instead of closing them."""
    import matplotlib.pyplot as plt

    kept, close = [], plt.close
    monkeypatch.setattr(plt, 'close', kept.append)
    yield kept
    for fig in kept:
        close(fig)
