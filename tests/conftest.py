"""Shared test setup. Fetches timm's own model test suite (see tests/timm_suite/conftest.py)."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # nothing here may reach the Hub
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

from timm_suite.fetch import fetch_timm_model_tests  # noqa: E402


def pytest_configure(config):
    fetch_timm_model_tests()
    # build the fused routing kernel once, up front (about a minute on a fresh machine), instead of
    # inside whichever test, or subprocess with its own timeout, routes first
    from timm_capsules.routing import routing_kernel
    routing_kernel()
